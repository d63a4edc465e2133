"""The train config (``configs/train.py``) read by the Trainer: validation that names the key, the model and step
configs it describes, the checks of the data and source against it, and the diff of two configs on resume."""

from __future__ import annotations

import json
from typing import Any

import ml_collections
import numpy as np

from mmfm_jax.config_utils import ConfigError, check, check_choice, check_positive, config_errors, validate_base
from mmfm_jax.flow.gmflow import validate_gm_source
from mmfm_jax.flow.time import TIME_KINDS, resolution_shift
from mmfm_jax.gmm.source import ModeSource
from mmfm_jax.models import encoders
from mmfm_jax.models.ditdh import DiTDHConfig
from mmfm_jax.train.adaptive import adaptive_from_config
from mmfm_jax.train.sampling import model_config
from mmfm_jax.train.step import StepConfig
from mmfm_jax.utils import parse_compiler_options

__all__ = ["STORAGE_DTYPES", "check_inputs", "checked_model_config", "config_changes", "model_config", "step_config",
           "validate", "validate_gm_train"]
STORAGE_DTYPES = ("float32", "bfloat16")  # source.table_dtype, train.adam_mu_dtype


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Every check of a train config that needs no file or mesh; raises ``ConfigError`` naming the key."""
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
        validate_gm_train(cfg)


def checked_model_config(cfg: ml_collections.ConfigDict) -> DiTDHConfig:
    """``model_config(cfg)``; a bad field raises ``ConfigError`` naming ``config.model.<field>``."""
    with config_errors(cfg, "model", {"dtype": "train.compute_dtype"}):
        return model_config(cfg)


def validate_gm_train(cfg: ml_collections.ConfigDict, source_kind: str | None = None, y_from: str | None = None
                      ) -> None:
    """GMFlow training (``model.head='gm'``): ``gmflow.validate_gm_source`` for ``source_kind`` / ``y_from``
    (default: the config's; the source is mode-conditional when the model sees the mode: ``y_from='mode'``) and
    ``train.gm_trans_ratio``. Raises ``ConfigError`` naming the key."""
    kind = cfg.source.kind if source_kind is None else source_kind
    mode = (cfg.source.y_from if y_from is None else y_from) == "mode"
    with config_errors(cfg, "train", {"trans_ratio": "train.gm_trans_ratio", "kind": "source.kind"}):
        validate_gm_source("gaussian" if kind == "gaussian" else "gmm", mode,
                           trans_ratio=float(cfg.train.gm_trans_ratio))


def step_config(cfg: ml_collections.ConfigDict, latent_shape: tuple[int, int], num_modes: int) -> StepConfig:
    """The ``StepConfig`` of a train config for latents [L, C] and ``num_modes`` adaptive-weighting keys."""
    t = cfg.train
    shift = t.time_shift or resolution_shift(int(np.prod(latent_shape)), t.time_shift_base)
    return StepConfig(grad_accum_steps=t.grad_accum_steps, source_kind=cfg.source.kind,
                      assignment=cfg.source.assignment, temperature=cfg.source.temperature, y_from=cfg.source.y_from,
                      weight_by=cfg.adaptive.weight_by, time_kind=t.time_kind, time_mean=t.time_mean,
                      time_std=t.time_std, t_max=t.t_max, shift=float(shift), shard_source=cfg.source.shard_table,
                      adaptive=adaptive_from_config(cfg.adaptive, num_modes), head=cfg.model.get("head", "velocity"),
                      gm_trans_ratio=float(t.get("gm_trans_ratio", 0.5)),
                      gm_weight_scale=float(t.get("gm_weight_scale", 2.0)))


def check_inputs(cfg: ml_collections.ConfigDict, mcfg: DiTDHConfig, latent_shape: tuple[int, ...],
                 cls_dim: int | None, source: ModeSource | None) -> None:
    """The data's latents [L, C] (and [CLS] dim, when known) and the source table against the config."""
    want = (mcfg.input_size ** 2, mcfg.in_channels)
    if tuple(latent_shape) != want:
        raise ConfigError(f"config.model: in_channels/input_size give latents {want}, the dataset has "
                          f"{tuple(latent_shape)}")
    if source is not None:
        if tuple(source.event_shape) != want:
            raise ConfigError(f"config.source.path: table event shape {source.event_shape} != latents {want}")
        if cfg.source.kind == "gmm_mode" and cls_dim is not None and int(source.gmm.means.shape[1]) != cls_dim:
            raise ConfigError(f"config.source.path: [CLS] GMM dim {source.gmm.means.shape[1]} != dataset cls dim "
                              f"{cls_dim}")
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
