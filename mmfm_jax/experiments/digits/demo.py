"""``python -m mmfm_jax demo``: a small, real reproduction of MM-FM's claim on scikit-learn's digits.

Claim: a GMM source with mode coupling converges much faster than the Gaussian baseline. Data: the 8x8 digits;
latent = pixel tokens [64, 1] in [-1, 1] (L = 64 row-major pixels, C = 1); [CLS] vector = the flattened image.
The GMM is fitted with our sharded EM on the training split's [CLS] vectors; the spatial table (per-mode mean
latent + one scalar variance) comes from the same K-sharded spatial pass as the ImageNet pipeline (no flips:
digits are not mirror-symmetric). A tiny DiTDH is trained for the same budget in each setting with the
train job's program (``train.trainer.Trainer``: in-step coupling, EMA, AdamW, clipping):

- ``gaussian``: Gaussian source, independent coupling (the baseline);
- ``gmm_indep``: GMM source, independent coupling (modes drawn from the weights);
- ``gmm_mode``: GMM source, mode coupling (mode drawn from the image's [CLS] posterior), unconditional model;
- ``gmm_mode_cond``: the same, mode-conditional model (it sees k; k ~ weights at sampling time).

Every ``eval_every`` steps the EMA model samples ``eval_samples`` images (Euler, ``sampler.num_points`` points) and
is scored by a small MLP classifier trained in the job on the training split: Frechet distance in its penultimate
features against the training split ("FD"), and classifier mode coverage (classes that get at least a quarter of
their share of samples; and the total variation between the predicted-class histogram and the data's). Output:
``table.md`` (metric vs step), ``report.md``, ``summary.json``, ``convergence.png``, ``samples.png``,
``samples_<setting>.png`` (``report.py``), the steps each GMM setting needs to reach the baseline's final FD
(the speed-up, a bound), one TensorBoard run per setting (``tb/<setting>``: scalars and sample grids) and each
setting's EMA model in the train job's layout (``models/<setting>``; the GMM source in ``models/source``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from mmfm_jax import parallel
from mmfm_jax.config_utils import check, check_choice, check_positive, validate_base
from mmfm_jax.data import digits
from mmfm_jax.experiments.digits import gm
from mmfm_jax.experiments.digits.common import (
    SETTINGS,
    draw_source,
    fit_source,
    make_trainer,
    prepare,
    score,
    setting_config,
)
from mmfm_jax.experiments.digits.report import LABELS, write_outputs
from mmfm_jax.flow.samplers import euler_grid, euler_sample
from mmfm_jax.gmm.source import ModeSource, save_source
from mmfm_jax.storage import write_json_atomic
from mmfm_jax.train.config import checked_model_config
from mmfm_jax.utils import MetricWriter, progress

DEFAULT_CONFIG = "demo.py"
log = logging.getLogger("mmfm_jax")


def validate(cfg: ml_collections.ConfigDict) -> None:
    validate_base(cfg)
    checked_model_config(cfg)
    check_choice(cfg, "mode", ("convergence", "gm_steps"))
    if cfg.mode == "gm_steps":
        gm.validate_gm_steps(cfg)
    check(cfg, "settings", lambda v: len(v) > 0 and all(s in SETTINGS for s in v), f"subset of {tuple(SETTINGS)}")
    check(cfg, "settings", lambda v: "gaussian" in v, "must include 'gaussian' (the baseline the speed-up is "
          "measured against)")
    for key in ("train.num_steps", "eval_every", "eval_samples", "gmm.n_components", "train.global_batch_size"):
        check_positive(cfg, key)
    check(cfg, "sampler.num_points", lambda v: v >= 2, "must be >= 2")
    check(cfg, "eval_extra", lambda v: all(isinstance(e, int) and 0 < e <= cfg.train.num_steps for e in v),
          "must be steps in [1, train.num_steps] (extra evaluations besides every eval_every)")


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
    c = setting_config(cfg, name)
    mesh = ctx.mesh
    trainer, state, it = make_trainer(c, mesh, train, src)
    source = trainer.source
    sampler = make_sampler(c, mesh, trainer.model_def, trainer.model_config, source, SETTINGS[name][0])
    n_eval = int(cfg.eval_samples)
    n_pad = -(-n_eval // parallel.batch_size_multiple(mesh)) * parallel.batch_size_multiple(mesh)
    idx = parallel.host_to_global(np.arange(n_pad, dtype=np.int32), mesh)
    curve, losses = [], []
    extra = {int(e) for e in cfg.get("eval_extra", ())}  # early evaluations: the speed-up is measured, not bounded
    t0 = time.time()
    writer = MetricWriter(ctx.path("tb", name))  # one TensorBoard run per setting: the curves overlay
    bar = progress(total=int(c.train.num_steps), desc=name)
    for step in range(1, int(c.train.num_steps) + 1):
        state, m = trainer.train_step(state, trainer.put_batch(next(it)))
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


def run(cfg: ml_collections.ConfigDict, ctx) -> dict:
    if cfg.mode == "gm_steps":  # GMFlow vs Euler, FD vs number of steps (gm.py)
        return gm.run_gm_steps(cfg, ctx)
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
