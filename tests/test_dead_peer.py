"""A process of a 2-process x 4-device run (the local launcher's environment, a ``dcn_data=2`` mesh: one block per
process) is killed with SIGKILL while its peer waits: jax.distributed's heartbeat ends the survivor within
``distributed.heartbeat_timeout_s`` (5 s here; default 20 s) with a non-zero code, the committed checkpoint stays
intact and a single process resumes from it; the resumed runs share a persistent compilation cache, and the
second one loads its executables from it."""

import os
import signal
import subprocess
import threading
import time

import jax
import pytest
from mp_launch import REPO, worker_env

from mmfm_jax import launch
from mmfm_jax.cli import CONFIG_DIR, run_job
from mmfm_jax.config_utils import load_config

_CACHE_KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
               "jax_persistent_cache_min_entry_size_bytes", "jax_persistent_cache_enable_xla_caches")


@pytest.fixture
def restore_jax_cache_settings():
    from jax.experimental.compilation_cache import compilation_cache

    saved = {k: getattr(jax.config, k) for k in _CACHE_KEYS}
    yield
    for k, v in saved.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


def _start(tmp_path, wd):
    a = launch.build_parser().parse_args(["local", "--processes=2", "--cpu-devices=4"])
    import portpicker

    job = ["train", f"--config={CONFIG_DIR}/train.py:tiny", "--config.train.num_steps=6",
           "--config.checkpoint.every_steps=2", "--config.debug.hang_at_step=3", "--config.mesh.dcn_data=2",
           "--config.distributed.heartbeat_timeout_s=5", f"--workdir={wd}"]
    procs, outs, hanging = [], [], []
    for env, argv in launch.local_commands(a, job, portpicker.pick_unused_port()):
        p = subprocess.Popen(argv, env=worker_env(env), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
        out, ready = [], threading.Event()

        def pump(p=p, out=out, ready=ready):
            for line in p.stdout:
                out.append(line)
                if line.startswith("DEBUG: hanging at step 3"):
                    ready.set()
            ready.set()  # exited

        threading.Thread(target=pump, daemon=True).start()
        procs.append(p)
        outs.append(out)
        hanging.append(ready)
    return procs, outs, hanging


def test_dead_peer_ends_the_survivor_and_the_run_resumes(tmp_path, restore_jax_cache_settings):
    wd = tmp_path / "run"
    procs, outs, hanging = _start(tmp_path, wd)
    try:
        for p, ev, out in zip(procs, hanging, outs):
            assert ev.wait(240) and p.poll() is None, "".join(out)[-3000:]
        t0 = time.monotonic()
        os.kill(procs[1].pid, signal.SIGKILL)
        rc = procs[0].wait(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        launch.stop(procs, 0.0)
    log = "".join(outs[0])
    assert rc != 0 and elapsed < 30, (rc, elapsed, log[-3000:])
    assert "distributed service detected fatal errors" in log or "heartbeat" in log, log[-3000:]
    assert "'dcn_data': 2" in log  # the 2-process run used one mesh block per process

    # The committed checkpoint (step 2) is intact: one process resumes from it, then again with a warm cache.
    cache = tmp_path / "xla_cache"
    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)

    def resume(num_steps):
        jax.clear_caches()  # a fresh process as far as jit is concerned
        cfg = load_config(f"{CONFIG_DIR}/train.py:tiny", {
            "train.num_steps": num_steps, "checkpoint.every_steps": 2, "compile_cache": str(cache),
            "compile_cache_min_compile_s": 0.0})
        return run_job("train", cfg, wd)

    s = resume(4)
    assert s["resumed_from"] == 2 and s["final_step"] == 4, s
    entries = sorted(p.name for p in cache.iterdir())
    assert any(e.startswith("jit_step_fn-") for e in entries), entries
    n = len(hits)
    s = resume(6)
    assert s["resumed_from"] == 4 and s["final_step"] == 6, s
    assert len(hits) > n, hits  # the train step was loaded...
    assert sorted(p.name for p in cache.iterdir()) == entries  # ...and nothing compiled anew (it would be written)
