"""Workdir guards: one run per workdir (:class:`WorkdirLock`) and per-stage config fingerprints (:class:`Stage`).

**Lock** (``<workdir>/run.lock``, JSON: host, pid, job, start time, lease end). Local and network file systems:
``fcntl.flock`` on the file, held for the life of the run (the kernel releases it when the process dies, so a
lock left by a killed run is taken over at once, with a warning naming the dead owner). Where the file system
has no ``flock`` and on ``gs://``: a *leased* lock object created only if absent (GCS ``ifGenerationMatch=0``,
``O_EXCL`` on files) and renewed by a background thread every ``lease_s / 3``; it is taken over (with a warning)
when its lease has expired or its owner is a dead process on this host. A second run on a locked workdir stops
with :class:`WorkdirLockedError` naming the owner. Only process 0 of a multi-process run takes the lock.

**Fingerprints** (``<workdir>/fingerprints/<job>.json``): each job declares a :class:`Stage`: the config keys its
outputs depend on, the config keys naming its inputs (a digest of each input's manifest is recorded) and its
outputs. A re-run whose fingerprint differs stops before any work, naming what changed; ``config.overwrite=True``
deletes the stage's outputs and starts it afresh.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from etils import epath

from mmfm_jax.config_utils import ConfigError

log = logging.getLogger("mmfm_jax")

LOCK_NAME = "run.lock"
LEASE_S = 120.0


class WorkdirLockedError(ConfigError):
    """Another run holds the workdir (the CLI reports it as a one-line error, exit code 2)."""


def _is_gcs(path: epath.Path) -> bool:
    return str(path).startswith("gs://")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # exists but not ours / unreadable: assume alive
    return True


def _describe(owner: Mapping[str, Any] | None) -> str:
    if not owner:
        return "an unknown run"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(owner.get("started_unix", 0))))
    return f"{owner.get('job', '?')} run (host {owner.get('host')}, pid {owner.get('pid')}, started {started})"


class _FileLease:
    """Lease backend on a plain file: create with ``O_EXCL``; generation = the token written last."""

    def __init__(self, path: epath.Path):
        self.path = os.fspath(path)

    def read(self) -> tuple[dict | None, Any]:
        try:
            with open(self.path) as f:
                owner = json.loads(f.read() or "{}")  # empty: a half-created lock, treated as expired
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError):
            return {}, None  # unreadable: treated as expired
        return owner, (owner or {}).get("token")

    def create(self, data: str) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def replace(self, data: str, generation: Any) -> Any:
        tmp = f"{self.path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "w") as f:
            f.write(data)
        os.replace(tmp, self.path)
        return json.loads(data)["token"]

    def delete(self, generation: Any) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class _GcsLease:
    """Lease backend on a GCS object: conditional create (``if_generation_match=0``), conditional replace and
    delete (``if_generation_match=<generation>``). Emulators that ignore preconditions are covered by reading the
    object back and checking the token."""

    def __init__(self, path: epath.Path):
        from google.cloud import storage

        bucket, _, name = str(path)[len("gs://"):].partition("/")
        self.blob_name = name
        self.bucket = storage.Client().bucket(bucket)

    def read(self) -> tuple[dict | None, Any]:
        from google.api_core import exceptions

        blob = self.bucket.blob(self.blob_name)
        try:
            text = blob.download_as_text()
        except exceptions.NotFound:
            return None, None
        try:
            owner = json.loads(text or "null")
        except ValueError:
            owner = {}
        return owner, blob.generation

    def create(self, data: str) -> bool:
        from google.api_core import exceptions

        try:
            self.bucket.blob(self.blob_name).upload_from_string(data, if_generation_match=0)
        except exceptions.PreconditionFailed:
            return False
        return True

    def replace(self, data: str, generation: Any) -> Any:
        blob = self.bucket.blob(self.blob_name)
        blob.upload_from_string(data, if_generation_match=generation)
        return blob.generation

    def delete(self, generation: Any) -> None:
        from google.api_core import exceptions

        try:
            self.bucket.blob(self.blob_name).delete(if_generation_match=generation)
        except (exceptions.NotFound, exceptions.PreconditionFailed):
            pass


class WorkdirLock:
    """``WorkdirLock(workdir, job).acquire()`` ... ``release()`` (see the module docstring)."""

    def __init__(self, workdir: str | os.PathLike, job: str, lease_s: float = LEASE_S):
        self.workdir = epath.Path(workdir)
        self.path = self.workdir / LOCK_NAME
        self.job = job
        self.lease_s = float(lease_s)
        self.owner = dict(host=socket.gethostname(), pid=os.getpid(), job=job, started_unix=time.time(),
                          token=uuid.uuid4().hex)
        self._fd: int | None = None
        self._lease: Any = None
        self._generation: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _data(self) -> str:
        return json.dumps(dict(self.owner, lease_until=time.time() + self.lease_s))

    def _stale(self, owner: dict | None) -> bool:
        if not owner:
            return True
        if float(owner.get("lease_until", 0)) < time.time():
            return True
        return owner.get("host") == self.owner["host"] and not _pid_alive(owner.get("pid", -1))

    def acquire(self) -> WorkdirLock:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not _is_gcs(self.path) and self._acquire_flock():
            return self
        self._lease = _GcsLease(self.path) if _is_gcs(self.path) else _FileLease(self.path)
        self._acquire_lease()
        return self

    # -- flock -----------------------------------------------------------------------------------------------

    def _acquire_flock(self) -> bool:
        """True when held; False when the file system has no flock (use a lease); raises if another run holds it."""
        import fcntl

        path = os.fspath(self.path)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_fd(fd)
                os.close(fd)
                raise WorkdirLockedError(
                    f"workdir {self.workdir} is in use by {_describe(owner)}: wait for it to finish, stop it, or "
                    "use another --workdir") from None
            except OSError as e:
                empty = os.fstat(fd).st_size == 0
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    if empty:  # the file this open created: the lease creates its own
                        os.unlink(path)
                    return False
                raise
            try:  # the file may have been released and unlinked between open and flock: retry on the new one
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_fd(fd)
        if previous:
            log.warning("workdir %s: taking over the lock of a %s that did not release it (no longer running)",
                        self.workdir, _describe(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._data().encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return True

    # -- lease -----------------------------------------------------------------------------------------------

    def _acquire_lease(self) -> None:
        for _ in range(5):
            owner, gen = self._lease.read()  # first (stores without preconditions would let create overwrite)
            if owner is not None:
                if not self._stale(owner):
                    until = time.strftime("%H:%M:%S UTC", time.gmtime(float(owner.get("lease_until", 0))))
                    raise WorkdirLockedError(
                        f"workdir {self.workdir} is in use by {_describe(owner)} (lock {self.path}, lease until "
                        f"{until}): wait for it to finish, stop it, or use another --workdir")
                log.warning("workdir %s: taking over the lock of a %s (lease expired or owner dead)", self.workdir,
                            _describe(owner))
                self._lease.delete(gen)
            if self._lease.create(self._data()):
                owner, gen = self._lease.read()
                if owner and owner.get("token") == self.owner["token"]:  # not overwritten by a racing run
                    self._generation = gen
                    self._start_renewal()
                    return
        raise WorkdirLockedError(f"workdir {self.workdir}: could not take the lock {self.path} (other runs racing)")

    def _start_renewal(self) -> None:
        def renew():
            while not self._stop.wait(self.lease_s / 3):
                try:
                    self._generation = self._lease.replace(self._data(), self._generation)
                except Exception as e:  # noqa: BLE001  (log and keep trying: the run itself is unaffected)
                    log.warning("workdir %s: could not renew the lock lease (%s: %s)", self.workdir,
                                type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")

        self._thread = threading.Thread(target=renew, name="mmfm-workdir-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Remove the lock (idempotent)."""
        if self._fd is not None:
            try:
                os.unlink(os.fspath(self.path))  # while still holding it: nobody can lock the old file after us
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None
        if self._lease is not None:
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=30)
            owner, gen = self._lease.read()
            if owner and owner.get("token") == self.owner["token"]:
                self._lease.delete(gen)
            self._lease = None


