import os
import signal
import subprocess
import sys
import time
import zipfile

import pytest

from mmfm_jax import launch


def _run(args):
    out = subprocess.run([sys.executable, "-m", "mmfm_jax.launch", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _tpu(*flags, job=("train", "--config=configs/train.py:xl_mode", "--workdir=gs://b/r")):
    return _run(["tpu", "--name=pod", "--zone=us-east5-a", "--dry-run", *flags, "--", *job]).strip().splitlines()


def test_tpu_dry_run_ships_a_wheel_of_this_checkout(repo_dir):
    lines = _tpu("--accelerator=v5p-16", "--create", "--env=FOO=1")
    ship = f"{repo_dir}/dist/mmfm_ship"
    assert lines[0] == ("gcloud compute tpus tpu-vm create pod --zone=us-east5-a --accelerator-type=v5p-16 "
                        "--version=v2-alpha-tpuv5")
    assert lines[1] == f"rm -rf {ship} {repo_dir}/build"
    assert lines[2].endswith(f"-m pip wheel -q --no-deps --wheel-dir {ship} {repo_dir}")
    assert lines[3] == f"cp -r {repo_dir}/configs {ship}/configs"
    assert lines[4].startswith("gcloud compute tpus tpu-vm ssh pod --zone=us-east5-a --worker=all '--command=mkdir")
    assert lines[5] == f"gcloud compute tpus tpu-vm scp --recurse {ship} pod:mmfm_jax/ --zone=us-east5-a --worker=all"
    setup, run = lines[6], lines[7]
    assert "--worker=all" in setup and "git clone" not in setup
    assert "uv venv -q --python 3.11 --python-preference only-managed .venv" in setup  # not the image's Python
    assert '"mmfm_jax[tpu] @ file://$PWD/mmfm_ship/mmfm_jax-0.1.0-py3-none-any.whl"' in setup
    assert "cp -r mmfm_ship/configs configs" in setup
    assert run == ("gcloud compute tpus tpu-vm ssh pod --zone=us-east5-a --worker=all '--command=cd mmfm_jax && "
                   "MMFM_DISTRIBUTED=auto FOO=1 .venv/bin/python -m mmfm_jax train --config=configs/train.py:xl_mode "
                   "--workdir=gs://b/r'")
    assert len(lines) == 8


def test_tpu_dry_run_multislice_through_gcs_staging(repo_dir):
    lines = _tpu("--num-slices=2", "--accelerator=v5p-128", "--create", "--spot", "--stage=gs://b/stage/", "--detach")
    assert lines[0] == ("gcloud compute tpus queued-resources create pod --zone=us-east5-a --node-count=2 "
                        "--node-prefix=pod --accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 --spot")
    assert lines[1] == ("gcloud compute tpus queued-resources describe pod --zone=us-east5-a "
                        "'--format=value(state.state)'")
    assert lines[5] == ("gcloud storage rsync --recursive --delete-unmatched-destination-objects "
                        f"{repo_dir}/dist/mmfm_ship gs://b/stage/mmfm_ship")
    setup, run = lines[6], lines[7]
    for line in (setup, run):
        assert line.startswith("gcloud compute tpus queued-resources ssh pod --zone=us-east5-a --worker=all --node=all")
    assert "gcloud storage rsync --recursive --delete-unmatched-destination-objects gs://b/stage/mmfm_ship " \
           "mmfm_ship" in setup
    assert "--workdir=gs://b/r --config.mesh.dcn_data=2 > logs/train-$(hostname).log" in run and "nohup env" in run
    assert len(lines) == 8 and not any(" scp " in x for x in lines)


def test_tpu_dry_run_repo_queued_and_skip_install():
    lines = _tpu("--repo=https://example.org/mmfm.git", "--ref=v1.2", "--create", "--queued", "--extras=tpu,torch",
                 job=("sample",))
    assert lines[0].startswith("gcloud compute tpus queued-resources create pod") and "--node-id=pod" in lines[0]
    assert "describe pod" in lines[1] and len(lines) == 4  # no local build: the workers clone
    assert "git clone -q https://example.org/mmfm.git src" in lines[2] and "fetch -q origin v1.2" in lines[2]
    assert '"mmfm_jax[tpu,torch] @ file://$PWD/src"' in lines[2]
    assert lines[3].startswith("gcloud compute tpus tpu-vm ssh pod")  # one slice: addressed as a TPU VM
    lines = _tpu("--skip-install", job=("sample",))
    assert len(lines) == 1 and "create" not in lines[0] and lines[0].endswith("-m mmfm_jax sample'")


_FAKE_GCLOUD = """import os, shutil, subprocess, sys
args = sys.argv[1:]
home = os.environ["FAKE_WORKER_HOME"]
with open(os.path.join(home, "..", "calls"), "a") as f:
    f.write(" ".join(args) + "\\n")
if args[3] == "ssh":  # run the command in the one worker's home
    cmd = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
    sys.exit(subprocess.run(["bash", "-c", cmd], cwd=home).returncode)
if args[3] == "scp":  # scp --recurse SRC NAME:DIR/  ->  DIR/basename(SRC)
    src, dest = args[5], args[6].split(":", 1)[1]
    shutil.copytree(src, os.path.join(home, dest, os.path.basename(src)))
"""

_FAKE_UV = """import os, sys, zipfile
args = sys.argv[1:]
if args[0] == "venv":  # a '.venv/bin/python' that sees only what 'uv pip install' unpacked
    os.makedirs(".venv/bin")
    with open(".venv/bin/python", "w") as f:
        f.write('#!/bin/bash\\nPYTHONPATH="$(dirname "$0")/../site" exec ' + sys.executable + ' "$@"\\n')
    os.chmod(".venv/bin/python", 0o755)
elif args[:2] == ["pip", "install"]:
    name, _, url = args[-1].partition(" @ file://")
    assert name == "mmfm_jax[tpu]" and url.endswith(".whl") and "--reinstall-package" in args, args
    zipfile.ZipFile(url).extractall(".venv/site")
"""


def _fake_tool(path, code):
    path.write_text(f"#!{sys.executable}\n{code}")
    path.chmod(0o755)


def test_tpu_launch_ships_installs_and_runs_on_a_stand_in_worker(repo_dir, tmp_path, monkeypatch, capfd):
    """Not a dry run: the wheel really is built (offline); stand-ins for ``gcloud`` (ssh runs the command in a
    local "worker" home, scp copies there) and ``uv`` (a venv that imports only the unpacked wheel) let the worker
    side run for real: the job starts from the shipped code and ``configs/`` and stops at config validation."""
    fake = tmp_path / "bin"
    fake.mkdir()
    _fake_tool(fake / "gcloud", _FAKE_GCLOUD)
    _fake_tool(fake / "uv", _FAKE_UV)
    worker = tmp_path / "worker"
    worker.mkdir()
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_WORKER_HOME", str(worker))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    ship = tmp_path / "out" / "mmfm_ship"
    rc = launch.main(["tpu", "--name=pod", "--zone=z", f"--ship-dir={ship}", "--no-build-isolation", "--",
                      "train", "--config=configs/train.py:tiny", "--config.mesh.dcn_data=0", "--workdir=/tmp/x"])
    err = capfd.readouterr().err
    assert rc != 0 and "config.mesh.dcn_data" in err, err[-2000:]  # validation ran in the worker's environment
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [c.split()[3] for c in calls] == ["ssh", "scp", "ssh", "ssh"]
    assert calls[-1].endswith("--command=cd mmfm_jax && MMFM_DISTRIBUTED=auto .venv/bin/python -m mmfm_jax train "
                              "--config=configs/train.py:tiny --config.mesh.dcn_data=0 --workdir=/tmp/x")
    with zipfile.ZipFile(ship / launch.wheel_name(repo_dir)) as z:
        assert "mmfm_jax/launch.py" in z.namelist()
    assert (worker / "mmfm_jax" / "configs" / "train.py").is_file()
    assert (worker / "mmfm_jax" / ".venv" / "site" / "mmfm_jax" / "parallel.py").is_file()
    assert not (worker / "mmfm_jax" / "mmfm_jax").exists()  # the job imported the installed wheel


def test_tpu_bad_flags():
    with pytest.raises(SystemExit, match="gs:// URI"):
        launch.main(["tpu", "--name=p", "--zone=z", "--stage=/tmp/x", "--dry-run", "--", "train"])
    with pytest.raises(SystemExit, match="give the job"):
        launch.main(["tpu", "--name=p", "--zone=z", "--dry-run"])


def test_slurm_dry_run(tmp_path):
    text = _run(["slurm", "--nodes=2", "--gpus-per-node=8", "--per=gpu", "--partition=gpu", f"--dir={tmp_path}",
                 "--dry-run", "--", "train", "--config=configs/train.py:xl_mode"])
    lines = text.splitlines()
    assert lines[0] == f"mkdir -p {tmp_path}/slurm_logs" and lines[1] == "#!/bin/bash"
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=8" in text
    assert "#SBATCH --partition=gpu" in text and f"#SBATCH --output={tmp_path}/slurm_logs/%x-%j.out" in text
    assert "srun --kill-on-bad-exit=1 python3 -m mmfm_jax train --config=configs/train.py:xl_mode" in text
    assert "MMFM_LOCAL_DEVICE_IDS" not in text
    text = _run(["slurm", "--nodes=2", "--per=node", "--gpus-per-node=4", "--dry-run", "--", "sample"])
    assert "#SBATCH --ntasks-per-node=1" in text
    assert "export MMFM_LOCAL_DEVICE_IDS=0,1,2,3" in text  # one task drives all GPUs of its node


def test_slurm_creates_the_log_folder_before_sbatch(tmp_path, monkeypatch):
    """A stand-in ``sbatch`` checks that the script's --output folder exists when it is called."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text('#!/bin/bash\nout=$(sed -n "s/^#SBATCH --output=//p" "$1")\n'
                                 'test -d "$(dirname "$out")" || exit 7\nbash -n "$1" || exit 8\n'
                                 f'cp "$1" {tmp_path}/submitted\n')
    (fake / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    logs = tmp_path / "work" / "logs" / "run1"
    assert launch.main(["slurm", f"--dir={tmp_path / 'work'}", "--log-dir=logs/run1", "--", "train"]) == 0
    assert logs.is_dir()
    assert f"--output={logs}/%x-%j.out" in (tmp_path / "submitted").read_text()


def test_supervise_stops_the_others_when_one_dies():
    """The local launcher's loop: the first process to die (here: SIGKILL) stops the rest at once and its code
    (128 + 9) is returned; a timeout returns 124."""
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    procs = [subprocess.Popen(sleeper),
             subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])]
    t0 = time.monotonic()
    assert launch.supervise(procs, grace_s=5.0, poll_s=0.02) == 137
    assert time.monotonic() - t0 < 20 and procs[0].returncode == -signal.SIGTERM
    procs = [subprocess.Popen(sleeper)]
    assert launch.supervise(procs, timeout_s=0.3, grace_s=0.0, poll_s=0.02) == 124
    assert procs[0].returncode is not None
    ok = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(2)]
    assert launch.supervise(ok, poll_s=0.02) == 0


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
