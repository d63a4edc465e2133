"""TPU topologies for planning: names -> abstract devices from libtpu, and the one table of chip figures.

``--topology`` takes a Cloud TPU name (``v4-8``, ``v5e-16``, ``v5litepod-16``, ``v5p-64``, ``v6e-256``: the
number is TensorCores for v4/v5p, chips for v5e/v6e, as Cloud TPU names them), an explicit libtpu name
(``v5p:4x4x4``, ``v6e:2x4``) or either prefixed by a slice count for a multi-slice (DCN) job (``2xv5e-16``).
``jax.experimental.topologies.get_topology_desc`` turns it into abstract devices (one per chip: v4/v5p in
megacore mode) on which programs compile for that TPU on a CPU-only host; nothing runs on them.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Nominal per-chip figures (Cloud TPU documentation): dense bf16 peak, HBM capacity and bandwidth."""

    name: str  # v4 | v5e | v5p | v6e (the libtpu topology prefix)
    peak_bf16_flops: float  # FLOP/s
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    dims: int  # 3: torus named by TensorCores (2 per chip), 2: named by chips
    chip_config: str  # libtpu chip_config_name


# The one table of chip peaks (roofline and `fits` use nothing else).
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 275e12, 32 * GiB, 1228e9, 3, "megacore"),
    "v5e": Chip("v5e", 197e12, 16 * GiB, 819e9, 2, "default"),
    "v5p": Chip("v5p", 459e12, 95 * GiB, 2765e9, 3, "megacore"),
    "v6e": Chip("v6e", 918e12, 32 * GiB, 1640e9, 2, "default"),
}
ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}
# chips -> torus shape of the standard slices
SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


def known_topologies() -> list[str]:
    out = []
    for chip in CHIPS.values():
        if chip.dims == 3:
            out += [f"{chip.name}-{2 * c}" for c in SHAPES_3D]
        else:
            out += [f"{chip.name}-{c}" for c in SHAPES_2D]
    return out


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given
    chip: Chip
    shape: str  # e.g. '4x4x4'
    num_slices: int = 1

    @property
    def libtpu_name(self) -> str:
        return f"{self.chip.name}:{self.shape}"

    @property
    def chips_per_slice(self) -> int:
        n = 1
        for s in self.shape.split("x"):
            n *= int(s)
        return n

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.num_slices


def parse_topology(name: str) -> Topology:
    """``'v5p-64'`` / ``'v5p:4x4x4'`` / ``'2xv5e-16'`` -> :class:`Topology`; unknown names raise ``ValueError``
    listing the known ones."""
    given = name
    name = name.strip().lower()
    slices = 1
    m = re.fullmatch(r"(\d+)x(v.*)", name)
    if m:
        slices, name = int(m.group(1)), m.group(2)
    known = ", ".join(known_topologies())
    bad = ValueError(f"--topology={given!r}: unknown TPU topology; known: {known}, an explicit "
                     f"'<{'|'.join(CHIPS)}>:AxB[xC]' (e.g. 'v5p:4x4x4'), optionally prefixed by a slice count "
                     "('2xv5e-16')")
    m = re.fullmatch(r"(v\w+?)(?::(\d+(?:x\d+){1,2})|-(\d+))", name)
    if not m or slices < 1:
        raise bad
    gen = ALIASES.get(m.group(1), m.group(1))
    chip = CHIPS.get(gen)
    if chip is None:
        raise bad
    if m.group(2):
        shape = m.group(2)
        if len(shape.split("x")) != chip.dims:
            raise ValueError(f"--topology={given!r}: {gen} topologies have {chip.dims} dimensions")
    else:
        n = int(m.group(3))
        table = SHAPES_3D if chip.dims == 3 else SHAPES_2D
        chips = n // 2 if chip.dims == 3 else n
        if (chip.dims == 3 and n % 2) or chips not in table:
            raise bad
        shape = table[chips]
    return Topology(given, chip, shape, slices)


def topology_devices(topo: Topology) -> list[Any]:
    """The abstract TPU devices of ``topo`` (slice-major when multi-slice), from libtpu on this host."""
    # several processes on one host may load libtpu to compile: skip its single-process lock
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    kw: dict[str, Any] = {"chip_config_name": topo.chip.chip_config}
    if topo.num_slices > 1:
        kw["num_slices"] = topo.num_slices
    dims = [int(s) for s in topo.shape.split("x")]
    if topo.chips_per_slice < 4:  # smaller than libtpu's default host (2x2x1): one host holds the slice
        kw["chips_per_host_bounds"] = tuple(dims + [1] * (3 - len(dims)))
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.libtpu_name, **kw)
    devices = list(desc.devices)
    return sorted(devices, key=lambda d: (getattr(d, "slice_index", 0) or 0, d.id))


def plan_mesh(mesh_cfg: Any, topo: Topology, devices: list[Any]):
    """``parallel.make_mesh(config.mesh)`` over the topology's devices. With several slices the ``dcn_data`` axis
    spans them (``config.mesh.dcn_data``, default: the slice count; it must equal the slice count). Raises
    ``ValueError`` naming both sizes when the mesh does not fit the topology."""
    from mmfm_jax import parallel

    shape = {k: int(mesh_cfg.get(k, 1)) for k in parallel.MESH_AXES} if mesh_cfg is not None else {}
    if topo.num_slices > 1 and shape.get("dcn_data", 1) == 1:
        shape["dcn_data"] = topo.num_slices
    if topo.num_slices > 1 and shape["dcn_data"] != topo.num_slices:
        raise ValueError(f"config.mesh.dcn_data = {shape['dcn_data']} but topology {topo.name} has "
                         f"{topo.num_slices} slices (the dcn_data axis spans the slices)")
    try:
        mesh = parallel.make_mesh(shape or None, devices)
    except ValueError as e:
        raise ValueError(f"config.mesh does not fit topology {topo.name} ({len(devices)} chips): {e}") from None
    return mesh
