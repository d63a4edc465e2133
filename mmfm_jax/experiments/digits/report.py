"""The digits demo's outputs: ``table.md``, ``report.md`` (embeds the figures), ``convergence.png`` (FD and the
class-histogram total variation vs step, each with its floor: the held-out split's value), ``samples.png`` (one
titled figure: real training digits beside each setting's final samples), ``samples_<setting>.png`` (bare grids)
and ``curves.json``."""

from __future__ import annotations

from typing import Any

import numpy as np

from mmfm_jax.data import digits
from mmfm_jax.storage import write_json_atomic

LABELS = {"gaussian": "Gaussian source (baseline)", "gmm_indep": "GMM source, independent coupling",
          "gmm_mode": "GMM source + mode coupling", "gmm_mode_cond": "GMM + mode coupling, mode-conditional"}


def label(name: str) -> str:
    return LABELS.get(name, name)


def speedup_text(s: dict[str, Any], name: str, first_eval: int, total: int) -> str:
    """Steps to reach the baseline's final FD, as what the evaluations prove: the FD is measured only at the
    evaluation steps, so reaching it at step s means <= s steps (a speed-up >= total / s)."""
    if name == "gaussian":
        return "baseline"
    steps = s["steps_to_baseline_final_fd"]
    if not steps:
        return f"not reached in {total} steps"
    bound = "" if steps > first_eval else " (reached at the first evaluation)"
    return f"<= {steps} steps, >= {total / steps:.3g}x{bound}"


def grid_png(x: np.ndarray, n: int = 128, cols: int = 16) -> np.ndarray:
    return digits.image_grid(digits.to_images(x[:n]), cols=cols)


def write_outputs(cfg, ctx, results: dict, speedups: dict, info: dict, real: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    names = list(results)
    steps = [row["step"] for row in results[names[0]]["curve"]]
    total = int(cfg.train.num_steps)
    lines = ["| step | " + " | ".join(f"FD {n}" for n in names) + " | " + " | ".join(f"cov {n}" for n in names) + " |",
             "|---" * (1 + 2 * len(names)) + "|"]
    for i, s in enumerate(steps):
        fds = " | ".join(f"{results[n]['curve'][i]['fd']:.2f}" for n in names)
        covs = " | ".join(f"{results[n]['curve'][i]['covered']:.2f}" for n in names)
        lines.append(f"| {s} | {fds} | {covs} |")
    table = "\n".join(lines)
    ctx.path("table.md").write_text(table + "\n")
    sp = ["| setting | final FD | final coverage | final TV | steps to the baseline's final FD (speed-up) |",
          "|---|---|---|---|---|"]
    for n in names:
        f = results[n]["final"]
        sp.append(f"| {label(n)} | {f['fd']:.2f} | {f['covered']:.2f} | {f['tv']:.3f} | "
                  f"{speedup_text(speedups[n], n, steps[0], total)} |")
    report = ["# Digits demo: MM-FM vs the Gaussian baseline", "",
              f"{total} steps per setting, global batch {cfg.train.global_batch_size}, "
              f"{cfg.gmm.n_components}-mode GMM, {cfg.sampler.num_points}-point Euler grid, "
              f"{cfg.eval_samples} samples per evaluation (steps {', '.join(map(str, steps))}).",
              f"Classifier test accuracy {info['classifier_test_accuracy']:.3f}. Floors (the held-out split "
              f"against the training split): FD {info['fd_test_vs_train']:.2f}, class-histogram TV "
              f"{info['tv_test_vs_train']:.3f}.",
              "The speed-up is a bound: the FD is measured only at the evaluation steps, so a setting that is "
              "below the baseline's final FD at step s needs at most s steps.", "", *sp, "",
              "![FD and class-histogram TV vs step](convergence.png)", "",
              "![real digits and each setting's final samples](samples.png)", "",
              "## FD and coverage vs step", "", table, "",
              "EMA models: `models/<setting>/` (the train job's layout: `config.json`, `checkpoints/<step>/state`); "
              "the GMM source: `models/source/`.", ""]
    ctx.path("report.md").write_text("\n".join(report))

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    for n in names:
        c = results[n]["curve"]
        ax[0].plot([r["step"] for r in c], [r["fd"] for r in c], marker="o", ms=3, label=label(n))
        ax[1].plot([r["step"] for r in c], [r["tv"] for r in c], marker="o", ms=3, label=label(n))
    ax[0].axhline(info["fd_test_vs_train"], color="gray", ls=":",
                  label=f"floor: held-out digits ({info['fd_test_vs_train']:.2f})")
    ax[1].axhline(info["tv_test_vs_train"], color="gray", ls=":",
                  label=f"floor: held-out digits ({info['tv_test_vs_train']:.3f})")
    ax[0].set(xlabel="training step", ylabel="FD (classifier features)", yscale="log",
              title="Frechet distance to the training digits (lower is better)")
    ax[1].set(xlabel="training step", ylabel="total variation",
              title="Class-histogram TV: predicted classes vs data (lower is better)")
    ax[0].legend(fontsize=8)
    ax[1].legend(handles=ax[1].get_lines()[-1:], fontsize=8)
    fig.suptitle(f"Digits demo: {total} steps per setting, batch {cfg.train.global_batch_size}, EMA samples "
                 f"({cfg.eval_samples} per evaluation)")
    fig.savefig(ctx.path("convergence.png"), dpi=110)
    plt.close(fig)

    panels = [("real digits (training split)", grid_png(real, 64, 8))]
    panels += [(f"{label(n)}\nstep {total}, FD {results[n]['final']['fd']:.2f}",
                grid_png(results[n]["samples"], 64, 8)) for n in names]
    titled_grids(ctx.path("samples.png"), panels, "Digits demo: real data and the final EMA samples of each setting "
                 f"({cfg.sampler.num_points}-point Euler grid)", rows=1)
    for n in names:
        Image.fromarray(grid_png(results[n]["samples"])).save(ctx.path(f"samples_{n}.png"))
    write_json_atomic(ctx.path("curves.json"), {n: r["curve"] for n, r in results.items()})


def titled_grids(path, panels: list[tuple[str, np.ndarray]], title: str, rows: int = 1) -> None:
    """One figure of uint8 grey image grids, each with its title, in ``rows`` rows (1: side by side; else one
    panel per row), under ``title``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    h, w = panels[0][1].shape
    if rows == 1:
        fig, axes = plt.subplots(1, n, figsize=(2.9 * n, 3.7), layout="constrained")
    else:
        fig, axes = plt.subplots(n, 1, figsize=(w / 40 + 0.5, n * (h / 40 + 0.45) + 0.5), layout="constrained")
    for a, (t, img) in zip(np.atleast_1d(axes), panels):
        a.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        a.set_title(t, fontsize=9)
        a.axis("off")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
