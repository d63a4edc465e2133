"""encode job on a generated JPEG folder: shards, [CLS] sidecars, statistics, bad images, resume."""

import json

import numpy as np
import pytest
from PIL import Image

from mmfm_jax.cli import run_job
from mmfm_jax.config_utils import load_config
from mmfm_jax.data import latents as latents_lib


def make_folder(root, n_per_class=5, classes=("a", "b"), bad=True, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 255, size=(40 + 3 * i, 48, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"img{i}.JPEG", quality=90)
    if bad:
        (root / classes[0] / "zz_corrupt.JPEG").write_bytes(b"not a jpeg at all")
        grey = rng.integers(0, 255, size=(30, 30), dtype=np.uint8)
        Image.fromarray(grey, "L").save(root / classes[1] / "zz_grey.png")
    return root


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, repo_dir):
    root = make_folder(tmp_path_factory.mktemp("imgs") / "train")
    work = tmp_path_factory.mktemp("enc")
    cfg = load_config(f"{repo_dir}/configs/encode.py:tiny", {"data.root": str(root)})
    summary = run_job("encode", cfg, work)
    return root, work, cfg, summary


def test_encode_outputs(encoded):
    root, work, cfg, s = encoded
    n = 12  # 10 good + corrupt + greyscale
    assert s["images"] == n and s["bad_images"] == 1 and s["bad_by_reason"]["undecodable"] == 1
    ds = latents_lib.LatentShards(work / "latents")
    # 11 decodable images x 2 views
    assert len(ds) == 22 and ds.manifest["complete"] and ds.manifest["num_shards"] == 2
    ex = ds.fetch(np.arange(len(ds)))
    assert ex["latent"].shape == (22, 4, 48) and ex["cls"].shape == (22, 48)
    assert set(ex["flip"].tolist()) == {0, 1}
    assert sorted(set(ex["index"].tolist())) == [i for i in range(12) if i != 5]  # index 5 = the corrupt file
    side = sorted((work / "latents").glob("cls-*.npz"))
    assert len(side) == 2
    stats = np.load(work / "latents" / "stats.npz")
    unflipped = ex["latent"][ex["flip"] == 0].astype(np.float64)
    np.testing.assert_allclose(stats["var"], unflipped.var(0), rtol=1e-4, atol=1e-6)
    assert json.loads((work / "summary.json").read_text())["bad_images"] == 1


def test_encode_matches_direct_model(encoded):
    import jax.numpy as jnp
    from flax import nnx

    from mmfm_jax.data import images as images_lib
    from mmfm_jax.data.preprocess import mmfm_pixels
    from mmfm_jax.models.dinov2 import Dinov2, Dinov2Config, encode_mmfm

    root, work, cfg, _ = encoded
    model = Dinov2(Dinov2Config.preset("fixture_small"), rngs=nnx.Rngs(0))
    src = images_lib.ImageFolderSource(root)
    ex0 = images_lib.LoadExample(src, 32)(3)
    lat, cls = encode_mmfm(model, mmfm_pixels(jnp.asarray(ex0["image"][None]), 28, jnp.asarray([True])))
    ds = latents_lib.LatentShards(work / "latents")
    got = ds.fetch(np.arange(len(ds)))
    row = np.where((got["index"] == 3) & (got["flip"] == 1))[0][0]
    np.testing.assert_allclose(got["latent"][row], np.asarray(lat[0]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["cls"][row], np.asarray(cls[0]), rtol=1e-4, atol=1e-4)


def test_encode_resume_rewrites_only_missing_shard(encoded, tmp_path):
    import shutil

    root, work, cfg, _ = encoded
    work2 = tmp_path / "enc2"
    shutil.copytree(work, work2)
    lat_dir = work2 / "latents"
    before = latents_lib.LatentShards(lat_dir).fetch(np.arange(22))
    # simulate a kill in the middle of shard 1: its data file exists but was never marked finished
    (lat_dir / "shard-00001.json").unlink()
    (lat_dir / "stats-00001.npz").unlink()
    mtime0 = (lat_dir / "shard-00000.array_record").stat().st_mtime_ns
    s = run_job("encode", cfg, work2)
    assert s["shards_written_now"] == 1
    assert (lat_dir / "shard-00000.array_record").stat().st_mtime_ns == mtime0
    after = latents_lib.LatentShards(lat_dir).fetch(np.arange(22))
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
