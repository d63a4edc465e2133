"""The toy job's ``gm_steps`` mode: sample quality vs number of steps, Euler on a velocity MLP against GMFlow's
GM-ODE / GM-SDE on a GM MLP trained for the same budget, with a Gaussian and an MM-FM GMM source (R^10, W2^2).

Per seed: the target of one setting (``gm.setting``) and its GMM fit as in the paper mode (``jobs/toy.py``). Four
models per seed: {velocity, GM head} x {Gaussian source, GMM source with mode coupling}; on the GMM source the model
is mode-conditional (it sees k as a one-hot), so every GMFlow closed form exists (``docs/gmflow.md``). All four
share the data, the network's hidden-layer initialisation and every random number; the Gaussian source is the GMM's
table with zero means and unit variances (so ``z0 = eps`` exactly) and a hidden mode (one-hot of -1 = zeros): the
two sources run as one ``vmap`` axis, the seeds as another. Velocity models train on the flow-matching MSE, GM models
on the transition NLL (``gm.trans_ratio``), same steps, batch, time sampler and Adam schedule.

Evaluation, for every number of steps N in ``gm.steps``: ``eval.n_samples`` samples per model from fresh source
draws (k ~ weights), W2^2 (exact OT) against as many held-out target samples. Methods: Euler on the velocity model
(uniform grid, N evaluations, down to t = 0), Euler on the GM model's mean velocity, GM-ODE (order 1 and 2,
``max(2, ceil(128 / N))`` substeps as the paper, or ``gm.substeps``) and GM-SDE (order 1 and 2), N evaluations each;
plus Euler with ``gm.ref_steps`` steps on the velocity model (its converged quality). Outputs: ``report.md``,
``summary.json`` (the table and every per-seed value).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mmfm_jax.experiments.gm_report import METHODS, gm_beats_euler, steps_table
from mmfm_jax.flow import gmflow
from mmfm_jax.flow.gm_ops import GaussianSource
from mmfm_jax.flow.loss import fm_loss_per_sample, interpolate
from mmfm_jax.flow.samplers import euler_grid, euler_sample
from mmfm_jax.flow.time import sample_time_per_example
from mmfm_jax.gmm.source import ModeSource, example_keys, sample_prior, sample_source
from mmfm_jax.models.mlp import MLPVelocity
from mmfm_jax.utils import progress

log = logging.getLogger("mmfm_jax")
SOURCES = ("gaussian", "gmm_mode")
HEADS = ("velocity", "gm")
SOURCE_LABELS = {"gaussian": "Gaussian", "gmm_mode": "GMM + mode coupling (mode-cond.)"}


def _model(cfg, head: str, key: Any) -> MLPVelocity:
    g = cfg.gm
    return MLPVelocity(cfg.dim, cfg.model.width, cfg.model.depth, cfg.model.n_freq, rngs=nnx.Rngs(key), head=head,
                       num_modes=cfg.n_modes, gm_components=g.components, gm_logstd_inner=g.logstd_inner)


def _mode_gaussian(src: ModeSource, k: jax.Array) -> GaussianSource:
    """The drawn modes' Gaussians in x layout [B, 1, D] (toy tables: per-dimension variances)."""
    return GaussianSource(jnp.take(src.means, k, axis=0), jnp.sqrt(jnp.take(src.variances, k, axis=0)))


def make_train_chunk(cfg, graphdefs: dict, tx):
    b, n_train, d = cfg.train.batch_size, cfg.data.n_train, cfg.dim
    tk = dict(kind=cfg.train.time_kind, shift=cfg.train.time_shift, t_max=cfg.train.t_max)

    def one_loss(p, head, step, xs, src, cond, key):
        keys = example_keys(jax.random.fold_in(key, step), jnp.arange(b))
        idx = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 2), (), 0, n_train))(keys)
        x = xs[idx]
        t = sample_time_per_example(jax.vmap(lambda k: jax.random.fold_in(k, 3))(keys), **tk)
        z0, k = sample_source("gmm_mode", src, x, keys, (b, 1, d), assignment=cfg.train.assignment)
        y = jnp.where(cond, k, -1)
        model = nnx.merge(graphdefs[head], p)
        if head == "velocity":
            return jnp.mean(fm_loss_per_sample(model(interpolate(x, z0[:, 0], t), t, y), x, z0[:, 0]))
        noise = jax.vmap(lambda kk: jax.random.normal(jax.random.fold_in(kk, 4), (1, d)))(keys)
        gsrc = _mode_gaussian(src, k)
        batch = gmflow.transition_inputs(x[:, None], z0, t, noise, cfg.gm.trans_ratio, gsrc)
        gm = model(batch.x_high[:, 0], batch.t_high, y)
        return jnp.mean(gmflow.transition_nll(gm, batch, gsrc, cfg.gm.weight_scale))

    def loss_fn(params, step, xs, srcs, conds, keys):
        # params[head]: [n_src, seeds, ...]; xs [seeds, n, d]; srcs [n_src, seeds]; conds [n_src]; keys [seeds]
        losses = {}
        for h in HEADS:
            per_seed = lambda p, x, s, c, kk, h=h: one_loss(p, h, step, x, s, c, kk)  # noqa: E731
            over_src = lambda p, s, c, h=h, f=per_seed: jax.vmap(f, in_axes=(0, 0, 0, None, 0))(  # noqa: E731
                p, xs, s, c, keys)
            losses[h] = jax.vmap(over_src)(params[h], srcs, conds)  # [n_src, seeds]
        return sum(jnp.sum(v) for v in losses.values()), losses

    def chunk(params, opt_state, steps, xs, srcs, conds, keys):
        def body(carry, step):
            p, o = carry
            (_, losses), g = jax.value_and_grad(loss_fn, has_aux=True)(p, step, xs, srcs, conds, keys)
            upd, o = tx.update(g, o, p)
            return (optax.apply_updates(p, upd), o), losses

        (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), steps)
        return params, opt_state, losses

    return jax.jit(chunk, donate_argnums=(0, 1))


