"""``launch/local.sh`` runs the tiny train job as 2 processes x 4 devices on a ``dcn_data=2`` mesh (one block per
process); process 1 is killed with SIGKILL while both wait at step 3. The launcher SIGTERMs process 0 at once,
which cannot finish a step without its peer: jax.distributed's heartbeat (``distributed.heartbeat_timeout_s``, 5 s
here, default 20 s) ends it well inside the launcher's 60 s grace, and the launcher returns 128 + 9. The
committed checkpoint stays intact and one process resumes from it, twice, with a persistent compilation cache: the
second resume loads the train step from it."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
from mp_launch import REPO, worker_env

from mmfm_jax.cli import CONFIG_DIR, run_job
from mmfm_jax.config_files import load_config


def test_dead_peer_ends_the_survivor_and_the_run_resumes(tmp_path, restore_jax_cache_settings):
    wd = tmp_path / "run"
    cmd = [sys.executable, "-m", "mmfm_jax.launch", "local", "--processes=2", "--cpu-devices=4", "--grace=60",
           "--module=tests.train_hooks", "--", "--hang-at=3",  # each process: mmfm-jax with a hang at step 3
           "train", f"--config={CONFIG_DIR}/train.py:tiny", "--config.train.num_steps=6",
           "--config.checkpoint.every_steps=2", "--config.mesh.dcn_data=2",
           "--config.distributed.heartbeat_timeout_s=5", f"--workdir={wd}"]
    launcher = subprocess.Popen(cmd, env=worker_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    lines, both_hang = [], threading.Event()

    def pump():
        for line in launcher.stdout:
            lines.append(line)
            if "".join(lines).count("DEBUG: hanging at step 3") == 2:  # the two lines may share one
                both_hang.set()
        both_hang.set()  # the launcher exited

    threading.Thread(target=pump, daemon=True).start()
    try:
        assert both_hang.wait(300) and launcher.poll() is None, "".join(lines)[-3000:]
        pid1 = int(re.search(r"launch: process 1: pid (\d+)", "".join(lines)).group(1))
        t0 = time.monotonic()
        os.kill(pid1, signal.SIGKILL)
        rc = launcher.wait(timeout=90)
        elapsed = time.monotonic() - t0
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    log = "".join(lines)
    assert rc == 128 + signal.SIGKILL and elapsed < 30, (rc, elapsed, log[-3000:])
    assert "launch: process 1 exited with code 137; stopping the others" in log
    assert "launch: stopped process 0: exited with code" in log, log[-3000:]  # on its own, not killed after 60 s
    assert "distributed service detected fatal errors" in log, log[-3000:]  # ... by the heartbeat
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
