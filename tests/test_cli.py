"""The CLI fails fast, naming the key, before any work starts."""

import json
import os
import subprocess
import sys

import pytest

from mmfm_jax.config_files import load_config
from mmfm_jax.config_utils import ConfigError


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


# ---------------------------------------------------------------------------------------------------------------
# mmfm-jax: help, config resolution, one-line errors before the workdir, subcommands (in-process: cheap)

def _run(capsys, *args) -> tuple[int, str, str]:
    import logging

    from mmfm_jax import cli

    root = logging.getLogger()
    before = list(root.handlers)
    try:
        with pytest.raises(SystemExit) as e:
            cli.run(["mmfm-jax", *args])
            raise SystemExit(0)
    finally:  # the CLI's log handler writes to this test's captured stderr: drop it
        for h in set(root.handlers) - set(before):
            root.removeHandler(h)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_help_from_another_directory(tmp_path):
    out = _cli("train", "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith("mmfm-jax train: DiTDH flow matching")
    assert "variants: tiny, tiny_gm, xl_mode" in text and "top-level keys" in text and "  model.{" in text
    assert len(text.splitlines()) < 80


def test_top_level_help_and_print_config(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # shipped configs resolve from any directory
    code, out, _ = _run(capsys, "--help")
    assert code == 0 and "fit-gmm" in out and "prepare-imagenet" in out and "launch" in out
    code, out, err = _run(capsys, "train", "--config=configs/train.py:tiny_gm", "--config.train.num_steps=3",
                          "--config.model.hidden_size=(16,32)", "--print_config")
    assert code == 0, err
    assert "num_steps: 3" in out and "head: gm" in out and "- 16" in out
    code, out, err = _run(capsys, "fit-gmm", "--config=fit_gmm.py:tiny", "--print_config")
    assert code == 0 and "n_components: 4" in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args,needle", [
    (("trian",), "unknown job 'trian'; did you mean 'train'?"),
    (("train", "--config=train.py:xl_mod"), "unknown variant 'xl_mod' (variants: tiny, tiny_gm, xl_mode"),
    (("train", "--config=configs/trian.py"), "no such config file (shipped: demo.py"),
    (("train", "--config.train.num_stepz=3"),
     "config.train.num_stepz: unknown key; did you mean config.train.num_steps?"),
    (("train", "--config.train.num_steps=abc"), "config.train.num_steps = 'abc': must be an int"),
    (("train", "--config.model.hidden_size=(0,48)"), "config.model.hidden_size = (0, 48): both entries must be > 0"),
    (("train", "--workdirr=x"), "did you mean --workdir?"),
    (("train", "--config.train.global_batch_size=12", "--config.train.grad_accum_steps=1"),
     "config.train.global_batch_size = 12: the micro-batch 12"),
    (("train", "--config.data.kind=latents", "--config.data.path=/nonexistent/latents"),
     "config.data.path = '/nonexistent/latents': no such folder (expected a latent dataset folder written by"),
    (("train", "--config.source.kind=gmm_indep", "--config.source.path=/nonexistent/src"),
     "config.source.path = '/nonexistent/src': no such folder (expected a source folder written by `mmfm-jax fit-gmm`"),
    (("sample", "--config=sample.py:imagenet_mode"),
     "config.model.path = 'artifacts/checkpoints/dinov2-b/mode-gmm-100k.pt': no such file (expected an official "
     "checkpoint (.pt) from the official release (download: `mmfm-jax fetch-release`"),
    (("evaluate", "--config=evaluate.py:tiny", "--config.input.path=/nonexistent.npz", "--config.ref.allow_none=True",
      "--config.ref.path="), "config.input.path = '/nonexistent.npz': no such file"),
    (("fit-gmm", "--config=fit_gmm.py:official"), "config.import_official.cls_pkl = 'artifacts/gmm/"),
    (("demo", "--config.train.global_batch_size=60"), "config.train.global_batch_size = 60"),
])
def test_one_line_errors_before_the_workdir(capsys, tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, *args, f"--workdir={tmp_path}/w")
    assert code == 2
    assert needle in err, err
    assert len(err.strip().splitlines()) <= 2 and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_sample_needs_a_checkpoint(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(load_config("train.py:tiny").to_dict()))
    code, _, err = _run(capsys, "sample", "--config=sample.py:tiny", f"--config.model.workdir={run}",
                        f"--workdir={tmp_path}/w")
    assert code == 2 and f"config.model.workdir = '{run}': no checkpoints in {run}/checkpoints" in err
    assert not (tmp_path / "w").exists()


def test_subcommands(capsys):
    code, _, err = _run(capsys, "bench")
    assert code == 2 and "benches: gmm" in err
    code, out, _ = _run(capsys, "launch", "--help")
    assert code == 0 and "local" in out and "slurm" in out
    code, out, _ = _run(capsys, "prepare-imagenet", "--help")
    assert code == 0 and "--manual_dir" in out


def test_overrides_parse_by_type(repo_dir):
    from mmfm_jax.config_files import parse_value, set_override

    cfg = load_config("train.py:tiny")  # a shipped config by name
    assert cfg.model.hidden_size == (32, 48)
    assert parse_value("false", True, "k") is False and parse_value("3", 1.0, "k") == 3.0
    assert parse_value("(1, 2)", (3, 4), "k") == (1, 2) and parse_value("7", (3,), "k") == (7,)
    assert parse_value("runs/x", "", "k") == "runs/x"
    with pytest.raises(ConfigError, match="config.k = '1.5': must be an int"):
        parse_value("1.5", 2, "k")
    with pytest.raises(ConfigError, match="config.train = '3': is a group of keys"):
        parse_value("3", cfg.train, "train")
    cfg.unlock()
    set_override(cfg, "train.base_lr", "1e-3", from_text=True)
    assert cfg.train.base_lr == 1e-3