def substeps_for(cfg, n_steps: int) -> int:
    return int(cfg.gm.substeps) or max(2, math.ceil(128 / n_steps))


def make_sampler(cfg, graphdefs: dict, method: str, n_steps: int):
    """jit: (params [n_src, seeds], srcs, conds, keys [seeds]) -> samples [n_src, seeds, n, d]."""
    head, solver, order = METHODS[method]
    n = cfg.eval.n_samples
    sub = 1 if solver != "ode" else substeps_for(cfg, n_steps)
    grid = euler_grid(n_steps + 1, 1.0, t_end=1.0) if solver == "euler" else gmflow.gm_grid(n_steps, sub, 1.0)

    def one(p, src, cond, key):
        keys = example_keys(key, jnp.arange(n))
        z0, k = sample_prior(src, keys)  # [n, 1, d]
        y = jnp.where(cond, k, -1)
        model = nnx.merge(graphdefs[head], p)
        if solver == "euler":
            vel = ((lambda x, t: model(x[:, 0], t, y)[:, None]) if head == "velocity"
                   else gmflow.gm_velocity_fn(lambda x, t: model(x[:, 0], t, y)))
            return euler_sample(vel, z0, grid)[:, 0]
        skeys = jax.vmap(lambda kk: jax.random.fold_in(kk, 3))(keys)
        return gmflow.gm_sample(lambda x, t: model(x[:, 0], t, y), z0, grid, solver=solver, num_substeps=sub,
                                order=order, source=_mode_gaussian(src, k), keys=skeys)[:, 0]

    def run(params, srcs, conds, keys):
        over_seeds = lambda p, s, c: jax.vmap(one, in_axes=(0, 0, None, 0))(p, s, c, keys)  # noqa: E731
        return jax.vmap(over_seeds)(params[head], srcs, conds)

    return jax.jit(run)


def _gaussian_table(src: ModeSource) -> ModeSource:
    return ModeSource(src.gmm, jnp.zeros_like(src.means), jnp.ones_like(src.variances))


