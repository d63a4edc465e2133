"""Compile one program for a topology and read what the compiler says about it.

Figures per chip (the compiled program is the SPMD program of one device):
- memory (``Compiled.memory_analysis``): arguments, outputs, aliased (donated) bytes, temporaries, generated code;
  ``total = arguments + outputs - aliased + temporaries + code``; ``fits`` = total <= the chip's HBM;
- FLOPs: ``Compiled.cost_analysis``'s, which counts a loop body once, plus the other ``trip count - 1`` passes of
  every counted loop (:func:`hlo.loop_flops`: matmul/convolution FLOPs read from the compiled HLO), so a step with
  32 micro-batches counts 32 forward/backward passes;
- HBM bytes accessed (:func:`hlo.step_bytes`): every kernel's HBM reads and writes in the compiled HLO times its
  executions per call; of a stacked operand only the slices read, of a buffer updated in place only the update,
  nothing for values in on-chip memory (XLA's own count, ``bytes_accessed_counted``, runs each loop body once and
  charges a scanned layer's kernels for whole stacked operands);
- roofline time per step: ``max(FLOPs / peak, bytes / HBM bandwidth)`` from :data:`topology.CHIPS`;
- collectives in the compiled HLO: count and bytes (result shapes) by kind, executions per call (a while loop's
  known trip count multiplies what its body does).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmfm_jax.plan.hlo import Module, collectives, loop_flops, step_bytes
from mmfm_jax.plan.topology import Chip, GiB


@dataclasses.dataclass
class Program:
    """A job's jitted function with abstract arguments (``jax.ShapeDtypeStruct`` carrying the job's shardings)."""

    name: str
    fn: Any  # a jax.jit-wrapped function
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)
    items_per_step: int = 0  # images (or samples) a step processes, for items/s; 0: not applicable
    per_chip_batch: int = 0
    notes: str = ""
    info: dict = dataclasses.field(default_factory=dict)


def _cost(compiled) -> dict[str, float]:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return dict(ca or {})


def analyze(prog: Program, chip: Chip, hlo_dir: Any = None) -> dict[str, Any]:
    """Lower and compile ``prog`` for the topology its arguments live on; -> the report dict (see module doc).
    ``hlo_dir``: also write the compiled HLO there as ``<program>.hlo.txt``."""
    t0 = time.perf_counter()
    try:
        compiled = prog.fn.lower(*prog.args, **prog.kwargs).compile()
    except Exception as e:  # noqa: BLE001  (the TPU compiler refuses a program that does not fit its HBM)
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return _out_of_memory(prog, chip, str(e), time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    mem = dict(arguments=int(ma.argument_size_in_bytes), outputs=int(ma.output_size_in_bytes),
               aliased=int(ma.alias_size_in_bytes), temporaries=int(ma.temp_size_in_bytes),
               code=int(ma.generated_code_size_in_bytes))
    total = mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"] + mem["code"]
    cost = _cost(compiled)
    flops_counted = float(cost.get("flops", 0.0))
    bytes_counted = float(cost.get("bytes accessed", 0.0))
    hlo = compiled.as_text()
    if hlo_dir is not None:
        Path(hlo_dir, f"{prog.name}.hlo.txt").write_text(hlo)
    mod = Module(hlo)
    extra_flops = loop_flops(mod)
    flops, nbytes = flops_counted + extra_flops, step_bytes(mod)
    t_compute, t_memory = flops / chip.peak_bf16_flops, nbytes / chip.hbm_bandwidth
    t_step = max(t_compute, t_memory)
    coll, trips = collectives(hlo)
    report = dict(
        program=prog.name, compile_seconds=round(seconds, 2), per_chip_batch=prog.per_chip_batch or None,
        memory_per_chip=dict(mem, total=total, hbm=chip.hbm_bytes, total_gib=round(total / GiB, 3),
                             hbm_gib=round(chip.hbm_bytes / GiB, 2), fraction_of_hbm=round(total / chip.hbm_bytes, 4)),
        fits=bool(total <= chip.hbm_bytes),
        flops_per_step=flops, bytes_accessed_per_step=nbytes, flops_counted=flops_counted,
        bytes_accessed_counted=bytes_counted, loop_extra=dict(flops=extra_flops),
        roofline=dict(seconds_per_step=t_step, compute_seconds=t_compute, memory_seconds=t_memory,
                      bound="compute" if t_compute >= t_memory else "memory"),
        collectives=coll, loop_trip_counts=trips)
    if prog.items_per_step:
        report["items_per_step"] = prog.items_per_step
        report["items_per_second_roofline"] = prog.items_per_step / t_step if t_step > 0 else None
    if prog.notes:
        report["notes"] = prog.notes
    if prog.info:
        report["info"] = prog.info
    return report


_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
_OOM = re.compile(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")


def argument_bytes(prog: Program) -> int:
    """Per-chip bytes of the program's abstract arguments (each leaf's shard shape under its sharding)."""
    import math

    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves((prog.args, prog.kwargs)):
        if isinstance(x, jax.ShapeDtypeStruct):
            shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
            total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def _out_of_memory(prog: Program, chip: Chip, msg: str, seconds: float) -> dict[str, Any]:
    """The report of a program the compiler refused for lack of HBM (its message gives the bytes needed)."""
    m = _OOM.search(msg)
    temp = int(float(m.group(1)) * _UNITS[m.group(2)]) if m else 0
    avail = int(float(m.group(3)) * _UNITS[m.group(4)]) if m else chip.hbm_bytes
    args = argument_bytes(prog)
    line = next((x for x in msg.splitlines() if "RESOURCE_EXHAUSTED" in x), msg.splitlines()[0])
    return dict(program=prog.name, compile_seconds=round(seconds, 2), per_chip_batch=prog.per_chip_batch or None,
                memory_per_chip=dict(arguments=args, temporaries=temp, total=args + temp, hbm=chip.hbm_bytes,
                                     available_hbm=avail, total_gib=round((args + temp) / GiB, 3),
                                     hbm_gib=round(chip.hbm_bytes / GiB, 2), at_least=True),
                fits=False, compile_error=line.strip()[:500], flops_per_step=None, bytes_accessed_per_step=None,
                roofline=None, collectives={}, loop_trip_counts=[],
                **({"notes": prog.notes} if prog.notes else {}), **({"info": prog.info} if prog.info else {}))


def search_batch(build: Callable[[int], Program], chip: Chip, start: int = 1, limit: int = 4096,
                 log: Callable[[str], None] = print) -> tuple[int, dict | None]:
    """Largest per-chip batch ``b`` in ``[1, limit]`` whose program ``build(b)`` fits the chip's HBM: doubling from
    ``start`` until one does not fit (or fails to build/compile), then bisection to within 1/8. -> ``(b, its
    report)``; ``(0, None)`` when even 1 does not fit."""
    best, best_rep, bad = 0, None, None

    def attempt(b: int) -> bool:
        nonlocal best, best_rep
        try:
            rep = analyze(build(b), chip)
        except Exception as e:  # noqa: BLE001  (a compile failure, e.g. out of memory at compile time)
            log(f"  per-chip batch {b}: failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
            return False
        log(f"  per-chip batch {b}: {rep['memory_per_chip']['total_gib'] or float('nan'):.2f} GiB of "
            f"{rep['memory_per_chip']['hbm_gib']:.0f} ({'fits' if rep['fits'] else 'does not fit'}), "
            f"compiled in {rep['compile_seconds']:.0f} s")
        if rep["fits"] and b > best:
            best, best_rep = b, rep
        return rep["fits"]

    b = start
    while b <= limit:
        if not attempt(b):
            bad = b
            break
        b *= 2
    if best and bad is None and best < limit:
        bad = None if attempt(limit) else limit
    if not best and start > 1:  # the start does not fit: bisect below it
        best, bad = (1, start) if attempt(1) else (0, None)
    if bad is not None and best:
        lo, hi = best, bad
        while hi - lo > max(1, lo // 8):  # to within 1/8 of the answer
            mid = (lo + hi) // 2
            if attempt(mid):
                lo = mid
            else:
                hi = mid
    return best, best_rep
