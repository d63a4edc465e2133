"""Sample grids in TensorBoard during training: latents shown as images, a grid every ``preview.every_steps``."""

import numpy as np

from mmfm_jax.cli import run_job
from mmfm_jax.config_files import load_config
from mmfm_jax.train.preview import latents_to_rgb, rgb_grid


def test_latents_to_rgb_and_grid():
    r = np.random.default_rng(0)
    x = r.normal(size=(5, 16, 8))
    x[:, :8] += 5.0 * np.arange(8)  # the first principal component separates the two halves of each grid
    img = latents_to_rgb(x)
    assert img.shape == (5, 4, 4, 3) and img.dtype == np.uint8
    pc1 = img[..., 0].reshape(5, 16).astype(int)
    assert abs(pc1[:, :8].mean() - pc1[:, 8:].mean()) > 60
    grey = latents_to_rgb(r.normal(size=(2, 64, 1)))
    assert grey.shape == (2, 8, 8, 3) and (grey[..., 0] == grey[..., 2]).all()
    g = rgb_grid(img)
    assert g.shape == (2 * 66 + 2, 3 * 66 + 2, 3)  # 5 cells -> 2 rows x 3 columns of 64 px + padding


def test_train_writes_sample_grids(tmp_path, monkeypatch):
    from mmfm_jax.utils import MetricWriter

    images = []
    monkeypatch.setattr(MetricWriter, "image", lambda self, tag, step, img: images.append((tag, step, img)))
    cfg = load_config("train.py:tiny_gm", {"train.num_steps": 4, "preview.every_steps": 2,
                                           "preview.num_samples": 5, "preview.num_points": 3})
    s = run_job("train", cfg, tmp_path / "w")
    assert s["final_step"] == 4
    assert [(t, st) for t, st, _ in images] == [("train/samples", 2), ("train/samples", 4)]
    img = images[-1][2]
    assert img.dtype == np.uint8 and img.shape == (2 * 66 + 2, 3 * 66 + 2, 3) and img.std() > 0
