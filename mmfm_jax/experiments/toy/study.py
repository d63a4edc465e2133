"""The toy study's ``paper`` mode: Len and W2^2 per setting for a Gaussian source, a GMM source with independent
coupling and a GMM source with mode coupling.

Per setting and seed: draw the target's train/held-out samples, fit the diagonal GMM with our EM, then train one
MLP velocity field per run -- all runs and seeds of a setting are trained together under ``vmap`` in one jitted
``lax.scan``. The runs of a seed share data, network init and noise (common random numbers), so differences come
from the source and the coupling only. Metrics: see :mod:`mmfm_jax.experiments.toy.job`.
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

from mmfm_jax.experiments.toy import loop, report
from mmfm_jax.experiments.toy.target import setting_data, w2_squared
from mmfm_jax.flow.loss import fm_loss_per_sample, interpolate
from mmfm_jax.flow.samplers import euler_grid, euler_sample, euler_sample_with_length
from mmfm_jax.flow.time import sample_time_per_example
from mmfm_jax.gmm.source import SOURCE_KINDS, ModeSource, example_keys, sample_prior, sample_source
from mmfm_jax.models.mlp import MLPVelocity

log = logging.getLogger("mmfm_jax")


def coupled_source(kind: str, src: ModeSource, x: jax.Array, keys: jax.Array, assignment: str) -> jax.Array:
    """z0 [B, d] paired with data x [B, d] under the run's source and coupling (``sample_source`` on the toy's
    one-token table, x itself playing the [CLS] vector)."""
    z0, _ = sample_source(kind, src, x, keys, (x.shape[0], 1, x.shape[1]), assignment=assignment)
    return z0[:, 0, :]


def make_train_chunk(cfg: ml_collections.ConfigDict, graphdef, tx, kinds: tuple[str, ...]):
    """jit: (params {kind: [seeds, ...]}, opt_state, steps [n], xs [seeds, n_train, d], srcs [seeds], keys [seeds])
    -> (params, opt_state, losses {kind: [n, seeds]}), donating params and opt_state."""
    b, n_train = cfg.train.batch_size, cfg.data.n_train
    tk = dict(kind=cfg.train.time_kind, shift=cfg.train.time_shift, t_max=cfg.train.t_max)

    def one_loss(p, step, xs, src, key, kind):
        keys = example_keys(jax.random.fold_in(key, step), jnp.arange(b))
        idx = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 2), (), 0, n_train))(keys)
        x = xs[idx]
        t = sample_time_per_example(jax.vmap(lambda k: jax.random.fold_in(k, 3))(keys), **tk)
        z0 = coupled_source(kind, src, x, keys, cfg.train.assignment)
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


def make_eval(cfg: ml_collections.ConfigDict, graphdef, kinds: tuple[str, ...]):
    """jit: (params, srcs, eval_keys, x_test [seeds, n, d]) -> {kind: (samples [seeds, n, d], path length
    [seeds, n], coupling cost [seeds], plot trajectories [seeds, T, plot_paths, d])}."""
    n, d, n_paths = cfg.eval.n_samples, cfg.dim, cfg.eval.plot_paths
    grid = euler_grid(cfg.eval.len_points, shift=1.0, t_end=1.0)  # uniform, t = 1 -> 0
    plot_grid = euler_grid(cfg.eval.plot_points, shift=1.0, t_end=1.0)

    def start(kind, src, keys):
        if kind == "gaussian":
            return sample_source("gaussian", None, None, keys, (keys.shape[0], 1, d))[0][:, 0]
        return sample_prior(src, keys)[0][:, 0]

    def one(p, src, key, x_test, kind):
        vel = lambda x, t: nnx.merge(graphdef, p)(x, t)
        keys = example_keys(key, jnp.arange(n))
        xf, length = euler_sample_with_length(vel, start(kind, src, keys), grid)
        ckeys = example_keys(jax.random.fold_in(key, 1), jnp.arange(n))
        cost = jnp.linalg.norm(coupled_source(kind, src, x_test, ckeys, cfg.train.assignment) - x_test, axis=-1)
        traj = euler_sample(vel, start(kind, src, keys[:n_paths]), plot_grid, return_trajectory=True)[1]
        return xf, length, jnp.mean(cost), traj

    def run(params, srcs, eval_keys, x_test):
        return {k: jax.vmap(lambda p, s, kk, xt, kind=k: one(p, s, kk, xt, kind))(params[k], srcs, eval_keys, x_test)
                for k in kinds}

    return jax.jit(run)


def run_setting(cfg: ml_collections.ConfigDict, ctx, fns: tuple, s_idx: int, name: str,
                radius: float) -> dict[str, Any]:
    """Data + GMM fits for every seed, then all runs x seeds trained together and evaluated."""
    kinds, seeds = tuple(cfg.runs), cfg.seeds
    mk, tx, chunk_fn, eval_fn = fns
    data = setting_data(cfg, s_idx, radius, mesh=ctx.mesh)
    tests, gmm_info = data["tests"], data["gmm_info"]
    log.info("toy/%s: GMM fits %s", name, gmm_info)
    srcs = jax.tree.map(lambda *v: jnp.stack(v), *data["srcs"])
    xs_j, tests_j = jnp.asarray(np.stack(data["xs"])), jnp.asarray(np.stack(tests))
    train_keys, init_keys, eval_keys = loop.seed_keys(cfg.seed, s_idx, seeds)
    state0 = jax.vmap(lambda k: nnx.split(mk(k))[1])(init_keys)  # same init for every run of a seed
    params = {k: jax.tree.map(jnp.copy, state0) for k in kinds}
    opt_state = tx.init(params)
    t0 = time.time()
    params, opt_state, last = loop.train_chunks(
        cfg, ctx, chunk_fn, params, opt_state, (xs_j, srcs, train_keys), desc=f"toy/{name}", prefix=name,
        summarize=lambda losses, n: {k: float(np.mean(loop.tail(v, n))) for k, v in losses.items()})
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
                       coupling_cost=float(np.mean(cost)), final_loss=last.get(k),
                       paper=report.PAPER.get(name, {}).get(k))
    eval_s = time.time() - t0
    ln = {k: runs[k]["len_mean"] for k in kinds}
    shape_ok = None
    if set(kinds) == set(SOURCE_KINDS):
        shape_ok = bool(ln["gmm_mode"] < ln["gmm_indep"] <= ln["gaussian"])
    return dict(radius=radius, runs=runs, w2_floor_mean=float(np.mean(data["floors"])),
                w2_floor_std=float(np.std(data["floors"])), gmm=gmm_info, shape_ok=shape_ok, train_seconds=train_s,
                eval_seconds=eval_s, _plot=dict(traj={k: out[k][3][0] for k in kinds}, test=tests[0],
                                                centres=data["centres"]))


def run_paper(cfg: ml_collections.ConfigDict, ctx) -> dict[str, Any]:
    """Every setting in turn; writes ``report.md`` and ``trajectories.png``; returns the job's summary."""
    kinds = tuple(cfg.runs)
    mk = lambda k: MLPVelocity(cfg.dim, cfg.model.width, cfg.model.depth, cfg.model.n_freq, rngs=nnx.Rngs(k))
    graphdef = nnx.split(nnx.eval_shape(lambda: mk(0)))[0]
    tx = loop.optimizer(cfg)
    # built once: every setting has the same shapes, so each function compiles once
    fns = (mk, tx, make_train_chunk(cfg, graphdef, tx, kinds), make_eval(cfg, graphdef, kinds))
    results = {}
    for s_idx, name in enumerate(cfg.settings):
        results[name] = run_setting(cfg, ctx, fns, s_idx, name, float(cfg.settings[name].radius))
    plots = {n: r.pop("_plot") for n, r in results.items()}
    files = []
    if ctx.is_main:
        (ctx.workdir / "report.md").write_text(report.markdown(cfg, results))
        files.append("report.md")
        if cfg.eval.plot_paths > 0:
            report.plot(ctx.workdir / "trajectories.png", cfg, plots)
            files.append("trajectories.png")
    shape = [r["shape_ok"] for r in results.values()]
    return dict(settings=results, shape_ok=None if None in shape else all(shape), files=files,
                table=report.table(cfg, results))
