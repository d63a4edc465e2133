"""Plan a TPU pod before paying for it: compile each job's hot programs for a TPU topology on this host.

``plan(cfg, 'v5p-64', workdir)`` builds the mesh of ``cfg.mesh`` over the topology's abstract devices (libtpu,
``jax.experimental.topologies``), compiles the job's real jitted programs with abstract inputs
(:mod:`.programs`), and reports per chip memory against HBM, FLOPs and bytes per step, a roofline time and the
collectives (:mod:`.analyze`), optionally searching the largest per-chip batch that fits. Figures are compiler
estimates for the given jax/libtpu versions, not measurements.

Public API: ``plan``, ``format_report``; ``topology`` (``parse_topology``, ``CHIPS``, ``Topology``), ``analyze``
(``analyze``, ``search_batch``, ``Program``), ``programs`` (the per-job program builders). CLI: ``mmfm-jax plan``.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections

from mmfm_jax.config_utils import ConfigError
from mmfm_jax.plan.analyze import Program, analyze, search_batch
from mmfm_jax.plan.topology import CHIPS, GiB, Topology, parse_topology, plan_mesh, topology_devices

__all__ = ["CHIPS", "Program", "analyze", "parse_topology", "plan", "format_report"]


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("jax", "jaxlib", "libtpu"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "none"
    return out


def _programs(job: str, cfg: ml_collections.ConfigDict, mesh, n_samples: int
              ) -> tuple[list[Program], Callable[[int], list[Program]] | None]:
    """-> (the configured programs, ``build(per_chip_batch) -> [programs]`` for ``--search-batch`` or None)."""
    from mmfm_jax.plan import programs as P

    if job == "fit-gmm":
        return P.fit_gmm_programs(cfg, mesh, n_samples), None
    builder, per_chip = {"train": P.train_builder, "sample": P.sample_builder, "encode": P.encode_builder,
                         "evaluate": P.evaluate_builder}[job](cfg, mesh)

    def build(b: int) -> list[Program]:
        out = builder(b)
        return out if isinstance(out, list) else [out]

    return build(per_chip), build


def plan(cfg: ml_collections.ConfigDict, topology: str, workdir: str | Path | None = None, *,
         search: bool = False, n_samples: int = 0, max_batch: int = 1024,
         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Compile the programs of the job ``cfg`` configures for ``topology``; write ``workdir/summary.json``.

    Raises ``ConfigError`` for an unknown topology, a mesh the topology cannot hold or a bad job config."""
    from mmfm_jax.plan.programs import detect_job, prepare

    try:
        topo: Topology = parse_topology(topology)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    job = detect_job(cfg)
    cfg = prepare(cfg, job)
    devices = topology_devices(topo)
    try:
        mesh = plan_mesh(cfg.mesh, topo, devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    chip = topo.chip
    log(f"plan {job} on {topo.name} ({topo.libtpu_name}{f' x {topo.num_slices} slices' if topo.num_slices > 1 else ''}"
        f", {len(devices)} chips of {devices[0].device_kind}), mesh {dict(mesh.shape)}")
    progs, build = _programs(job, cfg, mesh, n_samples)
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    reports = []
    for p in progs:
        log(f"compiling {p.name} ...")
        reports.append(analyze(p, chip, hlo_dir=workdir))
    summary: dict[str, Any] = dict(
        job="plan", planned_job=job, topology=topo.name, libtpu_topology=topo.libtpu_name, num_slices=topo.num_slices,
        num_chips=len(devices), device_kind=devices[0].device_kind, mesh=dict(mesh.shape),
        chip=dataclasses.asdict(chip), versions=_versions(),
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        note="compiler estimates (XLA memory/cost analysis for this topology), not measurements",
        programs=reports, fits=all(r["fits"] for r in reports))
    if search and build is not None:
        first = progs[-1].name  # the largest program of a step (sample: with the decoder)
        log(f"searching the largest per-chip batch of {first} that fits ...")
        start = reports[-1]["per_chip_batch"] if reports[-1]["fits"] else 1  # the configured batch when it fits
        best, rep = search_batch(lambda b: build(b)[-1], chip, start=min(start or 1, max_batch), limit=max_batch,
                                 log=log)
        summary["search_batch"] = dict(program=first, largest_per_chip_batch=best, report=rep)
    if workdir is not None:
        from mmfm_jax.storage import write_json_atomic

        write_json_atomic(Path(workdir) / "summary.json", summary)
    log(format_report(summary))
    return summary


def _gb(x: float) -> str:
    return f"{x / GiB:.2f}"


def format_report(summary: dict[str, Any]) -> str:
    """A few lines per program: per-chip GiB, fits, FLOPs, bytes, roofline, collectives."""
    lines = [f"{summary['planned_job']} on {summary['topology']} ({summary['num_chips']} x {summary['device_kind']}), "
             f"mesh {summary['mesh']}; {summary['note']} (jax {summary['versions']['jax']}, libtpu "
             f"{summary['versions']['libtpu']}, {summary['date']})"]
    reps = list(summary["programs"])
    if summary.get("search_batch", {}).get("report"):
        reps.append(dict(summary["search_batch"]["report"], program=summary["search_batch"]["report"]["program"]
                         + " [largest batch]"))
    for r in reps:
        m = r["memory_per_chip"]
        if r.get("compile_error"):
            lines.append(f"  {r['program']} (per-chip batch {r.get('per_chip_batch')}): DOES NOT FIT: "
                         f"{r['compile_error']}")
            continue
        rl = r["roofline"]
        coll = ", ".join(f"{k} {v['executed']}x {v['executed_bytes'] / 2 ** 20:.1f} MiB" for k, v in
                         sorted(r["collectives"].items())) or "none"
        rate = f", {r['items_per_second_roofline']:.1f} items/s at the roofline" if r.get(
            "items_per_second_roofline") else ""
        batch = f" (per-chip batch {r['per_chip_batch']})" if r.get("per_chip_batch") else ""
        lines += [f"  {r['program']}{batch}: {_gb(m['total'])} of {m['hbm_gib']:.0f} GiB per chip "
                  f"({'fits' if r['fits'] else 'DOES NOT FIT'}; arguments {_gb(m['arguments'])}, outputs "
                  f"{_gb(m['outputs'])}, aliased {_gb(m['aliased'])}, temporaries {_gb(m['temporaries'])})",
                  f"    per step and chip: {r['flops_per_step'] / 1e12:.3f} TFLOP, "
                  f"{r['bytes_accessed_per_step'] / 1e9:.3f} GB accessed; roofline "
                  f"{rl['seconds_per_step'] * 1e3:.2f} ms ({rl['bound']}-bound){rate}",
                  f"    collectives per call: {coll}"]
    if "search_batch" in summary:
        s = summary["search_batch"]
        lines.append(f"  largest per-chip batch of {s['program']} that fits: {s['largest_per_chip_batch']}")
    return "\n".join(lines)
