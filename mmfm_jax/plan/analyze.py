"""Compile one program for a topology and read what the compiler says about it.

Figures per chip (the compiled program is the SPMD program of one device):
- memory (``Compiled.memory_analysis``): arguments, outputs, aliased (donated) bytes, temporaries, generated code;
  ``total = arguments + outputs - aliased + temporaries + code``; ``fits`` = total <= the chip's HBM;
- cost (``Compiled.cost_analysis``): FLOPs and bytes accessed. XLA counts a loop body once; :func:`loop_extra`
  adds the other ``trip count - 1`` passes (matmul/convolution FLOPs and kernel bytes read from the compiled HLO),
  so a step with 32 micro-batches counts 32 forward/backward passes;
- roofline time per step: ``max(FLOPs / peak, bytes / HBM bandwidth)`` from :data:`topology.CHIPS`;
- collectives in the compiled HLO: count and bytes (result shapes) by kind, executions per call (a while loop's
  known trip count multiplies what its body does).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmfm_jax.plan.topology import Chip, GiB

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")
DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1,
               "f8e5m2": 1, "f8e4m3": 1, "f8e5m2fnuz": 1, "f8e4m3fnuz": 1, "f8e4m3b11fnuz": 1}
_SHAPE = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start|-done)?\(")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"\b(calls|to_apply|body|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


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


def shape_bytes(text: str) -> int:
    total = 0
    for dt, dims in _SHAPE.findall(text):
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * DTYPE_BYTES[dt]
    return total


def _computations(hlo: str) -> tuple[dict[str, list[str]], str | None]:
    comps: dict[str, list[str]] = {}
    entry, cur = None, None
    for line in hlo.splitlines():
        if cur is None:
            m = _HEADER.match(line)
            if m:
                cur = m.group(1)
                comps[cur] = []
                if line.startswith("ENTRY"):
                    entry = cur
        elif line.startswith("}"):
            cur = None
        else:
            comps[cur].append(line)
    return comps, entry


_COND = re.compile(r"condition=%?([\w.\-]+)")
_LT = re.compile(r"^\s*ROOT\s+%\S+\s*=\s*pred\[\]\S*\s+compare\(%[\w.\-]+,\s*%([\w.\-]+)\),\s*direction=LT")


def trip_count(line: str, comps: dict[str, list[str]]) -> int | None:
    """A while loop's trip count: XLA's ``known_trip_count``, else a condition ``i < constant`` (a counted loop
    from 0 by 1, as ``lax.scan`` / ``fori_loop`` lower to). None when neither applies."""
    t = _TRIP.search(line)
    if t:
        return int(t.group(1))
    c = _COND.search(line)
    body = comps.get(c.group(1), []) if c else []
    for ln in body:
        m = _LT.match(ln)
        if m:
            const = re.compile(r"^\s*%" + re.escape(m.group(1)) + r"\s*=\s*s32\[\]\S*\s+constant\((\d+)\)")
            for ln2 in body:
                k = const.match(ln2)
                if k:
                    return int(k.group(1))
    return None


def _edges(comps: dict[str, list[str]], trips: bool = True) -> dict[str, list[tuple[str, int, bool]]]:
    """caller -> [(callee, executions per call, callee is a program level (not a kernel's inside))]."""
    edges: dict[str, list[tuple[str, int, bool]]] = defaultdict(list)
    for name, lines in comps.items():
        for line in lines:
            is_while = " while(" in line
            n = (trip_count(line, comps) or 1) if trips and is_while else 1
            outer = is_while or " call(" in line or " conditional(" in line
            for kind, callee in _CALLS.findall(line):
                edges[name].append((callee, n if kind in ("body", "condition") else 1, outer))
            for group in _BRANCHES.findall(line):
                for callee in group.split(","):
                    edges[name].append((callee.strip().lstrip("%"), 1, True))
    return edges


def _multipliers(comps: dict[str, list[str]], entry: str | None, trips: bool = True) -> dict[str, int]:
    """Executions of each computation per call of the entry (while bodies times their known trip counts)."""
    edges = _edges(comps, trips)
    mult: dict[str, int] = defaultdict(int)
    if entry is None:
        return {name: 1 for name in comps}
    order: list[str] = []
    seen: set[str] = set()

    def visit(c):  # topological order (the call graph is a DAG)
        if c in seen:
            return
        seen.add(c)
        for callee, _, _ in edges.get(c, ()):
            visit(callee)
        order.append(c)

    visit(entry)
    mult[entry] = 1
    for c in reversed(order):
        for callee, n, _ in edges.get(c, ()):
            mult[callee] += mult[c] * n
    return mult


def collectives(hlo: str) -> tuple[dict[str, dict[str, int]], list[int]]:
    """``({kind: {count, bytes, executed, executed_bytes}}, [loop trip counts, -1 = unknown])`` from compiled HLO.
    Async pairs are counted once, by their ``-done`` result."""
    comps, entry = _computations(hlo)
    mult = _multipliers(comps, entry)
    out: dict[str, dict[str, int]] = {}
    trips: list[int] = []
    for name, lines in comps.items():
        m_c = mult.get(name, 0) if entry is not None else 1
        for line in lines:
            if " while(" in line:
                t = trip_count(line, comps)
                trips.append(t if t is not None else -1)
            m = _OP.match(line)
            if not m or m.group(3) == "-start":
                continue
            kind, nbytes = m.group(2), shape_bytes(m.group(1))
            row = out.setdefault(kind, dict(count=0, bytes=0, executed=0, executed_bytes=0))
            row["count"] += 1
            row["bytes"] += nbytes
            row["executed"] += m_c
            row["executed_bytes"] += m_c * nbytes
    return out, trips


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*")
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency"}


def _close(text: str, i: int) -> int:
    """Index of the parenthesis closing the one at ``text[i]``."""
    depth = 0
    for j in range(i, len(text)):
        depth += {"(": 1, ")": -1}.get(text[j], 0)
        if depth == 0:
            return j
    return len(text) - 1


def _instruction(line: str) -> tuple[str, str, str, list[str], str] | None:
    """``(name, type, opcode, operand names, attributes)`` of an HLO instruction line."""
    m = _INSTR.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):
        k = _close(rest, 0) + 1
    else:
        k = rest.find(" ")
    if k <= 0:
        return None
    typ, rest = rest[:k], rest[k:].lstrip()
    p = rest.find("(")
    if p <= 0:
        return None
    q = _close(rest, p)
    return m.group(1), typ, rest[:p], re.findall(r"%([\w.\-]+)", rest[p + 1:q]), rest[q + 1:]


def _dims(typ: str) -> list[int]:
    found = _SHAPE.findall(typ)
    return [int(d) for d in found[0][1].split(",") if d] if found else []


def _dot_flops(op: str, typ: str, operands: list[str], attrs: str, types: dict[str, str]) -> float:
    out = 1
    for d in _dims(typ):
        out *= d
    if op == "dot" and operands:
        lhs = _dims(types.get(operands[0], ""))
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
        k = 1
        for i in (m.group(1).split(",") if m and m.group(1) else []):
            k *= lhs[int(i)] if int(i) < len(lhs) else 1
        return 2.0 * out * k
    if op == "convolution" and len(operands) > 1:
        # contraction = input features x window taps; batched matmuls written as convolutions over batch
        # "windows" (lhs dilation or kernel reversal) contract over the features only
        kernel = _dims(types.get(operands[1], ""))
        m = re.search(r"dim_labels=\w+_(\w+)->", attrs)
        window = re.search(r"window=\{([^}]*)\}", attrs)
        trick = bool(window) and ("lhs_dilate" in window.group(1) or "rhs_reversal" in window.group(1))
        k = 1
        for i, label in enumerate(m.group(1) if m else ""):
            if i < len(kernel) and (label == "i" or (label not in "io" and not trick)):
                k *= kernel[i]
        return 2.0 * out * k
    return 0.0


def loop_extra(hlo: str) -> tuple[float, float]:
    """``(FLOPs, bytes)`` that loops add beyond one pass of their bodies: for every computation, (executions with
    the known trip counts - executions with each loop run once) x its matmul/convolution FLOPs and, for program-level
    computations, the bytes its kernels read and write (operands + results, as XLA's cost analysis counts them)."""
    comps, entry = _computations(hlo)
    if entry is None:
        return 0.0, 0.0
    with_trips, once = _multipliers(comps, entry, True), _multipliers(comps, entry, False)
    outer = {entry}
    for callees in _edges(comps).values():
        outer.update(c for c, _, o in callees if o)
    types: dict[str, str] = {}
    parsed: dict[str, list] = {}
    for name, lines in comps.items():
        parsed[name] = [x for x in map(_instruction, lines) if x is not None]
        for ins in parsed[name]:
            types[ins[0]] = ins[1]
    flops = nbytes = 0.0
    for name, instrs in parsed.items():
        extra = with_trips.get(name, 0) - once.get(name, 0)
        if extra <= 0:
            continue
        for _, typ, op, operands, attrs in instrs:
            flops += extra * _dot_flops(op, typ, operands, attrs, types)
            if name in outer and op not in _NO_TRAFFIC:
                sizes = [shape_bytes(types.get(o, "")) for o in operands]
                if _uses(op, attrs, comps, "dynamic-slice"):  # reads a slice of its operands (a row per pass)
                    sizes = [min(x, shape_bytes(typ)) for x in sizes]
                out_shapes = set(_SHAPE.findall(typ))  # (dtype, dims), layouts ignored
                updated = [bool(set(_SHAPE.findall(types.get(o, ""))) & out_shapes) for o in operands]
                if _in_place(op, attrs, comps) and any(updated):
                    # an in-place update of a buffer (a stacked gradient, a scatter row by row): only the update moves
                    nbytes += extra * 2 * sum(sz for sz, u in zip(sizes, updated) if not u)
                else:
                    nbytes += extra * (shape_bytes(typ) + sum(sizes))
    return flops, nbytes


def _uses(op: str, attrs: str, comps: dict[str, list[str]], *kinds: str) -> bool:
    """Whether the instruction is, or is a fusion containing, one of the opcodes ``kinds``."""
    if op in kinds:
        return True
    m = re.search(r"calls=%?([\w.\-]+)", attrs) if op == "fusion" else None
    return bool(m) and any(f" {k}(" in ln for ln in comps.get(m.group(1), []) for k in kinds)


def _in_place(op: str, attrs: str, comps: dict[str, list[str]]) -> bool:
    return _uses(op, attrs, comps, "dynamic-update-slice", "scatter")


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
    extra_flops, extra_bytes = loop_extra(hlo)
    flops, nbytes = flops_counted + extra_flops, bytes_counted + extra_bytes
    t_compute, t_memory = flops / chip.peak_bf16_flops, nbytes / chip.hbm_bandwidth
    t_step = max(t_compute, t_memory)
    coll, trips = collectives(hlo)
    report = dict(
        program=prog.name, compile_seconds=round(seconds, 2), per_chip_batch=prog.per_chip_batch or None,
        memory_per_chip=dict(mem, total=total, hbm=chip.hbm_bytes, total_gib=round(total / GiB, 3),
                             hbm_gib=round(chip.hbm_bytes / GiB, 2), fraction_of_hbm=round(total / chip.hbm_bytes, 4)),
        fits=bool(total <= chip.hbm_bytes),
        flops_per_step=flops, bytes_accessed_per_step=nbytes, flops_counted=flops_counted,
        bytes_accessed_counted=bytes_counted, loop_extra=dict(flops=extra_flops, bytes=extra_bytes),
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
