"""The digits demo's ``gm_steps`` mode: FD vs number of steps, Euler on a velocity DiTDH against GMFlow's GM-ODE /
GM-SDE on a GM DiTDH (``model.head='gm'``) trained for the same budget, Gaussian and GMM sources.

Four tiny DiTDHs are trained with the train job's program (``train.trainer.Trainer``: in-step coupling, EMA, AdamW,
clipping), ``train.num_steps`` steps each, same batch, time sampler, optimizer and seed: {velocity, GM head} x
{``gaussian``
(Gaussian source, unconditional model), ``gmm_mode_cond`` (GMM source + mode coupling, the model sees the mode, so
every GMFlow closed form exists with the mode's Gaussian as the source)}. The velocity models train on the
flow-matching MSE, the GM models on the transition NLL (``train.gm_trans_ratio``). Then, from the EMA parameters,
for every N in ``gm.steps``: ``eval_samples`` samples per method (same source draws for every method and N), scored
by the demo's classifier FD against the training split. Methods (N model evaluations each, shifted grid down to
t = 0, ``sampler.shift``): Euler on the velocity model, Euler on the GM model's mean velocity, GM-ODE (order 1 / 2,
``max(2, ceil(128 / N))`` substeps) and GM-SDE (order 1 / 2); plus Euler with ``gm.ref_steps`` on the velocity model.
Outputs: ``report.md`` (the table), ``summary.json``, ``samples_gm_steps.png`` (N = 4, every method).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from mmfm_jax import parallel
from mmfm_jax.config_utils import check, check_positive
from mmfm_jax.data import digits
from mmfm_jax.experiments.digits.common import (
    SETTINGS,
    draw_source,
    fit_source,
    make_trainer,
    prepare,
    score,
    setting_config,
)
from mmfm_jax.experiments.digits.report import titled_grids
from mmfm_jax.experiments.gm_report import METHODS, gm_beats_euler, steps_table
from mmfm_jax.flow import gmflow
from mmfm_jax.flow.samplers import euler_grid, euler_sample
from mmfm_jax.storage import write_json_atomic
from mmfm_jax.train.config import validate_gm_train
from mmfm_jax.train.step import mode_gaussian
from mmfm_jax.utils import MetricWriter, progress

log = logging.getLogger("mmfm_jax")
_COMPILER_OPTIONS: dict = {}
HEADS = ("velocity", "gm")
SETTING_LABELS = {"gaussian": "Gaussian", "gmm_indep": "GMM, indep. coupling", "gmm_mode": "GMM + mode coupling",
                  "gmm_mode_cond": "GMM + mode coupling (mode-cond.)"}


def validate_gm_steps(cfg: ml_collections.ConfigDict) -> None:
    check(cfg, "gm.steps", lambda v: len(v) >= 1 and all(isinstance(s, int) and s >= 1 for s in v), "ints >= 1")
    check(cfg, "gm.methods", lambda v: len(v) >= 1 and all(m in METHODS for m in v), f"subset of {tuple(METHODS)}")
    for key in ("gm.components", "gm.logstd_inner"):
        check_positive(cfg, key)
    check(cfg, "gm.ref_steps", lambda v: isinstance(v, int) and v >= 0, "must be an int >= 0 (0 = no reference)")
    check(cfg, "gm.substeps", lambda v: isinstance(v, int) and v >= 0, "must be an int >= 0 (0 = auto)")
    for name in cfg.settings:
        kind, cond = SETTINGS[name]
        validate_gm_train(cfg, kind, "mode" if cond else "none")
        if kind != "gaussian" and not cond:
            check(cfg, "gm.methods", lambda v: all(METHODS[m][1] == "euler" or (METHODS[m][1] == "ode" and
                                                                               METHODS[m][2] == 1) for m in v),
                  f"setting {name!r} (the model does not see the mode) allows only Euler and first-order GM-ODE")
            check(cfg, "gm.substeps", lambda v: v == 1, f"setting {name!r} needs 1 (no closed-form transport)")


def _config(cfg, name: str, head: str) -> ml_collections.ConfigDict:
    c = setting_config(cfg, name)
    c.model.head = head
    c.model.gm_components = int(cfg.gm.components)
    c.model.gm_logstd_inner = int(cfg.gm.logstd_inner)
    return c


def train_model(cfg, ctx, name: str, head: str, train: dict, src) -> dict[str, Any]:
    """Train one model with the train job's program; returns its EMA state, model def/config and the placed
    source."""
    c = _config(cfg, name, head)
    trainer, state, it = make_trainer(c, ctx.mesh, train, src)
    t0 = time.time()
    losses = []
    writer = MetricWriter(ctx.path("tb", f"{name}_{head}"))  # one TensorBoard run per model: the curves overlay
    for step in progress(range(1, int(c.train.num_steps) + 1), desc=f"{name}/{head}"):
        state, m = trainer.train_step(state, trainer.put_batch(next(it)))
        losses.append(m["loss"])
        if step % 100 == 0:
            writer.scalars(step, {"gm_steps/loss": float(np.mean(jax.device_get(losses[-100:])))}, console=False)
    writer.close()
    it.close()
    final_loss = float(np.mean(jax.device_get(losses[-50:])))
    return dict(ema=state.ema, buffers=state.buffers, mdef=trainer.model_def, mcfg=trainer.model_config,
                source=trainer.source, seconds=time.time() - t0, final_loss=final_loss)


def substeps_for(cfg, n_steps: int) -> int:
    return int(cfg.gm.substeps) or max(2, math.ceil(128 / n_steps))


def make_sampler(cfg, model: dict, kind: str, method: str, n_steps: int):
    """jit: (ema, buffers, source, indices [n]) -> samples [n, 64, 1] (fp32)."""
    _, solver, order = METHODS[method]
    shift = float(cfg.sampler.shift)
    sub = substeps_for(cfg, n_steps) if solver == "ode" else 1
    grid = euler_grid(n_steps + 1, shift, t_end=1.0) if solver == "euler" else gmflow.gm_grid(n_steps, sub, shift)
    base = jax.random.PRNGKey(int(cfg.seed) + 7)
    mdef, mcfg = model["mdef"], model["mcfg"]
    gm = mcfg.head == "gm"

    def sample(ema, buffers, source, indices):
        z0, k = draw_source(base, kind, source, indices)
        net = mdef.merge(ema, buffers)
        y = k if mcfg.use_y_conditioning else None
        fn = lambda x, t: net(x, t, y)  # noqa: E731
        if solver == "euler":
            return euler_sample(gmflow.gm_velocity_fn(fn) if gm else fn, z0, grid)
        gsrc = mode_gaussian(source, k) if (kind != "gaussian" and mcfg.use_y_conditioning) else None
        skeys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base, i), 3))(indices)
        return gmflow.gm_sample(fn, z0, grid, solver=solver, num_substeps=sub, order=order, source=gsrc, keys=skeys)

    return jax.jit(sample, compiler_options=_COMPILER_OPTIONS or None)


def run_gm_steps(cfg, ctx) -> dict[str, Any]:
    t_start = time.time()
    prep = prepare(cfg)
    train, clf, ref_stats = prep["train"], prep["clf"], prep["ref_stats"]
    needs_gmm = any(SETTINGS[s][0] != "gaussian" for s in cfg.settings)
    src, gmm_info = (fit_source(cfg, ctx.mesh, train) if needs_gmm else (None, {}))
    mesh = ctx.mesh
    n_eval = int(cfg.eval_samples)
    mult = parallel.batch_size_multiple(mesh)
    idx = parallel.host_to_global(np.arange(-(-n_eval // mult) * mult, dtype=np.int32), mesh)
    methods = list(cfg.gm.methods)
    runs = [(m, int(s)) for m in methods for s in cfg.gm.steps]
    runs += [("euler", int(cfg.gm.ref_steps))] if cfg.gm.ref_steps else []  # 0: no reference row
    fd: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    train_info: dict[str, dict[str, Any]] = {}
    shown: dict[str, np.ndarray] = {}
    eval_s = 0.0
    for name in cfg.settings:
        kind = SETTINGS[name][0]
        fd[name] = {}
        for head in HEADS:
            if not any(METHODS[m][0] == head for m in methods):
                continue
            log.info("demo gm_steps: training %s / %s head for %d steps", name, head, cfg.train.num_steps)
            model = train_model(cfg, ctx, name, head, train, src)
            train_info[f"{name}/{head}"] = dict(seconds=model["seconds"], final_loss=model["final_loss"])
            t0 = time.time()
            for r_idx, (method, n_steps) in enumerate(runs):
                if METHODS[method][0] != head:
                    continue
                x = make_sampler(cfg, model, kind, method, n_steps)(model["ema"], model["buffers"], model["source"],
                                                                    idx)
                x = np.asarray(parallel.global_to_host(x))[:n_eval]
                key = "euler_ref" if cfg.gm.ref_steps and r_idx == len(runs) - 1 else method
                fd[name].setdefault(key, {})[str(n_steps)] = score(clf, ref_stats, x)
                log.info("demo gm_steps: %s, %s, N = %d: FD %.3f", SETTING_LABELS.get(name, name), key, n_steps,
                         fd[name][key][str(n_steps)]["fd"])
                if n_steps == 4 and key != "euler_ref":
                    shown[f"{name}/{method}"] = x[:16]
            eval_s += time.time() - t0
    res = dict(steps=[int(s) for s in cfg.gm.steps], methods=methods, ref_steps=int(cfg.gm.ref_steps), fd=fd,
               fd_test_vs_train=prep["fd_floor"], classifier_test_accuracy=prep["clf_acc"], gmm=gmm_info,
               train=train_info, eval_seconds=eval_s, total_seconds=time.time() - t_start)
    res["table"] = table(res)
    res["gm_beats_euler_le8"] = beats(res)
    if ctx.is_main:
        ctx.path("report.md").write_text(markdown(cfg, res))
        write_json_atomic(ctx.path("gm_steps.json"), {k: v for k, v in res.items() if k != "table"})
        if shown:
            panels = [("real digits (training split)", digits.image_grid(digits.to_images(train["latent"][:16]),
                                                                          cols=16))]
            panels += [(f"{SETTING_LABELS.get(k.split('/')[0], k)}: {k.split('/')[1]}, N = 4",
                        digits.image_grid(digits.to_images(v), cols=16)) for k, v in shown.items()]
            titled_grids(ctx.path("samples_gm_steps.png"), panels, "Samples at N = 4 model evaluations",
                         rows=len(panels))
    res["files"] = ["report.md", "gm_steps.json"] + (["samples_gm_steps.png"] if shown else [])
    res["samples_png_rows"] = list(shown)
    return res


def beats(res: dict) -> dict[str, bool]:
    """Per setting: does the best GM solver have a lower FD than Euler (velocity model) at every N <= 8?"""
    return gm_beats_euler(res["fd"], res["steps"], lambda c: c["fd"])


def table(res: dict) -> str:
    def fd(c):
        return f"{c['fd']:.2f}"

    return steps_table(res["fd"], res["steps"], res["methods"], SETTING_LABELS, fd, fd, res["ref_steps"],
                       "held-out digits", f"{res['fd_test_vs_train']:.2f}")


def markdown(cfg, res: dict) -> str:
    tr = ", ".join(f"{k} {v['seconds']:.0f}s (final loss {v['final_loss']:.3f})" for k, v in res["train"].items())
    return "\n".join([
        "# Digits demo: FD vs number of steps, Euler vs GMFlow's solvers", "",
        f"Each model: tiny DiTDH, {cfg.train.num_steps} steps at batch {cfg.train.global_batch_size} with the real "
        f"train step (GM head: K = {cfg.gm.components}, transition NLL with lambda = {cfg.train.gm_trans_ratio}); "
        f"{cfg.eval_samples} samples per cell from the EMA model, FD in the classifier's features against the "
        f"training split (classifier test accuracy {res['classifier_test_accuracy']:.3f}). N = model evaluations; "
        "GM-ODE uses max(2, ceil(128 / N)) substeps. Design: mmfm_jax/experiments/digits/gm.py, docs/gmflow.md.", "",
        res["table"], "",
        f"Best GM solver below Euler at every N <= 8: {res['gm_beats_euler_le8']}. Training: {tr}; evaluation "
        f"{res['eval_seconds']:.0f}s.", "", "![samples at N = 4](samples_gm_steps.png)", ""])
