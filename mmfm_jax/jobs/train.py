"""train: DiTDH flow matching on latents with in-step (mode) coupling; resumable, preemptible, any mesh.

Workdir: ``config.json``, ``summary.json``, ``tb/``, ``checkpoints/<step>/{state,data,config}``. A run restarted
with the same workdir resumes from the newest usable checkpoint (bitwise the same trajectory as an uninterrupted
run: the data order and every random draw are functions of the step and the global example index only). SIGTERM
saves at the next step boundary and returns. ``train(cfg, ctx, dataset=..., source=...)`` runs the same loop on
an in-memory dataset / a given ``ModeSource`` (the digits demo).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from mmfm_jax import parallel
from mmfm_jax.config_utils import ConfigError, check, check_choice, check_positive, validate_base
from mmfm_jax.data import latents as latents_lib
from mmfm_jax.flow.gmflow import validate_gm_source
from mmfm_jax.flow.time import TIME_KINDS, resolution_shift
from mmfm_jax.gmm.source import ModeSource, cast_table, load_source, shard_source
from mmfm_jax.models import encoders
from mmfm_jax.models.ditdh import DiTDH, DiTDHConfig, ditdh_flops_per_example
from mmfm_jax.train.adaptive import adaptive_from_config
from mmfm_jax.train.checkpoint import Checkpointer, PreemptionGuard
from mmfm_jax.train.optim import optimizer_from_config
from mmfm_jax.train.preview import make_preview
from mmfm_jax.train.sampling import model_config
from mmfm_jax.train.state import param_count, state_initializer
from mmfm_jax.train.step import StepConfig, check_batch_geometry, make_train_step, put_batch
from mmfm_jax.utils import parse_compiler_options, progress
from mmfm_jax.workdir import Stage

DEFAULT_CONFIG = "train.py:tiny"
# what the checkpoints depend on (workdir.py); num_steps may grow on resume, threads/peak/XLA options are free
STAGE = Stage(keys=("seed", "model", "data", "source", "train", "adaptive"),
              ignore=("train.num_steps", "train.peak_tflops_per_device", "train.compiler_options", "data.num_threads",
                      "data.prefetch", "source.shard_table"),
              inputs=("data.path", "source.path"), outputs=("checkpoints", "checkpoints_corrupt"))
log = logging.getLogger("mmfm_jax.train")
_COMPILED: dict[Any, Any] = {}
STORAGE_DTYPES = ("float32", "bfloat16")  # source.table_dtype, train.adam_mu_dtype
# the config.train fields the compiled init/step depend on (beyond the model and step configs)
_PROGRAM_KEYS = ("initial_lr", "base_lr", "final_lr", "initial_phase_steps", "decay_start_steps", "decay_end_steps",
                 "schedule", "b1", "b2", "eps", "weight_decay", "clip_grad", "initial_ema_decay", "ema_decay",
                 "compiler_options", "adam_mu_dtype")


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps."""


