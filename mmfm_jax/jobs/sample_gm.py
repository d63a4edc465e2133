"""The sample job's GMFlow and guidance-sweep helpers: solver grids, substeps, scales, and the checks that need the
model's config (``model.head``, mode conditioning). See ``jobs/sample.py`` and ``docs/gmflow.md``."""

from __future__ import annotations

import json

import ml_collections

from mmfm_jax.config_utils import ConfigError, check, config_errors
from mmfm_jax.flow import gmflow
from mmfm_jax.models.ditdh import DiTDHConfig
from mmfm_jax.train.sampling import as_gm, gm_substeps, guide_scales, model_config, sample_grid  # noqa: F401
from mmfm_jax.utils import as_path

SOLVERS = ("euler", "gm_ode", "gm_sde")


def peek_model_config(spec: ml_collections.ConfigDict) -> DiTDHConfig | None:
    """The model config of a training run (``kind='train'``: its ``config.json``) without loading weights; None
    when it cannot be read yet (checked again after loading)."""
    if spec.kind != "train" or not spec.workdir:
        return None
    path = as_path(spec.workdir) / "config.json"
    if not path.is_file():
        return None
    return model_config(ml_collections.ConfigDict(json.loads(path.read_text())))


def validate_for_model(cfg: ml_collections.ConfigDict, mcfg: DiTDHConfig) -> None:
    """The checks that need the model's config (head, mode conditioning); raises ``ConfigError`` naming the key."""
    gm = mcfg.head == "gm"
    if cfg.sampler.solver != "euler" and not gm:
        raise ConfigError(f"config.sampler.solver = {cfg.sampler.solver!r}: GMFlow's solvers need a GM model "
                          "(model.head='gm' in its training config); this model predicts a velocity: use 'euler'")
    if not gm:
        return
    if cfg.guide.enabled:
        key = "guide.scales" if len(cfg.guide.scales) else "guide.scale"
        check(cfg, key, lambda v: all(0.0 <= w < 1.0 for w in guide_scales(cfg)),
              "probabilistic AutoGuidance (a GM model) needs scales in [0, 1)")
        check(cfg, "guide.t_min", lambda v: v == 0.0 and cfg.guide.t_max == 1.0,
              "probabilistic guidance is applied at every step: need t_min = 0 and t_max = 1")
    solver = "sde" if cfg.sampler.solver == "gm_sde" else "ode"
    substeps = gm_substeps(cfg) if cfg.sampler.solver != "euler" else 1
    order = int(cfg.sampler.gm_order) if cfg.sampler.solver != "euler" else 1
    with config_errors(cfg, "sampler", {"kind": "source.kind", "num_substeps": "sampler.gm_substeps",
                                         "order": "sampler.gm_order"}):
        gmflow.validate_gm_source(cfg.source.kind, mcfg.use_y_conditioning, solver=solver, num_substeps=substeps,
                                  order=order)
    if cfg.decoder.enabled:
        check(cfg, "decoder.weights", lambda v: bool(v) or cfg.decoder.random_init,
              "required: the RAE decoder (official model.pt, or .safetensors/.npz with its keys)")
        check(cfg, "decoder.stats", lambda v: bool(v), "required: latent statistics (stats.npz or official stat.pt)")
