"""``python -m mmfm_jax demo``: a small, real reproduction of MM-FM's claim on scikit-learn's digits.

Claim: a GMM source with mode coupling converges much faster than the Gaussian baseline. Data: the 8x8 digits;
latent = pixel tokens [64, 1] in [-1, 1] (L = 64 row-major pixels, C = 1); [CLS] vector = the flattened image.
The GMM is fitted with our sharded EM on the training split's [CLS] vectors; the spatial table (per-mode mean
latent + one scalar variance) comes from the same K-sharded spatial pass as the ImageNet pipeline (no flips:
digits are not mirror-symmetric). A tiny DiTDH is trained for the same budget in each setting with the real
train step (in-step coupling, EMA, AdamW, clipping):

- ``gaussian``: Gaussian source, independent coupling (the baseline);
- ``gmm_indep``: GMM source, independent coupling (modes drawn from the weights);
- ``gmm_mode``: GMM source, mode coupling (mode drawn from the image's [CLS] posterior), unconditional model;
- ``gmm_mode_cond``: the same, mode-conditional model (it sees k; k ~ weights at sampling time).

Every ``eval_every`` steps the EMA model samples ``eval_samples`` images (Euler, ``sampler.num_points`` points) and
is scored by a small MLP classifier trained in the job on the training split: Frechet distance in its penultimate
features against the training split ("FD"), and classifier mode coverage (classes that get at least a quarter of
their share of samples; and the total variation between the predicted-class histogram and the data's). Output:
``table.md`` (metric vs step), ``report.md``, ``summary.json``, ``convergence.png``, ``samples.png``,
``samples_<setting>.png`` (``jobs/demo_report.py``), the steps each GMM setting needs to reach the baseline's final FD
(the speed-up, a bound), one TensorBoard run per setting (``tb/<setting>``: scalars and sample grids) and each
setting's EMA model in the train job's layout (``models/<setting>``; the GMM source in ``models/source``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mmfm_jax import parallel
from mmfm_jax.config_utils import check, check_choice, check_positive, validate_base
from mmfm_jax.data import digits
from mmfm_jax.data import latents as latents_lib
from mmfm_jax.eval import classifier as clf_lib
from mmfm_jax.eval.metrics import feature_stats, frechet_distance
from mmfm_jax.flow.samplers import euler_grid, euler_sample
from mmfm_jax.gmm import em, spatial
from mmfm_jax.gmm.source import ModeSource, sample_prior, sample_source, save_source, shard_source
from mmfm_jax.jobs.demo_report import LABELS, write_outputs
from mmfm_jax.jobs.train import checked_model_config, model_config, step_config
from mmfm_jax.models.ditdh import DiTDH
from mmfm_jax.storage import write_json_atomic
from mmfm_jax.train.optim import optimizer_from_config
from mmfm_jax.train.state import create_train_state
from mmfm_jax.train.step import make_train_step, put_batch
from mmfm_jax.utils import MetricWriter, progress

DEFAULT_CONFIG = "demo.py"
SETTINGS = {  # name -> (source kind, model sees the mode)
    "gaussian": ("gaussian", False),
    "gmm_indep": ("gmm_indep", False),
    "gmm_mode": ("gmm_mode", False),
    "gmm_mode_cond": ("gmm_mode", True),
}
log = logging.getLogger("mmfm_jax")


def validate(cfg: ml_collections.ConfigDict) -> None:
    validate_base(cfg)
    checked_model_config(cfg)
    check_choice(cfg, "mode", ("convergence", "gm_steps"))
    if cfg.mode == "gm_steps":
        from mmfm_jax.jobs.demo_gm import validate_gm_steps

        validate_gm_steps(cfg)
    check(cfg, "settings", lambda v: len(v) > 0 and all(s in SETTINGS for s in v), f"subset of {tuple(SETTINGS)}")
    check(cfg, "settings", lambda v: "gaussian" in v, "must include 'gaussian' (the baseline the speed-up is "
          "measured against)")
    for key in ("train.num_steps", "eval_every", "eval_samples", "gmm.n_components", "train.global_batch_size"):
        check_positive(cfg, key)
    check(cfg, "sampler.num_points", lambda v: v >= 2, "must be >= 2")
    check(cfg, "eval_extra", lambda v: all(isinstance(e, int) and 0 < e <= cfg.train.num_steps for e in v),
          "must be steps in [1, train.num_steps] (extra evaluations besides every eval_every)")


def fit_source(cfg, mesh, train: dict[str, np.ndarray]) -> tuple[ModeSource, dict]:
    """EM on the [CLS] vectors, then the spatial pass (hard assignment, per-mode mean + scalar variance)."""
    g = cfg.gmm
    gmm, info = em.fit(train["cls"], int(g.n_components), mesh=mesh, seed=int(cfg.seed), max_iter=int(g.max_iter),
                       tol=float(g.tol), reg_covar=float(g.reg_covar), chunk_size=int(g.chunk_size))
    from mmfm_jax.gmm.diag import predict

    labels = np.asarray(predict(gmm, jnp.asarray(train["cls"])))
    n, tokens, ch = train["latent"].shape
    st = spatial.init_stats(int(g.n_components), tokens * ch, mesh)
    gb = -(-n // parallel.batch_size_multiple(mesh)) * parallel.batch_size_multiple(mesh)
    lat = np.zeros((gb, tokens, ch), np.float32)
    lat[:n] = train["latent"]
    lab = np.zeros(gb, np.int32)
    lab[:n] = labels
    valid = np.arange(gb) < n
    b = parallel.host_to_global({"x": lat, "l": lab, "v": valid}, mesh)
    st = spatial.accumulate(st, b["x"], b["l"], b["v"], mesh=mesh, height=digits.HEIGHT, width=digits.WIDTH,
                            flip=False)
    means, var, counts = spatial.finalize(st, int(g.n_components), tokens, ch)
    src = ModeSource(gmm=gmm, means=np.asarray(means), variances=np.asarray(var))
    return src, dict(em_iterations=int(info["n_iter"]), em_converged=bool(info["converged"]),
                     em_lower_bound=float(info["lower_bound"]), empty_modes=int((np.asarray(counts) == 0).sum()),
                     mode_variance_mean=float(np.mean(var)))


def _setting_config(cfg, name: str) -> ml_collections.ConfigDict:
    kind, cond = SETTINGS[name]
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.source.kind = kind
    c.source.y_from = "mode" if cond else "none"
    c.model.use_y_conditioning = cond
    c.adaptive.enabled = bool(cfg.adaptive.enabled) and kind != "gaussian"
    return c


def draw_source(base: jax.Array, kind: str, source: ModeSource | None, indices: jax.Array):
    """Sampling-time source draw for sample ``i`` keyed by ``fold_in(base, i)`` -> (z0 [B, 64, 1], k [B])."""
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)
    if kind == "gaussian":
        return sample_source("gaussian", None, None, keys, (indices.shape[0], 64, 1))
    return sample_prior(source, keys)


def make_sampler(cfg, mesh, mdef_graph, mcfg, src: ModeSource | None, kind: str):
    grid = euler_grid(int(cfg.sampler.num_points), float(cfg.sampler.shift), float(cfg.sampler.t_end))
    base = jax.random.PRNGKey(int(cfg.seed) + 7)

    @jax.jit
    def sample(ema, buffers, source, indices):
        z0, k = draw_source(base, kind, source, indices)
        model = nnx.merge(mdef_graph.graphdef, nnx.State(ema), nnx.State(buffers))
        y = k if mcfg.use_y_conditioning else None
        return euler_sample(lambda x, t: model(x, t, y), z0, grid)

    return sample


def build_trainer(c: ml_collections.ConfigDict, mesh, name: str, train: dict, src: ModeSource | None):
    """The real train step for one setting's config ``c``: ``(state, step_fn, step_config, mdef, model_config,
    placed source or None, data iterator)``."""
    mcfg = model_config(c)
    ds = latents_lib.InMemoryLatents(train)
    scfg = step_config(c, ds.latent_shape, src.n_modes if src is not None else mcfg.num_modes)
    tx, lr_fn, ema_fn = optimizer_from_config(c.train)
    state, shardings, mdef = create_train_state(lambda r: DiTDH(mcfg, r), tx, mesh, int(c.seed),
                                                scfg.adaptive.num_modes)
    step_fn = make_train_step(mdef, tx, lr_fn, ema_fn, scfg, mesh, shardings)
    source = shard_source(src, mesh) if (src is not None and SETTINGS[name][0] != "gaussian") else None
    it = latents_lib.make_iterator(ds, int(c.train.global_batch_size), seed=int(c.seed), num_threads=1, prefetch=2)
    return state, step_fn, scfg, mdef, mcfg, source, it


def save_model(ctx, c: ml_collections.ConfigDict, name: str, state, step: int, source_dir: str | None) -> str:
    """The EMA model (the whole train state) in the train job's layout: ``models/<name>/config.json`` +
    ``checkpoints/<step>/state``, loadable like a train workdir (``sample`` with ``model.kind='train'``)."""
    from mmfm_jax.train.checkpoint import Checkpointer

    out = ctx.path("models", name)
    saved = ml_collections.ConfigDict(c.to_dict())
    saved.source.path = source_dir or ""
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "config.json", saved.to_dict())
    ckpt = Checkpointer(out / "checkpoints", max_to_keep=1, async_save=False)
    ckpt.save(step, state, None, saved.to_dict())
    ckpt.close()
    return str(out)


def run_setting(cfg, ctx, name: str, train: dict, src: ModeSource | None, clf, ref_stats,
                source_dir: str | None = None) -> dict[str, Any]:
    c = _setting_config(cfg, name)
    mesh = ctx.mesh
    state, step_fn, scfg, mdef, mcfg, source, it = build_trainer(c, mesh, name, train, src)
    sampler = make_sampler(c, mesh, mdef, mcfg, source, SETTINGS[name][0])
    n_eval = int(cfg.eval_samples)
    n_pad = -(-n_eval // parallel.batch_size_multiple(mesh)) * parallel.batch_size_multiple(mesh)
    idx = parallel.host_to_global(np.arange(n_pad, dtype=np.int32), mesh)
    curve, losses = [], []
    extra = {int(e) for e in cfg.get("eval_extra", ())}  # early evaluations: the speed-up is measured, not bounded
    t0 = time.time()
    writer = MetricWriter(ctx.path("tb", name))  # one TensorBoard run per setting: the curves overlay
    bar = progress(total=int(c.train.num_steps), desc=name)
    for step in range(1, int(c.train.num_steps) + 1):
        state, m = step_fn(state, put_batch(next(it), mesh, scfg), source)
        losses.append(m["loss"])
        bar.update(1)
        if step % int(cfg.eval_every) == 0 or step == int(c.train.num_steps) or step in extra:
            x = np.asarray(parallel.global_to_host(sampler(state.ema, state.buffers, source, idx)))[:n_eval]
            sc = score(clf, ref_stats, x)
            loss = float(np.mean(jax.device_get(losses)))
            losses = []
            curve.append(dict(step=step, **sc, loss=loss))
            log.info("demo: %s step %d: FD %.3f, class-histogram TV %.3f, coverage %.2f, loss %.4f", name, step,
                     sc["fd"], sc["tv"], sc["covered"], loss)
            writer.scalars(step, {"demo/fd": sc["fd"], "demo/covered": sc["covered"], "demo/tv": sc["tv"],
                                  "demo/loss": loss}, console=False)
            writer.image("demo/samples", step, digits.image_grid(digits.to_images(x[:64]), cols=8)[..., None])
    bar.close()
    it.close()
    writer.close()
    model_dir = save_model(ctx, c, name, state, int(c.train.num_steps), source_dir)
    return dict(curve=curve, seconds=time.time() - t0, final=curve[-1], samples=x, model_dir=model_dir)


def steps_to_reach(curve: list[dict], target: float) -> int | None:
    for row in curve:
        if row["fd"] <= target:
            return int(row["step"])
    return None


def prepare(cfg) -> dict[str, Any]:
    """The digits split, the scoring classifier (trained on the training split), its test accuracy, the reference
    feature statistics and class frequencies, and the FD floor (held-out split vs training split)."""
    data = digits.load_digits_split(float(cfg.test_fraction), int(cfg.seed))
    train = data["train"]
    clf = clf_lib.train_classifier(train["cls"], train["label"], 10, steps=int(cfg.classifier_steps),
                                   seed=int(cfg.seed))
    _, test_pred = clf_lib.features_and_predictions(clf, data["test"]["cls"])
    clf_acc = float(np.mean(test_pred == data["test"]["label"]))
    ref_feats, _ = clf_lib.features_and_predictions(clf, train["cls"])
    freq = np.bincount(train["label"], minlength=10) / len(train["label"])
    ref_stats = {"fd": feature_stats(ref_feats), "freq": freq}
    test_feats, _ = clf_lib.features_and_predictions(clf, data["test"]["cls"])
    fd_floor = float(frechet_distance(*feature_stats(test_feats), *ref_stats["fd"]))
    tv_floor = clf_lib.mode_coverage(test_pred, 10, freq)["tv"]
    log.info("demo: classifier test accuracy %.3f; held-out split vs training split: FD %.3f, class-histogram TV "
             "%.3f (the floors)", clf_acc, fd_floor, tv_floor)
    return dict(train=train, clf=clf, clf_acc=clf_acc, ref_stats=ref_stats, fd_floor=fd_floor, tv_floor=tv_floor)


def score(clf, ref_stats, x: np.ndarray) -> dict[str, float]:
    """FD (classifier features, against the training split) and class coverage of samples x [n, 64, 1]."""
    n = x.shape[0]
    feats, pred = clf_lib.features_and_predictions(clf, np.clip(x.reshape(n, -1), -1.5, 1.5))
    cov = clf_lib.mode_coverage(pred, 10, ref_stats["freq"])
    return dict(fd=float(frechet_distance(*feature_stats(feats), *ref_stats["fd"])), covered=cov["covered"],
                tv=cov["tv"])


def run(cfg: ml_collections.ConfigDict, ctx) -> dict:
    if cfg.mode == "gm_steps":  # GMFlow vs Euler, FD vs number of steps (jobs/demo_gm.py)
        from mmfm_jax.jobs.demo_gm import run_gm_steps

        return run_gm_steps(cfg, ctx)
    t0 = time.time()
    prep = prepare(cfg)
    train, clf, clf_acc, ref_stats, fd_floor = (prep[k] for k in ("train", "clf", "clf_acc", "ref_stats", "fd_floor"))
    needs_gmm = any(SETTINGS[s][0] != "gaussian" for s in cfg.settings)
    src, gmm_info = (fit_source(cfg, ctx.mesh, train) if needs_gmm else (None, {}))
    source_dir = None
    if src is not None:
        source_dir = str(ctx.path("models", "source"))
        save_source(source_dir, src, {"job": "demo", "gmm": gmm_info})
    results = {}
    for name in cfg.settings:
        log.info("demo: training %s (%s) for %d steps", name, LABELS.get(name, name), cfg.train.num_steps)
        results[name] = run_setting(cfg, ctx, name, train, src, clf, ref_stats,
                                    source_dir if SETTINGS[name][0] != "gaussian" else None)
        log.info("demo: %s final FD %.3f, coverage %.2f (%.0f s); EMA model in %s", name,
                 results[name]["final"]["fd"], results[name]["final"]["covered"], results[name]["seconds"],
                 results[name]["model_dir"])
    base_fd = results["gaussian"]["final"]["fd"]
    base_steps = int(cfg.train.num_steps)
    speedups = {}
    for name, r in results.items():
        s = steps_to_reach(r["curve"], base_fd)
        speedups[name] = dict(steps_to_baseline_final_fd=s, speedup=(base_steps / s) if s else None)
    if ctx.is_main:
        write_outputs(cfg, ctx, results, speedups, dict(classifier_test_accuracy=clf_acc, fd_test_vs_train=fd_floor,
                                                        tv_test_vs_train=prep["tv_floor"], **gmm_info), train["latent"])
    return dict(settings=list(cfg.settings), steps=base_steps, classifier_test_accuracy=clf_acc,
                fd_test_vs_train=fd_floor, tv_test_vs_train=prep["tv_floor"], gmm=gmm_info, baseline_final_fd=base_fd,
                models={n: r["model_dir"] for n, r in results.items()}, source_dir=source_dir,
                final={n: r["final"] for n, r in results.items()}, speedup=speedups,
                curves={n: r["curve"] for n, r in results.items()}, total_seconds=time.time() - t0)
