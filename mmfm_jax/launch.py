"""Launch any job on a GCP TPU pod, a SLURM GPU cluster, or as N local CPU processes.

``python -m mmfm_jax.launch <tpu|slurm|local> [launcher flags] -- <job> [job flags]``, e.g.::

    python -m mmfm_jax.launch tpu --name=mmfm-v5p --zone=us-east5-a --accelerator=v5p-64 --create \\
        -- train --config=configs/train.py:xl_mode --workdir=gs://bucket/runs/xl_mode
    python -m mmfm_jax.launch slurm --nodes=4 --gpus-per-node=8 --per=gpu -- train --config=...
    python -m mmfm_jax.launch local --processes=2 --cpu-devices=4 -- fit-gmm --config=...

``--dry-run`` prints every command (one per line) instead of running it. Multi-host set-up:
- TPU: builds a wheel of this checkout, copies it and ``configs/`` to every worker (``tpu-vm scp``, or through a
  ``gs://`` staging folder with ``--stage``), creates a uv-managed Python >= 3.11 environment there, installs the
  ``tpu`` extra and runs the same command on all workers (``jax.distributed.initialize()`` detects the pod).
  ``--num-slices=N`` creates and addresses a multi-slice queued resource and adds ``--config.mesh.dcn_data=N``.
- SLURM: ``srun`` starts one task per GPU (``--per=gpu``) or per node (``--per=node``); jax reads the SLURM
  environment (process id, count, coordinator = first node; one GPU per task from ``SLURM_LOCALID``).
- local: N processes with ``MMFM_COORDINATOR_ADDRESS`` / ``MMFM_NUM_PROCESSES`` / ``MMFM_PROCESS_ID`` (read by
  ``distributed.maybe_initialize_distributed``) on 127.0.0.1, each with ``--cpu-devices`` fake CPU devices, running
  ``python -m <--module, default mmfm_jax> <job> ...``.
When one process of a local or SLURM launch fails, the others are stopped and its exit code is returned.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

SHIP = "mmfm_ship"  # the folder (wheel + configs/) copied to every TPU worker, under --dir there
UV_INSTALL = "curl -LsSf https://astral.sh/uv/install.sh | sh"


def _job_command(job_argv: Sequence[str], python: str = "python3") -> str:
    if not job_argv:
        raise SystemExit("launch: give the job after '--', e.g. -- train --config=configs/train.py:tiny")
    return " ".join([python, "-m", "mmfm_jax"] + [shlex.quote(a) for a in job_argv])


def _env_prefix(items: Sequence[str] | None) -> str:
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in _env_pairs(items))
    return env + " " if env else ""


# ----------------------------------------------------------------------------------------------------------------
# TPU


def checkout_root() -> Path:
    """The source checkout this package runs from (the folder with ``pyproject.toml`` and ``configs/``)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / "configs").is_dir():
        raise SystemExit(f"launch tpu: {root} is not a source checkout (no pyproject.toml / configs/); run from a "
                         "checkout, or install from git on the workers with --repo=URL [--ref=REF]")
    return root


def wheel_name(root: Path) -> str:
    """``mmfm_jax-<version>-py3-none-any.whl``: the file ``pip wheel`` builds from ``root`` (pure Python)."""
    import tomllib

    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    return f"{project['name'].replace('-', '_')}-{project['version']}-py3-none-any.whl"


def _tpu_setup_script(a: argparse.Namespace, wheel: str) -> str:
    """Worker-side install: the code (shipped wheel or a git checkout), ``configs/``, a uv venv, the extras."""
    lines = ["set -e", f"mkdir -p {a.dir}", f"cd {a.dir}"]
    if a.repo:
        lines += [f"if [ ! -d src/.git ]; then git clone -q {shlex.quote(a.repo)} src; fi",
                  f"git -C src fetch -q origin {shlex.quote(a.ref)}", "git -C src checkout -q --detach FETCH_HEAD",
                  "rm -rf configs", "cp -r src/configs configs"]
        spec = f'"mmfm_jax[{a.extras}] @ file://$PWD/src"'
    else:
        if a.stage:
            lines.append(f"gcloud storage rsync --recursive --delete-unmatched-destination-objects "
                         f"{a.stage}/{SHIP} {SHIP}")
        lines += ["rm -rf configs", f"cp -r {SHIP}/configs configs"]
        spec = f'"mmfm_jax[{a.extras}] @ file://$PWD/{SHIP}/{wheel}"'
    lines += ['export PATH="$HOME/.local/bin:$PATH"', f"command -v uv >/dev/null || {{ {UV_INSTALL}; }}",
              f"[ -x .venv/bin/python ] || uv venv -q --python {a.python} --python-preference only-managed .venv",
              f"uv pip install -q --python .venv/bin/python --reinstall-package mmfm_jax {spec}"]
    return "; ".join(lines)


