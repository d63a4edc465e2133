"""mmfm_jax.api.Pipeline.from_workdir on a tiny trained run: the README snippet runs, sampling equals the sample job,
conventions come from the run's config.json, and the Checkpointer's fallback is used (read-only)."""

import json
import math
import re
import shutil

import numpy as np
import pytest

from mmfm_jax.cli import run_job
from mmfm_jax.config_files import load_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, repo_dir):
    root = tmp_path_factory.mktemp("api")
    cfg = load_config(f"{repo_dir}/configs/train.py:tiny", {"train.num_steps": 4})
    s = run_job("train", cfg, root / "train")
    assert s["checkpoints"] == [2, 4]
    return root


def test_readme_snippet_runs(run_dir, repo_dir, monkeypatch):
    text = (repo_dir / "README.md").read_text()
    block = re.search(r"### Python API.*?```python\n(.*?)```", text, re.S)
    assert block is not None, "README: no ```python block under '### Python API'"
    code = block.group(1)
    assert len(code.strip().splitlines()) <= 6
    (run_dir / "runs").mkdir(exist_ok=True)
    if not (run_dir / "runs" / "train").exists():
        (run_dir / "runs" / "train").symlink_to(run_dir / "train")
    monkeypatch.chdir(run_dir)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102  (our own README)
    x, pipe = scope["x"], scope["pipe"]
    assert x.shape == (8, 16, 4) and x.dtype == np.float32 and np.isfinite(x).all()
    # conventions from config.json: the tiny run's shift is sqrt(16 * 4 / 4096), not ImageNet's sqrt(48)
    assert pipe.conventions["shift"] == pytest.approx(0.125) and pipe.latent_shape == (16, 4)
    assert pipe.conventions["dtype"] == "float32" and pipe.main[3].endswith("@4")


def test_sample_equals_the_sample_job(run_dir, repo_dir):
    from mmfm_jax.api import Pipeline

    cfg = load_config(f"{repo_dir}/configs/sample.py:tiny", {
        "model.workdir": str(run_dir / "train"), "decoder.enabled": False, "num_samples": 6, "seed": 3,
        "batch_size": 8, "output.images_per_shard": 6})
    run_job("sample", cfg, run_dir / "sample")
    want = np.load(run_dir / "sample" / "samples" / "images-00000.npz")["arr_0"]
    pipe = Pipeline.from_workdir(run_dir / "train")
    got = pipe.sample(6, seed=3, steps=5, batch_size=4)  # another batch split
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(pipe.sample(6, seed=4, steps=5, batch_size=4), got)
    assert len(pipe._fns) == 1  # another seed reuses the compiled program
    with pytest.raises(ValueError, match="gm_ode.*GM model"):
        pipe.sample(2, solver="gm_ode")
    with pytest.raises(ValueError, match="guidance needs a guide"):
        pipe.sample(2, guidance=1.5)
    with pytest.raises(ValueError, match="no decoder"):
        pipe.decode(got)


def test_shift_from_config_and_checkpoint_fallback(run_dir, repo_dir, caplog):
    from mmfm_jax.api import Pipeline
    from mmfm_jax.train.sampling import read_train_config, train_shift

    work = run_dir / "copy"
    shutil.copytree(run_dir / "train", work, symlinks=True)
    cfg = json.loads((work / "config.json").read_text())
    cfg["train"]["time_shift_base"] = 1024
    (work / "config.json").write_text(json.dumps(cfg))
    assert train_shift(read_train_config(work), (16, 4)) == pytest.approx(math.sqrt(64 / 1024))
    for f in (work / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file() and f.suffix not in (".json",) and f.stat().st_size > 0 and "ocdbt" not in f.name:
            f.write_bytes(b"\0" * f.stat().st_size)
    with caplog.at_level("WARNING"):
        pipe = Pipeline.from_workdir(work)
    assert pipe.main[3].endswith("@2") and pipe.conventions["shift"] == pytest.approx(0.25)
    assert (work / "checkpoints" / "4").exists()  # a reader leaves the run's files in place
    assert "cannot be restored" in caplog.text
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 3"):
        Pipeline.from_workdir(work, step=3)
    # the sample job reads the same shift (sampler.shift=0) and falls back the same way
    cfg = load_config(f"{repo_dir}/configs/sample.py:tiny", {
        "model.workdir": str(work), "decoder.enabled": False, "num_samples": 4, "output.images_per_shard": 4})
    s = run_job("sample", cfg, run_dir / "sample_copy")
    assert s["model"].endswith("@2") and (work / "checkpoints" / "4").exists()
    want = np.load(run_dir / "sample_copy" / "samples" / "images-00000.npz")["arr_0"]
    np.testing.assert_allclose(pipe.sample(4, steps=5), want, rtol=1e-5, atol=1e-5)
    assert "shift=0.25" in repr(pipe)


def test_normalisation_and_encoder_from_the_latent_dataset(run_dir):
    from mmfm_jax.api import Pipeline

    work, ds = run_dir / "latents_run", run_dir / "enc" / "latents"
    shutil.copytree(run_dir / "train", work, symlinks=True)
    cfg = json.loads((work / "config.json").read_text())
    cfg["data"].update(kind="latents", path=str(ds), normalize=True)
    (work / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match=r"config\.data\.path"):
        Pipeline.from_workdir(work)
    ds.mkdir(parents=True)
    (ds / "manifest.json").write_text(json.dumps({"normalized": False}))  # raw latents, normalised when read
    var = np.full((16, 4), 4.0, np.float32)
    np.savez(ds / "stats.npz", var=var)
    (ds.parent / "config.json").write_text(json.dumps({"encoder": {"weights": "org/encoder", "random_init": False},
                                                       "data": {"image_size": 28}}))
    pipe = Pipeline.from_workdir(work)
    c = pipe.conventions
    assert c["normalized"] and c["encoder"] == "org/encoder" and c["image_size"] == 28 and pipe.mean is None
    np.testing.assert_array_equal(np.asarray(pipe.var), var)
