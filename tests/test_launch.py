import subprocess
import sys

from mmfm_jax import launch


def _run(args):
    out = subprocess.run([sys.executable, "-m", "mmfm_jax.launch", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_tpu_dry_run():
    text = _run(["tpu", "--name=pod", "--zone=us-east5-a", "--accelerator=v5p-16", "--create", "--dry-run",
                 "--env=FOO=1", "--", "train", "--config=configs/train.py:xl_mode", "--workdir=gs://b/r"])
    lines = text.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("gcloud compute tpus tpu-vm create pod --zone=us-east5-a")
    assert "--accelerator-type=v5p-16" in lines[0]
    assert "--worker=all" in lines[1] and "pip install" in lines[1]
    assert "--worker=all" in lines[2]
    assert "FOO=1 python3 -m mmfm_jax train --config=configs/train.py:xl_mode --workdir=gs://b/r" in lines[2]


def test_tpu_reuse_skip_install():
    text = _run(["tpu", "--name=pod", "--zone=z", "--skip-install", "--dry-run", "--", "sample"])
    assert len(text.strip().splitlines()) == 1 and "create" not in text


def test_slurm_dry_run():
    text = _run(["slurm", "--nodes=2", "--gpus-per-node=8", "--per=gpu", "--partition=gpu", "--dry-run", "--",
                 "train", "--config=configs/train.py:xl_mode"])
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=8" in text
    assert "#SBATCH --partition=gpu" in text
    assert "srun --kill-on-bad-exit=1 python3 -m mmfm_jax train --config=configs/train.py:xl_mode" in text
    text = _run(["slurm", "--nodes=2", "--per=node", "--dry-run", "--", "sample"])
    assert "#SBATCH --ntasks-per-node=1" in text


def test_local_dry_run():
    text = _run(["local", "--processes=2", "--cpu-devices=4", "--port=12345", "--dry-run", "--", "toy"])
    lines = text.strip().splitlines()
    assert len(lines) == 2
    for pid, line in enumerate(lines):
        assert f"MMFM_PROCESS_ID={pid}" in line and "MMFM_NUM_PROCESSES=2" in line
        assert "MMFM_COORDINATOR_ADDRESS=127.0.0.1:12345" in line
        assert "--xla_force_host_platform_device_count=4" in line
        assert line.endswith("-m mmfm_jax toy")


def test_bad_env_flag():
    import pytest

    with pytest.raises(SystemExit, match="KEY=VALUE"):
        launch.main(["local", "--dry-run", "--env=oops", "--", "toy"])


def test_gpu_pending_script_parses_and_needs_a_part(repo_dir):
    script = f"{repo_dir}/launch/gpu_pending.sh"
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    out = subprocess.run(["bash", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "usage: launch/gpu_pending.sh train|gmm" in out.stderr


def test_local_launch_runs_two_processes_for_real(repo_dir, tmp_path):
    """launch/local.sh starts 2 processes x 4 CPU devices that join one jax.distributed job through the MMFM_*
    variables: the tiny train job runs 2 steps and checkpoints the data state of both processes."""
    import json
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env["PYTHON"] = sys.executable
    wd = tmp_path / "run"
    out = subprocess.run(
        ["bash", f"{repo_dir}/launch/local.sh", "--processes=2", "--cpu-devices=4", "--timeout=300", "--",
         "train", f"--config={repo_dir}/configs/train.py:tiny", "--config.train.num_steps=2",
         "--config.checkpoint.every_steps=2", f"--workdir={wd}"],
        cwd=repo_dir, env=env, capture_output=True, text=True, timeout=360)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["final_step"] == 2
    data = wd / "checkpoints" / "2" / "data"
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= {p.name for p in data.iterdir()}
