"""What every job shares: the workdir layout, config.json / summary.json, logging, TensorBoard, the mesh."""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
import time
from typing import Any

import jax
import ml_collections
from etils import epath
from jax.sharding import Mesh

from mmfm_jax import distributed, parallel
from mmfm_jax.config_utils import ConfigError
from mmfm_jax.storage import as_path, check_store, write_json_atomic
from mmfm_jax.utils import MetricWriter
from mmfm_jax.workdir import WorkdirLock, check_stage

log = logging.getLogger("mmfm_jax")


@dataclasses.dataclass
class JobContext:
    """Workdir layout: ``config.json``, ``summary.json``, ``tb/`` (TensorBoard), job-specific folders; ``workdir`` is
    an ``epath.Path`` (a local folder or a ``gs://`` URI)."""

    job: str
    workdir: epath.Path
    mesh: Mesh
    writer: MetricWriter
    t0: float = dataclasses.field(default_factory=time.time)
    lock: WorkdirLock | None = None

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    def path(self, *parts: str) -> epath.Path:
        return self.workdir.joinpath(*parts)

    def write_summary(self, summary: dict[str, Any]) -> dict[str, Any]:
        summary = dict(job=self.job, wall_s=round(time.time() - self.t0, 3), num_devices=jax.device_count(),
                       num_processes=jax.process_count(), mesh=dict(self.mesh.shape), **summary)
        if self.is_main:
            write_json_atomic(self.path("summary.json"), summary)
        return summary

    def close(self) -> None:
        """Close the metric writer and release the workdir lock."""
        self.writer.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _guard_workdir(job: str, cfg: ml_collections.ConfigDict, workdir: epath.Path) -> WorkdirLock | None:
    """Process 0 takes the workdir lock and checks the job's stage fingerprint (``workdir.Stage`` in the job
    module's ``STAGE``); every process raises the same error if either fails. Nothing is written on failure."""
    import importlib

    import numpy as np

    from mmfm_jax.jobs import JOBS

    lock, err, failure = None, "", None
    if jax.process_index() == 0:
        try:
            lock = WorkdirLock(workdir, job).acquire()
            stage = getattr(importlib.import_module(JOBS[job]), "STAGE", None) if job in JOBS else None
            if stage is not None:
                check_stage(workdir, job, stage, cfg.to_dict(), overwrite=bool(cfg.get("overwrite", False)))
        except Exception as e:  # noqa: BLE001  (re-raised below, after telling the other processes)
            if lock is not None:
                lock.release()
                lock = None
            err, failure = str(e) or type(e).__name__, e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        failed = int(np.asarray(multihost_utils.broadcast_one_to_all(np.int32(bool(err)))))
        if failed and not err:
            err = f"{job}: process 0 refused workdir {workdir} (see its log)"
    if failure is not None and not isinstance(failure, ConfigError):
        raise failure
    if err:
        raise ConfigError(err)
    return lock


_BOUND = re.compile(r"<bound method ([\w.]+) of .*?>+")
_QUIET_LIBS = ("gcsfs", "fsspec", "google", "orbax", "absl", "tensorstore", "etils")


class CleanFallbacks(logging.Filter):
    """Third-party storage/checkpoint libraries announce fallbacks (``Could not determine bucket type ...
    falling back to GCSFileSystem``, ``Failed to move file using moveTo API ... Falling back to copy/delete``) once
    per call, with tracebacks and ``<bound method X of <object ...>>`` reprs. Their records become one clean line
    each: no traceback, ``X`` instead of the repr, the first line only, and a repeated fallback message once per
    process."""

    def __init__(self):
        super().__init__()
        self._seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(_QUIET_LIBS):
            return True
        msg = _BOUND.sub(r"\1", record.getMessage()).strip().splitlines()
        msg = msg[0] if msg else ""
        if "falling back" in msg.lower():
            key = (record.name, re.sub(r"\d+", "#", msg))
            if key in self._seen:
                return False
            self._seen.add(key)
        record.msg, record.args, record.exc_info, record.exc_text, record.stack_info = msg, (), None, None, None
        return True


def setup_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger()
    try:  # absl.app installs its own handler on the root logger: keep one copy of every line
        from absl import logging as absl_logging

        root.removeHandler(absl_logging.get_absl_handler())
    except Exception:  # noqa: BLE001
        pass
    if not any(getattr(h, "_mmfm", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h._mmfm = True  # type: ignore[attr-defined]
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s] %(message)s", "%H:%M:%S"))
        h.addFilter(CleanFallbacks())
        root.addHandler(h)
    root.setLevel(level)
    for noisy in ("absl", "jax._src", "orbax", "tensorstore", "gcsfs", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def start_job(job: str, cfg: ml_collections.ConfigDict, workdir: str | epath.PathLike) -> JobContext:
    """Initialise multi-host and the compilation cache, build the mesh, lock the workdir and check the stage's
    fingerprint (``workdir.py``), create the workdir (local or ``gs://``; a missing or unreachable bucket fails
    here, naming the URI), write ``config.json``, open the writer. Call ``ctx.close()`` at the end."""
    check_store(workdir, "--workdir")
    distributed.maybe_initialize_distributed(cfg)
    distributed.configure_compile_cache(cfg)
    mesh = parallel.mesh_from_config(cfg)
    workdir = as_path(workdir)
    lock = _guard_workdir(job, cfg, workdir)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(workdir / "config.json", cfg.to_dict())
    distributed.sync("workdir")
    writer = MetricWriter(workdir / "tb")
    log.info("%s: %d devices (%d processes), mesh %s, workdir %s", job, jax.device_count(), jax.process_count(),
             dict(mesh.shape), workdir)
    return JobContext(job=job, workdir=workdir, mesh=mesh, writer=writer, lock=lock)
