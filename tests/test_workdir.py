"""Workdir guards: the run lock (flock, a file lease where flock is missing, a leased object on gs://) and the
per-stage config fingerprints."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from etils import epath

from mmfm_jax.config_utils import ConfigError
from mmfm_jax.workdir import LOCK_NAME, Stage, WorkdirLock, WorkdirLockedError, check_stage


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_stops_a_second_run_and_takes_over_a_dead_one(tmp_path, caplog, repo_dir):
    from mmfm_jax.cli import run_job
    from mmfm_jax.config_files import load_config

    wd = tmp_path / "run"
    a = WorkdirLock(wd, "train").acquire()
    with pytest.raises(WorkdirLockedError, match=rf"in use by train run \(host {socket.gethostname()}, pid "
                                                 rf"{os.getpid()}, started 20"):
        WorkdirLock(wd, "train").acquire()
    # a second job on the locked workdir stops before writing anything
    cfg = load_config(f"{repo_dir}/configs/train.py:tiny", {"data.kind": "synthetic", "source.kind": "gaussian",
                                                             "source.y_from": "none", "adaptive.enabled": False,
                                                             "model.use_y_conditioning": False})
    with pytest.raises(ConfigError, match="is in use by train run"):
        run_job("train", cfg, wd)
    assert sorted(p.name for p in wd.iterdir()) == [LOCK_NAME]
    a.release()
    assert not (wd / LOCK_NAME).exists()
    # a run killed with its lock in place (flock released by the kernel): taken over with a warning
    (wd / LOCK_NAME).write_text(json.dumps(dict(host=socket.gethostname(), pid=_dead_pid(), job="train",
                                                started_unix=time.time() - 60, lease_until=time.time() + 999)))
    with caplog.at_level("WARNING"):
        b = WorkdirLock(wd, "sample").acquire()
    assert "taking over the lock of a train run" in caplog.text
    assert json.loads((wd / LOCK_NAME).read_text())["pid"] == os.getpid()
    b.release()


def test_lease_lock_without_flock(tmp_path, monkeypatch, caplog):
    """A file system without flock: an O_EXCL lease file; a live owner stops us, an expired lease or a dead owner
    on this host is taken over."""
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    wd = tmp_path / "run"
    a = WorkdirLock(wd, "train").acquire()
    assert a._lease is not None and json.loads((wd / LOCK_NAME).read_text())["token"] == a.owner["token"]
    with pytest.raises(WorkdirLockedError, match="lease until"):
        WorkdirLock(wd, "train").acquire()
    a.release()
    assert not (wd / LOCK_NAME).exists()
    for owner in (dict(host="elsewhere", pid=1, lease_until=time.time() - 1),  # expired lease, another host
                  dict(host=socket.gethostname(), pid=_dead_pid(), lease_until=time.time() + 999)):  # dead owner
        (wd / LOCK_NAME).write_text(json.dumps(dict(owner, job="train", started_unix=0)))
        caplog.clear()
        with caplog.at_level("WARNING"):
            b = WorkdirLock(wd, "train").acquire()
        assert "taking over the lock" in caplog.text
        b.release()


def test_gcs_lease_lock(gcs_dir, caplog):
    wd = epath.Path(gcs_dir) / "run"
    a = WorkdirLock(wd, "train", lease_s=3).acquire()
    lock = wd / LOCK_NAME
    first = json.loads(lock.read_text())
    assert first["token"] == a.owner["token"] and first["host"] == socket.gethostname()
    with pytest.raises(WorkdirLockedError, match="is in use by train run"):
        WorkdirLock(wd, "sample").acquire()
    deadline = time.time() + 20  # the lease is renewed every lease_s / 3
    while json.loads(lock.read_text())["lease_until"] == first["lease_until"] and time.time() < deadline:
        time.sleep(0.2)
    assert json.loads(lock.read_text())["lease_until"] > first["lease_until"]
    a.release()
    assert not lock.exists()
    lock.write_text(json.dumps(dict(host="another-host", pid=1, job="train", started_unix=0,
                                    lease_until=time.time() - 5)))  # a run that died elsewhere, lease expired
    with caplog.at_level("WARNING"):
        b = WorkdirLock(wd, "train").acquire()
    assert "taking over the lock of a train run (host another-host" in caplog.text
    b.release()


def test_stage_fingerprint_names_changes_and_overwrite_starts_afresh(tmp_path, caplog):
    stage = Stage(keys=("gmm", "seed"), ignore=("gmm.chunk_size",), inputs=("data.dir",), outputs=("out", "x.*"))
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text('{"n": 1}')
    cfg = {"seed": 0, "gmm": {"n_components": 8, "chunk_size": 64}, "data": {"dir": str(data)}}
    wd = tmp_path / "wd"
    check_stage(wd, "fit-gmm", stage, cfg)
    (wd / "out").mkdir()
    (wd / "x.old").write_text("1")
    check_stage(wd, "fit-gmm", stage, dict(cfg, gmm={"n_components": 8, "chunk_size": 128}))  # ignored key
    (data / "manifest.json").write_text('{"n": 2}')
    with pytest.raises(ConfigError) as e:
        check_stage(wd, "fit-gmm", stage, dict(cfg, gmm={"n_components": 16, "chunk_size": 64}))
    msg = str(e.value)
    assert "config.gmm.n_components: 8 -> 16" in msg and "input config.data.dir changed" in msg
    assert "--config.overwrite=True" in msg and (wd / "out").exists()
    with caplog.at_level("WARNING"):
        check_stage(wd, "fit-gmm", stage, dict(cfg, gmm={"n_components": 16, "chunk_size": 64}), overwrite=True)
    assert not (wd / "out").exists() and not (wd / "x.old").exists() and "deleted" in caplog.text
    check_stage(wd, "fit-gmm", stage, dict(cfg, gmm={"n_components": 16, "chunk_size": 64}))  # recorded


def test_library_fallback_messages_become_one_clean_line():
    import logging

    from mmfm_jax.jobs.common import CleanFallbacks

    f = CleanFallbacks()

    def rec(name, msg, args=(), exc=False):
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            info = sys.exc_info() if exc else None
        return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, info)

    fb = "Could not determine bucket type for bucket name %s: no credentials, falling back to GCSFileSystem"
    r1, r2 = rec("gcsfs", fb, ("b",)), rec("gcsfs", fb, ("b",))
    assert f.filter(r1) and not f.filter(r2)  # the same fallback: once
    r = rec("gcsfs.retry", "%s out of retries on exception: %s\nline two",
            ("<bound method GCSFileSystem._call of <gcsfs.core.GCSFileSystem object at 0x7f00>>", "501"), exc=True)
    assert f.filter(r) and r.exc_info is None
    assert r.getMessage() == "GCSFileSystem._call out of retries on exception: 501"
    ours = rec("mmfm_jax", "keep <bound method A.b of <x>>\nas is", exc=True)
    assert f.filter(ours) and ours.exc_info is not None and "\n" in ours.getMessage()
