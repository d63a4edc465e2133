"""train: DiTDH flow matching on latents with in-step (mode) coupling; resumable, preemptible, any mesh.

Workdir: ``config.json``, ``summary.json``, ``tb/``, ``checkpoints/<step>/{state,data,config}``. A run restarted
with the same workdir resumes from the newest usable checkpoint (bitwise the same trajectory as an uninterrupted
run: the data order and every random draw are functions of the step and the global example index only). SIGTERM
saves at the next step boundary and returns. The program is ``train.trainer.Trainer``; ``run(cfg, ctx, dataset=...,
source=..., callbacks=...)`` trains on a given dataset / ``ModeSource`` and calls each ``callback(StepEvent)`` after
every step (``cli.run_job`` passes them through).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from mmfm_jax.data import latents as latents_lib
from mmfm_jax.data.synthetic import synthetic_latents
from mmfm_jax.gmm.source import ModeSource
from mmfm_jax.models.ditdh import DiTDHConfig
from mmfm_jax.train import config as train_config
from mmfm_jax.train.checkpoint import Checkpointer, PreemptionGuard
from mmfm_jax.train.preview import make_preview
from mmfm_jax.train.state import param_count
from mmfm_jax.train.trainer import Callback, StepEvent, Trainer
from mmfm_jax.utils import progress
from mmfm_jax.workdir import Stage

DEFAULT_CONFIG = "train.py:tiny"
# what the checkpoints depend on (workdir.py); num_steps may grow on resume, threads/peak/XLA options are free
STAGE = Stage(keys=("seed", "model", "data", "source", "train", "adaptive"),
              ignore=("train.num_steps", "train.peak_tflops_per_device", "train.compiler_options", "data.num_threads",
                      "data.prefetch", "source.shard_table"),
              inputs=("data.path", "source.path"), outputs=("checkpoints", "checkpoints_corrupt"))
log = logging.getLogger("mmfm_jax.train")
validate = train_config.validate


def build_dataset(cfg: ml_collections.ConfigDict, mcfg: DiTDHConfig):
    """``data.kind='synthetic'``: deterministic random latents of the model's shape; else the latent shards."""
    if cfg.data.kind == "synthetic":
        return synthetic_latents(cfg.seed + 12345, cfg.data.synthetic_size, (mcfg.input_size ** 2, mcfg.in_channels),
                                 cfg.data.synthetic_cls_dim)
    return latents_lib.LatentShards(cfg.data.path, normalize=cfg.data.normalize)


def _window_metrics(vals: list[dict], ips: float, tflops: float, peak: float) -> dict[str, float]:
    mean = lambda k: float(np.mean([v[k] for v in vals]))
    return dict(loss=mean("loss"), loss_unweighted=mean("loss_unweighted"), grad_norm=mean("grad_norm"),
                lr=float(vals[-1]["lr"]), ema_decay=float(vals[-1]["ema_decay"]), t_mean=mean("t_mean"),
                skipped_total=float(vals[-1]["skipped_total"]), images_per_s=ips, tflops_per_device=tflops,
                mfu=tflops / peak)


def run(cfg: ml_collections.ConfigDict, ctx, dataset: Any = None, source: ModeSource | None = None,
        callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """The training loop (see module docstring). ``dataset``/``source`` override the config's data/source."""
    t = cfg.train
    G = t.global_batch_size
    ds = dataset if dataset is not None else build_dataset(cfg, train_config.model_config(cfg))
    trainer = Trainer.from_config(cfg, ctx.mesh, latent_shape=tuple(ds.latent_shape), cls_dim=ds.cls_dim,
                                  source=source)
    scfg = trainer.step_config
    it = latents_lib.make_iterator(ds, G, seed=cfg.seed, shuffle=cfg.data.shuffle,
                                   num_threads=cfg.data.num_threads, prefetch=cfg.data.prefetch)
    ckpt = Checkpointer(ctx.path("checkpoints"), max_to_keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    restored = ckpt.restore(trainer.abstract_state(), it)
    if restored is not None:
        state = restored.state
        start = int(jax.device_get(state.step))
        log.info("resumed from checkpoint step %d%s", restored.step,
                 f" (latest step {restored.fallback_from} was unusable)" if restored.fallback_from else "")
        changed = train_config.config_changes(restored.config, cfg.to_dict())
        if changed:
            log.warning("resuming with a config that differs from the checkpoint's in %d keys: %s", len(changed),
                        "; ".join(changed[:10]))
    else:
        state = trainer.init_state()
        start = 0
    n_params = param_count(state)
    flops_step = trainer.flops_per_example * G
    log.info("train: %s params, batch %d (%d micro-batches), %s source, y=%s, shift %.4f, steps %d -> %d",
             f"{n_params:,}", G, t.grad_accum_steps, scfg.source_kind, scfg.y_from, scfg.shift, start, t.num_steps)

    pv = cfg.get("preview")
    preview = (make_preview(trainer.model_def, trainer.model_config, scfg, ctx.mesh, tuple(ds.latent_shape),
                            pv.num_samples, pv.num_points, cfg.seed) if pv is not None and pv.every_steps > 0 else None)
    guard = PreemptionGuard()
    config_dict = cfg.to_dict()
    step, window, pending = start, [], None
    t_last, step_last = time.perf_counter(), start
    summary_metrics: dict[str, float] = {}
    preempted = False
    multi = jax.process_count() > 1
    bar = progress(total=t.num_steps, initial=start, desc="train")
    try:
        batch = next(it) if step < t.num_steps else None
        while step < t.num_steps:
            state, m = trainer.train_step(state, trainer.put_batch(batch, step + 1))
            step += 1
            window.append(m)
            if step == start + 1:  # images/s without the compile: time from the end of the first step
                jax.block_until_ready(m)
                t_last, step_last = time.perf_counter(), step
            if pending is not None:  # one step behind: no host sync on the step just dispatched
                trainer.check_finite(pending, step, t.max_consecutive_nonfinite, ckpt.latest_step())
            pending = m
            for callback in callbacks:
                callback(StepEvent(step, state, m, ckpt, guard))
            if step % cfg.log_every == 0 or step == t.num_steps:
                now = time.perf_counter()
                ips = (step - step_last) * G / max(now - t_last, 1e-9)  # 0 for a window of the first step only
                tflops = flops_step / G * ips / jax.device_count() / 1e12
                summary_metrics = _window_metrics(jax.device_get(window), ips, tflops, t.peak_tflops_per_device)
                ctx.writer.scalars(step, {f"train/{k}": v for k, v in summary_metrics.items()})
                window, t_last, step_last = [], now, step
            check_now = not multi or step % cfg.checkpoint.preemption_check_every == 0
            stop = check_now and guard.should_stop()
            if step % cfg.checkpoint.every_steps == 0 or step == t.num_steps or stop:
                ctx.writer.flush()  # the metrics up to this step are durable before the checkpoint can commit
                ckpt.save(step, state, latents_lib.iterator_state_bytes(it), config_dict)
            if preview is not None and step % pv.every_steps == 0:  # sample grid of the EMA model
                ctx.writer.image("train/samples", step, preview(state, trainer.source))
            if stop:
                preempted = True
                log.warning("preempted: checkpoint saved at step %d; exiting", step)
                break
            if step < t.num_steps:
                batch = next(it)
            bar.update(1)
        if pending is not None:
            trainer.check_finite(pending, step, t.max_consecutive_nonfinite, ckpt.latest_step())
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
