"""Start the 2-process workers of the multi-host tests (``mp_*_worker.py``) and collect their output.

Each worker is ``python tests/<worker> <process_id> <port> <args...>``; it calls ``jax.distributed.initialize`` on
127.0.0.1:<port> with 4 CPU devices per process. Imported by plain name (tests/ has no ``__init__.py``).
"""

import os
import subprocess
import sys

import portpicker

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def worker_env(extra: dict | None = None) -> dict:
    """CPU-only environment with the repo importable and no inherited device-count settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    env.update(extra or {})
    return env


def run_workers(worker: str, args, n: int = 2, timeout: float = 240, env: dict | None = None,
                cwd: str | None = None) -> list[str]:
    """Run ``n`` processes of ``tests/<worker>`` to completion; assert they all exit 0; return their outputs."""
    port = portpicker.pick_unused_port()
    procs = [subprocess.Popen([sys.executable, os.path.join(TESTS, worker), str(pid), str(port), *map(str, args)],
                              env=env or worker_env(), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for pid in range(n)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, f"{worker} failed (rc={p.returncode}):\n{out[-4000:]}"
    return outs
