"""scikit-learn's diagonal-GMM M-step, evaluated from statistics centred on per-component reference points.

sklearn (1.x, ``_estimate_gaussian_parameters``): ``N_k = sum_n r_nk + eps_N`` (``eps_N = 10 eps`` of the data's
float type), ``mu_k = S1_k / N_k``, ``var_k = S2_k / N_k - mu_k^2 + reg_covar`` with ``S1 = sum r x``, ``S2 = sum r
x^2`` taken about the origin. Computed that way in floating point, ``S2 / N_k - mu^2`` cancels: a tight component
far from the origin loses all its digits. Here the statistics arrive centred on a reference point ``c_k`` per
component (EM uses the means entering the iteration; the k-means++ initialisation the picked point itself):
``R_k = sum r``, ``T1_k = sum r (x - c_k)``, ``T2_k = sum r (x - c_k)^2``. The same quantities, exactly rewritten::

    delta = (T1 - eps_N c) / N_k             mu = c + delta
    var   = (T2 - 2 delta T1 + delta^2 R + eps_N mu^2) / N_k + reg_covar

(``T2 - 2 delta T1 + delta^2 R = sum r (x - mu)^2`` up to the tiny ``eps_N`` terms, and ``eps_N mu^2`` is the
frame-dependent bias that sklearn's ``N_k += eps_N`` leaves in the variance), so every term is a small
non-cancelling quantity once ``c`` is near ``mu``. An empty component gets sklearn's ``mu = 0``,
``var = reg_covar``. The variance is clamped at 0 before ``reg_covar`` (a no-op unless rounding makes it negative).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmfm_jax.gmm.diag import DiagGMM

F32_EPS = float(np.finfo(np.float32).eps)
NK_EPS = 10.0 * F32_EPS  # sklearn's 10 * eps for float32 data (the official fit ran on float32 [CLS] tokens)
NK_EPS64 = 10.0 * float(np.finfo(np.float64).eps)  # sklearn on float64 data


def default_nk_eps(dtype) -> float:
    """sklearn's ``10 * eps`` of ``dtype``'s floating type (float32 unless float64)."""
    return NK_EPS64 if np.dtype(dtype) == np.float64 else NK_EPS


def centre(g: jax.Array, rsum: jax.Array, centres: jax.Array) -> jax.Array:
    """Statistics about the origin -> about ``centres``: ``g = [sum r x^2, sum r x] [K, 2D]``, ``rsum = sum r [K]``,
    ``centres [K, D]`` -> ``[sum r (x - c)^2, sum r (x - c)] [K, 2D]`` (exact algebra; use it only for small
    responsibility mass: it cancels as the origin-centred form does)."""
    d = centres.shape[1]
    g2, g1 = g[:, :d], g[:, d:]
    t1 = g1 - centres * rsum[:, None]
    t2 = g2 - 2.0 * centres * g1 + centres * centres * rsum[:, None]
    return jnp.concatenate([t2, t1], axis=1)


def m_step(rsum: jax.Array, t: jax.Array, centres: jax.Array, shift: jax.Array, reg_covar, nk_eps) -> DiagGMM:
    """The M-step from ``rsum = sum_n r_nk [K]`` and ``t = [sum r (x - c)^2, sum r (x - c)] [K, 2D]`` centred on
    ``centres c [K, D]`` (all in the frame shifted by ``shift [D]``: ``x - shift``); formulas in the module
    docstring. Returns sklearn's parameters (``weights = N_k / sum N_k``) in the original frame."""
    d = centres.shape[1]
    t2, t1 = t[:, :d], t[:, d:]
    nk = rsum + nk_eps
    c_abs = centres + shift  # only ever multiplied by eps_N: its rounding does not matter
    delta = (t1 - nk_eps * c_abs) / nk[:, None]
    mu = centres + delta  # shifted frame
    mu_abs = mu + shift
    ss = t2 - 2.0 * delta * t1 + delta * delta * rsum[:, None] + nk_eps * mu_abs * mu_abs
    var = jnp.maximum(ss / nk[:, None], 0.0) + reg_covar
    return DiagGMM(weights=nk / jnp.sum(nk), means=mu_abs, variances=var)