def run_gm_steps(cfg, ctx) -> dict[str, Any]:
    from mmfm_jax.jobs import toy

    t_start = time.time()
    name = cfg.gm.setting
    s_idx = list(cfg.settings).index(name)
    centres, a = toy.target_geometry(cfg, float(cfg.settings[name].radius))
    seeds = cfg.seeds
    xs, tests, floors, fitted = [], [], [], []
    for s in range(seeds):
        rng = np.random.default_rng([cfg.seed, s_idx, s, 6])
        xs.append(toy.sample_target(rng, centres, a, cfg.data.n_train))
        tests.append(toy.sample_target(rng, centres, a, cfg.eval.n_samples))
        floors.append(toy.w2_squared(tests[-1], toy.sample_target(rng, centres, a, cfg.eval.n_samples)))
        fitted.append(toy.fit_source(xs[-1], cfg, seed=cfg.seed * 1000 + 10 * s_idx + s, mesh=ctx.mesh)[0])
    stack = lambda ts: jax.tree.map(lambda *v: jnp.stack(v), *ts)  # noqa: E731
    gmm_src = stack(fitted)
    srcs = stack([stack([_gaussian_table(f) for f in fitted]), gmm_src])  # [n_src, seeds]
    conds = jnp.asarray([False, True])
    xs_j = jnp.asarray(np.stack(xs))
    base = jax.random.fold_in(jax.random.key(cfg.seed), 1000 + s_idx)
    seed_keys = jax.vmap(lambda s: jax.random.fold_in(base, s))(jnp.arange(seeds))
    purpose = lambda p: jax.vmap(lambda k: jax.random.fold_in(k, p))(seed_keys)  # noqa: E731
    train_keys, init_keys, eval_keys = purpose(0), purpose(1), purpose(2)
    graphdefs = {h: nnx.split(nnx.eval_shape(lambda h=h: _model(cfg, h, 0)))[0] for h in HEADS}
    params = {h: jax.vmap(lambda k, h=h: nnx.split(_model(cfg, h, k))[1])(init_keys) for h in HEADS}
    params = {h: jax.tree.map(lambda v: jnp.stack([v, v]), p) for h, p in params.items()}  # same init per source
    tx = optax.adam(optax.cosine_decay_schedule(cfg.train.lr, cfg.train.steps, alpha=cfg.train.final_lr_frac))
    opt_state = tx.init(params)
    chunk_fn = make_train_chunk(cfg, graphdefs, tx)
    t0 = time.time()
    done, last = 0, {}
    with progress(total=cfg.train.steps, desc=f"toy-gm/{name}") as bar:
        while done < cfg.train.steps:
            n = min(cfg.train.chunk, cfg.train.steps - done)
            params, opt_state, losses = chunk_fn(params, opt_state, jnp.arange(done, done + n), xs_j, srcs, conds,
                                                 train_keys)
            done += n
            last = {f"{h}/{src}": float(np.mean(np.asarray(v)[-max(1, n // 5):, i]))
                    for h, v in losses.items() for i, src in enumerate(SOURCES)}
            ctx.writer.scalars(done, {f"gm_steps/{k}/loss": v for k, v in last.items()}, console=False)
            bar.update(n)
    train_s = time.time() - t0
    log.info("toy gm_steps/%s: %d steps x %d models in %.1fs, final losses %s", name, cfg.train.steps,
             len(HEADS) * len(SOURCES) * seeds, train_s, {k: round(v, 3) for k, v in last.items()})

    t0 = time.time()
    w2: dict[str, dict[str, dict[str, list[float]]]] = {src: {} for src in SOURCES}
    runs = [(m, int(s)) for m in cfg.gm.methods for s in cfg.gm.steps]
    runs += [("euler", int(cfg.gm.ref_steps))] if cfg.gm.ref_steps else []  # 0: no reference row
    for r_idx, (method, n_steps) in enumerate(runs):
        out = np.asarray(jax.device_get(make_sampler(cfg, graphdefs, method, n_steps)(params, srcs, conds,
                                                                                        eval_keys)))
        for i, src in enumerate(SOURCES):
            vals = [toy.w2_squared(out[i, s], tests[s]) for s in range(seeds)]
            key = "euler_ref" if cfg.gm.ref_steps and r_idx == len(runs) - 1 else method
            w2[src].setdefault(key, {})[str(n_steps)] = vals
    eval_s = time.time() - t0
    res = dict(setting=name, radius=float(cfg.settings[name].radius), steps=[int(s) for s in cfg.gm.steps],
               methods=list(cfg.gm.methods), ref_steps=int(cfg.gm.ref_steps), w2=w2,
               w2_floor_mean=float(np.mean(floors)), w2_floor_std=float(np.std(floors)), final_losses=last,
               train_seconds=train_s, eval_seconds=eval_s, total_seconds=time.time() - t_start)
    res["table"] = table(res)
    res["gm_beats_euler_le8"] = beats(res)
    if ctx.is_main:
        (ctx.workdir / "report.md").write_text(markdown(cfg, res))
    res["files"] = ["report.md"]
    return res


def _mean(v: list[float]) -> float:
    return float(np.mean(v))


def beats(res: dict) -> dict[str, bool]:
    """Per source: does the best GM solver have a lower mean W2^2 than Euler at every N <= 8?"""
    return gm_beats_euler(res["w2"], res["steps"], _mean)


def table(res: dict) -> str:
    return steps_table(res["w2"], res["steps"], res["methods"], SOURCE_LABELS,
                       lambda v: f"{_mean(v):.3f} ± {np.std(v):.3f}", lambda v: f"{_mean(v):.3f}", res["ref_steps"],
                       "target vs target", f"{res['w2_floor_mean']:.3f}")


def markdown(cfg, res: dict) -> str:
    return "\n".join([
        f"# Toy R^{cfg.dim} ({res['setting']}, radius {res['radius']}): W2² vs number of steps, Euler vs GMFlow", "",
        f"{cfg.seeds} seeds (mean ± std); every model trained {cfg.train.steps} Adam steps at batch "
        f"{cfg.train.batch_size} (velocity: FM MSE; GM: transition NLL, K = {cfg.gm.components}, lambda = "
        f"{cfg.gm.trans_ratio}); W2² = exact OT between {cfg.eval.n_samples} samples and as many held-out target "
        f"samples. N = model evaluations; GM-ODE uses max(2, ceil(128 / N)) substeps. Design: "
        "mmfm_jax/jobs/toy_gm.py, docs/gmflow.md.", "", res["table"], "",
        f"Best GM solver below Euler at every N <= 8: {res['gm_beats_euler_le8']}. Train {res['train_seconds']:.0f}s,"
        f" eval {res['eval_seconds']:.0f}s.", ""])