def tpu_commands(a: argparse.Namespace, job_argv: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``(kind, argv)`` in order; kind ``'run'`` (run, must succeed) or ``'wait'`` (poll until it prints ACTIVE).

    Create (optional; a queued resource for ``--queued`` or several slices), build the wheel here, ship it (and
    ``configs/``) to every worker, install, run the job on every worker of every slice.
    """
    multi = a.num_slices > 1
    where = [f"--zone={a.zone}"] + ([f"--project={a.project}"] if a.project else [])
    qr = ["gcloud", "compute", "tpus", "queued-resources"]
    base = qr if multi else ["gcloud", "compute", "tpus", "tpu-vm"]
    select = ["--worker=all"] + (["--node=all"] if multi else [])
    job_argv = list(job_argv)
    if multi and not any(x.startswith("--config.mesh.dcn_data") for x in job_argv):
        job_argv.append(f"--config.mesh.dcn_data={a.num_slices}")
    job = _job_command(job_argv, python=".venv/bin/python")  # checks that a job was given, before any side effect
    cmds: list[tuple[str, list[str]]] = []
    if a.create:
        if multi or a.queued:
            nodes = [f"--node-count={a.num_slices}", f"--node-prefix={a.name}"] if multi else [f"--node-id={a.name}"]
            cmds.append(("run", qr + ["create", a.name, *where, *nodes, f"--accelerator-type={a.accelerator}",
                                      f"--runtime-version={a.version}"] + (["--spot"] if a.spot else [])))
            cmds.append(("wait", qr + ["describe", a.name, *where, "--format=value(state.state)"]))
        else:
            cmds.append(("run", base + ["create", a.name, *where, f"--accelerator-type={a.accelerator}",
                                        f"--version={a.version}"] + (["--spot"] if a.spot else [])))

    def ssh(command: str) -> tuple[str, list[str]]:
        return "run", base + ["ssh", a.name, *where, *select, f"--command={command}"]

    if not a.skip_install:
        wheel = ""
        if not a.repo:
            root = checkout_root()
            ship = Path(a.ship_dir or root / "dist" / SHIP).resolve()
            if ship.name != SHIP:
                raise SystemExit(f"launch tpu: --ship-dir must end in /{SHIP}, got {ship}")
            wheel = wheel_name(root)
            build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(ship), str(root)]
            # setuptools keeps build/ between builds: a module deleted here would still be shipped from there
            cmds += [("run", ["rm", "-rf", str(ship), str(root / "build")]),
                     ("run", build + (["--no-build-isolation"] if a.no_build_isolation else [])),
                     ("run", ["cp", "-r", str(root / "configs"), str(ship / "configs")])]
            if a.stage:
                cmds.append(("run", ["gcloud", "storage", "rsync", "--recursive",
                                     "--delete-unmatched-destination-objects", str(ship), f"{a.stage}/{SHIP}"]))
            else:
                cmds.append(ssh(f"mkdir -p {a.dir} && rm -rf {a.dir}/{SHIP}"))
                cmds.append(("run", base + ["scp", "--recurse", str(ship), f"{a.name}:{a.dir}/", *where, *select]))
        cmds.append(ssh(_tpu_setup_script(a, wheel)))
    run = f"MMFM_DISTRIBUTED=auto {_env_prefix(a.env)}{job}"  # jax.distributed.initialize() on every worker
    if a.detach:  # keeps running after this ssh session ends; output in DIR/logs/ on every worker
        run = f"mkdir -p logs && nohup env {run} > logs/{job_argv[0]}-$(hostname).log 2>&1 < /dev/null &"
    cmds.append(ssh(f"cd {a.dir} && {run}"))
    return cmds


def run_tpu(a: argparse.Namespace, job_argv: Sequence[str]) -> int:
    cmds = tpu_commands(a, job_argv)
    if a.dry_run:
        for _, c in cmds:
            print(shlex.join(c))
        return 0
    for kind, c in cmds:
        print("+", shlex.join(c), file=sys.stderr, flush=True)
        if kind == "wait":
            _wait_active(c, a.poll_s)
            continue
        rc = subprocess.run(c, check=False).returncode
        if rc:
            print(f"launch tpu: command failed with exit code {rc}", file=sys.stderr)
            return rc
    return 0


def _wait_active(describe: list[str], poll_s: float) -> None:
    """Poll a queued resource until ACTIVE (a queue can take hours); stop on FAILED / SUSPENDED."""
    last = ""
    while True:
        state = subprocess.run(describe, capture_output=True, text=True, check=False).stdout.strip()
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED", "SUSPENDING"):
            raise SystemExit(f"launch tpu: queued resource is {state}: {shlex.join(describe[:-1])}")
        if state != last:
            print(f"launch tpu: queued resource {state or '(no state yet)'}; waiting", file=sys.stderr, flush=True)
            last = state
        time.sleep(poll_s)


# ----------------------------------------------------------------------------------------------------------------
# SLURM


def slurm_log_dir(a: argparse.Namespace) -> str:
    return os.path.abspath(os.path.join(a.dir, os.path.expanduser(a.log_dir)))


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
        f"#SBATCH --output={slurm_log_dir(a)}/%x-%j.out",  # SLURM opens it before the script runs: made by main()
    ]
    if a.partition:
        lines.append(f"#SBATCH --partition={a.partition}")
    if a.account:
        lines.append(f"#SBATCH --account={a.account}")
    lines += ["set -euo pipefail", f"cd {shlex.quote(a.dir)}"]
    if a.venv:
        lines.append(f"source {a.venv}/bin/activate")
    if not per_gpu:  # jax would give each task only GPU $SLURM_LOCALID (= 0); distributed.py reads this instead
        lines.append(f"export MMFM_LOCAL_DEVICE_IDS={','.join(map(str, range(a.gpus_per_node)))}")
    for k, v in _env_pairs(a.env):
        lines.append(f"export {k}={shlex.quote(v)}")
    # jax.distributed.initialize() reads SLURM_PROCID/SLURM_NTASKS/SLURM_STEP_NODELIST (and SLURM_LOCALID per GPU).
    # A task that fails ends the step (--kill-on-bad-exit); one that hangs on a dead peer is ended by jax's
    # heartbeat (config.distributed.heartbeat_timeout_s). The script's exit code is srun's.
    lines.append("srun --kill-on-bad-exit=1 " + _job_command(job_argv))
    return "\n".join(lines) + "\n"


def run_slurm(a: argparse.Namespace, job_argv: Sequence[str]) -> int:
    text = slurm_script(a, job_argv)
    log_dir = slurm_log_dir(a)
    if a.dry_run:
        print(f"mkdir -p {shlex.quote(log_dir)}")
        print(text, end="")
        print(f"sbatch {a.script or '<script>'}")
        return 0
    import tempfile

    os.makedirs(log_dir, exist_ok=True)
    path = a.script or tempfile.mkstemp(prefix="mmfm_", suffix=".sbatch")[1]
    with open(path, "w") as f:
        f.write(text)
    return subprocess.run(["sbatch", path], check=False).returncode


# ----------------------------------------------------------------------------------------------------------------
# Local processes


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
        out.append((env, [sys.executable, "-m", a.module, *job_argv]))
    return out


def exit_code(returncode: int) -> int:
    """A shell-style exit code: 128 + N for a process killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def stop(procs: Sequence[subprocess.Popen], grace_s: float = 5.0) -> None:
    """SIGTERM every running process, SIGKILL those still running ``grace_s`` seconds later; report each."""
    live = [(i, p) for i, p in enumerate(procs) if p.poll() is None]
    for _, p in live:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for i, p in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
            how = f"exited with code {exit_code(p.returncode)}"
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            how = f"killed after {grace_s:g} s"
        print(f"launch: stopped process {i}: {how}", file=sys.stderr, flush=True)


def supervise(procs: Sequence[subprocess.Popen], timeout_s: float = 0.0, grace_s: float = 5.0,
              poll_s: float = 0.1) -> int:
    """Wait for all processes. The first one to fail (non-zero exit or killed) stops the others at once (a peer of
    a dead process would otherwise block in its next collective); returns its :func:`exit_code`, 124 when
    ``timeout_s`` (> 0) passes first, else 0."""
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
    code = 0
    try:
        while True:
            failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
            if failed is not None:
                code = exit_code(procs[failed].returncode)
                print(f"launch: process {failed} exited with code {code}; stopping the others", file=sys.stderr,
                      flush=True)
                return code
            if all(p.returncode == 0 for p in procs):
                return 0
            if deadline is not None and time.monotonic() > deadline:
                print(f"launch: timeout after {timeout_s:g} s; stopping all processes", file=sys.stderr, flush=True)
                return 124
            time.sleep(poll_s)
    finally:
        stop(procs, grace_s)


def run_local(a: argparse.Namespace, job_argv: Sequence[str]) -> int:
    """Start the processes and :func:`supervise` them."""
    import portpicker

    port = a.port or portpicker.pick_unused_port()
    cmds = local_commands(a, job_argv, port)
    if a.dry_run:
        for env, argv in cmds:
            print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), " ".join(shlex.quote(x) for x in argv))
        return 0
    procs = []
    try:
        for env, argv in cmds:
            procs.append(subprocess.Popen(argv, env={**os.environ, **env}))
            print(f"launch: process {len(procs) - 1}: pid {procs[-1].pid}", file=sys.stderr, flush=True)
    except BaseException:
        stop(procs, 0.0)
        raise
    return supervise(procs, a.timeout, a.grace)


