"""Preprocessing: the ADM centre crop (bitwise vs an independent Pillow re-implementation), torch's bicubic resize
(vs a numpy implementation of torch's kernel), normalisation and the two pixel paths."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mmfm_jax.data.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    bicubic_weights,
    center_crop_arr,
    cls_fit_transform,
    imagenet_normalize,
    mmfm_pixels,
    mmfm_train_transform,
    random_flips,
    resize_bicubic_torch,
)


def smooth_image(h: int, w: int, seed: int) -> Image.Image:
    """A generated RGB image with structure at several scales (gradients + blobs + noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = []
    for c in range(3):
        f1, f2 = rng.uniform(0.005, 0.2, 2)
        v = 127 + 60 * np.sin(f1 * xx + c) * np.cos(f2 * yy) + 40 * (xx / max(w, 1)) + rng.normal(0, 12, (h, w))
        chans.append(v)
    return Image.fromarray(np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8), "RGB")


def reference_crop(img: Image.Image, size: int) -> np.ndarray:
    """The ADM recipe written out differently: count the halvings first, then one bicubic step, then slice."""
    w, h = img.size
    halvings = 0
    while min(w >> halvings, h >> halvings) >= 2 * size:
        halvings += 1
    for _ in range(halvings):
        img = img.resize((img.size[0] // 2, img.size[1] // 2), Image.BOX)
    short = min(img.size)
    target = tuple(int(round(s * size / short)) for s in img.size)
    img = img.resize(target, Image.BICUBIC)
    a = np.array(img)
    y0 = (a.shape[0] - size) // 2
    x0 = (a.shape[1] - size) // 2
    return a[y0:, x0:][:size, :size]


@pytest.mark.parametrize("hw,size", [((700, 530), 64), ((129, 200), 64), ((517, 1031), 128), ((1024, 512), 128),
                                     ((31, 45), 64), ((64, 64), 64), ((300, 97), 32), ((600, 800), 256)])
def test_center_crop_bitwise(hw, size):
    img = smooth_image(*hw, seed=hw[0] * 7 + hw[1])
    ours = center_crop_arr(img, size)
    assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, reference_crop(img, size))


def test_center_crop_converts_modes():
    rgb = smooth_image(90, 120, seed=3)
    for mode in ("L", "RGBA", "CMYK", "P", "LA", "I"):
        img = rgb.convert(mode)
        np.testing.assert_array_equal(center_crop_arr(img, 40), reference_crop(img.convert("RGB"), 40))


def torch_bicubic_numpy(x: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """torch upsample_bicubic2d (align_corners=False): per output pixel 4x4 taps, A = -0.75, clamped borders."""
    A = -0.75

    def kernel_1d(t):
        def near(d):
            return ((A + 2) * d - (A + 3)) * d * d + 1

        def far(d):
            return ((A * d - 5 * A) * d + 8 * A) * d - 4 * A

        return np.array([far(t + 1), near(t), near(1 - t), far(2 - t)])

    def taps(n_in, n_out):
        idx, wts = [], []
        s = np.float32(n_in) / np.float32(n_out)  # torch's opmath for float input: float32 coordinates
        for o in range(n_out):
            real = float(s * (np.float32(o) + np.float32(0.5)) - np.float32(0.5))
            f = math.floor(real)
            idx.append([min(max(f - 1 + k, 0), n_in - 1) for k in range(4)])
            wts.append(kernel_1d(real - f))
        return np.array(idx), np.array(wts)

    iy, wy = taps(x.shape[1], oh)
    ix, wx = taps(x.shape[2], ow)
    g = x[:, iy[:, :, None, None], ix[None, None, :, :], :]  # [B, oh, 4, ow, 4, C]
    return np.einsum("bykxjc,yk,xj->byxc", g.astype(np.float64), wy, wx)


@pytest.mark.parametrize("src,dst", [((256, 256), (224, 224)), ((20, 33), (47, 16)), ((37, 37), (16, 16))])
def test_resize_matches_torch_bicubic_kernel(src, dst):
    x = np.random.default_rng(0).uniform(-1, 2, (2, *src, 3)).astype(np.float32)
    ref = torch_bicubic_numpy(x, *dst)
    ours = np.asarray(jax.jit(lambda v: resize_bicubic_torch(v, dst))(jnp.asarray(x)))
    assert ours.shape == (2, *dst, 3)
    assert np.abs(ours - ref).max() < 1e-5


def test_kernels_differ_from_jax_default_and_aa_rows_normalised():
    x = np.random.default_rng(1).uniform(0, 1, (1, 256, 256, 3)).astype(np.float32)
    ours = np.asarray(resize_bicubic_torch(jnp.asarray(x), 224))
    jaxs = np.asarray(jax.image.resize(jnp.asarray(x), (1, 224, 224, 3), "bicubic", antialias=False))
    assert np.abs(ours - jaxs).max() > 1e-3  # a = -0.75 (torch) vs a = -0.5 (jax)
    w = bicubic_weights(37, 16, antialias=True)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)
    assert (np.count_nonzero(w, axis=1) > 4).all()  # stretched support when downsampling


def test_normalize_and_pixel_paths():
    img = smooth_image(300, 410, seed=5)
    crop = center_crop_arr(img, 256)
    x = crop.astype(np.float32) / 255.0
    expect = (x - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    np.testing.assert_allclose(np.asarray(imagenet_normalize(jnp.asarray(x))), expect, rtol=1e-6, atol=1e-6)
    # train path: crop 256 -> flip -> [0,1] -> torch bicubic 224 -> normalise
    flipped = torch_bicubic_numpy(x[None, :, ::-1], 224, 224)[0]
    ref = (flipped - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    single = mmfm_train_transform(img, flip=True)
    assert single.shape == (224, 224, 3) and single.dtype == np.float32
    assert np.abs(single - ref).max() < 1e-4
    batch = np.asarray(mmfm_pixels(jnp.asarray(np.stack([crop, crop])), 224, jnp.asarray([False, True])))
    np.testing.assert_allclose(batch[1], single, atol=1e-5)
    # mirror images up to torch's float32 source coordinates (not exactly symmetric, as in torch)
    np.testing.assert_allclose(batch[0], batch[1][:, ::-1], atol=5e-4)
    # [CLS] path: direct 224 crop, no flip, no resize
    c224 = center_crop_arr(img, 224)
    cls_in = cls_fit_transform(img)
    np.testing.assert_allclose(cls_in, (c224 / np.float32(255) - np.array(IMAGENET_MEAN, np.float32))
                               / np.array(IMAGENET_STD, np.float32), atol=1e-6)
    np.testing.assert_allclose(np.asarray(mmfm_pixels(jnp.asarray(c224[None]), 224))[0], cls_in, atol=1e-6)


def test_random_flips_depend_on_global_index_only():
    key = jax.random.key(7)
    idx = jnp.arange(100, 164)
    full = np.asarray(random_flips(key, idx))
    assert 15 < full.sum() < 49
    np.testing.assert_array_equal(np.asarray(random_flips(key, idx[::-1]))[::-1], full)
    np.testing.assert_array_equal(np.asarray(random_flips(key, idx[10:20])), full[10:20])
