"""``python -m mmfm_jax sample``: source draws -> Euler ODE (+ AutoGuidance) or GMFlow's GM-ODE / GM-SDE (+
probabilistic AutoGuidance) -> RAE decoder -> uint8 image shards.

Models come from a training run (``model.kind = 'train'``: the EMA parameters of an Orbax checkpoint, restored
onto this job's mesh whatever device count wrote it) or from an official checkpoint (``'official'``: ``.pt`` with its
``ema`` entry, ``.safetensors`` or ``.npz``). The guide (AutoGuidance) is specified the same way.

Sample ``i`` uses the key ``fold_in(PRNGKey(seed), i)`` for its mode and source noise, so the same seed gives the
same images whatever the number of devices, processes or the batch size. Sampling is ``jit`` over the mesh with
the batch split over every device of every process. Output: ``WORKDIR/samples/images-XXXXX.npz`` (``arr_0``
[n, H, W, 3] uint8, ``index``, ``mode``), written atomically; a restarted job skips finished shards. ``grid.png``
shows the first images. ``merge_npz`` also writes one ADM-style ``samples.npz`` at the end.

Solvers (``sampler.solver``): ``'euler'`` on the velocity (a GM model: its mean velocity), ``sampler.num_points``
points, i.e. ``num_points - 1`` model evaluations down to ``t_end``; ``'gm_ode'`` / ``'gm_sde'`` (a GM model,
``model.head='gm'`` in its training config): GMFlow's solvers (``flow/gmflow.py``) with the same number of model
evaluations, ``num_points - 1``, on GMFlow's grid ending at t = 0 with the same shift, ``sampler.gm_substeps``
GM-ODE substeps per evaluation (0: ``max(2, ceil(128 / NFE))`` as the paper; GM-SDE takes 1) and
``sampler.gm_order`` (1 or 2). With the MM-FM GMM source the closed forms use the sampled mode's Gaussian when the
model sees the mode; an unconditional model on a GMM source allows only first-order, one-substep GM-ODE
(``gmflow.validate_gm_source``). GM-SDE noise uses the stream ``fold_in(key_i, 3)`` of sample i's key.

Guidance (``guide.enabled``): a velocity model gets AutoGuidance ``v_g + w (v - v_g)`` (``guide.scale``, 1.5 in
the paper, on ``[guide.t_min, guide.t_max]``); a GM model gets *probabilistic AutoGuidance*: GMFlow's probabilistic
guidance with the guide model's mean as the "unconditional" mean, ``guide.scale`` w in [0, 1) (a velocity guide's
velocity is its mean). ``guide.scales`` (a tuple of several scales) runs a guidance sweep as one compiled program
(``jax.vmap`` over the scale; for a GM model ``gmflow.sample_sweep``): every scale sees the same sources and noise,
and scale w is written to ``samples/scale_<w>/`` (``samples_scale_<w>.npz``, ``grid_scale_<w>.png``).
"""

from __future__ import annotations

import logging
import math

import jax
import ml_collections
from flax import nnx

from mmfm_jax import distributed, parallel
from mmfm_jax.config_utils import ConfigError, check, check_choice, check_positive, config_errors, validate_base
from mmfm_jax.flow import gmflow
from mmfm_jax.models import encoders
from mmfm_jax.models.ditdh import DiTDHConfig
from mmfm_jax.train import sample_io, sampling
from mmfm_jax.train.sampling import gm_substeps, guide_scales
from mmfm_jax.workdir import Stage

DEFAULT_CONFIG = "sample.py:tiny"
# what the samples depend on (workdir.py): another checkpoint, source or sampler setting stops a resumed run
STAGE = Stage(keys=("seed", "model", "guide", "source", "sampler", "decoder", "encoder", "num_samples", "output"),
              inputs=("model.workdir", "model.path", "guide.workdir", "guide.path", "source.path", "decoder.weights",
                      "decoder.stats"),
              outputs=("samples", "samples*.npz", "grid*.png"))
log = logging.getLogger("mmfm_jax")


def validate(cfg: ml_collections.ConfigDict) -> None:
    validate_base(cfg)
    for name in ("model", "guide"):
        if name == "guide" and not cfg.guide.enabled:
            continue
        check_choice(cfg, f"{name}.kind", ("train", "official"))
        key = "workdir" if cfg[name].kind == "train" else "path"
        check(cfg, f"{name}.{key}", lambda v: bool(v), f"required for {name}.kind={cfg[name].kind!r}")
    check_choice(cfg, "source.kind", ("gaussian", "gmm"))
    check_choice(cfg, "encoder.name", ("",) + encoders.NAMES)
    sample_io.resolve_encoder(cfg)
    if cfg.source.kind == "gmm":
        check(cfg, "source.path", lambda v: bool(v), "required for source.kind='gmm' (a fit-gmm source folder)")
    check_positive(cfg, "num_samples")
    check_positive(cfg, "batch_size")
    check_positive(cfg, "output.images_per_shard")
    check(cfg, "sampler.num_points", lambda v: int(v) >= 2, "must be >= 2 (N points = N - 1 model evaluations)")
    check_choice(cfg, "sampler.dtype", ("float32", "bfloat16"))
    check(cfg, "guide.t_min", lambda v: 0.0 <= v <= cfg.guide.t_max <= 1.0, "need 0 <= t_min <= t_max <= 1")
    check_choice(cfg, "sampler.solver", sampling.SOLVERS)
    check(cfg, "sampler.gm_substeps", lambda v: isinstance(v, int) and v >= 0, "must be an int >= 0 (0 = auto)")
    check_choice(cfg, "sampler.gm_order", (1, 2))
    check(cfg, "guide.scales", lambda v: len(v) == 0 or cfg.guide.enabled, "a guidance sweep needs guide.enabled")
    check(cfg, "guide.scales", lambda v: len(set(float(a) for a in v)) == len(v), "must be distinct")
    mcfg = sampling.peek_model_config(cfg.model)
    if mcfg is not None:
        validate_for_model(cfg, mcfg)


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


