"""The toy study's reports: the ``paper`` mode's table (beside the paper's numbers), markdown and trajectory
figure; the ``gm_steps`` mode's W2^2-vs-steps table and markdown (built on :mod:`mmfm_jax.experiments.gm_report`)."""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from mmfm_jax.experiments.gm_report import gm_beats_euler, steps_table

# Third-party paper notes (see docs/toy.md): (Len, W2^2) per setting and run.
PAPER = {
    "compact": {"gaussian": (1.88, 1.252), "gmm_indep": (1.82, 1.251), "gmm_mode": (1.67, 1.248)},
    "spread": {"gaussian": (2.35, 1.582), "gmm_indep": (2.30, 1.631), "gmm_mode": (2.00, 1.556)},
}
LABELS = {"gaussian": ("Gaussian", "Indep."), "gmm_indep": ("GMM", "Indep."), "gmm_mode": ("GMM", "Mode")}
SOURCE_LABELS = {"gaussian": "Gaussian", "gmm_mode": "GMM + mode coupling (mode-cond.)"}


# ----------------------------------------------------------------------------------------------------------------
# paper mode


def _pm(m: float, s: float, nd: int) -> str:
    return f"{m:.{nd}f} ± {s:.{nd}f}"


def table(cfg: ml_collections.ConfigDict, results: dict[str, Any]) -> str:
    """Markdown table: ours (mean ± std over seeds) beside the paper's numbers."""
    rows = ["| Setting | Source | Coupling | Len ↓ (ours) | W2² ↓ (ours) | E‖z0−x‖ (coupling) | Len (paper) "
            "| W2² (paper) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for k, v in r["runs"].items():
            p = v["paper"] or ("–", "–")
            rows.append(f"| {name.capitalize()} | {LABELS[k][0]} | {LABELS[k][1]} "
                        f"| {_pm(v['len_mean'], v['len_std'], 3)} | {_pm(v['w2_mean'], v['w2_std'], 3)} "
                        f"| {v['coupling_cost']:.3f} | {p[0]} | {p[1]} |")
        rows.append(f"| {name.capitalize()} | target vs target (floor) | – | – | "
                    f"{_pm(r['w2_floor_mean'], r['w2_floor_std'], 3)} | – | – | – |")
    return "\n".join(rows)


def markdown(cfg: ml_collections.ConfigDict, results: dict[str, Any]) -> str:
    lines = [f"# Toy experiment (R^{cfg.dim}): trajectory length and W2²", "",
             f"{cfg.seeds} seeds; {cfg.train.steps} Adam steps (batch {cfg.train.batch_size}) per model; Len on "
             f"{cfg.eval.n_samples} source samples ({cfg.eval.len_points - 1} Euler steps, t = 1 -> 0); W2² = exact "
             f"OT between {cfg.eval.n_samples} generated and {cfg.eval.n_samples} held-out target samples. "
             "Design: docs/toy.md.", "", table(cfg, results), ""]
    for name, r in results.items():
        lines.append(f"- {name}: radius {r['radius']}; expected order Len(GMM/mode) < Len(GMM/indep) <= "
                     f"Len(Gaussian/indep): **{r['shape_ok']}**; GMM fits (EM): "
                     + ", ".join(f"n_iter={g.get('n_iter')} converged={g.get('converged')}" for g in r["gmm"])
                     + f"; train {r['train_seconds']:.0f}s, eval {r['eval_seconds']:.0f}s")
    lines += ["", "![trajectories](trajectories.png)", ""]
    return "\n".join(lines)


def plot(path, cfg: ml_collections.ConfigDict, plots: dict[str, Any]) -> None:
    """Trajectories (seed 0), one panel per setting and run, projected on the plane where the m mode centres form
    a regular m-gon (x -> x C^T Q, Q the polygon's vertices): every mode is visible, none overlaps another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(plots)
    kinds = list(cfg.runs)
    fig, axes = plt.subplots(len(names), len(kinds), figsize=(4 * len(kinds), 4 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        pl = plots[name]
        c = np.asarray(pl["centres"], np.float64)
        ang = 2 * np.pi * np.arange(c.shape[0]) / c.shape[0]
        w = c.T @ np.stack([np.cos(ang), np.sin(ang)], 1)
        w *= float(np.linalg.norm(c, axis=1).max()) / max(float(np.linalg.norm(c @ w, axis=1).max()), 1e-12)
        if not np.isfinite(w).all() or np.abs(w).max() == 0:
            w = np.eye(c.shape[1])[:, :2]
        proj = lambda x, w=w: np.asarray(x) @ w
        tp = proj(pl["test"])
        for j, k in enumerate(kinds):
            ax = axes[i, j]
            ax.scatter(tp[:, 0], tp[:, 1], s=2, c="0.8", label="target")
            tr = proj(pl["traj"][k])  # [T, n, 2]
            for p in range(tr.shape[1]):
                ax.plot(tr[:, p, 0], tr[:, p, 1], lw=0.7, alpha=0.7)
            ax.scatter(tr[0, :, 0], tr[0, :, 1], s=6, c="k", marker="o", label="source (t=1)")
            ax.scatter(tr[-1, :, 0], tr[-1, :, 1], s=8, c="r", marker="x", label="sample (t=0)")
            ax.set_title(f"{name}: {LABELS[k][0]} / {LABELS[k][1]}")
            ax.set_aspect("equal", adjustable="datalim")
    axes[0, 0].legend(loc="best", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# gm_steps mode: res["w2"][source][method][str(N)] = per-seed W2^2 values


def _mean(v: list[float]) -> float:
    return float(np.mean(v))


def gm_beats(res: dict) -> dict[str, bool]:
    """Per source: does the best GM solver have a lower mean W2^2 than Euler at every N <= 8?"""
    return gm_beats_euler(res["w2"], res["steps"], _mean)


def gm_table(res: dict) -> str:
    return steps_table(res["w2"], res["steps"], res["methods"], SOURCE_LABELS,
                       lambda v: f"{_mean(v):.3f} ± {np.std(v):.3f}", lambda v: f"{_mean(v):.3f}", res["ref_steps"],
                       "target vs target", f"{res['w2_floor_mean']:.3f}")


def gm_markdown(cfg: ml_collections.ConfigDict, res: dict) -> str:
    return "\n".join([
        f"# Toy R^{cfg.dim} ({res['setting']}, radius {res['radius']}): W2² vs number of steps, Euler vs GMFlow", "",
        f"{cfg.seeds} seeds (mean ± std); every model trained {cfg.train.steps} Adam steps at batch "
        f"{cfg.train.batch_size} (velocity: FM MSE; GM: transition NLL, K = {cfg.gm.components}, lambda = "
        f"{cfg.gm.trans_ratio}); W2² = exact OT between {cfg.eval.n_samples} samples and as many held-out target "
        f"samples. N = model evaluations; GM-ODE uses max(2, ceil(128 / N)) substeps. Design: "
        "mmfm_jax/experiments/toy/gm.py, docs/gmflow.md.", "", res["table"], "",
        f"Best GM solver below Euler at every N <= 8: {res['gm_beats_euler_le8']}. Train {res['train_seconds']:.0f}s,"
        f" eval {res['eval_seconds']:.0f}s.", ""])
