"""scikit-learn's digits (1,797 8x8 greyscale images, 10 classes) as a latent dataset for the demo.

Latent = pixel tokens: ``[N, 64, 1]`` (L = 8*8 row-major, C = 1), pixel values 0..16 mapped to [-1, 1].
[CLS] vector = the flattened image ``[N, 64]`` (the same values), which the demo's GMM is fitted on.
"""

from __future__ import annotations

import numpy as np

HEIGHT = WIDTH = 8


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """-> {'train': {latent [N,64,1], cls [N,64], label [N], index [N]}, 'test': {...}} (fixed, seeded split)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0) * 2.0 - 1.0  # [N, 8, 8] in [-1, 1]
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    out = {}
    for name, idx in (("test", np.sort(perm[:n_test])), ("train", np.sort(perm[n_test:]))):
        flat = x[idx].reshape(len(idx), HEIGHT * WIDTH)
        out[name] = {"latent": flat[:, :, None].copy(), "cls": flat.copy(), "label": y[idx],
                     "index": idx.astype(np.int64)}
    return out


def to_images(latents: np.ndarray) -> np.ndarray:
    """Latents [N, 64, 1] (or [N, 64]) in [-1, 1] -> uint8 images [N, 8, 8] (clipped)."""
    x = np.asarray(latents, np.float32).reshape(-1, HEIGHT, WIDTH)
    return np.clip((x + 1.0) * 127.5, 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, cols: int = 16, scale: int = 4, pad: int = 1) -> np.ndarray:
    """uint8 [N, h, w] -> one uint8 grid image [H, W], each cell upscaled ``scale`` x (nearest)."""
    n, h, w = images.shape
    rows = -(-n // cols)
    big = np.repeat(np.repeat(images, scale, 1), scale, 2)
    hh, ww = h * scale + pad, w * scale + pad
    grid = np.full((rows * hh + pad, cols * ww + pad), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[pad + r * hh: pad + r * hh + h * scale, pad + c * ww: pad + c * ww + w * scale] = big[i]
    return grid