def run(cfg: ml_collections.ConfigDict, ctx) -> dict:
    mesh = ctx.mesh
    rules = parallel.rules_from_config(cfg)
    main = sampling.load_model(cfg.model, mesh, rules, cfg.sampler.dtype)
    guide = sampling.load_model(cfg.guide, mesh, rules, cfg.sampler.dtype) if cfg.guide.enabled else None
    mcfg = main.config
    encoder = sample_io.resolve_encoder(cfg)
    validate_for_model(cfg, mcfg)
    if guide is not None and mcfg.head == "velocity" and guide.config.head == "gm":
        raise ConfigError("config.guide: a GM guide model needs a GM main model (or use a velocity guide)")
    if mcfg.patch_size != 1:
        raise ConfigError("config.model: only patch_size 1 (token latents) is supported by the sampler")
    event_shape = (mcfg.input_size ** 2, mcfg.in_channels)
    if cfg.model.kind == "train" and not float(cfg.sampler.shift):  # 0: the shift the run was trained with
        cfg = ml_collections.ConfigDict(cfg.to_dict())
        cfg.sampler.shift = sampling.train_shift(sampling.read_train_config(cfg.model.workdir), event_shape)
    source = sample_io.load_mode_source(cfg, mesh, mcfg, event_shape)
    decoder, var, mean = sample_io.load_decoder_and_stats(cfg, encoder, event_shape)
    fn, grid = sampling.make_sample_fn(cfg, mesh, main, guide, source, decoder, var, mean, event_shape)
    dec_state = None if decoder is None else jax.device_put(nnx.state(decoder), parallel.replicated(mesh))

    n, per_shard = int(cfg.num_samples), int(cfg.output.images_per_shard)
    gb = parallel.round_up_batch(int(cfg.batch_size), mesh)
    n_shards = math.ceil(n / per_shard)
    out = ctx.path("samples")
    sweep = len(cfg.guide.scales) > 0
    scales = guide_scales(cfg)
    tags = [f"scale_{w:g}" for w in scales] if sweep else []
    outs = [out / tag for tag in tags] if sweep else [out]
    if ctx.is_main:
        for o in outs:
            o.mkdir(parents=True, exist_ok=True)
    distributed.sync("sample_dir")
    todo = sample_io.pending_sample_shards(outs, n_shards)
    nfe = int(cfg.sampler.num_points) - 1
    gname = "probabilistic AutoGuidance" if mcfg.head == "gm" else "AutoGuidance"
    log.info("sample: %d samples in %d shards (%d to do), batch %d, %s, %d-point grid (%d NFE%s), model %s%s",
             n, n_shards, len(todo), gb, cfg.sampler.solver, len(grid), nfe, f" x2 ({gname})" if guide else "",
             main.description, f", guide {guide.description} scale(s) {scales}" if guide else "")
    grids = None
    if cfg.output.png_grid and decoder is not None:
        grids = [ctx.path(f"grid_{t}.png") for t in tags] if sweep else [ctx.path("grid.png")]
    sample_io.write_sample_shards(fn, (main.state, None if guide is None else guide.state, source, dec_state), outs,
                                  todo, n=n, per_shard=per_shard, global_batch=gb, mesh=mesh, sweep=sweep,
                                  grids=grids)
    summary = dict(num_samples=n, shards=n_shards, shards_written_now=len(todo), grid_points=len(grid),
                   nfe_per_model=nfe, solver=cfg.sampler.solver, model_head=mcfg.head, model=main.description,
                   guide=guide.description if guide else None,
                   guide_scale=scales[0] if guide and not sweep else None,
                   guide_scales=list(scales) if sweep else None, source=cfg.source.kind, dtype=cfg.sampler.dtype,
                   output=str(out), outputs=[str(o) for o in outs] if sweep else None, decoded=decoder is not None,
                   encoder=encoder)
    if cfg.sampler.solver != "euler":
        summary.update(gm_substeps=gm_substeps(cfg), gm_order=int(cfg.sampler.gm_order))
    if cfg.output.merge_npz and ctx.is_main and decoder is not None:
        paths = [ctx.path(f"samples_{t}.npz") for t in tags] if sweep else [ctx.path("samples.npz")]
        merged = sample_io.merge_shards(outs, n_shards, paths)
        summary["merged"] = merged if sweep else merged[0]
    return summary
