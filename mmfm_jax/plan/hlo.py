"""Reading compiled HLO text: computations, loop trip counts, collectives, matmul FLOPs and kernel bytes.

The text is what ``Compiled.as_text()`` gives (XLA's HLO printer); parsed with regular expressions (no HLO parser
is public in jax), which is enough for the few facts the planner needs: which computations loops run how often,
which instructions are collectives or matmuls, and the bytes each kernel reads and writes.
"""

from __future__ import annotations

import functools
import math
import re
from collections import defaultdict

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


def _elements(dims: str) -> int:
    """Element count of an HLO shape's dimension list, e.g. ``'8,256,768'`` (``''``: a scalar)."""
    return math.prod(int(d) for d in dims.split(",") if d)


def shape_bytes(text: str) -> int:
    total = 0
    for dt, dims in _SHAPE.findall(text):
        total += _elements(dims) * DTYPE_BYTES[dt]
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


_PARAM = re.compile(r"\sparameter\((\d+)\)")
_CALLEE = re.compile(r"\bcalls=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_LAYOUT = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\](\{[^}]*\})?")
_ON_CHIP = re.compile(r"S\([1-9]\d*\)")  # a layout's memory space other than 0 (HBM): on-chip memory on TPU
_IN_PLACE = ("dynamic-update-slice", "scatter")  # operand 0 is the buffer updated in place
_SLICING = ("dynamic-slice", "slice", "gather")  # operand 0 is read only where the slice lies
_FREE_CALLS = {"AllocateBuffer", "ConcatBitcast", "AssumeGatherIndicesInBound"}  # TPU bookkeeping, no traffic


def hbm_bytes(text: str) -> int:
    """Bytes of the shapes in ``text`` whose layout puts them in HBM (memory space 0: no ``S(n)``, n >= 1)."""
    total = 0
    for dt, dims, layout in _LAYOUT.findall(text):
        if layout and _ON_CHIP.search(layout):
            continue
        total += _elements(dims) * DTYPE_BYTES[dt]
    return total


