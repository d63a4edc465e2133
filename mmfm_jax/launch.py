"""Launch any job on a GCP TPU pod, a SLURM GPU cluster, or as N local CPU processes.

``python -m mmfm_jax.launch <tpu|slurm|local> [launcher flags] -- <job> [job flags]``, e.g.::

    python -m mmfm_jax.launch tpu --name=mmfm-v5p --zone=us-east5-a --accelerator=v5p-64 --create \
        -- train --config=configs/train.py:xl_mode --workdir=gs://bucket/runs/xl_mode
    python -m mmfm_jax.launch slurm --nodes=4 --gpus-per-node=8 --per=gpu -- train --config=...
    python -m mmfm_jax.launch local --processes=2 --cpu-devices=4 -- fit-gmm --config=...

``--dry-run`` prints the commands (one per line) instead of running them. Multi-host set-up:
- TPU: every worker runs the same command; ``jax.distributed.initialize()`` auto-detects the pod.
- SLURM: ``srun`` starts one task per GPU (``--per=gpu``) or per node (``--per=node``); jax reads the SLURM
  environment (process id, count, coordinator = first node; one GPU per task from ``SLURM_LOCALID``).
- local: N processes with ``MMFM_COORDINATOR_ADDRESS`` / ``MMFM_NUM_PROCESSES`` / ``MMFM_PROCESS_ID`` (read by
  ``parallel.maybe_initialize_distributed``) on 127.0.0.1, each with ``--cpu-devices`` fake CPU devices.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence

DEFAULT_REPO = "https://github.com/mmfm-jax/mmfm_jax.git"


def _job_command(job_argv: Sequence[str], python: str = "python3") -> str:
    if not job_argv:
        raise SystemExit("launch: give the job after '--', e.g. -- train --config=configs/train.py:tiny")
    return " ".join([python, "-m", "mmfm_jax"] + [shlex.quote(a) for a in job_argv])


def tpu_commands(a: argparse.Namespace, job_argv: Sequence[str]) -> list[list[str]]:
    """gcloud commands: (optionally) create the TPU VM, install on all workers, run the job on all workers."""
    base = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = [f"--zone={a.zone}"] + ([f"--project={a.project}"] if a.project else [])
    cmds: list[list[str]] = []
    if a.create:
        create = base + ["create", a.name, *where, f"--accelerator-type={a.accelerator}", f"--version={a.version}"]
        if a.spot:
            create.append("--spot")
        cmds.append(create)
    ssh = base + ["ssh", a.name, *where, "--worker=all"]
    if not a.skip_install:
        install = (f"set -e; if [ ! -d {a.dir} ]; then git clone {a.repo} {a.dir}; fi; cd {a.dir}; "
                   f"git fetch -q && git checkout -q {a.ref}; pip install -q -e '.[tpu]'")
        cmds.append(ssh + [f"--command={install}"])
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in _env_pairs(a.env))
    run = f"cd {a.dir} && {env + ' ' if env else ''}{_job_command(job_argv)}"
    cmds.append(ssh + [f"--command={run}"])
    return cmds


def slurm_script(a: argparse.Namespace, job_argv: Sequence[str]) -> str:
    """An sbatch script running the job with one task per GPU or per node."""
    per_gpu = a.per == "gpu"
    tasks_per_node = a.gpus_per_node if per_gpu else 1
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={a.job_name}",
        f"#SBATCH --nodes={a.nodes}",
        f"#SBATCH --ntasks-per-node={tasks_per_node}",
        f"#SBATCH --gpus-per-node={a.gpus_per_node}",
        f"#SBATCH --cpus-per-task={a.cpus_per_task}",
        f"#SBATCH --time={a.time}",
        f"#SBATCH --output={a.log_dir}/%x-%j.out",
    ]
    if a.partition:
        lines.append(f"#SBATCH --partition={a.partition}")
    if a.account:
        lines.append(f"#SBATCH --account={a.account}")
    lines += ["set -euo pipefail", f"cd {a.dir}"]
    if a.venv:
        lines.append(f"source {a.venv}/bin/activate")
    for k, v in _env_pairs(a.env):
        lines.append(f"export {k}={shlex.quote(v)}")
    # jax.distributed.initialize() reads SLURM_PROCID/SLURM_NTASKS/SLURM_STEP_NODELIST (and SLURM_LOCALID per GPU).
    lines.append("srun --kill-on-bad-exit=1 " + _job_command(job_argv))
    return "\n".join(lines) + "\n"


def local_commands(a: argparse.Namespace, job_argv: Sequence[str], port: int) -> list[tuple[dict[str, str], list[str]]]:
    """(extra env, argv) per local process."""
    out = []
    for pid in range(a.processes):
        env = {
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={a.cpu_devices}",
            "MMFM_NUM_PROCESSES": str(a.processes),
            "MMFM_PROCESS_ID": str(pid),
            "MMFM_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        }
        env.update(dict(_env_pairs(a.env)))
        out.append((env, [sys.executable, "-m", "mmfm_jax", *job_argv]))
    return out


def run_local(a: argparse.Namespace, job_argv: Sequence[str]) -> int:
    """Start the processes, wait for all; returns the first non-zero exit code (or 0). Kills the rest on failure."""
    import portpicker

    port = a.port or portpicker.pick_unused_port()
    cmds = local_commands(a, job_argv, port)
    if a.dry_run:
        for env, argv in cmds:
            print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), " ".join(shlex.quote(x) for x in argv))
        return 0
    procs = [subprocess.Popen(argv, env={**os.environ, **env}) for env, argv in cmds]
    code = 0
    try:
        for p in procs:
            rc = p.wait(timeout=a.timeout or None)
            code = code or rc
    except subprocess.TimeoutExpired:
        code = 124
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return code


def _env_pairs(items: Sequence[str] | None) -> list[tuple[str, str]]:
    out = []
    for item in items or ():
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise SystemExit(f"launch: --env expects KEY=VALUE, got {item!r}")
        out.append((k, v))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmfm_jax.launch", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="where", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    common.add_argument("--env", action="append", default=[], help="KEY=VALUE for the job's environment")

    t = sub.add_parser("tpu", parents=[common], help="GCP TPU VM / pod")
    t.add_argument("--name", required=True)
    t.add_argument("--zone", required=True)
    t.add_argument("--project", default="")
    t.add_argument("--accelerator", default="v5p-8")
    t.add_argument("--version", default="v2-alpha-tpuv5", help="TPU VM runtime image")
    t.add_argument("--create", action="store_true", help="create the TPU VM first (else reuse it)")
    t.add_argument("--spot", action="store_true")
    t.add_argument("--skip-install", action="store_true")
    t.add_argument("--repo", default=DEFAULT_REPO)
    t.add_argument("--ref", default="main")
    t.add_argument("--dir", default="~/mmfm_jax")

    s = sub.add_parser("slurm", parents=[common], help="SLURM GPU cluster (writes and submits an sbatch script)")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=8)
    s.add_argument("--per", choices=("gpu", "node"), default="gpu", help="one process per GPU or per node")
    s.add_argument("--cpus-per-task", type=int, default=8)
    s.add_argument("--time", default="24:00:00")
    s.add_argument("--partition", default="")
    s.add_argument("--account", default="")
    s.add_argument("--job-name", default="mmfm_jax")
    s.add_argument("--log-dir", default="slurm_logs")
    s.add_argument("--dir", default=os.getcwd())
    s.add_argument("--venv", default="")
    s.add_argument("--script", default="", help="where to write the sbatch script (default: a temp file)")

    loc = sub.add_parser("local", parents=[common], help="N processes on this machine (CPU), e.g. for tests")
    loc.add_argument("--processes", type=int, default=2)
    loc.add_argument("--cpu-devices", type=int, default=4)
    loc.add_argument("--port", type=int, default=0)
    loc.add_argument("--timeout", type=float, default=0.0, help="seconds; 0 = no limit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        argv, job_argv = argv[:i], argv[i + 1:]
    else:
        job_argv = []
    a = build_parser().parse_args(argv)
    if a.where == "tpu":
        cmds = tpu_commands(a, job_argv)
        for c in cmds:
            if a.dry_run:
                print(shlex.join(c))
            else:
                subprocess.run(c, check=True)
        return 0
    if a.where == "slurm":
        text = slurm_script(a, job_argv)
        if a.dry_run:
            print(text, end="")
            print(f"sbatch {a.script or '<script>'}")
            return 0
        import tempfile

        path = a.script or tempfile.mkstemp(prefix="mmfm_", suffix=".sbatch")[1]
        with open(path, "w") as f:
            f.write(text)
        return subprocess.run(["sbatch", path], check=False).returncode
    if not job_argv:
        raise SystemExit("launch: give the job after '--'")
    return run_local(a, job_argv)


if __name__ == "__main__":
    raise SystemExit(main())
