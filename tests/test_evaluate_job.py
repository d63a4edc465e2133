"""evaluate job: npz / folder inputs, reference statistics and images, metric identities."""

import numpy as np
from PIL import Image

from mmfm_jax.cli import run_job
from mmfm_jax.config_files import load_config


def test_evaluate_npz_and_folder(tmp_path, repo_dir):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, size=(12, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=imgs)
    # the reference batch holds the same images (no stored statistics): FID 0, precision = recall = 1
    np.savez(tmp_path / "ref.npz", arr_0=imgs)
    cfg = load_config(f"{repo_dir}/configs/evaluate.py:tiny", {"input.path": str(tmp_path / "samples.npz"),
                                                               "ref.path": str(tmp_path / "ref.npz")})
    s = run_job("evaluate", cfg, tmp_path / "w1")
    assert s["num_images"] == 12
    assert abs(s["fid"]) < 1e-3 and abs(s["sfid"]) < 1e-3
    assert s["precision"] == 1.0 and s["recall"] == 1.0
    assert s["inception_score"] >= 1.0
    # the same images as PNG files give the same metrics
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(folder / f"{i:06d}.png")
    cfg2 = load_config(f"{repo_dir}/configs/evaluate.py:tiny", {"input.path": str(folder),
                                                                "ref.path": str(tmp_path / "ref.npz")})
    s2 = run_job("evaluate", cfg2, tmp_path / "w2")
    for k in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert abs(s[k] - s2[k]) < 1e-6, k


def test_evaluate_against_stored_stats(tmp_path, repo_dir):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 255, size=(10, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=imgs)
    cfg = load_config(f"{repo_dir}/configs/evaluate.py:tiny", {"input.path": str(tmp_path / "samples.npz"),
                                                               "ref.path": "", "ref.allow_none": True,
                                                               "save_features": True})
    s = run_job("evaluate", cfg, tmp_path / "w")
    f = np.load(tmp_path / "w" / "features.npz")
    from mmfm_jax.eval import metrics

    mu, sigma = metrics.feature_stats(f["pool"])
    mu_s, sigma_s = metrics.feature_stats(f["spatial"])
    np.savez(tmp_path / "stats_ref.npz", mu=mu + 0.5, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    cfg2 = load_config(f"{repo_dir}/configs/evaluate.py:tiny", {"input.path": str(tmp_path / "samples.npz"),
                                                                "ref.path": str(tmp_path / "stats_ref.npz")})
    s2 = run_job("evaluate", cfg2, tmp_path / "w2")
    # shifting the mean by 0.5 in each of 2048 dims adds 0.25 * 2048 to the FID
    assert abs(s2["fid"] - 0.25 * 2048) < 1e-3 * 512
    assert abs(s2["sfid"]) < 1e-3
    assert "precision" not in s2 and "inception_score" in s
