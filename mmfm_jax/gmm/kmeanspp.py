"""Sharded k-means++ seeding with scikit-learn semantics, and sklearn's one-hot initialisation of a diagonal GMM.

The algorithm is sklearn's ``kmeans_plusplus`` (``sklearn.cluster._kmeans._kmeans_plusplus``) with unit sample
weights: the first center is a uniformly drawn point; then, for each further center, ``2 + int(log K)`` candidates
are drawn with probability proportional to the squared distance to the closest chosen center (inverse-CDF:
``searchsorted(cumsum(d2), u * potential)``, clipped to the last point), and the candidate that minimises the new
potential ``sum_n min(d2_n, |x_n - c|^2)`` is kept (greedy local trials).

Sharded: the data stay split along N (see :func:`mmfm_jax.gmm.samples.shard_samples`); each device keeps the squared
distances of its own rows; the global inverse-CDF is resolved with the per-device totals (``all_gather``) and a
local ``searchsorted``; candidate points are gathered with a masked ``psum``. The whole loop is one jitted
``fori_loop`` inside ``shard_map``. Randomness (:func:`draws`): ``u = np.random.default_rng(seed).random((K,
n_trials))`` rounded to float32, identical on every process; the first center is ``floor(u[0, 0] * N)``, the trials
of center c use ``u[c]``, so the picks do not depend on the device count (up to float summation order).
Distances are computed on the
shifted data (``x - shift``) in fp32 (float64 for float64 data) and clamped at 0, like sklearn's
``_euclidean_distances``.

``params_from_indices`` is sklearn's ``GaussianMixture._initialize`` with one-hot responsibilities (``resp[idx_k,
k] = 1``): ``N_k = 1 + nk_eps`` (10 eps), ``means_k = x_idx / N_k``, ``variances_k = x^2 / N_k - means^2 + reg_covar
= nk_eps x^2 / N_k^2 + reg_covar``, and *unnormalised* ``weights_k = N_k / N`` exactly as sklearn (only the first
E-step's lower bound sees that; the responsibilities do not). The variance is evaluated in that cancellation-free
form (:func:`mmfm_jax.gmm.mstep.m_step` centred on the picked point), exact to a few ulp in either precision.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmfm_jax.gmm.diag import DiagGMM
from mmfm_jax.gmm.mstep import default_nk_eps, m_step
from mmfm_jax.gmm.precision import lax_precision, matmul_precision
from mmfm_jax.gmm.samples import ShardedSamples, jitted, psum, replicate, shard_index, shard_samples, take_rows


def n_local_trials_default(n_clusters: int) -> int:
    """sklearn's greedy trial count ``2 + int(log(K))``."""
    return 2 + int(np.log(n_clusters))


