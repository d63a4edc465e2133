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

import io
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mmfm_jax import parallel
from mmfm_jax.config_utils import ConfigError, check, check_choice, check_positive, validate_base
from mmfm_jax.gmm.source import load_source
from mmfm_jax.jobs.sample_gm import SOLVERS, gm_substeps, guide_scales, peek_model_config, validate_for_model
from mmfm_jax.models import encoders
from mmfm_jax.storage import as_path, load_npz, save_npz_atomic, write_bytes_atomic
from mmfm_jax.train.sampling import load_model, make_sample_fn, read_train_config, train_shift
from mmfm_jax.utils import progress
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
    resolve_encoder(cfg)
    if cfg.source.kind == "gmm":
        check(cfg, "source.path", lambda v: bool(v), "required for source.kind='gmm' (a fit-gmm source folder)")
    check_positive(cfg, "num_samples")
    check_positive(cfg, "batch_size")
    check_positive(cfg, "output.images_per_shard")
    check(cfg, "sampler.num_points", lambda v: int(v) >= 2, "must be >= 2 (N points = N - 1 model evaluations)")
    check_choice(cfg, "sampler.dtype", ("float32", "bfloat16"))
    check(cfg, "guide.t_min", lambda v: 0.0 <= v <= cfg.guide.t_max <= 1.0, "need 0 <= t_min <= t_max <= 1")
    check_choice(cfg, "sampler.solver", SOLVERS)
    check(cfg, "sampler.gm_substeps", lambda v: isinstance(v, int) and v >= 0, "must be an int >= 0 (0 = auto)")
    check_choice(cfg, "sampler.gm_order", (1, 2))
    check(cfg, "guide.scales", lambda v: len(v) == 0 or cfg.guide.enabled, "a guidance sweep needs guide.enabled")
    check(cfg, "guide.scales", lambda v: len(set(float(a) for a in v)) == len(v), "must be distinct")
    mcfg = peek_model_config(cfg.model)
    if mcfg is not None:
        validate_for_model(cfg, mcfg)


def resolve_encoder(cfg: ml_collections.ConfigDict) -> str:
    """``encoder.name``, or (``''``) the encoder of a training run's latents (``model.kind='train'``: the latents'
    manifest, else the run's ``encoder.name``), else ``dinov2_b``. A mismatch is a ``ConfigError``."""
    found = None
    if cfg.model.kind == "train" and cfg.model.workdir and (as_path(cfg.model.workdir) / "config.json").exists():
        tc = read_train_config(cfg.model.workdir).to_dict()
        data = tc.get("data") or {}
        found = encoders.recorded_encoder(data.get("path")) if data.get("kind") == "latents" else None
        found = found or (tc.get("encoder") or {}).get("name") or None
    name = cfg.encoder.name
    if name and found and name != found:
        raise ConfigError(f"config.encoder.name = {name!r}, but the model in config.model.workdir "
                          f"({cfg.model.workdir}) was trained on {found!r} latents")
    return name or found or "dinov2_b"


def decoder_config(cfg: ml_collections.ConfigDict, encoder: str | None = None):
    """``decoder.preset`` + ``decoder.overrides``; the output is de-normalised with the encoder's mean/std
    (``encoder`` or :func:`resolve_encoder`; as RAE does) unless the overrides set ``image_mean`` / ``image_std``."""
    from mmfm_jax.models.decoder import DecoderConfig

    spec = encoders.get(encoder or resolve_encoder(cfg))
    kw = dict(image_mean=tuple(spec.mean), image_std=tuple(spec.std))
    kw.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.decoder.overrides.items()})
    return DecoderConfig.preset(cfg.decoder.preset, dtype=cfg.sampler.dtype, **kw)


def build_decoder(cfg: ml_collections.ConfigDict, encoder: str | None = None):
    from mmfm_jax.models.decoder import RAEDecoder

    d = cfg.decoder
    dcfg = decoder_config(cfg, encoder)
    if d.random_init:
        log.warning("sample: random decoder weights (decoder.random_init=True): for tests only")
        return RAEDecoder(dcfg, rngs=nnx.Rngs(0))
    from mmfm_jax.convert.decoder import load_decoder

    return load_decoder(d.weights, dcfg, prefix=d.prefix)


def _todo_shards(outs: list[Any], n_shards: int) -> list[int]:
    todo = [s for s in range(n_shards) if not all((o / f"images-{s:05d}.npz").exists() for o in outs)]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        mask = np.zeros(n_shards, np.int32)
        mask[todo] = 1
        mask = np.asarray(multihost_utils.broadcast_one_to_all(mask))
        todo = [int(i) for i in np.nonzero(mask)[0]]
    return todo


