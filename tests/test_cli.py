"""The CLI fails fast, naming the key, before any work starts."""

import os
import subprocess
import sys

import pytest

from mmfm_jax.config_utils import ConfigError, load_config


def _cli(*args, cwd):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "mmfm_jax", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


def test_unknown_job_lists_jobs(repo_dir):
    out = _cli("nope", cwd=repo_dir)
    assert out.returncode == 2
    assert "unknown job 'nope'" in out.stderr and "fit-gmm" in out.stderr and "train" in out.stderr


@pytest.mark.parametrize("flag,needle", [
    ("--config.gmm.n_componentz=3", "n_componentz"),
    ("--config.gmm.n_components=abc", "config.gmm.n_components"),
])
def test_bad_keys_and_types_fail_in_flag_parsing(repo_dir, tmp_path, flag, needle):
    out = _cli("fit-gmm", "--config=configs/fit_gmm.py:tiny", flag, f"--workdir={tmp_path}/w", cwd=repo_dir)
    assert out.returncode != 0
    assert needle in out.stderr
    assert not (tmp_path / "w").exists()  # nothing was started


@pytest.mark.parametrize("flag,needle", [
    ("--config.gmm.n_components=-1", "config.gmm.n_components"),
    ("--config.mesh.data=0", "config.mesh.data"),
    ("--config.spatial.shift=median", "config.spatial.shift"),
])
def test_bad_values_fail_before_work(repo_dir, tmp_path, flag, needle):
    out = _cli("fit-gmm", "--config=configs/fit_gmm.py:tiny", "--config.data.latents_dir=/nonexistent", flag,
               f"--workdir={tmp_path}/w", cwd=repo_dir)
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr
    assert not (tmp_path / "w").exists()


def test_missing_required_value(repo_dir, tmp_path):
    out = _cli("fit-gmm", "--config=configs/fit_gmm.py:tiny", f"--workdir={tmp_path}/w", cwd=repo_dir)
    assert out.returncode == 2 and "config.data.latents_dir" in out.stderr


def test_load_config_overrides(repo_dir):
    cfg = load_config(f"{repo_dir}/configs/fit_gmm.py:tiny", {"gmm.n_components": 7})
    assert cfg.gmm.n_components == 7 and cfg.latent.grid == (2, 2)
    with pytest.raises(ConfigError, match="config.gmm.nope"):
        load_config(f"{repo_dir}/configs/fit_gmm.py:tiny", {"gmm.nope": 1})
    with pytest.raises(ValueError, match="unknown variant"):
        load_config(f"{repo_dir}/configs/fit_gmm.py:bogus")
