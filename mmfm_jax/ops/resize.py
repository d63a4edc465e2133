"""Torch-exact bicubic resampling (``F.interpolate(mode='bicubic', align_corners=False)``, with or without antialias).

The kernels are built as dense ``[out, in]`` weight matrices (float64 numpy, cached) and applied as two matmuls at
highest precision. Hand-rolled because ``jax.image.resize`` differs from torch: its bicubic uses a = -0.5 (torch's
plain bicubic uses a = -0.75) and it has no un-clamped half-pixel source coordinate. Used for the MM-FM image resize
(``data.preprocess``) and for resizing ViT position tables (DINOv2, ViT-MAE, SigLIP).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys cubic convolution kernel with parameter ``a`` (torch: -0.75 plain bicubic, -0.5 antialiased)."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((x - 5.0) * x + 8.0) * x * a - 4.0 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def _bicubic_matrix(in_size: int, out_size: int, antialias: bool) -> np.ndarray:
    w = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    if not antialias:
        # upsample_bicubic2d: source = scale * (i + 0.5) - 0.5 (not clamped), 4 taps, indices clamped to the border.
        # The source coordinate is computed in float32 as torch does for float input (its rounding moves outputs
        # by up to ~1e-4 at 256 px); the taps from it in float64.
        scale32 = np.float32(in_size) / np.float32(out_size)
        for i in range(out_size):
            src = float(scale32 * np.float32(i + 0.5) - np.float32(0.5))
            base = math.floor(src)
            t = src - base
            taps = _cubic(np.array([t + 1.0, t, 1.0 - t, 2.0 - t]), -0.75)
            for k in range(4):
                w[i, min(max(base - 1 + k, 0), in_size - 1)] += taps[k]
        return w
    # _upsample_bicubic2d_aa: kernel stretched by the downscale factor, window clipped to the image, renormalised.
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        js = np.arange(lo, hi)
        taps = _cubic((js - center + 0.5) * inv, -0.5)
        total = taps.sum()
        w[i, lo:hi] = taps / total if total != 0.0 else taps
    return w


def bicubic_weights(in_size: int, out_size: int, antialias: bool = False) -> np.ndarray:
    """float64 ``[out_size, in_size]`` matrix ``W`` with ``resize(x) = W @ x`` along one axis, as torch
    ``F.interpolate(mode='bicubic', align_corners=False, antialias=antialias)`` with an explicit output size.

    ``antialias=False``: cubic a = -0.75, 4 taps, border indices clamped. ``antialias=True``: cubic a = -0.5
    stretched by ``in/out`` when downsampling, taps clipped to the image and renormalised. Cached; do not modify.
    """
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"bicubic_weights: sizes must be positive, got {in_size} -> {out_size}")
    return _bicubic_matrix(int(in_size), int(out_size), bool(antialias))


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int | np.integer):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def resize_bicubic_torch(x: jax.Array, size: int | Sequence[int], antialias: bool = False) -> jax.Array:
    """Resize ``x [B, H, W, C]`` (float) to ``[B, h, w, C]`` like torch ``F.interpolate(x_nchw, size=(h, w),
    mode='bicubic', align_corners=False, antialias=antialias)``: two fp32 matmuls at highest precision, no clamping
    of the overshoot (as torch for float input). Jittable; the weights are compile-time constants.
    """
    oh, ow = _pair(size)
    _, h, w, _ = x.shape
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    x = x.astype(jnp.float32)
    hp = jax.lax.Precision.HIGHEST
    if (oh, ow) != (h, w) or antialias:
        wh = jnp.asarray(bicubic_weights(h, oh, antialias), jnp.float32)
        ww = jnp.asarray(bicubic_weights(w, ow, antialias), jnp.float32)
        x = jnp.einsum("bhwc,pw->bhpc", x, ww, precision=hp)
        x = jnp.einsum("bhpc,oh->bopc", x, wh, precision=hp)
    return x.astype(dtype)


def resize_token_grid(tokens: jax.Array, src_grid: tuple[int, int], dst_grid: tuple[int, int],
                      antialias: bool = False) -> jax.Array:
    """Resize a row-major token grid ``[..., sh*sw, D]`` to ``[..., dh*dw, D]`` (float32) like torch
    ``F.interpolate(grid_nchw, size=dst_grid, mode='bicubic', align_corners=False, antialias=antialias)``, the
    recipe transformers uses for ViT position tables. Returned as float32 unchanged when the grids are equal."""
    (sh, sw), (dh, dw) = (int(v) for v in src_grid), (int(v) for v in dst_grid)
    if tokens.shape[-2] != sh * sw:
        raise ValueError(f"resize_token_grid: {tokens.shape[-2]} tokens are not a {sh}x{sw} grid")
    x = tokens.astype(jnp.float32)
    if (sh, sw) == (dh, dw):
        return x
    lead = x.shape[:-2]
    x = x.reshape(-1, sh, sw, x.shape[-1])
    wh = jnp.asarray(bicubic_weights(sh, dh, antialias), jnp.float32)
    ww = jnp.asarray(bicubic_weights(sw, dw, antialias), jnp.float32)
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum("bhwd,pw->bhpd", x, ww, precision=hp)
    x = jnp.einsum("bhpd,oh->bopd", x, wh, precision=hp)
    return x.reshape(*lead, dh * dw, x.shape[-1])