def draws(seed: int, n_clusters: int, n_trials: int) -> np.ndarray:
    """The uniforms ``[K, n_trials]`` (float32 values) that drive :func:`kmeans_plusplus_indices`."""
    return np.random.default_rng(seed).random((n_clusters, n_trials)).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _build(mesh: Mesh, axes: tuple[str, ...], n: int, local_len: int, k: int, n_trials: int, precision: Any,
           dtype: str = "float32"):
    big_l = local_len
    dt = jnp.dtype(dtype)
    dims_nt = (((1,), (1,)), ((), ()))

    def local(xl, shift, u):
        dev = shard_index(axes)
        xs = xl.astype(dt) - shift  # [L, D]
        rows = dev * big_l + jnp.arange(big_l)
        valid = rows < n
        n_valid = jnp.clip(n - dev * big_l, 0, big_l)
        xsq = jnp.sum(xs * xs, axis=1)

        def gather(gid):  # [T] global row ids -> [T, D] (shifted points), replicated
            own = (gid // big_l) == dev
            pts = xs[jnp.clip(gid - dev * big_l, 0, big_l - 1)]
            return psum(jnp.where(own[:, None], pts, 0.0), axes)

        def dists(c):  # [T, D] -> [T, L] squared distances, 0 on padding rows
            dd = xsq[None, :] - 2.0 * lax.dot_general(c, xs, dims_nt, precision=precision) \
                + jnp.sum(c * c, axis=1)[:, None]
            return jnp.where(valid[None, :], jnp.maximum(dd, 0.0), 0.0)

        first = jnp.minimum(jnp.floor(u[0, 0] * n).astype(jnp.int32), n - 1)
        closest = dists(gather(first[None]))[0]
        pot = psum(jnp.sum(closest), axes)
        idx = jnp.zeros((k,), jnp.int32).at[0].set(first)

        def body(c, carry):
            closest, pot, idx = carry
            r = u[c] * pot
            cs = jnp.cumsum(closest)
            tot = cs[-1]
            if axes:
                totals = lax.all_gather(tot, axes)
                ends = jnp.cumsum(totals)
                end, off = ends[dev], ends[dev] - totals[dev]
                first_dev = dev == 0
            else:
                end, off, first_dev = tot, jnp.zeros((), dt), True
            # the device holding the first global index whose cumulative sum reaches r
            own = (r <= end) & ((r > off) | first_dev)
            li = jnp.minimum(jnp.searchsorted(cs, r - off, side="left"), jnp.maximum(n_valid - 1, 0))
            gid = psum(jnp.where(own, dev * big_l + li, 0), axes)
            gid = jnp.where(psum(own.astype(jnp.int32), axes) > 0, gid, n - 1)  # r beyond the total: last point
            dc = jnp.minimum(closest[None, :], dists(gather(gid)))
            pots = psum(jnp.sum(dc, axis=1), axes)
            b = jnp.argmin(pots)
            return dc[b], pots[b], idx.at[c].set(gid[b])

        _, _, idx = lax.fori_loop(1, k, body, (closest, pot, idx))
        return idx

    xspec = PartitionSpec(None if not axes else axes[0] if len(axes) == 1 else axes, None)
    rep = PartitionSpec()
    f = jax.shard_map(local, mesh=mesh, in_specs=(xspec, rep, rep), out_specs=rep, check_vma=False)
    return jax.jit(f, out_shardings=NamedSharding(mesh, rep))


def kmeans_plusplus_indices(data: ShardedSamples | Any, n_clusters: int, *, seed: int = 0,
                            n_local_trials: int | None = None, mesh: Mesh | None = None,
                            precision: Any = "highest") -> np.ndarray:
    """Row indices ``[K]`` (int) of the k-means++ seeds of ``data`` (a ``ShardedSamples``, numpy or jax array)."""
    data = data if isinstance(data, ShardedSamples) else shard_samples(data, mesh)
    k = int(n_clusters)
    if not 1 <= k <= data.n:
        raise ValueError(f"n_clusters must be in [1, n_samples={data.n}], got {k}")
    t = n_local_trials_default(k) if n_local_trials is None else int(n_local_trials)
    fn = _build(data.mesh, data.axes, data.n, data.local_len, k, t, lax_precision(matmul_precision(precision)),
                data.dtype.name)
    out = fn(data.x, replicate(data.shift, data.mesh, data.dtype), replicate(draws(seed, k, t), data.mesh, data.dtype))
    return np.asarray(out).astype(np.int64)


def kmeans_plusplus(x: Any, n_clusters: int, *, seed: int = 0, n_local_trials: int | None = None,
                    mesh: Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
    """sklearn-style ``(centers [K, D], indices [K])`` (``centers = x[indices]``)."""
    data = x if isinstance(x, ShardedSamples) else shard_samples(x, mesh)
    idx = kmeans_plusplus_indices(data, n_clusters, seed=seed, n_local_trials=n_local_trials)
    return np.asarray(gather_rows(data, idx), np.float32), idx


def gather_rows(data: ShardedSamples, indices: Any) -> jax.Array:
    """``x[indices]`` (compute dtype, unshifted) as a replicated array."""
    idx = np.asarray(indices, np.int64)
    if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= data.n)):
        raise ValueError(f"indices must be 1-D in [0, {data.n}), got {idx!r}")
    rep = NamedSharding(data.mesh, PartitionSpec())
    return jitted(take_rows, rep)(data.x, replicate(idx.astype(np.int32), data.mesh))


def params_from_indices(data: ShardedSamples | Any, indices: Any, *, reg_covar: float = 1e-6,
                        mesh: Mesh | None = None, nk_eps: float | None = None) -> DiagGMM:
    """sklearn's ``_initialize`` from one-hot responsibilities at ``indices [K]`` (see module docstring), in the
    data's compute dtype; ``nk_eps`` default: ``10 eps`` of that dtype."""
    data = data if isinstance(data, ShardedSamples) else shard_samples(data, mesh)
    nk_eps = default_nk_eps(data.dtype) if nk_eps is None else nk_eps
    pts = gather_rows(data, indices)
    fn = jitted(_one_hot_m_step, NamedSharding(data.mesh, PartitionSpec()))
    return fn(pts, *replicate((data.shift, data.n, reg_covar, nk_eps), data.mesh, data.dtype))


def _one_hot_m_step(pts, shift, n, reg_covar, nk_eps):
    """The M-step of one-hot responsibilities, centred on the picked points: no statistic but ``N_k`` is nonzero."""
    k, d = pts.shape
    g = m_step(jnp.ones((k,), pts.dtype), jnp.zeros((k, 2 * d), pts.dtype), pts - shift, shift, reg_covar, nk_eps)
    return DiagGMM(weights=jnp.full((k,), (1.0 + nk_eps) / n, pts.dtype), means=g.means, variances=g.variances)


def potential(x: np.ndarray, centers: np.ndarray) -> float:
    """k-means potential ``sum_n min_k |x_n - c_k|^2`` in float64 (numpy; for tests and benchmarks)."""
    x = np.asarray(x, np.float64)
    c = np.asarray(centers, np.float64)
    d2 = (x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]
    return float(np.maximum(d2, 0).min(1).sum())
