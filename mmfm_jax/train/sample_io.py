"""What the ``sample`` job reads and writes around the sampling program (:mod:`mmfm_jax.train.sampling`).

Inputs, checked against the model before any sampling: the encoder its latents come from, the RAE decoder and the
latent statistics it de-normalises with, the mode source. Outputs: shard ``s`` holds samples ``[s * S, (s + 1) * S)``
(S = ``output.images_per_shard``) as ``<out>/images-XXXXX.npz`` (``arr_0`` [n, H, W, 3] uint8 or latents,
``index``, ``mode``), written atomically by process 0, so a restarted job skips finished shards
(:func:`pending_sample_shards`); ``grid.png`` shows the first images; :func:`merge_shards` writes one ADM-style
``samples.npz``. A guidance sweep writes one such folder per scale.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mmfm_jax import distributed, parallel
from mmfm_jax.config_utils import ConfigError
from mmfm_jax.data.shards import pending_shards
from mmfm_jax.models import encoders
from mmfm_jax.storage import as_path, load_npz, save_npz_atomic, write_bytes_atomic
from mmfm_jax.train.sampling import read_train_config
from mmfm_jax.utils import progress

log = logging.getLogger("mmfm_jax")


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
    """The RAE decoder of ``decoder.weights`` (random weights with ``decoder.random_init``: for tests only)."""
    from mmfm_jax.models.decoder import RAEDecoder

    d = cfg.decoder
    dcfg = decoder_config(cfg, encoder)
    if d.random_init:
        log.warning("sample: random decoder weights (decoder.random_init=True): for tests only")
        return RAEDecoder(dcfg, rngs=nnx.Rngs(0))
    from mmfm_jax.convert.decoder import load_decoder

    return load_decoder(d.weights, dcfg, prefix=d.prefix)


def load_decoder_and_stats(cfg: ml_collections.ConfigDict, encoder: str, event_shape: tuple[int, int]
                           ) -> tuple[Any, Any, Any]:
    """-> (decoder, var [L, C], mean [L, C] or None), or Nones with ``decoder.enabled`` off (latents out)."""
    if not cfg.decoder.enabled:
        return None, None, None
    from mmfm_jax.data.stats import load_stats

    decoder = build_decoder(cfg, encoder)
    dc = decoder.config
    if (dc.num_patches, dc.latent_dim) != event_shape:
        raise ConfigError(f"config.decoder: decodes {dc.num_patches} tokens x {dc.latent_dim}, the model makes "
                          f"{event_shape[0]} x {event_shape[1]}")
    var, mean = load_stats(cfg.decoder.stats, *event_shape)
    mean = None if mean is None or not cfg.decoder.use_mean else jnp.asarray(mean)
    return decoder, jnp.asarray(var), mean


def load_mode_source(cfg: ml_collections.ConfigDict, mesh, mcfg: Any, event_shape: tuple[int, int]) -> Any:
    """The ``source.path`` mode source (K-sharded with ``source.shard_table``, else replicated), checked against the
    model (``mcfg``); None for ``source.kind = 'gaussian'``."""
    if cfg.source.kind != "gmm":
        return None
    from mmfm_jax.gmm.source import load_source

    source, _ = load_source(cfg.source.path, mesh if cfg.source.shard_table else None)
    if tuple(source.event_shape) != event_shape:
        raise ConfigError(f"config.source.path: table event shape {source.event_shape} != model's {event_shape}")
    if mcfg.use_y_conditioning and source.n_modes > mcfg.num_modes:
        raise ConfigError(f"config.source.path: {source.n_modes} modes but the model's table has "
                          f"{mcfg.num_modes} rows")
    if not cfg.source.shard_table:
        source = jax.device_put(source, parallel.replicated(mesh))
    return source


def shard_path(out: Any, s: int) -> Any:
    return out / f"images-{s:05d}.npz"


def pending_sample_shards(outs: list[Any], n_shards: int) -> list[int]:
    """The shards not yet written to every folder of ``outs`` (agreed by every process)."""
    return pending_shards(n_shards, lambda: (s for s in range(n_shards)
                                             if all(shard_path(o, s).exists() for o in outs)))


def write_sample_shards(fn: Callable, args: tuple, outs: list[Any], todo: list[int], *, n: int, per_shard: int,
                        global_batch: int, mesh, sweep: bool, grids: list[Any] | None = None) -> None:
    """Sample the shards ``todo`` with ``fn(*args, global indices)`` (the sampling program's call) in global batches
    of ``global_batch`` (the last one padded: computed and dropped) and write shard s into each of ``outs`` (with
    ``sweep`` the program's output is [B, S, ...]: entry j goes to ``outs[j]``). ``grids``: one PNG path per out for
    the first 64 images of shard 0, or None. Every process calls it; process 0 writes."""
    bar = progress(total=sum(min(per_shard, n - s * per_shard) for s in todo), desc="sample")
    for s in todo:
        lo, hi = s * per_shard, min((s + 1) * per_shard, n)
        imgs, modes = [], []
        for b0 in range(lo, hi, global_batch):
            idx = np.arange(b0, b0 + global_batch, dtype=np.int32)  # past ``hi``: computed and dropped
            g_idx = parallel.host_to_global(idx[parallel.local_batch_slice(global_batch)], mesh)
            x, k = parallel.global_to_host(fn(*args, g_idx))
            take = min(global_batch, hi - b0)
            imgs.append(x[:take])
            modes.append(k[:take])
            bar.update(take)
        if jax.process_index() == 0:
            arr = np.concatenate(imgs)
            for j, o in enumerate(outs):
                a = arr[:, j] if sweep else arr
                save_npz_atomic(shard_path(o, s), arr_0=a, index=np.arange(lo, hi), mode=np.concatenate(modes))
                if s == 0 and grids is not None:
                    write_grid(grids[j], a[:64])
        distributed.sync(f"sample_shard_{s}")
    bar.close()


def merge_shards(outs: list[Any], n_shards: int, paths: list[Any]) -> list[str]:
    """Concatenate each out's ``arr_0`` shards into one ADM-style ``.npz`` at the matching ``paths`` entry."""
    for o, path in zip(outs, paths):
        arrs = [load_npz(shard_path(o, s))["arr_0"] for s in range(n_shards)]
        save_npz_atomic(path, arr_0=np.concatenate(arrs))
    return [str(p) for p in paths]


def write_grid(path: Any, images: np.ndarray, cols: int = 8) -> None:
    """uint8 images [n, H, W, 3] as one PNG, ``cols`` per row, written atomically."""
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
