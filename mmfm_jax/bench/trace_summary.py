"""``python -m mmfm_jax.bench trace_summary DIR [--steps=N] [--top=15]``: where the device time of a profile goes.

Reads the newest ``*.trace.json.gz`` under ``DIR`` (written by ``jax.profiler.trace``, e.g. ``bench train
--trace=DIR``), keeps the kernels that ran on accelerators (processes named ``/device:...``) and sums their time by
kind, per traced step:

- ``gemm``: cuBLAS / CUTLASS / XLA dot kernels;
- ``attention``: cuDNN / flash attention;
- ``collective``: NCCL and other cross-device communication;
- ``copy``: copies, transposes, memsets;
- ``other``: everything else, mostly XLA's element-wise and reduction fusions (memory bound: where a fused kernel
  or a smaller dtype can still win).

Then the ``--top`` kernels by time, with the HLO op they came from. Kernel names differ between CUDA versions; the
patterns below are matched against the kernel name and its ``hlo_op`` / ``long_name`` arguments.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
from pathlib import Path
from typing import Any

KINDS: tuple[tuple[str, re.Pattern], ...] = (
    ("attention", re.compile(r"sdpa|flash|fmha|attention|cudnn", re.I)),
    ("collective", re.compile(r"nccl|all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|"
                              r"allreduce|allgather|reducescatter", re.I)),
    ("gemm", re.compile(r"gemm|xmma|nvjet|cutlass|cublas|wgmma|matmul|\bdot\b|dot[._]|convolution", re.I)),
    ("copy", re.compile(r"copy|transpose|memcpy|memset", re.I)),
)


def classify(name: str, args: dict[str, Any] | None = None) -> str:
    """The kind of one device kernel (module docstring), from its name and HLO arguments."""
    text = " ".join([name] + [str(v) for k, v in (args or {}).items() if k in ("hlo_op", "long_name", "name")])
    for kind, pattern in KINDS:
        if pattern.search(text):
            return kind
    return "other"


def find_trace(path: str | Path) -> Path:
    """``path`` itself if it is a trace file, else the newest ``*.trace.json.gz`` below it."""
    p = Path(path)
    if p.is_file():
        return p
    found = sorted(p.rglob("*.trace.json.gz"), key=lambda f: f.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no *.trace.json.gz below {p} (write one with jax.profiler.trace)")
    return found[-1]


def summarize(trace_file: str | Path, steps: int = 1) -> dict[str, Any]:
    """``{'kinds': {kind: ms per step}, 'total_ms': ms per step, 'ops': [(ms per step, kind, name, hlo_op), ...]
    (descending), 'devices': [process names]}`` over the accelerator kernels of one trace file."""
    with gzip.open(trace_file, "rt") as f:
        events = json.load(f).get("traceEvents", [])
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    devices = {pid for pid, name in procs.items() if name.startswith("/device:")}
    kinds: dict[str, float] = collections.defaultdict(float)
    ops: dict[tuple[str, str, str], float] = collections.defaultdict(float)
    ran: set[Any] = set()  # device processes with kernels (a process loaded plugin may add an empty device plane)
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in devices:
            continue
        ran.add(e["pid"])
        args = e.get("args", {}) or {}
        kind = classify(e.get("name", ""), args)
        ms = float(e.get("dur", 0.0)) / 1e3 / steps
        kinds[kind] += ms
        ops[(kind, e.get("name", ""), str(args.get("hlo_op", "")))] += ms
    top = sorted(((ms, *key) for key, ms in ops.items()), reverse=True)
    return {"kinds": dict(kinds), "total_ms": sum(kinds.values()), "ops": top,
            "devices": sorted(procs[p] for p in ran)}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m mmfm_jax.bench trace_summary")
    p.add_argument("path", help="a profile folder (jax.profiler.trace log_dir) or a *.trace.json.gz file")
    p.add_argument("--steps", type=int, default=1, help="steps in the trace (figures are per step)")
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args(argv[1:])
    f = find_trace(a.path)
    s = summarize(f, max(1, a.steps))
    print(f"# {f}: {len(s['devices'])} device(s) {', '.join(s['devices'][:4])}")
    if not s["devices"]:
        print("no accelerator kernels in this trace (a CPU-only run records host threads only)")
        return
    total = s["total_ms"] or 1.0
    print(f"device time per step: {s['total_ms']:.2f} ms (summed over devices)")
    for kind in ("gemm", "attention", "other", "copy", "collective"):
        ms = s["kinds"].get(kind, 0.0)
        print(f"  {kind:11s}{ms:10.2f} ms  {100 * ms / total:5.1f}%")
    print(f"\ntop {a.top} kernels (ms per step, kind, kernel, hlo op):")
    for ms, kind, name, hlo in s["ops"][:a.top]:
        print(f"  {ms:9.3f}  {kind:10s} {name[:70]:70s} {hlo[:40]}")