class Module:
    """Compiled HLO parsed once: computations (instruction tuples ``(name, type, opcode, operands, attributes)``),
    each one's root, parameters by index and the users of every value. Instruction names are unique in a module."""

    def __init__(self, hlo: str):
        self.comps, self.entry = _computations(hlo)
        self.instrs: dict[str, list[tuple]] = {}
        self.ins: dict[str, tuple] = {}
        self.root: dict[str, str] = {}
        self.params: dict[str, dict[int, str]] = defaultdict(dict)
        self.users: dict[str, dict[str, list[tuple]]] = {}
        for comp, lines in self.comps.items():
            users: dict[str, list[tuple]] = defaultdict(list)
            self.instrs[comp] = []
            for line in lines:
                ins = _instruction(line)
                if ins is None:
                    continue
                self.instrs[comp].append(ins)
                self.ins[ins[0]] = ins
                if line.lstrip().startswith("ROOT"):
                    self.root[comp] = ins[0]
                if ins[2] == "parameter":
                    p = _PARAM.search(line)
                    if p:
                        self.params[comp][int(p.group(1))] = ins[0]
                for o in dict.fromkeys(ins[3]):
                    users[o].append(ins)
            self.users[comp] = users
        self.types = {name: ins[1] for name, ins in self.ins.items()}

    def hbm(self, name: str) -> int:
        return hbm_bytes(self.types.get(name, ""))

    def kernel_bytes(self, ins: tuple) -> int:
        """HBM bytes a program-level instruction (a kernel) reads and writes. Values the TPU compiler placed in
        on-chip memory (layout memory space ``S(n)``, n >= 1) cost nothing; of a stacked operand only the slices
        read are charged (``slice`` / ``dynamic-slice`` / ``gather`` of it, in the fusion or a nested one), of a
        buffer updated in place (``dynamic-update-slice`` / ``scatter`` into it) only the update written: what the
        kernels of a scanned-layer loop move per pass, not the whole stacked parameters. An asynchronous pair is
        charged once, at its ``-done``: the result read from its source and written to its destination."""
        _, typ, op, operands, attrs = ins
        callee = _CALLEE.search(attrs) if op == "fusion" else None
        if callee and callee.group(1) in self.comps:
            comp = callee.group(1)
            return (sum(self._read(comp, i, o) for i, o in enumerate(operands))
                    + min(self._written(comp, self.root.get(comp, "")), hbm_bytes(typ)))
        if op.endswith("-start") or (op == "custom-call" and _TARGET.search(attrs)
                                     and _TARGET.search(attrs).group(1) in _FREE_CALLS):
            return 0
        if op.endswith("-done"):
            start = self.ins.get(operands[0]) if operands else None
            source = sum(self.hbm(o) for o in start[3]) if start is not None else shape_bytes(typ)
            return min(source, shape_bytes(typ)) + hbm_bytes(typ)
        if op in _SLICING:
            part = shape_bytes(typ) if self.hbm(operands[0]) else 0
            return part + hbm_bytes(typ) + sum(self.hbm(o) for o in operands[1:])
        if op in _IN_PLACE and operands:
            update, index = self._update(op, operands)
            written = sum(shape_bytes(self.types.get(o, "")) for o in update) if self.hbm(operands[0]) else 0
            return sum(self.hbm(o) for o in update + index) + written
        return hbm_bytes(typ) + sum(self.hbm(o) for o in operands)

    @staticmethod
    def _update(op: str, operands: list[str]) -> tuple[list[str], list[str]]:
        """(update operands, index operands) of an in-place update."""
        if op == "dynamic-update-slice":
            return operands[1:2], operands[2:]
        n = (len(operands) - 1) // 2  # scatter(inputs..., indices, updates...)
        return operands[n + 1:], operands[n:n + 1]

    def _read(self, comp: str, index: int, operand: str) -> int:
        """HBM bytes of the fusion operand ``index`` that the fused computation ``comp`` reads."""
        full = self.hbm(operand)
        param = self.params[comp].get(index)
        part = self._reads_of(comp, param) if param is not None and full else None
        return full if part is None else min(part, full)

    @functools.cache  # noqa: B019  (a Module lives for one analysis)
    def _reads_of(self, comp: str, name: str) -> int | None:
        """Bytes of value ``name`` in ``comp`` read through slices or nested fusions; None: read whole."""
        total = 0
        for user in self.users[comp].get(name, ()):
            uname, utyp, uop, uops, uattrs = user
            callee = _CALLEE.search(uattrs) if uop == "fusion" else None
            if uop == "bitcast":
                part = self._reads_of(comp, uname)
                if part is None:
                    return None
                total += part
            elif uop in _SLICING + _IN_PLACE and uops[0] == name and uops.count(name) == 1:
                total += shape_bytes(utyp) if uop in _SLICING else 0  # an in-place update reads nothing of it
            elif callee and callee.group(1) in self.comps:
                for j, o in enumerate(uops):
                    if o == name:
                        p = self.params[callee.group(1)].get(j)
                        part = self._reads_of(callee.group(1), p) if p is not None else None
                        if part is None:
                            return None
                        total += part
            else:
                return None
        return total

    def _root_param(self, name: str) -> tuple | None:
        ins = self.ins.get(name)
        while ins is not None and ins[2] == "bitcast" and ins[3]:
            ins = self.ins.get(ins[3][0])
        return ins if ins is not None and ins[2] == "parameter" else None

    def _written(self, comp: str, name: str) -> int:
        """HBM bytes the fused computation ``comp`` writes for its value ``name`` (its root or a root tuple's part)."""
        ins = self.ins.get(name)
        if ins is None:
            return 0
        _, typ, op, operands, attrs = ins
        if op == "tuple":
            return sum(self._written(comp, o) for o in operands)
        if hbm_bytes(typ) == 0:  # on chip
            return 0
        if op == "bitcast" and operands:
            return min(self._written(comp, operands[0]), hbm_bytes(typ))
        if op in _IN_PLACE and operands and self._root_param(operands[0]) is not None:
            update, _ = self._update(op, operands)
            return sum(shape_bytes(self.types.get(o, "")) for o in update)
        callee = _CALLEE.search(attrs) if op == "fusion" else None
        if callee and callee.group(1) in self.root:
            return min(self._written(callee.group(1), self.root[callee.group(1)]), hbm_bytes(typ))
        return hbm_bytes(typ)


def step_bytes(mod: Module) -> float:
    """HBM bytes one call of the program reads and writes: every program-level kernel's
    :meth:`Module.kernel_bytes` times its executions per call (loops multiplied by their trip counts)."""
    if mod.entry is None:
        return 0.0
    mult = _multipliers(mod.comps, mod.entry, True)
    total = 0.0
    for name in _program_level(mod):
        for ins in mod.instrs.get(name, ()):
            if ins[2] not in _NO_TRAFFIC and mult.get(name, 0):
                total += mult[name] * mod.kernel_bytes(ins)
    return total


def _program_level(mod: Module) -> set[str]:
    """The entry and the computations it runs as programs (loop bodies and conditions, calls, branches), not the
    insides of kernels (fusions, reductions' combiners)."""
    outer = {mod.entry}
    for callees in _edges(mod.comps).values():
        outer.update(c for c, _, o in callees if o)
    return outer


def loop_flops(mod: Module) -> float:
    """Matmul/convolution FLOPs that loops add beyond one pass of their bodies (XLA's cost analysis counts a loop
    body once): for every computation, (executions with the known trip counts - executions with each loop run
    once) x its FLOPs."""
    if mod.entry is None:
        return 0.0
    with_trips, once = _multipliers(mod.comps, mod.entry, True), _multipliers(mod.comps, mod.entry, False)
    flops = 0.0
    for name, instrs in mod.instrs.items():
        extra = with_trips.get(name, 0) - once.get(name, 0)
        if extra > 0:
            flops += extra * sum(_dot_flops(op, typ, operands, attrs, mod.types)
                                 for _, typ, op, operands, attrs in instrs)
    return flops
