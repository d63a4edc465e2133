"""Shared GMFlow test data (imported by plain name from tests/): a 2-D data GM with a shared isotropic std (its
exact x0-posterior is a GM of our layout), an MM-FM-like diagonal source, random GMs and numpy densities."""

import functools

import jax
import numpy as np

from mmfm_jax.ops.gm import GM, GaussianSource

A = np.array([[2.0, 0.0], [-2.0, 1.0], [0.0, -2.5]], np.float32)
LW = np.log(np.array([0.5, 0.3, 0.2], np.float32))
S0 = 0.3
DIAG = GaussianSource(np.array([0.5, -0.3], np.float32), np.array([0.7, 1.3], np.float32))
SOURCES = {"gaussian": None, "mode_gmm": DIAG}


@functools.partial(jax.jit, static_argnames=("b", "n_tok", "k", "c", "diag"))
def rand_gm(key, b=3, n_tok=1, k=3, c=2, diag=False, scale=1.0):
    k1, k2, k3 = jax.random.split(key, 3)
    means = scale * jax.random.normal(k1, (b, n_tok, k, c))
    logw = jax.nn.log_softmax(jax.random.normal(k2, (b, n_tok, k)))
    shape = (b, n_tok, 1, c) if diag else (b, 1, 1, 1)
    return GM(means, logw, -0.7 + 0.2 * jax.random.normal(k3, shape))


def np_gm_logpdf(gm, pts):
    """log density of token 0 of each sample at pts [B, P, C] (true density, with 2 pi), numpy float64."""
    m = np.asarray(gm.means, np.float64)[:, 0]  # [B, K, C]
    lw = np.asarray(gm.logweights, np.float64)[:, 0]
    ls = np.broadcast_to(np.asarray(gm.logstds, np.float64), gm.means.shape)[:, 0]  # [B, K, C]
    z = (pts[:, :, None, :] - m[:, None]) / np.exp(ls)[:, None]
    comp = np.sum(-0.5 * z**2 - ls[:, None] - 0.5 * np.log(2 * np.pi), -1) + lw[:, None]
    mx = comp.max(-1, keepdims=True)
    return (mx + np.log(np.exp(comp - mx).sum(-1, keepdims=True)))[..., 0]


def grid2d(lo, hi, n=241):
    g = np.linspace(lo, hi, n)
    xx, yy = np.meshgrid(g, g, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], -1), (g[1] - g[0]) ** 2
