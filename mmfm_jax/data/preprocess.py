"""Image preprocessing identical to the reference (ADM centre crop, torch bicubic resize, ImageNet normalisation).

Two pixel paths (spec 2a / 2c):

- **MM-FM training / encode** (``mmfm_train_transform``): ADM ``center_crop_arr(., 256)`` -> optional horizontal flip ->
  ``[0, 1]`` -> torch ``F.interpolate(256 -> 224, mode='bicubic', align_corners=False)`` (no antialias) -> ImageNet
  mean/std. The crop runs on the host (Pillow, in the input pipeline); the rest is ``mmfm_pixels`` on a batch on
  device.
- **[CLS] for the GMM fit** (``cls_fit_transform``): ``center_crop_arr(., 224)`` directly, no flip, no resize.

Images are NHWC; uint8 on the host, float32 on device. The resampling kernels (torch's bicubic with and without
antialias) are built as dense ``[out, in]`` weight matrices (float64 numpy, cached) and applied as two matmuls; the
DINOv2 position-embedding interpolation reuses them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# ------------------------------------------------------------------------------------------------------------------
# Host side: the ADM centre crop (Pillow)


def center_crop_arr(pil_image: Image.Image, size: int) -> np.ndarray:
    """ADM/guided-diffusion centre crop: uint8 ``[size, size, 3]``.

    While the short side is at least ``2 * size``, halve both sides (integer division) with a BOX filter; then
    resize with BICUBIC so that the short side becomes ``size`` (each side ``round(side * size / short)``, Python's
    round); then cut the centre ``size x size`` window (offsets ``(side - size) // 2``). Non-RGB images are converted
    with ``convert('RGB')`` first, as torchvision's loader does before the transform.
    """
    img = pil_image if pil_image.mode == "RGB" else pil_image.convert("RGB")
    while True:
        w, h = img.size
        if min(w, h) < 2 * size:
            break
        img = img.resize((w // 2, h // 2), resample=Image.Resampling.BOX)
    w, h = img.size
    ratio = size / min(w, h)
    new_w, new_h = round(w * ratio), round(h * ratio)
    img = img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top:top + size, left:left + size])


# ------------------------------------------------------------------------------------------------------------------
# Resampling weight matrices (torch semantics, align_corners=False)


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


# ------------------------------------------------------------------------------------------------------------------
# Device side: [0, 1], flip, resize, normalise


def imagenet_normalize(x: jax.Array, mean: Sequence[float] = IMAGENET_MEAN,
                       std: Sequence[float] = IMAGENET_STD) -> jax.Array:
    """``(x - mean) / std`` over the last (channel) axis; ``x`` float in ``[0, 1]``, NHWC."""
    xp = jnp if isinstance(x, jax.Array) else np
    return (x - xp.asarray(mean, np.float32)) / xp.asarray(std, np.float32)


def to_unit_float(images: jax.Array) -> jax.Array:
    """uint8 ``[..., 3]`` -> float32 in ``[0, 1]`` (``x / 255``, as torchvision ``ToTensor``)."""
    xp = jnp if isinstance(images, jax.Array) else np
    return xp.asarray(images).astype(np.float32) / np.float32(255.0)


def mmfm_pixels(images: jax.Array, size: int = 224, flip: jax.Array | None = None) -> jax.Array:
    """Batch of centre crops (uint8 ``[B, S, S, 3]``) -> the DINOv2 input ``[B, size, size, 3]`` float32.

    ``flip`` (bool ``[B]``, optional) mirrors those images horizontally first (RandomHorizontalFlip acts on the
    256 crop, before the resize). Then ``[0, 1]``, the torch bicubic resize to ``size`` (skipped when ``S == size``,
    the [CLS] path) and ImageNet normalisation. Jittable.
    """
    x = to_unit_float(jnp.asarray(images))
    if flip is not None:
        x = jnp.where(jnp.asarray(flip)[:, None, None, None], x[:, :, ::-1, :], x)
    if x.shape[1:3] != (size, size):
        x = resize_bicubic_torch(x, size)
    return imagenet_normalize(x)


def random_flips(key: jax.Array, indices: jax.Array, p: float = 0.5) -> jax.Array:
    """bool ``[B]``: flip example ``i`` with probability ``p`` from ``fold_in(key, indices[i])`` (the project's RNG
    convention: the decision depends only on the key and the global example index, not on the batch split)."""
    idx = jnp.asarray(indices).astype(jnp.uint32)
    return jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(key, i), p))(idx)


def mmfm_train_transform(pil_image: Image.Image, flip: bool = False, crop_size: int = 256,
                         size: int = 224) -> np.ndarray:
    """One image through the MM-FM training path: ``center_crop_arr(256)`` -> flip -> [0,1] -> bicubic 224 ->
    normalise. Returns float32 ``[size, size, 3]``. (The pipeline does the crop on the host and the rest with
    ``mmfm_pixels`` on a batch; this is the single-image equivalent.)
    """
    crop = center_crop_arr(pil_image, crop_size)
    return np.asarray(mmfm_pixels(crop[None], size, jnp.asarray([bool(flip)]))[0])


def cls_fit_transform(pil_image: Image.Image, size: int = 224) -> np.ndarray:
    """The [CLS] path of the GMM fit (spec 2c): ``center_crop_arr(224)`` -> [0,1] -> normalise (no flip, no resize).
    Returns float32 ``[size, size, 3]``.
    """
    crop = center_crop_arr(pil_image, size)
    return np.asarray(imagenet_normalize(to_unit_float(crop)), np.float32)
