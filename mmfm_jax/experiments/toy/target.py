"""The toy target and what both modes of the study draw from it: the fixed geometry, samples, the GMM fit
(the source) and the exact W2^2 used as the sample-quality metric. Design: docs/toy.md."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy.optimize import linear_sum_assignment

from mmfm_jax.gmm.diag import DiagGMM
from mmfm_jax.gmm.em import fit
from mmfm_jax.gmm.source import ModeSource


def target_geometry(cfg: ml_collections.ConfigDict, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """(centres [m, d], A [d, d]): x = c_i + A z. The rotation depends only on ``geometry_seed``.

    With ``standardize``, both are scaled (exactly, from the geometry) so the target has zero mean and total
    variance d (mean per-dimension variance 1), the scale of the N(0, I) source -- as latents are normalised.
    """
    d, m = cfg.dim, cfg.n_modes
    q, r = np.linalg.qr(np.random.default_rng(cfg.geometry_seed).normal(size=(d, d)))
    rot = q * np.sign(np.diag(r))[None]
    a = rot * np.linspace(cfg.within_scales[0], cfg.within_scales[1], d)[None]
    e = np.eye(d)[:m]
    centres = radius * (e - e.mean(0, keepdims=True))
    if cfg.standardize:
        total = float((centres ** 2).sum(1).mean() + (a ** 2).sum())
        alpha = np.sqrt(d / total)
        centres, a = alpha * centres, alpha * a
    return centres, a


def sample_target(rng: np.random.Generator, centres: np.ndarray, a: np.ndarray, n: int) -> np.ndarray:
    """n samples [n, d] float32: a uniformly drawn centre plus ``A z``."""
    i = rng.integers(0, centres.shape[0], n)
    return (centres[i] + rng.normal(size=(n, a.shape[0])) @ a.T).astype(np.float32)


def fit_source(x: np.ndarray, cfg: ml_collections.ConfigDict, seed: int, mesh=None) -> tuple[ModeSource, dict]:
    """Our EM on the training samples (sharded over ``mesh``); the toy's table is the GMM itself (L = 1, C = dim,
    per-dimension variances: ``z0 = mean_k + sqrt(var_k) * eps`` with var_k a vector)."""
    gmm, info = fit(x, cfg.n_modes, mesh=mesh, seed=seed, init=cfg.gmm.init, max_iter=cfg.gmm.max_iter, tol=cfg.gmm.tol,
                    reg_covar=cfg.gmm.reg_covar)
    gmm = DiagGMM(*(jnp.asarray(np.asarray(a), jnp.float32) for a in (gmm.weights, gmm.means, gmm.variances)))
    src = ModeSource(gmm=gmm, means=gmm.means[:, None, :], variances=gmm.variances[:, None, :])
    return src, {k: info[k] for k in ("converged", "n_iter", "lower_bound") if k in info}


def w2_squared(a: np.ndarray, b: np.ndarray) -> float:
    """Exact squared 2-Wasserstein distance between two equal-size empirical measures (uniform weights)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cost = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T
    r, c = linear_sum_assignment(cost)
    return float(np.maximum(cost[r, c], 0).mean())


def setting_data(cfg: ml_collections.ConfigDict, s_idx: int, radius: float, mesh=None,
                 stream: tuple[int, ...] = ()) -> dict:
    """Per seed of setting ``s_idx``: training samples, held-out samples, the target-vs-target W2^2 floor and the
    fitted source. Seed s draws from ``np.random.default_rng([cfg.seed, s_idx, s, *stream])``; the EM seed is
    ``cfg.seed * 1000 + 10 * s_idx + s``. Returns lists over seeds (``xs``, ``tests``, ``floors``, ``srcs``,
    ``gmm_info``) and the geometry (``centres``, ``a``)."""
    centres, a = target_geometry(cfg, radius)
    out: dict = dict(xs=[], tests=[], floors=[], srcs=[], gmm_info=[], centres=centres, a=a)
    for s in range(cfg.seeds):
        rng = np.random.default_rng([cfg.seed, s_idx, s, *stream])
        out["xs"].append(sample_target(rng, centres, a, cfg.data.n_train))
        out["tests"].append(sample_target(rng, centres, a, cfg.eval.n_samples))
        out["floors"].append(w2_squared(out["tests"][-1], sample_target(rng, centres, a, cfg.eval.n_samples)))
        src, info = fit_source(out["xs"][-1], cfg, seed=cfg.seed * 1000 + 10 * s_idx + s, mesh=mesh)
        out["srcs"].append(src)
        out["gmm_info"].append(info)
    return out
