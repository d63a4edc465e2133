"""``python -m mmfm_jax toy``: the paper's R^10 experiment (trajectory length Len and W2^2), Compact vs Spread.

Per setting and seed: draw the target's train/held-out samples, fit the diagonal GMM with our EM, then train one
MLP velocity field per run (Gaussian/indep., GMM/indep., GMM/mode) -- all runs and seeds of a setting are trained
together under ``vmap`` in one jitted ``lax.scan``. The three runs of a seed share data, network init and noise
(common random numbers), so differences come from the source and the coupling only.

Metrics, per trained model, on ``eval.n_samples`` fresh source samples (GMM runs draw k from the weights):
- Len = mean over samples of the length of the learned ODE path from t = 1 to t = 0 (Euler on a uniform grid of
  ``eval.len_points`` points: sum |dt| ||v||);
- W2^2 = exact optimal-transport cost (squared Euclidean, uniform weights; scipy ``linear_sum_assignment``) between
  the generated samples and as many held-out target samples; the same cost between two held-out target sets is
  reported as the finite-sample floor;
- cost = E ||z0 - x|| under the training coupling (the length of the straight conditional paths).

Outputs in the workdir: ``report.md`` (table beside the paper's numbers), ``summary.json``, ``trajectories.png``.
Mode ``gm_steps`` (``configs/toy.py:gm_steps``): Euler vs GMFlow's solvers vs number of steps (``gm.py``).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from mmfm_jax.config_utils import ConfigError, check, check_choice, check_positive, validate_base
from mmfm_jax.experiments.gm_report import METHODS
from mmfm_jax.experiments.toy import gm, study
from mmfm_jax.flow.time import TIME_KINDS
from mmfm_jax.gmm.source import SOURCE_KINDS

DEFAULT_CONFIG = "toy.py"


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Raise ``ConfigError`` naming the first bad key, before any work."""
    validate_base(cfg)
    check(cfg, "dim", lambda v: isinstance(v, int) and v >= 2, "must be an int >= 2")
    check(cfg, "n_modes", lambda v: isinstance(v, int) and 1 <= v <= cfg.dim, "must be an int in [1, dim]")
    check(cfg, "within_scales", lambda v: len(v) == 2 and 0 < v[0] <= v[1], "must be (low, high) with 0 < low <= high")
    check(cfg, "settings", lambda v: len(v) >= 1, "needs at least one setting")
    for name in cfg.settings:
        check_positive(cfg, f"settings.{name}.radius", allow_zero=True)
    check(cfg, "runs", lambda v: len(v) >= 1 and len(set(v)) == len(v) and all(r in SOURCE_KINDS for r in v),
          f"must be distinct names from {SOURCE_KINDS}")
    check(cfg, "seeds", lambda v: isinstance(v, int) and v >= 1, "must be an int >= 1")
    for key in ("data.n_train", "model.width", "model.depth", "train.steps", "train.batch_size", "train.chunk",
                "eval.n_samples", "gmm.max_iter", "gmm.reg_covar"):
        check_positive(cfg, key)
    check(cfg, "model.n_freq", lambda v: isinstance(v, int) and v >= 0, "must be an int >= 0")
    check(cfg, "data.n_train", lambda v: v >= 2 * cfg.n_modes, "must be >= 2 * n_modes")
    check_positive(cfg, "train.lr")
    check(cfg, "train.final_lr_frac", lambda v: 0 <= v <= 1, "must be in [0, 1]")
    check_choice(cfg, "train.time_kind", TIME_KINDS)
    check(cfg, "train.time_shift", lambda v: v > 0, "must be > 0")
    check(cfg, "train.t_max", lambda v: 0 < v <= 1, "must be in (0, 1]")
    check_choice(cfg, "train.assignment", ("soft", "hard"))
    check_choice(cfg, "gmm.init", ("k-means++",))
    check(cfg, "eval.len_points", lambda v: isinstance(v, int) and v >= 2, "must be an int >= 2")
    check(cfg, "eval.plot_points", lambda v: isinstance(v, int) and v >= 2, "must be an int >= 2")
    check(cfg, "eval.plot_paths", lambda v: isinstance(v, int) and 0 <= v <= cfg.eval.n_samples,
          "must be an int in [0, eval.n_samples]")
    if cfg.eval.n_samples > 5000:
        raise ConfigError(f"config.eval.n_samples = {cfg.eval.n_samples}: exact OT is O(n^3); keep it <= 5000")
    check_choice(cfg, "mode", ("paper", "gm_steps"))
    if cfg.mode == "gm_steps":
        check(cfg, "gm.setting", lambda v: v in cfg.settings, f"must name one of settings {tuple(cfg.settings)}")
        check(cfg, "gm.steps", lambda v: len(v) >= 1 and all(isinstance(s, int) and s >= 1 for s in v),
              "must be ints >= 1")
        check(cfg, "gm.methods", lambda v: len(v) >= 1 and all(m in METHODS for m in v), f"subset of {tuple(METHODS)}")
        check(cfg, "gm.trans_ratio", lambda v: 0 < v <= 1, "must be in (0, 1]")
        for key in ("gm.components", "gm.logstd_inner", "gm.weight_scale"):
            check_positive(cfg, key)
        check(cfg, "gm.ref_steps", lambda v: isinstance(v, int) and v >= 0, "must be an int >= 0 (0 = no reference)")
        check(cfg, "gm.substeps", lambda v: isinstance(v, int) and v >= 0, "must be an int >= 0 (0 = auto)")


def run(cfg: ml_collections.ConfigDict, ctx) -> dict[str, Any]:
    """The ``paper`` mode's Len / W2^2 table, or (``mode='gm_steps'``) W2^2 vs number of steps per solver."""
    if cfg.mode == "gm_steps":
        return gm.run_gm_steps(cfg, ctx)
    return study.run_paper(cfg, ctx)