# ----------------------------------------------------------------------------------------------------------------
# CLI


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

    t = sub.add_parser("tpu", parents=[common], help="GCP TPU VM / pod / multi-slice")
    t.add_argument("--name", required=True, help="TPU VM name (multi-slice: queued resource id and node prefix)")
    t.add_argument("--zone", required=True)
    t.add_argument("--project", default="")
    t.add_argument("--accelerator", default="v5p-8", help="accelerator type of one slice")
    t.add_argument("--version", default="v2-alpha-tpuv5", help="TPU VM runtime image")
    t.add_argument("--num-slices", type=int, default=1, help="> 1: a multi-slice queued resource (DCN data axis)")
    t.add_argument("--create", action="store_true", help="create the TPU first (else reuse it)")
    t.add_argument("--queued", action="store_true", help="create one slice through a queued resource too")
    t.add_argument("--spot", action="store_true")
    t.add_argument("--poll-s", type=float, default=30.0, help="seconds between queued-resource state checks")
    t.add_argument("--skip-install", action="store_true", help="run only (the workers are set up already)")
    t.add_argument("--stage", default="", help="gs://BUCKET/PATH: ship the wheel through Cloud Storage, not scp")
    t.add_argument("--ship-dir", default="", help=f"local build folder (default: <checkout>/dist/{SHIP})")
    t.add_argument("--no-build-isolation", action="store_true", help="build the wheel with this environment's "
                   "setuptools (offline)")
    t.add_argument("--repo", default="", help="install from this git URL on the workers instead of a local wheel")
    t.add_argument("--ref", default="HEAD", help="git ref for --repo (default: its default branch)")
    t.add_argument("--extras", default="tpu", help="package extras to install, e.g. tpu,torch (official .pt files)")
    t.add_argument("--python", default="3.11", help="Python version of the workers' uv-managed environment")
    t.add_argument("--dir", default="mmfm_jax", help="working folder on the workers (relative to home)")
    t.add_argument("--detach", action="store_true", help="run under nohup (logs in DIR/logs/) and return")

    s = sub.add_parser("slurm", parents=[common], help="SLURM GPU cluster (writes and submits an sbatch script)")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=8)
    s.add_argument("--per", choices=("gpu", "node"), default="gpu", help="one process per GPU or per node")
    s.add_argument("--cpus-per-task", type=int, default=8)
    s.add_argument("--time", default="24:00:00")
    s.add_argument("--partition", default="")
    s.add_argument("--account", default="")
    s.add_argument("--job-name", default="mmfm_jax")
    s.add_argument("--log-dir", default="slurm_logs", help="relative to --dir; created before sbatch")
    s.add_argument("--dir", default=os.getcwd())
    s.add_argument("--venv", default="")
    s.add_argument("--script", default="", help="where to write the sbatch script (default: a temp file)")

    loc = sub.add_parser("local", parents=[common], help="N processes on this machine (CPU), e.g. for tests")
    loc.add_argument("--processes", type=int, default=2)
    loc.add_argument("--cpu-devices", type=int, default=4)
    loc.add_argument("--port", type=int, default=0)
    loc.add_argument("--timeout", type=float, default=0.0, help="seconds; 0 = no limit")
    loc.add_argument("--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL when stopping")
    loc.add_argument("--module", default="mmfm_jax", help="the Python module each process runs with -m (a program "
                     "that embeds the CLI: `mmfm_jax.cli.run(argv, **job_kwargs)`)")
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
        if a.num_slices < 1:
            raise SystemExit(f"launch tpu: --num-slices must be >= 1, got {a.num_slices}")
        if a.stage and not a.stage.startswith("gs://"):
            raise SystemExit(f"launch tpu: --stage must be a gs:// URI, got {a.stage!r}")
        a.stage = a.stage.rstrip("/")
        return run_tpu(a, job_argv)
    if a.where == "slurm":
        return run_slurm(a, job_argv)
    if not job_argv:
        raise SystemExit("launch: give the job after '--'")
    return run_local(a, job_argv)


if __name__ == "__main__":
    raise SystemExit(main())