def validate(cfg: ml_collections.ConfigDict) -> None:
    validate_base(cfg)
    mcfg = checked_model_config(cfg)
    check_choice(cfg, "data.kind", ("latents", "synthetic"))
    if cfg.data.kind == "latents":
        check(cfg, "data.path", lambda v: bool(v), "must name a latent dataset folder (from the encode job)")
        if "encoder" in cfg:  # '' = any; else the latents must come from that encoder
            try:
                encoders.check_encoder(cfg.encoder.name, cfg.data.path)
            except ValueError as e:
                raise ConfigError(str(e)) from None
    check_choice(cfg, "source.kind", ("gaussian", "gmm_indep", "gmm_mode"))
    check_choice(cfg, "source.assignment", ("soft", "hard"))
    check_choice(cfg, "source.y_from", ("none", "mode", "label"))
    check_choice(cfg, "source.table_dtype", STORAGE_DTYPES)
    check_choice(cfg, "train.adam_mu_dtype", STORAGE_DTYPES)
    if cfg.source.kind != "gaussian":
        check(cfg, "source.path", lambda v: bool(v), "must name a ModeSource folder (fit-gmm) for a GMM source")
    if cfg.source.y_from == "mode":
        check(cfg, "source.kind", lambda v: v != "gaussian", "y_from='mode' needs a GMM source")
    check(cfg, "model.use_y_conditioning", lambda v: v == (cfg.source.y_from != "none"),
          f"must be {cfg.source.y_from != 'none'} when source.y_from = {cfg.source.y_from!r}")
    t = cfg.train
    for k in ("num_steps", "global_batch_size", "grad_accum_steps"):
        check(cfg, f"train.{k}", lambda v: isinstance(v, int) and v > 0, "must be a positive int")
    check(cfg, "train.global_batch_size", lambda v: v % t.grad_accum_steps == 0,
          f"must be a multiple of train.grad_accum_steps={t.grad_accum_steps}")
    check_choice(cfg, "train.compute_dtype", ("float32", "bfloat16", "fp32", "bf16"))
    check_choice(cfg, "train.schedule", ("linear", "cosine"))
    check_choice(cfg, "train.time_kind", TIME_KINDS)
    check(cfg, "train.time_shift", lambda v: v >= 0, "must be >= 0 (0 = resolution shift)")
    check(cfg, "train.max_consecutive_nonfinite", lambda v: v >= 1, "must be >= 1")
    check(cfg, "train.peak_tflops_per_device", lambda v: v > 0, "must be > 0")
    check(cfg, "train.compiler_options", lambda v: parse_compiler_options(v) is not None,
          "must be 'auto' and/or 'name=value,...' (XLA options for jax.jit)")
    for k in ("initial_lr", "base_lr", "final_lr"):
        check(cfg, f"train.{k}", lambda v: v >= 0, "must be >= 0")
    check_choice(cfg, "adaptive.weight_by", ("mode", "label"))
    if cfg.adaptive.enabled and cfg.adaptive.weight_by == "mode":
        check(cfg, "adaptive.enabled", lambda v: cfg.source.kind != "gaussian",
              "weighting by mode needs a GMM source (set adaptive.enabled=False or weight_by='label')")
    if "preview" in cfg:
        check(cfg, "preview.every_steps", lambda v: isinstance(v, int) and v >= 0, "must be an int >= 0 (0 = off)")
        check_positive(cfg, "preview.num_samples")
        check(cfg, "preview.num_points", lambda v: isinstance(v, int) and v >= 2, "must be an int >= 2")
    check(cfg, "checkpoint.every_steps", lambda v: v > 0, "must be > 0")
    check(cfg, "checkpoint.keep", lambda v: v > 0, "must be > 0")
    if mcfg.head == "gm":
        check(cfg, "train.gm_weight_scale", lambda v: v > 0, "must be > 0")
        validate_gm_train(cfg.source.kind, cfg.source.y_from, cfg.train.gm_trans_ratio)


def checked_model_config(cfg: ml_collections.ConfigDict) -> DiTDHConfig:
    """``model_config(cfg)``; a bad field raises ``ConfigError`` naming ``config.model.<field>``."""
    try:
        return model_config(cfg)
    except (ValueError, TypeError) as e:
        msg = str(e)
        raise ConfigError(msg.replace("DiTDHConfig.", "config.model.", 1) if msg.startswith("DiTDHConfig.")
                          else f"config.model: {msg}") from None


def validate_gm_train(source_kind: str, y_from: str, trans_ratio: float) -> None:
    """GMFlow training (``model.head='gm'``): ``gmflow.validate_gm_source`` with this job's keys (the source is
    mode-conditional when the model sees the mode: ``source.y_from='mode'``). Raises ``ConfigError``."""
    try:
        validate_gm_source("gaussian" if source_kind == "gaussian" else "gmm", y_from == "mode",
                           trans_ratio=trans_ratio, prefix="train")
    except ConfigError as e:
        msg = str(e).replace("config.train.trans_ratio", "config.train.gm_trans_ratio").replace(
            "config.source.mode_conditional = False", f"config.source.y_from = {y_from!r}, not 'mode'")
        raise ConfigError(msg) from None


# ----------------------------------------------------------------------------------------------------------------