def run(cfg: ml_collections.ConfigDict, ctx) -> dict:
    mesh = ctx.mesh
    rules = parallel.rules_from_config(cfg)
    main = load_model(cfg.model, mesh, rules, cfg.sampler.dtype)
    guide = load_model(cfg.guide, mesh, rules, cfg.sampler.dtype) if cfg.guide.enabled else None
    mcfg = main[2]
    encoder = resolve_encoder(cfg)
    validate_for_model(cfg, mcfg)
    if guide is not None and mcfg.head == "velocity" and guide[2].head == "gm":
        raise ConfigError("config.guide: a GM guide model needs a GM main model (or use a velocity guide)")
    if mcfg.patch_size != 1:
        raise ConfigError("config.model: only patch_size 1 (token latents) is supported by the sampler")
    event_shape = (mcfg.input_size ** 2, mcfg.in_channels)
    if cfg.model.kind == "train" and not float(cfg.sampler.shift):  # 0: the shift the run was trained with
        cfg = ml_collections.ConfigDict(cfg.to_dict())
        cfg.sampler.shift = train_shift(read_train_config(cfg.model.workdir), event_shape)
    source = None
    if cfg.source.kind == "gmm":
        source, _ = load_source(cfg.source.path, mesh if cfg.source.shard_table else None)
        if tuple(source.event_shape) != event_shape:
            raise ConfigError(f"config.source.path: table event shape {source.event_shape} != model's {event_shape}")
        if mcfg.use_y_conditioning and source.n_modes > mcfg.num_modes:
            raise ConfigError(f"config.source.path: {source.n_modes} modes but the model's table has "
                              f"{mcfg.num_modes} rows")
        if not cfg.source.shard_table:
            source = jax.device_put(source, parallel.replicated(mesh))
    decoder = var = mean = None
    if cfg.decoder.enabled:
        from mmfm_jax.data.stats import load_stats

        decoder = build_decoder(cfg, encoder)
        dc = decoder.config
        if (dc.num_patches, dc.latent_dim) != event_shape:
            raise ConfigError(f"config.decoder: decodes {dc.num_patches} tokens x {dc.latent_dim}, the model makes "
                              f"{event_shape[0]} x {event_shape[1]}")
        var, mean = load_stats(cfg.decoder.stats, *event_shape)
        var = jnp.asarray(var)
        mean = None if mean is None or not cfg.decoder.use_mean else jnp.asarray(mean)
    fn, grid = make_sample_fn(cfg, mesh, main, guide, source, decoder, var, mean, event_shape)
    rep = parallel.replicated(mesh)
    dec_state = None if decoder is None else jax.device_put(nnx.state(decoder), rep)
    guide_state = None if guide is None else guide[1]

    n, per_shard = int(cfg.num_samples), int(cfg.output.images_per_shard)
    gb = int(cfg.batch_size)
    mult = parallel.batch_size_multiple(mesh)
    gb = -(-gb // mult) * mult
    n_shards = math.ceil(n / per_shard)
    out = ctx.path("samples")
    sweep = len(cfg.guide.scales) > 0
    scales = guide_scales(cfg)
    tags = [f"scale_{w:g}" for w in scales] if sweep else []
    outs = [out / tag for tag in tags] if sweep else [out]
    if ctx.is_main:
        for o in outs:
            o.mkdir(parents=True, exist_ok=True)
    parallel.sync("sample_dir")
    todo = _todo_shards(outs, n_shards)
    nfe = int(cfg.sampler.num_points) - 1
    gname = "probabilistic AutoGuidance" if mcfg.head == "gm" else "AutoGuidance"
    log.info("sample: %d samples in %d shards (%d to do), batch %d, %s, %d-point grid (%d NFE%s), model %s%s",
             n, n_shards, len(todo), gb, cfg.sampler.solver, len(grid), nfe, f" x2 ({gname})" if guide else "",
             main[3], f", guide {guide[3]} scale(s) {scales}" if guide else "")
    bar = progress(total=sum(min(per_shard, n - s * per_shard) for s in todo), desc="sample")
    for s in todo:
        lo, hi = s * per_shard, min((s + 1) * per_shard, n)
        imgs, modes = [], []
        for b0 in range(lo, hi, gb):
            idx = np.arange(b0, b0 + gb, dtype=np.int32)  # past ``hi``: computed and dropped
            g_idx = parallel.host_to_global(idx[parallel.local_batch_slice(gb)], mesh)
            x, k = fn(main[1], guide_state, source, dec_state, g_idx)
            x, k = parallel.global_to_host((x, k))
            take = min(gb, hi - b0)
            imgs.append(x[:take])
            modes.append(k[:take])
            bar.update(take)
        if ctx.is_main:
            arr = np.concatenate(imgs)
            for j, o in enumerate(outs):
                a = arr[:, j] if sweep else arr
                save_npz_atomic(o / f"images-{s:05d}.npz", arr_0=a, index=np.arange(lo, hi),
                                mode=np.concatenate(modes))
                if s == 0 and cfg.output.png_grid and decoder is not None:
                    _write_grid(ctx.path(f"grid_{tags[j]}.png" if sweep else "grid.png"), a[:64])
        parallel.sync(f"sample_shard_{s}")
    bar.close()
    summary = dict(num_samples=n, shards=n_shards, shards_written_now=len(todo), grid_points=len(grid),
                   nfe_per_model=nfe, solver=cfg.sampler.solver, model_head=mcfg.head, model=main[3],
                   guide=guide[3] if guide else None, guide_scale=scales[0] if guide and not sweep else None,
                   guide_scales=list(scales) if sweep else None, source=cfg.source.kind, dtype=cfg.sampler.dtype,
                   output=str(out), outputs=[str(o) for o in outs] if sweep else None, decoded=decoder is not None,
                   encoder=encoder)
    if cfg.sampler.solver != "euler":
        summary.update(gm_substeps=gm_substeps(cfg), gm_order=int(cfg.sampler.gm_order))
    if cfg.output.merge_npz and ctx.is_main and decoder is not None:
        merged = []
        for j, o in enumerate(outs):
            arrs = [load_npz(o / f"images-{s:05d}.npz")["arr_0"] for s in range(n_shards)]
            path = ctx.path(f"samples_{tags[j]}.npz" if sweep else "samples.npz")
            save_npz_atomic(path, arr_0=np.concatenate(arrs))
            merged.append(str(path))
        summary["merged"] = merged if sweep else merged[0]
    return summary


def _write_grid(path: Any, images: np.ndarray, cols: int = 8) -> None:
    from PIL import Image

    n, h, w, c = images.shape
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = im
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())
