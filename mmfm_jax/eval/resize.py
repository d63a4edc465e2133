"""The two Inception input paths: uint8 NHWC images -> ``[N, 299, 299, 3]`` float32 network input.

- ``'adm'`` (default; the paper's numbers): the guided-diffusion ADM evaluator feeds float images in [0, 255] into the
  TF graph, which resizes with TF1's legacy ``ResizeBilinear`` (``align_corners=False``, no half-pixel centres:
  ``src = dst * in / out``, computed in float32), then scales ``(x - 128) / 128``.
- ``'pytorch_fid'``: ``x / 255``, torch ``F.interpolate(bilinear, align_corners=False)`` (half-pixel centres:
  ``src = (dst + 0.5) * in / out - 0.5``, clamped at 0), then ``2 x - 1``.

Both resizes are separable gathers with the reference's float32 arithmetic (x direction first, then y), so they
match the references to float32 rounding; at 299x299 input they are the identity and are skipped.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

INCEPTION_SIZE = 299
INPUT_PATHS = ("adm", "pytorch_fid")


def _coords_tf_legacy(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TF1 ``ResizeBilinear`` (legacy scaler): ``src = float32(dst) * float32(in / out)``."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    lo = np.floor(src)
    i0 = np.maximum(lo.astype(np.int64), 0)
    i1 = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
    return i0.astype(np.int32), i1.astype(np.int32), (src - lo).astype(np.float32)


def _coords_half_pixel(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch bilinear, ``align_corners=False``: ``src = max(scale * (dst + 0.5) - 0.5, 0)``, float32 ``scale``.

    torch's CPU kernel evaluates ``scale * (dst + 0.5) - 0.5`` as one fused multiply-add (one float32 rounding); we
    do the same (exact float64 product, one rounding). Two roundings move ``src`` by an ulp (~2e-6 at src ~ 32).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.float64(scale) * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = src.astype(np.int64)  # floor (src >= 0)
    i1 = i0 + (i0 < in_size - 1)
    return i0.astype(np.int32), i1.astype(np.int32), (src - i0.astype(np.float32)).astype(np.float32)


def _interp_axis(x: jax.Array, axis: int, i0: np.ndarray, i1: np.ndarray, lerp: np.ndarray, form: str) -> jax.Array:
    a = jnp.take(x, jnp.asarray(i0), axis=axis)
    b = jnp.take(x, jnp.asarray(i1), axis=axis)
    shape = [1] * x.ndim
    shape[axis] = -1
    w1 = jnp.asarray(lerp).reshape(shape)
    if form == "tf":
        return a + (b - a) * w1
    w0 = jnp.asarray(np.float32(1.0) - lerp).reshape(shape)
    return w0 * a + w1 * b


def resize_bilinear(x: jax.Array, size: tuple[int, int], half_pixel_centers: bool) -> jax.Array:
    """Bilinear resize of float32 NHWC ``x`` to ``size = (H, W)``, no antialiasing (up- or down-sampling).

    ``half_pixel_centers=False``: TF1 legacy ``ResizeBilinear`` (ADM). ``True``: torch ``align_corners=False``.
    """
    coords = _coords_half_pixel if half_pixel_centers else _coords_tf_legacy
    form = "torch" if half_pixel_centers else "tf"
    out_h, out_w = size
    if x.shape[2] != out_w:
        x = _interp_axis(x, 2, *coords(x.shape[2], out_w), form)
    if x.shape[1] != out_h:
        x = _interp_axis(x, 1, *coords(x.shape[1], out_h), form)
    return x


def adm_inputs(images: jax.Array) -> jax.Array:
    """uint8 (or float in [0, 255]) NHWC -> ADM evaluator's network input: TF1 legacy resize, ``(x - 128) / 128``."""
    x = images.astype(jnp.float32)
    x = resize_bilinear(x, (INCEPTION_SIZE, INCEPTION_SIZE), half_pixel_centers=False)
    return (x - 128.0) / 128.0


def pytorch_fid_inputs(images: jax.Array) -> jax.Array:
    """uint8 NHWC -> pytorch-fid's network input: ``x / 255``, half-pixel bilinear resize, ``2 x - 1``."""
    x = images.astype(jnp.float32) / jnp.float32(255.0)
    x = resize_bilinear(x, (INCEPTION_SIZE, INCEPTION_SIZE), half_pixel_centers=True)
    return 2.0 * x - 1.0


def input_fn(input_path: str) -> Callable[[jax.Array], jax.Array]:
    """``'adm'`` | ``'pytorch_fid'`` -> the preprocessing function."""
    if input_path == "adm":
        return adm_inputs
    if input_path == "pytorch_fid":
        return pytorch_fid_inputs
    raise ValueError(f"input_path must be one of {INPUT_PATHS}, got {input_path!r}")