def synthetic_dataset(cfg: ml_collections.ConfigDict, mcfg: DiTDHConfig) -> latents_lib.InMemoryLatents:
    """Deterministic random latents (tests, benchmarks): latent [N, L, C], cls [N, D], label N % 10."""
    r = np.random.default_rng(cfg.seed + 12345)
    n, L, C = cfg.data.synthetic_size, mcfg.input_size ** 2, mcfg.in_channels
    lat = r.normal(size=(n, L, C)).astype(np.float32)
    if cfg.data.synthetic_nan:
        lat[:] = np.nan
    return latents_lib.InMemoryLatents(dict(latent=lat, label=np.arange(n) % 10,
                                            cls=r.normal(size=(n, cfg.data.synthetic_cls_dim)).astype(np.float32)))


def build_dataset(cfg: ml_collections.ConfigDict, mcfg: DiTDHConfig):
    if cfg.data.kind == "synthetic":
        return synthetic_dataset(cfg, mcfg)
    return latents_lib.LatentShards(cfg.data.path, normalize=cfg.data.normalize)


def step_config(cfg: ml_collections.ConfigDict, latent_shape: tuple[int, int], num_modes: int) -> StepConfig:
    t = cfg.train
    shift = t.time_shift or resolution_shift(int(np.prod(latent_shape)), t.time_shift_base)
    return StepConfig(grad_accum_steps=t.grad_accum_steps, source_kind=cfg.source.kind,
                      assignment=cfg.source.assignment, temperature=cfg.source.temperature, y_from=cfg.source.y_from,
                      weight_by=cfg.adaptive.weight_by, time_kind=t.time_kind, time_mean=t.time_mean,
                      time_std=t.time_std, t_max=t.t_max, shift=float(shift), shard_source=cfg.source.shard_table,
                      adaptive=adaptive_from_config(cfg.adaptive, num_modes), head=cfg.model.get("head", "velocity"),
                      gm_trans_ratio=float(t.get("gm_trans_ratio", 0.5)),
                      gm_weight_scale=float(t.get("gm_weight_scale", 2.0)))


def _check_shapes(ds, mcfg: DiTDHConfig, source: ModeSource | None, cfg) -> None:
    want = (mcfg.input_size ** 2, mcfg.in_channels)
    if tuple(ds.latent_shape) != want:
        raise ConfigError(f"config.model: in_channels/input_size give latents {want}, the dataset has "
                          f"{tuple(ds.latent_shape)}")
    if source is not None:
        if tuple(source.event_shape) != want:
            raise ConfigError(f"config.source.path: table event shape {source.event_shape} != latents {want}")
        if cfg.source.kind == "gmm_mode" and int(source.gmm.means.shape[1]) != ds.cls_dim:
            raise ConfigError(f"config.source.path: [CLS] GMM dim {source.gmm.means.shape[1]} != dataset cls dim "
                              f"{ds.cls_dim}")
        if cfg.source.y_from == "mode" and source.n_modes > mcfg.num_modes:
            raise ConfigError(f"config.model.num_modes = {mcfg.num_modes} < {source.n_modes} source modes")


def config_changes(saved: Any, now: dict, prefix: str = "") -> list[str]:
    """``['train.base_lr: 0.0002 -> 0.0001', ...]``: the keys whose values differ between a checkpoint's stored
    config (JSON: tuples became lists) and the current one."""
    if not isinstance(saved, dict):
        return []
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k, "<absent>"), now.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{k}.")
        elif json.loads(json.dumps(a, default=str)) != json.loads(json.dumps(b, default=str)):
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def run(cfg: ml_collections.ConfigDict, ctx) -> dict[str, Any]:
    return train(cfg, ctx)


