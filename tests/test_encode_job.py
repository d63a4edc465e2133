"""encode job on a generated JPEG folder: shards, [CLS] sidecars, statistics, bad images, resume."""

import json

import numpy as np
import pytest
from PIL import Image

from mmfm_jax.cli import run_job
from mmfm_jax.config_files import load_config
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
    # the bad images of the shard written before the restart are still counted (index 5: the corrupt file)
    assert s["bad_images"] == 1 and s["bad_examples"] == [{"index": 5, "reason": "undecodable"}]
    assert s["images_seen"] == 12 and s["bad_images_now"] == 0 and s["images_seen_now"] == 6
    assert (lat_dir / "shard-00000.array_record").stat().st_mtime_ns == mtime0
    after = latents_lib.LatentShards(lat_dir).fetch(np.arange(22))
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def _wait_for(cond, proc, log, timeout=90.0):
    """Poll ``cond()`` (short sleeps) until true; fail if ``proc`` exits first or on timeout."""
    import time

    t_end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"encode subprocess exited early (rc={proc.returncode}):\n{log.read_text()[-4000:]}")
        if time.monotonic() > t_end:
            raise AssertionError(f"timed out waiting for the encode subprocess:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


def _manifest_shards(lat_dir):
    try:
        return [s["id"] for s in json.loads((lat_dir / latents_lib.MANIFEST).read_text())["shards"]]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def test_encode_sigkill_then_restart_equals_uninterrupted(encoded, tmp_path, repo_dir):
    """SIGKILL a real ``python -m mmfm_jax encode`` after its first shard, restart: same dataset as one run.

    The hang point is deterministic without a debug knob: image 8 (shard 1) is a named pipe, so shard 1's loader
    blocks on it once shard 0 is committed; the kill lands while shard 1 is in flight."""
    import os
    import shutil
    import signal
    import subprocess
    import sys

    root_ref, work_ref, _, _ = encoded
    root = tmp_path / "train"
    shutil.copytree(root_ref, root)
    fifo = root / "b" / "img2.JPEG"  # index 8: shard 1
    real_bytes = fifo.read_bytes()
    fifo.unlink()
    os.mkfifo(fifo)
    work = tmp_path / "run"
    lat = work / "latents"
    log = tmp_path / "encode.log"
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8", MMFM_NO_PROGRESS="1",
               PYTHONPATH=os.pathsep.join([str(repo_dir), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "mmfm_jax", "encode", f"--config={repo_dir}/configs/encode.py:tiny",
           f"--config.data.root={root}", f"--workdir={work}"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=repo_dir, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: _manifest_shards(lat) == [0], proc, log)  # shard 0 committed and in the manifest
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the killed run: an incomplete manifest that lists only the finished shard, and nothing of shard 1
    m = json.loads((lat / latents_lib.MANIFEST).read_text())
    assert not m["complete"] and [s["id"] for s in m["shards"]] == [0] and m["num_examples"] == 10
    ds = latents_lib.LatentShards(lat, allow_incomplete=True)
    assert len(ds) == 10 and not (work / "summary.json").exists() and "encode: 8 devices" in log.read_text()
    assert not list(lat.glob("*-00001*")) and not (lat / "stats.npz").exists()
    # temp files of a kill at other moments, then the image back in place, then restart (in-process)
    stale = [".shard-00001.array_record.tmp-999999", ".cls-00001.tmp.npz", ".stats-00001.tmp.npz",
             ".manifest.json.x1y2z3.tmp", ".shard-00001.json.q9w8.tmp", ".stats.npz.tmp-999999.npz"]
    for name in stale:
        (lat / name).write_bytes(b"partial")
    fifo.unlink()
    fifo.write_bytes(real_bytes)
    mtime0 = (lat / "shard-00000.array_record").stat().st_mtime_ns
    cfg = load_config(f"{repo_dir}/configs/encode.py:tiny", {"data.root": str(root)})
    s = run_job("encode", cfg, work)
    assert s["shards_written_now"] == 1 and s["examples_written_now"] == 12 and s["bad_images_now"] == 0
    assert s["bad_images"] == 1  # the killed run's shard 0 holds the corrupt image: the total still counts it
    assert (lat / "shard-00000.array_record").stat().st_mtime_ns == mtime0
    assert not [p.name for p in lat.iterdir() if ".tmp" in p.name]
    # == the uninterrupted run (the fixture's): manifest, records per (index, flip), sidecars, statistics
    ref_dir = work_ref / "latents"
    assert json.loads((lat / latents_lib.MANIFEST).read_text()) == json.loads((ref_dir / latents_lib.MANIFEST)
                                                                                .read_text())
    a, b = (latents_lib.LatentShards(d).fetch(np.arange(22)) for d in (lat, ref_dir))
    for k in ("index", "flip", "label"):
        np.testing.assert_array_equal(a[k], b[k])
    for k in ("latent", "cls"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5)
    for sid in range(2):
        with np.load(lat / f"cls-{sid:05d}.npz") as za, np.load(ref_dir / f"cls-{sid:05d}.npz") as zb:
            np.testing.assert_array_equal(za["index"], zb["index"])
            np.testing.assert_allclose(za["cls"], zb["cls"], rtol=1e-5, atol=1e-5)
    sa, sb = latents_lib.load_stats(lat), latents_lib.load_stats(ref_dir)
    assert set(sa) == set(sb)
    for k in sa:
        np.testing.assert_allclose(sa[k], sb[k], rtol=1e-6, atol=1e-9)


def test_encode_imports_statistics(encoded, tmp_path, repo_dir):
    """``stats.import_path``: the dataset's normalisation statistics come from a file (our stats.npz here; the
    official stat.pt goes through the same load_stats), variance only, shape-checked."""
    root, work, _, _ = encoded
    var = np.full((4, 48), 3.0, np.float32)
    np.savez(tmp_path / "var_only.npz", var=var)
    cfg = load_config(f"{repo_dir}/configs/encode.py:tiny", {"data.root": str(root),
                                                             "stats.import_path": str(tmp_path / "var_only.npz")})
    s = run_job("encode", cfg, tmp_path / "enc")
    assert s["stats"] == f"imported {tmp_path / 'var_only.npz'}"
    with np.load(tmp_path / "enc" / "latents" / "stats.npz") as z:
        np.testing.assert_array_equal(z["var"], var)
        assert "mean" not in z.files
    # the records are the same encoder outputs as without the import (statistics are applied when reading)
    a = latents_lib.LatentShards(work / "latents").fetch(np.arange(4))
    b = latents_lib.LatentShards(tmp_path / "enc" / "latents").fetch(np.arange(4))
    np.testing.assert_array_equal(a["latent"], b["latent"])
    np.savez(tmp_path / "bad.npz", var=np.ones((5, 48), np.float32))
    bad = load_config(f"{repo_dir}/configs/encode.py:tiny", {"data.root": str(root),
                                                             "stats.import_path": str(tmp_path / "bad.npz")})
    with pytest.raises(ValueError, match=r"var has shape \(5, 48\), expected \(4, 48\)"):
        run_job("encode", bad, tmp_path / "enc_bad")
    assert not list((tmp_path / "enc_bad").rglob("shard-*"))  # failed before encoding anything
