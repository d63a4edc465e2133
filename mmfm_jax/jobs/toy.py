"""``python -m mmfm_jax toy``: the paper's R^10 experiment (trajectory length Len and W2^2), Compact vs Spread.

Per setting and seed: draw the target's train/held-out samples, fit the diagonal GMM with our EM, then train one
MLP velocity field per run (Gaussian/indep., GMM/indep., GMM/mode) -- all runs and seeds of a setting are trained
together under ``vmap`` in one jitted ``lax.scan``. The three runs of a seed share data, network init and noise
(common random numbers), so differences come from the source and the coupling only.

Metrics, per trained model, on ``eval.n_samples`` fresh source samples (GMM runs draw k from the weights):
- Len = mean over samples of the length of the learned ODE path from t = 1 to t = 0 (Euler on a uniform grid of
  ``eval.len_points`` points: sum |dt| ||v||);
- W2^2 = exact optimal-transport cost (squared Euclidean, uniform weights; scipy ``linear_sum_assignment``) between
  the generated samples and as many held-out target samples; the same cost between two held-out target sets is
  reported as the finite-sample floor;
- cost = E ||z0 - x|| under the training coupling (the length of the straight conditional paths).

Outputs in the workdir: ``report.md`` (table beside the paper's numbers), ``summary.json``, ``trajectories.png``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from scipy.optimize import linear_sum_assignment

from mmfm_jax.config_utils import ConfigError, check, check_choice, check_positive, validate_base
from mmfm_jax.flow.loss import fm_loss_per_sample, interpolate
from mmfm_jax.flow.samplers import euler_grid, euler_sample, euler_sample_with_length
from mmfm_jax.flow.time import TIME_KINDS, sample_time_per_example
from mmfm_jax.gmm.diag import DiagGMM
from mmfm_jax.gmm.source import SOURCE_KINDS, ModeSource, example_keys, sample_prior, sample_source
from mmfm_jax.models.mlp import MLPVelocity
from mmfm_jax.utils import progress

DEFAULT_CONFIG = "toy.py"
log = logging.getLogger("mmfm_jax")

# Third-party paper notes (see docs/toy.md): (Len, W2^2) per setting and run.
PAPER = {
    "compact": {"gaussian": (1.88, 1.252), "gmm_indep": (1.82, 1.251), "gmm_mode": (1.67, 1.248)},
    "spread": {"gaussian": (2.35, 1.582), "gmm_indep": (2.30, 1.631), "gmm_mode": (2.00, 1.556)},
}
LABELS = {"gaussian": ("Gaussian", "Indep."), "gmm_indep": ("GMM", "Indep."), "gmm_mode": ("GMM", "Mode")}


def validate(cfg: ml_collections.ConfigDict) -> None:
    validate_base(cfg)
    check(cfg, "dim", lambda v: isinstance(v, int) and v >= 2, "must be an int >= 2")
    check(cfg, "n_modes", lambda v: isinstance(v, int) and 1 <= v <= cfg.dim, "must be an int in [1, dim]")
    check(cfg, "within_scales", lambda v: len(v) == 2 and 0 < v[0] <= v[1], "must be (low, high) with 0 < low <= high")
    check(cfg, "settings", lambda v: len(v) >= 1, "needs at least one setting")
    for name in cfg.settings:
        check_positive(cfg, f"settings.{name}.radius", allow_zero=True)
    check(cfg, "runs", lambda v: len(v) >= 1 and len(set(v)) == len(v) and all(r in SOURCE_KINDS for r in v),
          f"must be distinct names from {SOURCE_KINDS}")
    check(cfg, "seeds", lambda v: isinstance(v, int) and v >= 1, "must be an int >= 1")
    for key in ("data.n_train", "model.width", "model.depth", "train.steps", "train.batch_size", "train.chunk",
                "eval.n_samples", "gmm.max_iter", "gmm.reg_covar"):
        check_positive(cfg, key)
    check(cfg, "model.n_freq", lambda v: isinstance(v, int) and v >= 0, "must be an int >= 0")
    check(cfg, "data.n_train", lambda v: v >= 2 * cfg.n_modes, "must be >= 2 * n_modes")
    check_positive(cfg, "train.lr")
    check(cfg, "train.final_lr_frac", lambda v: 0 <= v <= 1, "must be in [0, 1]")
    check_choice(cfg, "train.time_kind", TIME_KINDS)
    check(cfg, "train.time_shift", lambda v: v > 0, "must be > 0")
    check(cfg, "train.t_max", lambda v: 0 < v <= 1, "must be in (0, 1]")
    check_choice(cfg, "train.assignment", ("soft", "hard"))
    check_choice(cfg, "gmm.init", ("k-means++",))
    check(cfg, "eval.len_points", lambda v: isinstance(v, int) and v >= 2, "must be an int >= 2")
    check(cfg, "eval.plot_points", lambda v: isinstance(v, int) and v >= 2, "must be an int >= 2")
    check(cfg, "eval.plot_paths", lambda v: isinstance(v, int) and 0 <= v <= cfg.eval.n_samples,
          "must be an int in [0, eval.n_samples]")
    if cfg.eval.n_samples > 5000:
        raise ConfigError(f"config.eval.n_samples = {cfg.eval.n_samples}: exact OT is O(n^3); keep it <= 5000")
    check_choice(cfg, "mode", ("paper", "gm_steps"))
    if cfg.mode == "gm_steps":
        from mmfm_jax.jobs.toy_gm import METHODS

        check(cfg, "gm.setting", lambda v: v in cfg.settings, f"must name one of settings {tuple(cfg.settings)}")
        check(cfg, "gm.steps", lambda v: len(v) >= 1 and all(isinstance(s, int) and s >= 1 for s in v),
              "must be ints >= 1")
        check(cfg, "gm.methods", lambda v: len(v) >= 1 and all(m in METHODS for m in v), f"subset of {tuple(METHODS)}")
        check(cfg, "gm.trans_ratio", lambda v: 0 < v <= 1, "must be in (0, 1]")
        for key in ("gm.components", "gm.logstd_inner", "gm.weight_scale"):
            check_positive(cfg, key)
        check(cfg, "gm.ref_steps", lambda v: isinstance(v, int) and v >= 0, "must be an int >= 0 (0 = no reference)")
        check(cfg, "gm.substeps", lambda v: isinstance(v, int) and v >= 0, "must be an int >= 0 (0 = auto)")


# ----------------------------------------------------------------------------------------------------------------
# Target


def target_geometry(cfg: ml_collections.ConfigDict, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """(centres [m, d], A [d, d]): x = c_i + A z. The rotation depends only on ``geometry_seed``.

    With ``standardize``, both are scaled (exactly, from the geometry) so the target has zero mean and total
    variance d (mean per-dimension variance 1), the scale of the N(0, I) source -- as latents are normalised.
    """
    d, m = cfg.dim, cfg.n_modes
    q, r = np.linalg.qr(np.random.default_rng(cfg.geometry_seed).normal(size=(d, d)))
    rot = q * np.sign(np.diag(r))[None]
    a = rot * np.linspace(cfg.within_scales[0], cfg.within_scales[1], d)[None]
    e = np.eye(d)[:m]
    centres = radius * (e - e.mean(0, keepdims=True))
    if cfg.standardize:
        total = float((centres ** 2).sum(1).mean() + (a ** 2).sum())
        alpha = np.sqrt(d / total)
        centres, a = alpha * centres, alpha * a
    return centres, a


def sample_target(rng: np.random.Generator, centres: np.ndarray, a: np.ndarray, n: int) -> np.ndarray:
    i = rng.integers(0, centres.shape[0], n)
    return (centres[i] + rng.normal(size=(n, a.shape[0])) @ a.T).astype(np.float32)


def fit_source(x: np.ndarray, cfg: ml_collections.ConfigDict, seed: int, mesh=None) -> tuple[ModeSource, dict]:
    """Our EM on the training samples (sharded over ``mesh``); the toy's table is the GMM itself (L = 1, C = dim,
    per-dimension variances: ``z0 = mean_k + sqrt(var_k) * eps`` with var_k a vector)."""
    from mmfm_jax.gmm.em import fit

    gmm, info = fit(x, cfg.n_modes, mesh=mesh, seed=seed, init=cfg.gmm.init, max_iter=cfg.gmm.max_iter, tol=cfg.gmm.tol,
                    reg_covar=cfg.gmm.reg_covar)
    gmm = DiagGMM(*(jnp.asarray(np.asarray(a), jnp.float32) for a in (gmm.weights, gmm.means, gmm.variances)))
    src = ModeSource(gmm=gmm, means=gmm.means[:, None, :], variances=gmm.variances[:, None, :])
    return src, {k: info[k] for k in ("converged", "n_iter", "lower_bound") if k in info}


# ----------------------------------------------------------------------------------------------------------------
# Training and evaluation (jitted; models stacked over seeds, one entry per run)


def _draw(kind: str, src: ModeSource, x: jax.Array, keys: jax.Array, cfg) -> jax.Array:
    z0, _ = sample_source(kind, src, x, keys, (x.shape[0], 1, x.shape[1]), assignment=cfg.train.assignment)
    return z0[:, 0, :]


def make_train_chunk(cfg, graphdef, tx, kinds: tuple[str, ...]):
    b, n_train = cfg.train.batch_size, cfg.data.n_train
    tk = dict(kind=cfg.train.time_kind, shift=cfg.train.time_shift, t_max=cfg.train.t_max)

    def one_loss(p, step, xs, src, key, kind):
        keys = example_keys(jax.random.fold_in(key, step), jnp.arange(b))
        idx = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 2), (), 0, n_train))(keys)
        x = xs[idx]
        t = sample_time_per_example(jax.vmap(lambda k: jax.random.fold_in(k, 3))(keys), **tk)
        z0 = _draw(kind, src, x, keys, cfg)
        v = nnx.merge(graphdef, p)(interpolate(x, z0, t), t)
        return jnp.mean(fm_loss_per_sample(v, x, z0))

    def loss_fn(params, step, xs, srcs, train_keys):
        losses = {k: jax.vmap(lambda p, x, s, kk, kind=k: one_loss(p, step, x, s, kk, kind))(
            params[k], xs, srcs, train_keys) for k in kinds}
        return sum(jnp.sum(v) for v in losses.values()), losses

    def chunk(params, opt_state, steps, xs, srcs, train_keys):
        def body(carry, step):
            p, o = carry
            (_, losses), g = jax.value_and_grad(loss_fn, has_aux=True)(p, step, xs, srcs, train_keys)
            upd, o = tx.update(g, o, p)
            return (optax.apply_updates(p, upd), o), losses

        (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), steps)
        return params, opt_state, losses

    return jax.jit(chunk, donate_argnums=(0, 1))


def make_eval(cfg, graphdef, kinds: tuple[str, ...]):
    n, d, n_paths = cfg.eval.n_samples, cfg.dim, cfg.eval.plot_paths
    grid = euler_grid(cfg.eval.len_points, shift=1.0, t_end=1.0)  # uniform, t = 1 -> 0
    plot_grid = euler_grid(cfg.eval.plot_points, shift=1.0, t_end=1.0)

    def start(kind, src, keys):
        if kind == "gaussian":
            return sample_source("gaussian", None, None, keys, (keys.shape[0], 1, d))[0][:, 0]
        return sample_prior(src, keys)[0][:, 0]

    def one(p, src, key, x_test, kind):
        vel = lambda x, t: nnx.merge(graphdef, p)(x, t)  # noqa: E731
        keys = example_keys(key, jnp.arange(n))
        xf, length = euler_sample_with_length(vel, start(kind, src, keys), grid)
        cost = jnp.linalg.norm(_draw(kind, src, x_test, example_keys(jax.random.fold_in(key, 1), jnp.arange(n)),
                                     cfg) - x_test, axis=-1)
        traj = euler_sample(vel, start(kind, src, keys[:n_paths]), plot_grid, return_trajectory=True)[1]
        return xf, length, jnp.mean(cost), traj

    def run(params, srcs, eval_keys, x_test):
        return {k: jax.vmap(lambda p, s, kk, xt, kind=k: one(p, s, kk, xt, kind))(params[k], srcs, eval_keys, x_test)
                for k in kinds}

    return jax.jit(run)


def w2_squared(a: np.ndarray, b: np.ndarray) -> float:
    """Exact squared 2-Wasserstein distance between two equal-size empirical measures (uniform weights)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cost = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T
    r, c = linear_sum_assignment(cost)
    return float(np.maximum(cost[r, c], 0).mean())


