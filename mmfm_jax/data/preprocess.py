"""Image preprocessing identical to the reference (ADM centre crop, torch bicubic resize, ImageNet normalisation).

Two pixel paths (spec 2a / 2c):

- **MM-FM training / encode** (``mmfm_train_transform``): ADM ``center_crop_arr(., 256)`` -> optional horizontal flip ->
  ``[0, 1]`` -> torch ``F.interpolate(256 -> 224, mode='bicubic', align_corners=False)`` (no antialias) -> ImageNet
  mean/std. The crop runs on the host (Pillow, in the input pipeline); the rest is ``mmfm_pixels`` on a batch on
  device.
- **[CLS] for the GMM fit** (``cls_fit_transform``): ``center_crop_arr(., 224)`` directly, no flip, no resize.

SigLIP2-B and MAE-B are fed the 256 crop itself (``size`` = 256: no resize) with their own mean/std
(``mean``/``std`` arguments; SigLIP2: 0.5 / 0.5).

Images are NHWC; uint8 on the host, float32 on device. The torch-exact bicubic resize lives in
``mmfm_jax.ops.resize`` (shared with the models' position-table resize) and is re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mmfm_jax.ops.resize import bicubic_weights, resize_bicubic_torch  # noqa: F401  (re-exported)

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


def mmfm_pixels(images: jax.Array, size: int = 224, flip: jax.Array | None = None,
                mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> jax.Array:
    """Batch of centre crops (uint8 ``[B, S, S, 3]``) -> the encoder input ``[B, size, size, 3]`` float32.

    ``flip`` (bool ``[B]``, optional) mirrors those images horizontally first (RandomHorizontalFlip acts on the
    256 crop, before the resize). Then ``[0, 1]``, the torch bicubic resize to ``size`` (skipped when ``S == size``:
    the [CLS] path, and SigLIP2 / MAE) and ``(x - mean) / std`` (ImageNet by default). Jittable.
    """
    x = to_unit_float(jnp.asarray(images))
    if flip is not None:
        x = jnp.where(jnp.asarray(flip)[:, None, None, None], x[:, :, ::-1, :], x)
    if x.shape[1:3] != (size, size):
        x = resize_bicubic_torch(x, size)
    return imagenet_normalize(x, mean, std)


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
