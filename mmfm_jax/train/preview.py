"""Sample previews while training: a few Euler samples from the EMA model, as one RGB grid for TensorBoard.

Latents are shown as images: ``[L, C]`` tokens on their ``sqrt(L) x sqrt(L)`` grid; with 1 or 3 channels the values
themselves (grey / RGB), otherwise the first three principal components of all the batch's tokens (the usual way to
look at DINOv2 features: tokens of the same part of an object get the same colour). No decoder is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mmfm_jax import parallel
from mmfm_jax.flow import gmflow
from mmfm_jax.flow.samplers import euler_grid, euler_sample
from mmfm_jax.gmm.source import ModeSource, sample_prior, sample_source


def make_preview(mdef: Any, mcfg: Any, scfg: Any, mesh: Mesh, event_shape: tuple[int, int], num_samples: int,
                 num_points: int, seed: int) -> Callable[[Any, ModeSource | None], np.ndarray]:
    """-> ``preview(state, source) -> uint8 [H, W, 3]``: ``num_samples`` Euler samples (``num_points`` grid points,
    the training time shift) of ``state.ema``, drawn from the training source (its modes as labels when the model
    sees them), as a grid. Every process must call it (a collective); the batch is padded to the mesh's shards."""
    n = parallel.round_up_batch(num_samples, mesh)
    grid = euler_grid(int(num_points), float(scfg.shift), 0.999)
    base = jax.random.PRNGKey(int(seed) + 4242)
    shard = scfg.shard_source

    @jax.jit
    def run(ema, buffers, source):
        idx = jax.lax.with_sharding_constraint(jnp.arange(n, dtype=jnp.int32), parallel.batch_sharding(mesh, 1))
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(idx)
        if scfg.source_kind == "gaussian":
            z0, k = sample_source("gaussian", None, None, keys, (n, *event_shape))
        else:
            z0, k = sample_prior(source, keys, mesh=mesh if shard else None)
        y = None
        if mcfg.use_y_conditioning:
            y = k if scfg.y_from == "mode" else jax.random.randint(base, (n,), 0, mcfg.num_modes)
        net = mdef.merge(ema, buffers)
        fn = lambda x, t: net(x, t, y)  # noqa: E731
        return euler_sample(gmflow.gm_velocity_fn(fn) if mcfg.head == "gm" else fn, z0, grid)

    def preview(state, source: ModeSource | None) -> np.ndarray:
        x = np.asarray(parallel.global_to_host(run(state.ema, state.buffers, source)))[:num_samples]
        return rgb_grid(latents_to_rgb(x))

    return preview


def latents_to_rgb(x: np.ndarray) -> np.ndarray:
    """Latents ``[n, L, C]`` (L a square) -> uint8 ``[n, h, w, 3]``: the values for C in (1, 3), else the top-3 PCA
    components of all tokens; each channel scaled by its 1st-99th percentiles over the batch."""
    x = np.nan_to_num(np.asarray(x, np.float64))
    n, L, C = x.shape
    h = math.isqrt(L)
    if h * h != L:
        raise ValueError(f"latents_to_rgb: {L} tokens are not a square grid")
    flat = x.reshape(n * L, C)
    if C not in (1, 3):
        flat = flat - flat.mean(0)
        _, vecs = np.linalg.eigh(flat.T @ flat)
        flat = flat @ vecs[:, ::-1][:, :3]
    lo, hi = np.percentile(flat, 1, axis=0), np.percentile(flat, 99, axis=0)
    img = np.clip((flat - lo) / np.maximum(hi - lo, 1e-12), 0, 1)
    if img.shape[1] == 1:
        img = np.repeat(img, 3, axis=1)
    return (img * 255).round().astype(np.uint8).reshape(n, h, h, 3)


def rgb_grid(images: np.ndarray, min_size: int = 64, pad: int = 2) -> np.ndarray:
    """uint8 ``[n, h, w, 3]`` -> one uint8 ``[H, W, 3]`` grid (about square), cells upscaled to >= ``min_size``."""
    n, h, w, _ = images.shape
    s = max(1, -(-min_size // h))
    big = np.repeat(np.repeat(images, s, 1), s, 2)
    cols = math.ceil(math.sqrt(n))
    rows = -(-n // cols)
    hh, ww = h * s + pad, w * s + pad
    out = np.full((rows * hh + pad, cols * ww + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        out[pad + r * hh: pad + r * hh + h * s, pad + c * ww: pad + c * ww + w * s] = big[i]
    return out