# ----------------------------------------------------------------------------------------------------------------


def run_setting(cfg, ctx, fns, s_idx: int, name: str, radius: float) -> dict[str, Any]:
    """Data + GMM fits for every seed, then all runs x seeds trained together and evaluated."""
    kinds, seeds = tuple(cfg.runs), cfg.seeds
    mk, tx, chunk_fn, eval_fn = fns
    centres, a = target_geometry(cfg, radius)
    xs, tests, floors, srcs, gmm_info = [], [], [], [], []
    for s in range(seeds):
        rng = np.random.default_rng([cfg.seed, s_idx, s])
        xs.append(sample_target(rng, centres, a, cfg.data.n_train))
        tests.append(sample_target(rng, centres, a, cfg.eval.n_samples))
        floors.append(w2_squared(tests[-1], sample_target(rng, centres, a, cfg.eval.n_samples)))
        src, info = fit_source(xs[-1], cfg, seed=cfg.seed * 1000 + 10 * s_idx + s, mesh=ctx.mesh)
        srcs.append(src)
        gmm_info.append(info)
    log.info("toy/%s: GMM fits %s", name, gmm_info)
    srcs = jax.tree.map(lambda *v: jnp.stack(v), *srcs)
    xs_j, tests_j = jnp.asarray(np.stack(xs)), jnp.asarray(np.stack(tests))
    base = jax.random.fold_in(jax.random.key(cfg.seed), s_idx)
    seed_keys = jax.vmap(lambda s: jax.random.fold_in(base, s))(jnp.arange(seeds))
    purpose = lambda p: jax.vmap(lambda k: jax.random.fold_in(k, p))(seed_keys)  # noqa: E731
    train_keys, init_keys, eval_keys = purpose(0), purpose(1), purpose(2)
    state0 = jax.vmap(lambda k: nnx.split(mk(k))[1])(init_keys)  # same init for every run of a seed
    params = {k: jax.tree.map(jnp.copy, state0) for k in kinds}
    opt_state = tx.init(params)
    t0 = time.time()
    done, last = 0, {}
    with progress(total=cfg.train.steps, desc=f"toy/{name}") as bar:
        while done < cfg.train.steps:
            n = min(cfg.train.chunk, cfg.train.steps - done)
            params, opt_state, losses = chunk_fn(params, opt_state, jnp.arange(done, done + n), xs_j, srcs, train_keys)
            done += n
            last = {k: float(np.mean(np.asarray(v)[-max(1, n // 5):])) for k, v in losses.items()}
            ctx.writer.scalars(done, {f"{name}/{k}/loss": v for k, v in last.items()}, console=False)
            bar.update(n)
    train_s = time.time() - t0
    log.info("toy/%s: %d steps x %d models in %.1fs, final losses %s", name, cfg.train.steps, len(kinds) * seeds,
             train_s, {k: round(v, 4) for k, v in last.items()})

    t0 = time.time()
    out = jax.device_get(eval_fn(params, srcs, eval_keys, tests_j))
    runs: dict[str, Any] = {}
    for k in kinds:
        xf, length, cost, _ = out[k]
        lens = [float(np.mean(length[s])) for s in range(seeds)]
        w2s = [w2_squared(xf[s], tests[s]) for s in range(seeds)]
        runs[k] = dict(len_mean=float(np.mean(lens)), len_std=float(np.std(lens)), w2_mean=float(np.mean(w2s)),
                       w2_std=float(np.std(w2s)), len_per_seed=lens, w2_per_seed=w2s,
                       coupling_cost=float(np.mean(cost)), final_loss=last.get(k), paper=PAPER.get(name, {}).get(k))
    eval_s = time.time() - t0
    ln = {k: runs[k]["len_mean"] for k in kinds}
    shape_ok = None
    if set(kinds) == set(SOURCE_KINDS):
        shape_ok = bool(ln["gmm_mode"] < ln["gmm_indep"] <= ln["gaussian"])
    return dict(radius=radius, runs=runs, w2_floor_mean=float(np.mean(floors)), w2_floor_std=float(np.std(floors)),
                gmm=gmm_info, shape_ok=shape_ok, train_seconds=train_s, eval_seconds=eval_s,
                _plot=dict(traj={k: out[k][3][0] for k in kinds}, test=tests[0], centres=centres))


def _pm(m: float, s: float, nd: int) -> str:
    return f"{m:.{nd}f} ± {s:.{nd}f}"


def table(cfg, results: dict[str, Any]) -> str:
    """Markdown table: ours (mean ± std over seeds) beside the paper's numbers."""
    rows = ["| Setting | Source | Coupling | Len ↓ (ours) | W2² ↓ (ours) | E‖z0−x‖ (coupling) | Len (paper) "
            "| W2² (paper) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for k, v in r["runs"].items():
            p = v["paper"] or ("–", "–")
            rows.append(f"| {name.capitalize()} | {LABELS[k][0]} | {LABELS[k][1]} "
                        f"| {_pm(v['len_mean'], v['len_std'], 3)} | {_pm(v['w2_mean'], v['w2_std'], 3)} "
                        f"| {v['coupling_cost']:.3f} | {p[0]} | {p[1]} |")
        rows.append(f"| {name.capitalize()} | target vs target (floor) | – | – | "
                    f"{_pm(r['w2_floor_mean'], r['w2_floor_std'], 3)} | – | – | – |")
    return "\n".join(rows)


def markdown(cfg, results: dict[str, Any]) -> str:
    lines = [f"# Toy experiment (R^{cfg.dim}): trajectory length and W2²", "",
             f"{cfg.seeds} seeds; {cfg.train.steps} Adam steps (batch {cfg.train.batch_size}) per model; Len on "
             f"{cfg.eval.n_samples} source samples ({cfg.eval.len_points - 1} Euler steps, t = 1 -> 0); W2² = exact "
             f"OT between {cfg.eval.n_samples} generated and {cfg.eval.n_samples} held-out target samples. "
             "Design: docs/toy.md.", "", table(cfg, results), ""]
    for name, r in results.items():
        lines.append(f"- {name}: radius {r['radius']}; expected order Len(GMM/mode) < Len(GMM/indep) <= "
                     f"Len(Gaussian/indep): **{r['shape_ok']}**; GMM fits (EM): "
                     + ", ".join(f"n_iter={g.get('n_iter')} converged={g.get('converged')}" for g in r["gmm"])
                     + f"; train {r['train_seconds']:.0f}s, eval {r['eval_seconds']:.0f}s")
    lines += ["", "![trajectories](trajectories.png)", ""]
    return "\n".join(lines)


def plot(path, cfg, plots: dict[str, Any]) -> None:
    """Trajectories (seed 0), one panel per setting and run, projected on the plane where the m mode centres form
    a regular m-gon (x -> x C^T Q, Q the polygon's vertices): every mode is visible, none overlaps another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(plots)
    kinds = list(cfg.runs)
    fig, axes = plt.subplots(len(names), len(kinds), figsize=(4 * len(kinds), 4 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        pl = plots[name]
        c = np.asarray(pl["centres"], np.float64)
        ang = 2 * np.pi * np.arange(c.shape[0]) / c.shape[0]
        w = c.T @ np.stack([np.cos(ang), np.sin(ang)], 1)
        w *= float(np.linalg.norm(c, axis=1).max()) / max(float(np.linalg.norm(c @ w, axis=1).max()), 1e-12)
        if not np.isfinite(w).all() or np.abs(w).max() == 0:
            w = np.eye(c.shape[1])[:, :2]
        proj = lambda x, w=w: np.asarray(x) @ w  # noqa: E731
        tp = proj(pl["test"])
        for j, k in enumerate(kinds):
            ax = axes[i, j]
            ax.scatter(tp[:, 0], tp[:, 1], s=2, c="0.8", label="target")
            tr = proj(pl["traj"][k])  # [T, n, 2]
            for p in range(tr.shape[1]):
                ax.plot(tr[:, p, 0], tr[:, p, 1], lw=0.7, alpha=0.7)
            ax.scatter(tr[0, :, 0], tr[0, :, 1], s=6, c="k", marker="o", label="source (t=1)")
            ax.scatter(tr[-1, :, 0], tr[-1, :, 1], s=8, c="r", marker="x", label="sample (t=0)")
            ax.set_title(f"{name}: {LABELS[k][0]} / {LABELS[k][1]}")
            ax.set_aspect("equal", adjustable="datalim")
    axes[0, 0].legend(loc="best", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: ml_collections.ConfigDict, ctx) -> dict[str, Any]:
    if cfg.mode == "gm_steps":  # GMFlow vs Euler, sample quality vs number of steps (jobs/toy_gm.py)
        from mmfm_jax.jobs.toy_gm import run_gm_steps

        return run_gm_steps(cfg, ctx)
    kinds = tuple(cfg.runs)
    mk = lambda k: MLPVelocity(cfg.dim, cfg.model.width, cfg.model.depth, cfg.model.n_freq, rngs=nnx.Rngs(k))  # noqa
    graphdef = nnx.split(nnx.eval_shape(lambda: mk(0)))[0]
    tx = optax.adam(optax.cosine_decay_schedule(cfg.train.lr, cfg.train.steps, alpha=cfg.train.final_lr_frac))
    # built once: every setting has the same shapes, so each function compiles once
    fns = (mk, tx, make_train_chunk(cfg, graphdef, tx, kinds), make_eval(cfg, graphdef, kinds))
    results = {}
    for s_idx, name in enumerate(cfg.settings):
        results[name] = run_setting(cfg, ctx, fns, s_idx, name, float(cfg.settings[name].radius))
    plots = {n: r.pop("_plot") for n, r in results.items()}
    files = []
    if ctx.is_main:
        (ctx.workdir / "report.md").write_text(markdown(cfg, results))
        files.append("report.md")
        if cfg.eval.plot_paths > 0:
            plot(ctx.workdir / "trajectories.png", cfg, plots)
            files.append("trajectories.png")
    shape = [r["shape_ok"] for r in results.values()]
    return dict(settings=results, shape_ok=None if None in shape else all(shape), files=files,
                table=table(cfg, results))
