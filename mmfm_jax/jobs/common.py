"""What every job shares: the workdir layout, config.json / summary.json, logging, TensorBoard, the mesh."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import Any

import jax
import ml_collections
from etils import epath
from jax.sharding import Mesh

from mmfm_jax import parallel
from mmfm_jax.utils import MetricWriter, as_path, check_store, write_json_atomic

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
        root.addHandler(h)
    root.setLevel(level)
    for noisy in ("absl", "jax._src", "orbax", "tensorstore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def start_job(job: str, cfg: ml_collections.ConfigDict, workdir: str | epath.PathLike) -> JobContext:
    """Initialise multi-host, build the mesh, create the workdir (local or ``gs://``; a missing or unreachable bucket
    fails here, naming the URI), write ``config.json``, open the writer."""
    check_store(workdir, "--workdir")
    parallel.maybe_initialize_distributed(cfg)
    mesh = parallel.mesh_from_config(cfg)
    workdir = as_path(workdir)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(workdir / "config.json", cfg.to_dict())
    parallel.sync("workdir")
    writer = MetricWriter(workdir / "tb")
    log.info("%s: %d devices (%d processes), mesh %s, workdir %s", job, jax.device_count(), jax.process_count(),
             dict(mesh.shape), workdir)
    return JobContext(job=job, workdir=workdir, mesh=mesh, writer=writer)
