"""What the two GMFlow step studies share (``demo`` in ``gm_steps`` mode and the GM variant of ``toy``): the
sampling methods compared and their report, a quality-vs-steps table.

``scores[setting][method][str(N)]`` holds one cell per number of model evaluations N (a dict or a list of per-seed
values; the jobs pass how to read and print a cell). Lower is better.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

# method -> (model head, solver, order); 'euler' is the velocity model's Euler
METHODS = {"euler": ("velocity", "euler", 1), "euler_gm_mean": ("gm", "euler", 1), "gm_ode": ("gm", "ode", 1),
           "gm_ode2": ("gm", "ode", 2), "gm_sde": ("gm", "sde", 1), "gm_sde2": ("gm", "sde", 2)}
LABELS = {"euler": "Euler (velocity model)", "euler_gm_mean": "Euler (GM model's mean)", "gm_ode": "GM-ODE",
          "gm_ode2": "GM-ODE 2", "gm_sde": "GM-SDE", "gm_sde2": "GM-SDE 2"}


def gm_beats_euler(scores: Mapping[str, Mapping], steps: Sequence[int], value: Callable[[Any], float],
                   max_steps: int = 8) -> dict[str, bool]:
    """Per setting: does the best GM solver (methods ``gm_*``) have a lower ``value(cell)`` than Euler at every
    N <= ``max_steps``? Settings without Euler, GM solvers or such N are left out."""
    out = {}
    few = [s for s in steps if s <= max_steps]
    for name, r in scores.items():
        gm = [m for m in r if m.startswith("gm_")]
        if "euler" in r and gm and few:
            out[name] = all(min(value(r[m][str(s)]) for m in gm) < value(r["euler"][str(s)]) for s in few)
    return out


def steps_table(scores: Mapping[str, Mapping], steps: Sequence[int], methods: Sequence[str],
                setting_labels: Mapping[str, str], cell: Callable[[Any], str], ref_cell: Callable[[Any], str],
                ref_steps: int, floor_label: str, floor: str) -> str:
    """Markdown: a row per (setting, method) and N columns; each setting's many-step Euler reference (``euler_ref``)
    repeated across the row; a last row with the metric's floor."""
    rows = ["| Source | Method | " + " | ".join(f"N = {s}" for s in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for name, r in scores.items():
        for m in methods:
            if m in r:
                rows.append(f"| {setting_labels[name]} | {LABELS[m]} | "
                            + " | ".join(cell(r[m][str(s)]) for s in steps) + " |")
        if "euler_ref" in r:
            ref = ref_cell(r["euler_ref"][str(ref_steps)])
            rows.append(f"| {setting_labels[name]} | Euler, {ref_steps} steps (reference) | "
                        + " | ".join([ref] * len(steps)) + " |")
    rows.append(f"| {floor_label} (floor) | – | " + " | ".join([floor] * len(steps)) + " |")
    return "\n".join(rows)