def _read_fd(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 1 << 16, 0)
        return json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------------------------------------------
# Stage fingerprints


@dataclasses.dataclass(frozen=True)
class Stage:
    """What a job's outputs depend on. ``keys``: config keys (sections or leaves) in the fingerprint; ``ignore``:
    keys inside them that do not change the outputs (threads, batch sizes, step counts); ``inputs``: config keys
    naming input folders/files (their manifest digest is recorded); ``outputs``: names/globs in the workdir and
    config keys naming output folders, deleted by ``config.overwrite=True``."""

    keys: tuple[str, ...]
    ignore: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    output_keys: tuple[str, ...] = ()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.loads(json.dumps(d, default=str))}


def _get(cfg_dict: Mapping[str, Any], key: str) -> Any:
    node: Any = cfg_dict
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def input_digest(path: str) -> str:
    """A short digest of an input: its ``manifest.json`` / ``metadata.json`` (datasets, sources, GMMs: content and
    mtime, one read), the list of
    its checkpoint steps (a train workdir), its listing (other folders) or size and mtime (a file)."""
    p = epath.Path(path)
    if not p.exists():
        return "missing"
    if p.is_dir():
        for name in ("manifest.json", "metadata.json"):
            if (p / name).exists():  # content and mtime: a dataset re-encoded in place has the same manifest
                digest = hashlib.sha256((p / name).read_bytes()).hexdigest()[:16]
                return f"{name}:{digest}, mtime {int((p / name).stat().mtime)}"
        if (p / "checkpoints").is_dir():
            steps = sorted(int(c.name) for c in (p / "checkpoints").iterdir() if c.name.isdigit())
            return f"checkpoint steps {steps}"
        names = sorted(c.name for c in p.iterdir())
        return f"listing:{hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16]}"
    st = p.stat()
    return f"size {st.length}, mtime {int(st.mtime)}" if hasattr(st, "length") else f"mtime {int(st.mtime)}"


