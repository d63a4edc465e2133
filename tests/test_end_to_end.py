"""train (8 devices, GMM source, mode-conditional) -> checkpoint -> sample with AutoGuidance on 1 and 2 devices
(identical images, any batch size) -> decode -> resume -> evaluate."""

import numpy as np
import pytest

from mmfm_jax.cli import run_job
from mmfm_jax.config_files import load_config
from mmfm_jax.gmm.diag import DiagGMM
from mmfm_jax.gmm.source import ModeSource, save_source


@pytest.fixture(scope="module")
def trained(tmp_path_factory, repo_dir):
    root = tmp_path_factory.mktemp("e2e")
    rng = np.random.default_rng(0)
    k, d, tokens, ch = 8, 4, 16, 4
    gmm = DiagGMM(weights=np.full(k, 1 / k, np.float32), means=rng.normal(size=(k, d)).astype(np.float32),
                  variances=np.ones((k, d), np.float32))
    src = ModeSource(gmm=gmm, means=rng.normal(size=(k, tokens, ch)).astype(np.float32),
                     variances=np.full(k, 0.5, np.float32))
    save_source(root / "source", src)
    np.savez(root / "stats.npz", var=np.full((tokens, ch), 2.0, np.float32))
    cfg = load_config(f"{repo_dir}/configs/train.py:tiny", {
        "source.kind": "gmm_mode", "source.path": str(root / "source"), "source.y_from": "mode",
        "model.use_y_conditioning": True, "checkpoint.every_steps": 3})
    s = run_job("train", cfg, root / "train")
    assert s["final_step"] == 6 and s["checkpoints"] == [3, 6]
    return root


def _sample(repo_dir, root, name, devices, batch, extra=None):
    overrides = {"model.workdir": str(root / "train"), "guide.enabled": True, "guide.workdir": str(root / "train"),
                 "guide.step": 3, "guide.scale": 1.5, "source.kind": "gmm", "source.path": str(root / "source"),
                 "decoder.stats": str(root / "stats.npz"), "mesh.num_devices": devices, "batch_size": batch}
    overrides.update(extra or {})
    cfg = load_config(f"{repo_dir}/configs/sample.py:tiny", overrides)
    return run_job("sample", cfg, root / name)


def _images(path):
    shards = sorted(path.glob("images-*.npz"))
    return np.concatenate([np.load(s)["arr_0"] for s in shards]), np.concatenate([np.load(s)["mode"] for s in shards])


def test_sample_is_device_and_batch_invariant_and_resumes(trained, repo_dir):
    root = trained
    s1 = _sample(repo_dir, root, "s1", 1, 8)
    assert s1["guide_scale"] == 1.5 and s1["nfe_per_model"] == 4 and s1["shards"] == 2
    s2 = _sample(repo_dir, root, "s2", 2, 4)
    assert s2["shards_written_now"] == 2
    a, ka = _images(root / "s1" / "samples")
    b, kb = _images(root / "s2" / "samples")
    assert a.shape == (20, 16, 16, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(ka, kb)
    np.testing.assert_array_equal(a, b)
    assert len(set(ka.tolist())) > 1  # modes are drawn from the GMM weights
    assert (root / "s1" / "grid.png").exists()
    # guidance changes the images; no guidance differs from guided
    s3 = _sample(repo_dir, root, "s3", 2, 8, {"guide.enabled": False})
    c, _ = _images(root / "s3" / "samples")
    assert s3["guide"] is None and not np.array_equal(a, c)
    # resume: a lost shard is redone, identically
    (root / "s2" / "samples" / "images-00001.npz").unlink()
    s4 = _sample(repo_dir, root, "s2", 2, 4)
    assert s4["shards_written_now"] == 1
    np.testing.assert_array_equal(_images(root / "s2" / "samples")[0], a)


def test_evaluate_samples(trained, repo_dir):
    root = trained
    if not (root / "s1").exists():
        _sample(repo_dir, root, "s1", 1, 8)
    cfg = load_config(f"{repo_dir}/configs/evaluate.py:tiny", {"input.path": str(root / "s1" / "samples"),
                                                               "ref.path": "", "ref.allow_none": True})
    s = run_job("evaluate", cfg, root / "eval")
    assert s["num_images"] == 20 and np.isfinite(s["inception_score"])