def train(cfg: ml_collections.ConfigDict, ctx, dataset: Any = None, source: ModeSource | None = None
          ) -> dict[str, Any]:
    """The training loop (see module docstring). ``dataset``/``source`` override the config's data/source."""
    mesh = ctx.mesh
    rules = parallel.rules_from_config(cfg)
    mcfg = model_config(cfg)
    t = cfg.train
    G = t.global_batch_size
    check_batch_geometry(G, t.grad_accum_steps, mesh)
    ds = dataset if dataset is not None else build_dataset(cfg, mcfg)
    if source is None and cfg.source.kind != "gaussian":
        source, _ = load_source(cfg.source.path, mesh)
    elif source is not None and isinstance(source.means, np.ndarray):
        source = shard_source(source, mesh)
    _check_shapes(ds, mcfg, source, cfg)
    if source is not None:
        source = cast_table(source, cfg.source.get("table_dtype", "float32"))
    num_modes = source.n_modes if source is not None and cfg.adaptive.weight_by == "mode" else mcfg.num_modes
    scfg = step_config(cfg, tuple(ds.latent_shape), num_modes)
    tx, lr_fn, ema_fn = optimizer_from_config(t)

    def make_model(rngs):
        return DiTDH(mcfg, rngs)

    kmodes = scfg.adaptive.num_modes
    copts = parse_compiler_options(t.compiler_options)
    key = (mcfg, scfg, tuple(t.get(k) for k in _PROGRAM_KEYS), mesh, tuple(sorted(rules.items())), cfg.seed, kmodes)
    if key not in _COMPILED:  # reuse compiled init/step across runs in one process (demo, tests)
        init, shardings, mdef = state_initializer(make_model, tx, mesh, cfg.seed, kmodes, rules, copts)
        _COMPILED[key] = (init, shardings, mdef,
                          make_train_step(mdef, tx, lr_fn, ema_fn, scfg, mesh, shardings, copts))
        while len(_COMPILED) > 4:
            _COMPILED.pop(next(iter(_COMPILED)))
    init, shardings, mdef, step_fn = _COMPILED[key]
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          jax.eval_shape(init), shardings)
    it = latents_lib.make_iterator(ds, G, seed=cfg.seed, shuffle=cfg.data.shuffle,
                                   num_threads=cfg.data.num_threads, prefetch=cfg.data.prefetch)
    ckpt = Checkpointer(ctx.path("checkpoints"), max_to_keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    restored = ckpt.restore(target, it)
    if restored is not None:
        state = restored.state
        start = int(jax.device_get(state.step))
        log.info("resumed from checkpoint step %d%s", restored.step,
                 f" (latest step {restored.fallback_from} was unusable)" if restored.fallback_from else "")
        changed = config_changes(restored.config, cfg.to_dict())
        if changed:
            log.warning("resuming with a config that differs from the checkpoint's in %d keys: %s", len(changed),
                        "; ".join(changed[:10]))
    else:
        state = init()
        start = 0
    n_params = param_count(state)
    flops_step = 3.0 * ditdh_flops_per_example(mcfg) * G  # forward + backward
    log.info("train: %s params, batch %d (%d micro-batches), %s source, y=%s, shift %.4f, steps %d -> %d",
             f"{n_params:,}", G, t.grad_accum_steps, scfg.source_kind, scfg.y_from, scfg.shift, start, t.num_steps)

    pv = cfg.get("preview")
    preview = (make_preview(mdef, mcfg, scfg, mesh, tuple(ds.latent_shape), pv.num_samples, pv.num_points, cfg.seed)
               if pv is not None and pv.every_steps > 0 else None)
    guard = PreemptionGuard()
    config_dict = cfg.to_dict()
    step, window, pending = start, [], None
    t_last, step_last = time.perf_counter(), start
    summary_metrics: dict[str, float] = {}
    preempted = False
    max_bad = t.max_consecutive_nonfinite
    multi = jax.process_count() > 1
    bar = progress(total=t.num_steps, initial=start, desc="train")

    def check_finite(m):
        streak = int(jax.device_get(m["nonfinite_streak"]))
        if streak >= max_bad:
            raise NonFiniteError(
                f"train: {streak} consecutive non-finite steps (loss={float(m['loss']):.4g}, grad_norm="
                f"{float(m['grad_norm']):.4g}) at step {int(step)}; stopping. Parameters were not updated by "
                f"those steps; the last checkpoint is step {ckpt.latest_step()}. Check the data (NaN/Inf), "
                "the learning rate, or use train.compute_dtype=float32.")

    # labels index a table when the model sees them or they key the adaptive weights: check their range per batch
    n_labels = (mcfg.num_modes if scfg.y_from == "label" else
                scfg.adaptive.num_modes if scfg.adaptive.enabled and scfg.weight_by == "label" else 0)

    def checked(batch):
        if n_labels and np.size(batch["label"]):
            lab = np.asarray(batch["label"])
            if lab.min() < 0 or lab.max() >= n_labels:
                raise ValueError(
                    f"train: a batch at step {step + 1} has labels in [{lab.min()}, {lab.max()}], outside [0, "
                    f"{n_labels}) (source.y_from={scfg.y_from!r}, adaptive.weight_by={scfg.weight_by!r}): the "
                    "dataset has no usable labels for this config (-1 = unlabelled), or model.num_modes is too small")
        return batch

    try:
        batch = next(it) if step < t.num_steps else None
        while step < t.num_steps:
            state, m = step_fn(state, put_batch(checked(batch), mesh, scfg), source)
            step += 1
            window.append(m)
            if step == start + 1:  # images/s without the compile: time from the end of the first step
                jax.block_until_ready(m)
                t_last, step_last = time.perf_counter(), step
            if pending is not None:  # one step behind: no host sync on the step just dispatched
                check_finite(pending)
            pending = m
            if cfg.debug.sigterm_at_step == step:  # tests: a real SIGTERM through the handler, in-process
                os.kill(os.getpid(), signal.SIGTERM)
            if cfg.debug.hang_at_step == step:  # tests: wait here for SIGKILL (or SIGTERM: save and exit)
                ckpt.wait()
                print(f"DEBUG: hanging at step {step}", flush=True)
                while not guard.requested:
                    signal.pause()
            if step % cfg.log_every == 0 or step == t.num_steps:
                vals = jax.device_get(window)
                now = time.perf_counter()
                ips = (step - step_last) * G / max(now - t_last, 1e-9)  # 0 for a window of the first step only
                tflops = flops_step / G * ips / jax.device_count() / 1e12
                summary_metrics = dict(
                    loss=float(np.mean([v["loss"] for v in vals])),
                    loss_unweighted=float(np.mean([v["loss_unweighted"] for v in vals])),
                    grad_norm=float(np.mean([v["grad_norm"] for v in vals])), lr=float(vals[-1]["lr"]),
                    ema_decay=float(vals[-1]["ema_decay"]), t_mean=float(np.mean([v["t_mean"] for v in vals])),
                    skipped_total=float(vals[-1]["skipped_total"]), images_per_s=ips,
                    tflops_per_device=tflops, mfu=tflops / t.peak_tflops_per_device)
                ctx.writer.scalars(step, {f"train/{k}": v for k, v in summary_metrics.items()})
                window, t_last, step_last = [], now, step
            check_now = not multi or step % cfg.checkpoint.preemption_check_every == 0
            stop = check_now and guard.should_stop()
            if step % cfg.checkpoint.every_steps == 0 or step == t.num_steps or stop:
                ctx.writer.flush()  # the metrics up to this step are durable before the checkpoint can commit
                ckpt.save(step, state, latents_lib.iterator_state_bytes(it), config_dict)
            if preview is not None and step % pv.every_steps == 0:  # sample grid of the EMA model
                ctx.writer.image("train/samples", step, preview(state, source))
            if stop:
                preempted = True
                log.warning("preempted: checkpoint saved at step %d; exiting", step)
                break
            if step < t.num_steps:
                batch = next(it)
            bar.update(1)
        if pending is not None:
            check_finite(pending)
    finally:
        bar.close()
        guard.close()
        ckpt.wait()
        ckpt_steps = ckpt.all_steps()
        ckpt.close()
        if hasattr(it, "close"):
            it.close()

    final = jax.device_get(dict(step=state.step, skipped=state.skipped))
    return dict(start_step=start, final_step=int(final["step"]), resumed=restored is not None,
                resumed_from=restored.step if restored is not None else None,
                fallback_from=restored.fallback_from if restored is not None else None,
                preempted=preempted, skipped_steps=int(final["skipped"]), param_count=n_params,
                source=scfg.source_kind, y_from=scfg.y_from, time_shift=scfg.shift,
                checkpoints=ckpt_steps, flops_per_step=flops_step,
                **{k: (v if math.isfinite(v) else str(v)) for k, v in summary_metrics.items()})