def fingerprint(stage: Stage, cfg_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``{'config': {'gmm.n_components': 8, ...}, 'inputs': {'data.latents_dir': 'manifest.json:ab12...'}}``."""
    flat: dict[str, Any] = {}
    for key in stage.keys:
        v = _get(cfg_dict, key)
        flat.update(_flatten(v, f"{key}.") if isinstance(v, Mapping) else {key: json.loads(json.dumps(v, default=str))})
    flat = {k: v for k, v in flat.items() if not any(k == i or k.startswith(i + ".") for i in stage.ignore)}
    inputs = {k: input_digest(str(_get(cfg_dict, k))) for k in stage.inputs if _get(cfg_dict, k)}
    return {"config": flat, "inputs": inputs}


def fingerprint_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``['config.gmm.n_components: 8 -> 16', 'input data.latents_dir: manifest.json:... -> ...']``."""
    out = []
    a, b = old.get("config", {}), new.get("config", {})
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            out.append(f"config.{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}")
    a, b = old.get("inputs", {}), new.get("inputs", {})
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            out.append(f"input config.{k} changed ({a.get(k, '<absent>')} -> {b.get(k, '<absent>')})")
    return out


def fingerprint_path(workdir: str | os.PathLike, job: str) -> epath.Path:
    return epath.Path(workdir) / "fingerprints" / f"{job}.json"


def check_stage(workdir: str | os.PathLike, job: str, stage: Stage, cfg_dict: Mapping[str, Any],
                overwrite: bool = False) -> dict[str, Any]:
    """Compare ``stage``'s fingerprint with the one recorded in ``workdir``; record it. Raises :class:`ConfigError`
    naming the changed keys/inputs unless ``overwrite`` (then the stage's outputs are deleted first). Call on one
    process, before any output is written."""
    from mmfm_jax.storage import write_json_atomic

    workdir = epath.Path(workdir)
    new = fingerprint(stage, cfg_dict)
    path = fingerprint_path(workdir, job)
    old = json.loads(path.read_text()) if path.exists() else None
    changes = fingerprint_changes(old, new) if old is not None else []
    if changes and not overwrite:
        raise ConfigError(
            f"{job}: {workdir} holds a {job} run with another config or other inputs ({len(changes)} differences: "
            f"{'; '.join(changes[:5])}{'; ...' if len(changes) > 5 else ''}). Nothing was changed. Restore the old "
            f"values, use another --workdir, or pass --config.overwrite=True to delete this stage's outputs and "
            "start it afresh")
    if overwrite:
        removed = remove_outputs(workdir, stage, cfg_dict)
        if removed:
            log.warning("%s: config.overwrite=True: deleted %s", job, ", ".join(removed))
    if old != new or overwrite:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, new)
    return new


def remove_outputs(workdir: epath.Path, stage: Stage, cfg_dict: Mapping[str, Any]) -> list[str]:
    targets = [p for pat in stage.outputs for p in workdir.glob(pat)]
    targets += [epath.Path(str(_get(cfg_dict, k))) for k in stage.output_keys if _get(cfg_dict, k)]
    removed = []
    for p in targets:
        if p.is_dir():
            p.rmtree()
        elif p.exists():
            p.unlink()
        else:
            continue
        removed.append(str(p))
    return removed
