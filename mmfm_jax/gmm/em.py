"""Sharded, chunked EM for a diagonal Gaussian mixture (scikit-learn ``GaussianMixture(covariance_type='diag')``).

Layout: data ``x [N, D]`` split along N (logical axis ``samples``) over every device of the mesh, padded to a
multiple of the number of shards; padding rows are masked (:mod:`mmfm_jax.gmm.samples`). One EM iteration is one
jitted call: a ``shard_map`` scans each device's shard in chunks of ``chunk_size`` rows (so a device never holds
more than chunk x K responsibilities; default :func:`default_chunk`) and accumulates N_k and the centred sums
``sum r (x - c)``, ``sum r (x - c)^2`` in place in loop-carried tables, and the log-likelihood with Kahan
compensation; they are ``psum``-ed over the devices and the M-step runs replicated. Per chunk: the E-step GEMMs
``logits = c_k - 0.5 (x^2 @ prec^T + x @ (-2 mu prec)^T)``, one exp pass, and the M-step statistics
(:mod:`mmfm_jax.gmm.sparse`): each row's largest responsibility by a centred segment sum, the others by the GEMM
``r^T @ [x^2, x]`` (8 N D K FLOP per iteration in all; no N x K x D intermediate) or, with ``m_step_top``, by
segment sums of the next largest ones (rows that would leave out more than ``m_step_tol`` are recorded and
completed after the chunk loop). GEMM precision: :mod:`mmfm_jax.gmm.precision`; with a
low-precision E-step each row's largest log-density is recomputed directly (``exact_top``, see :func:`fit`).

Numerics: the data are shifted by a fixed per-feature reference (the float64 mean of up to 4096 evenly spaced rows;
identical for every mesh), and the M-step statistics are centred on each component's mean entering the
iteration (:mod:`mmfm_jax.gmm.mstep`), so neither a component far from the data mean nor a collapsed one loses
its variance to cancellation; the formulas are sklearn's, exactly rewritten (no shift changes a result).
Constant features and duplicated points fit without NaN (sklearn's float32 fit raises there). ``dtype='float64'``
runs everything in float64 (64-bit types enabled only inside the fit).

scikit-learn semantics (1.x): ``N_k = sum_n r_nk + 10 eps``; ``weights = N_k / sum N_k``; ``means = S1 / N_k``;
``variances = S2 / N_k - means^2 + reg_covar`` (empty components: mean 0, variance reg_covar); the lower bound of
iteration i is the mean log-likelihood of the parameters *entering* iteration i (computed in its E-step); stop when
``|lb_i - lb_{i-1}| < tol``. The k-means++ initialisation is sklearn's ``_initialize`` with one-hot
responsibilities (see :mod:`mmfm_jax.gmm.kmeanspp`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmfm_jax.gmm import kmeanspp, sparse
from mmfm_jax.gmm import precision as gp
from mmfm_jax.gmm.diag import DiagGMM
from mmfm_jax.gmm.mstep import F32_EPS, NK_EPS, NK_EPS64, default_nk_eps, m_step  # noqa: F401 (re-exported)
from mmfm_jax.gmm.precision import step_precisions
from mmfm_jax.gmm.samples import (  # noqa: F401 (re-exported)
    SHIFT_ROWS,
    ShardedSamples,
    _astype,
    axes_entry,
    check_dtype,
    jitted,
    psum,
    replicate,
    shard_index,
    shard_samples,
    take_rows,
    x64_scope,
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EMState:
    """Resumable EM state: parameters after ``iteration`` iterations, the lower bound computed in that iteration
    (``-inf`` before the first) and whether the fit has converged. Scalars are 0-d numpy arrays (Orbax-friendly)."""

    params: DiagGMM
    iteration: Any  # int32 []
    lower_bound: Any  # float64 []
    converged: Any  # bool []


def make_state(params: DiagGMM, iteration: int = 0, lower_bound: float = -np.inf, converged: bool = False) -> EMState:
    return EMState(params, np.asarray(iteration, np.int32), np.asarray(lower_bound, np.float64),
                   np.asarray(converged, bool))


def _kahan(carry: tuple[jax.Array, jax.Array], new: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Compensated ``sum + new`` of the scalar log-likelihood: ``(sum, compensation)``."""
    s, c = carry
    y = new - c
    t = s + y
    return t, (t - s) - y


Gemm = Callable[[Any, Any, Any], jax.Array]
GEMMS: tuple[Gemm, Gemm] = (gp.e_step_gemm, gp.m_step_gemm)  # (E-step ``(x^2, x) . w^T``, M-step ``r^T . a``)


@functools.lru_cache(maxsize=32)
def _build_step(mesh: Mesh, axes: tuple[str, ...], n: int, local_len: int, chunk: int, k: int, d: int,
                precision: tuple[Any, Any], exact_top: bool = False, m_top: int = 0, m_tol: float = 0.0,
                dtype: str = "float32", gemms: tuple[Gemm, Gemm] = GEMMS, m_stats: bool = True) -> Callable:
    """Jitted ``step(x, params, shift, reg_covar, nk_eps) -> (new_params, mean log-likelihood of params,
    (largest left-out mass of a row, [chunks that ran dense, rows completed densely]))``; ``m_top`` > 0: sparse
    M-step where each row leaves out at most ``m_tol`` (:mod:`mmfm_jax.gmm.sparse`).
    ``precision``: ``(E-step GEMM, M-step GEMM)``; ``gemms``: the functions that compute them, ``(e_gemm((x^2, x) [C, D]
    each, w, precision) -> [C, K]`` with ``w = precision.prepare_e_weights((prec, -2 mu prec), precision)``,
    ``m_gemm(r [C, K], a [C, 2D], precision) -> [K, 2D])`` (default
    :data:`GEMMS`; ``bench gmm_emulate`` passes emulated ones). ``exact_top``: recompute each row's likely winners
    directly, ``log w_k - 0.5 (D log 2 pi + sum log var_k + sum prec_k (x - mu_k)^2)``, before the softmax
    (:func:`mmfm_jax.gmm.precision.refine_top`). ``dtype``: of the data and all arithmetic. ``m_stats=False``: the
    E-step only (parameters returned unchanged; for timing and :func:`score`)."""
    e_prec, m_prec = precision
    e_gemm, m_gemm = gemms
    dt = jnp.dtype(dtype)
    n_chunks = -(-local_len // chunk)

    def local(xl, weights, means, variances, shift):
        dev = shard_index(axes)
        mu = means - shift  # also the M-step's per-component centres
        prec = 1.0 / variances
        base = jnp.log(weights) - 0.5 * (d * math.log(2 * math.pi) + jnp.sum(jnp.log(variances), -1))
        const = base - 0.5 * jnp.sum(mu * mu * prec, -1)
        w = gp.prepare_e_weights((prec, -2.0 * mu * prec), e_prec)

        def logits_of(rows):  # [R] local row indices -> (log-joint densities [R, K], shifted rows [R, D])
            # rows by a gather, not a dynamic slice: XLA:CPU reloads a dynamic slice's offset per element in every
            # fusion that reads it, which leaves the fused M-step update unvectorised (~6x slower)
            xc = xl.at[rows].get(mode="promise_in_bounds").astype(dt) - shift
            logits = const - 0.5 * e_gemm((xc * xc, xc), w, e_prec)
            if exact_top:  # the expanded form's rounding grows with prec * x^2: recompute the likely winners
                logits = gp.refine_top(logits, xc, mu, prec, base, e_prec)
            return logits, xc

        def dense(r_, a_):
            return m_gemm(r_, a_, m_prec)

        def body(carry, i):
            start = jnp.minimum(i * chunk, local_len - chunk)
            rows = start + jnp.arange(chunk)
            logits, xc = logits_of(rows)
            valid = (rows >= i * chunk) & (dev * local_len + rows < n)
            ll, acc, rec, dmax, counts = carry
            if not m_stats:
                mx = jnp.max(logits, axis=1, keepdims=True)
                lse = mx[:, 0] + jnp.log(jnp.sum(jnp.exp(logits - mx), axis=1))
                return (_kahan(ll, jnp.sum(jnp.where(valid, lse, 0.0))), acc, rec, dmax, counts), None
            lse, acc, rec, drop, n_dense, n_rec = sparse.chunk_stats(
                logits, valid, xc, m_top, m_tol, dense, acc, centres=mu, rec=rec, rows=rows)
            return (_kahan(ll, jnp.sum(jnp.where(valid, lse, 0.0))), acc, rec, jnp.maximum(dmax, drop),
                    counts + jnp.stack([n_dense, n_rec])), None

        zero = jnp.zeros((), dt)
        carry = ((zero, zero), None, None, zero, jnp.zeros((2,), jnp.int32))
        if not m_stats:
            ((ll, _), *_), _ = lax.scan(body, carry, jnp.arange(n_chunks))
            return psum((ll,), axes), carry[3:]

        rec = sparse.pending(sparse.capacity(n_chunks, chunk), max(1, m_top), dt) if m_top else None
        carry = carry[:1] + (sparse.zeros(k, d, dt), rec) + carry[3:]
        carry, _ = lax.scan(body, carry, jnp.arange(n_chunks))
        (ll, _), acc, rec, dmax, counts = carry
        if rec is not None:  # the recorded rows' left-out responsibilities, after the loop
            acc = sparse.complete(rec, acc, logits_of, sparse.completion_rows(chunk), dense, centres=mu)
        return psum((ll, *sparse.finish(acc, mu)), axes), (lax.pmax(dmax, axes) if axes else dmax, psum(counts, axes))

    xspec = PartitionSpec(axes_entry(axes), None)
    rep = PartitionSpec()
    stats = jax.shard_map(local, mesh=mesh, in_specs=(xspec, rep, rep, rep, rep), out_specs=rep,
                          check_vma=False)

    def step(x, params: DiagGMM, shift, reg_covar, nk_eps):
        params = jax.tree.map(lambda v: v.astype(dt), params)
        tot, sparse_info = stats(x, params.weights, params.means, params.variances, shift)
        if not m_stats:
            return params, tot[0] / n, sparse_info
        ll, nk, s = tot
        new = m_step(nk, s, params.means - shift, shift, reg_covar, nk_eps)
        return new, ll / n, sparse_info

    sh = NamedSharding(mesh, rep)
    return jax.jit(step, out_shardings=(sh, sh, sh))


CPU_CHUNK, ACCELERATOR_CHUNK = 1024, 4096


def default_chunk(mesh: Mesh) -> int:
    """Rows per chunk when ``chunk_size`` is not given: :data:`CPU_CHUNK` on CPUs (the chunk's temporaries stay in
    the caches; larger chunks run a sparse iteration ~1.5x slower at K = 512, docs/gmm.md), else
    :data:`ACCELERATOR_CHUNK`."""
    return CPU_CHUNK if mesh.devices.flat[0].platform == "cpu" else ACCELERATOR_CHUNK


def chunk_rows(chunk_size: int | None, mesh: Mesh, local_len: int) -> int:
    """The rows per chunk EM runs: ``chunk_size`` (None or 0: :func:`default_chunk`), at most a device's rows."""
    return max(1, min(int(chunk_size or default_chunk(mesh)), local_len))


def _check_params(gmm: DiagGMM, k: int, d: int) -> None:
    shapes = (tuple(gmm.weights.shape), tuple(gmm.means.shape), tuple(gmm.variances.shape))
    if shapes != ((k,), (k, d), (k, d)):
        raise ValueError(f"initial DiagGMM has shapes {shapes}, expected {((k,), (k, d), (k, d))}")
    if not np.all(np.asarray(gmm.variances) > 0) or not np.all(np.asarray(gmm.weights) >= 0):
        raise ValueError("initial DiagGMM needs variances > 0 and weights >= 0")


def as_dtype(data: ShardedSamples, dtype: Any) -> ShardedSamples:
    """``data`` with its rows in ``dtype`` (float64 inside :func:`~mmfm_jax.gmm.samples.x64_scope`); same
    placement and shift."""
    dt = check_dtype(dtype)
    if data.dtype == dt and data.x.dtype in (np.float32, np.float64):
        return data
    x = jitted(_astype, data.x.sharding, (1,))(data.x, dt)
    return dataclasses.replace(data, x=x, shift=np.asarray(data.shift).astype(dt))


def fit(x: Any, n_components: int, *, dtype: str = "float32", **kwargs) -> tuple[DiagGMM, dict]:
    """Fit a diagonal GMM to ``x [N, D]`` with EM, data sharded along N over all devices of ``mesh``.

    ``x``: numpy (the full array, identical on every process), a global ``jax.Array`` (e.g. from
    ``parallel.host_to_global`` of per-process rows), or a :class:`ShardedSamples` from :func:`shard_samples` (to
    reuse one placement for several fits). ``mesh``: default all devices (``parallel.make_mesh()``).
    ``chunk_size``: rows per chunk per device (None or 0: :func:`default_chunk`, 1024 on CPUs, 4096 on accelerators).

    ``dtype``: ``float32`` (default) or ``float64``: data, parameters, statistics and GEMMs in float64, with JAX's
    64-bit types enabled only while the fit runs (``jax.enable_x64``); the returned parameters are float64 arrays
    (use them through numpy, or cast them, outside such a scope). Needs ``precision='highest'``.

    ``init``: ``"k-means++"`` (sklearn semantics, seeded by ``seed``), a ``DiagGMM`` used as the parameters of the
    first E-step (sklearn's ``weights_init``/``means_init``/``precisions_init = 1 / variances``), or ``K`` row
    indices (e.g. sklearn's ``kmeans_plusplus`` picks) initialised as sklearn's k-means++ does
    (:func:`mmfm_jax.gmm.kmeanspp.params_from_indices`).
    ``state``: resume an interrupted fit exactly (same data, mesh and arguments). ``on_iteration(it, lower_bound,
    state)`` runs on the host after every iteration (1-based ``it``). ``precision``: of the two GEMMs (the E-step's
    also for the k-means++ distances, fp32 for ``bf16x3_fused``): ``highest`` = true fp32 (default); ``default``
    lets GPUs use TF32; ``bf16x3_fused`` (3-pass bf16 split as few large GEMMs, :mod:`mmfm_jax.gmm.precision`); a
    ``lax.DotAlgorithmPreset`` name, e.g. ``tf32_tf32_f32_x3``; or ``'E,M'`` / a pair for the E-step and M-step
    GEMMs separately. ``gemms``: the functions computing those GEMMs (default :data:`GEMMS`).
    ``exact_top`` (default: on for float64 or an E-step other than ``highest``): recompute each row's two likely
    winners directly, ``sum prec (x - mu)^2`` (``precision.refine_top``); without it a low-precision E-step
    misreports the lower bound (by 50-140 nats per sample with one-pass TF32, ~1 with ``bf16x3_fused``; README).
    ``m_step_top`` > 0: sparse M-step (:mod:`mmfm_jax.gmm.sparse`): each row adds its ``m_step_top`` largest
    responsibilities (centred segment sums); a row whose others exceed ``m_step_tol`` gets them too, by a small dense
    GEMM (by the full one in a chunk with more than chunk/16 such rows). ``info['m_step_dropped']``: the largest mass
    any row left out; history entries count ``m_step_dense_chunks`` (of ``info['n_chunks']``) and
    ``m_step_completed_rows``. 0 (default): dense, as sklearn (each row's largest responsibility still goes through
    the centred segment sum, the others through the GEMM).
    ``nk_eps``: sklearn's ``N_k += 10 eps``; default ``10 eps`` of ``dtype`` (sklearn on float32 data, as in the
    official fit, or on float64 data). As in sklearn it biases a component's variance up by ``nk_eps / N_k *
    mean^2`` (visible only for near-empty or collapsed components and in the k-means++ initial variances).

    Returns ``(gmm, info)``: ``gmm`` holds replicated global arrays; ``info`` has ``converged``, ``n_iter``,
    ``lower_bound`` (mean log-likelihood per sample of the last E-step, sklearn's ``lower_bound_``), ``history``
    (one dict per iteration: iteration, lower_bound, change, seconds), ``init_indices`` (k-means++ picks or None),
    ``init_seconds``, ``n_samples``, ``n_devices``, ``n_chunks``, ``m_step_top``, ``m_step_dropped``, ``dtype``.
    """
    with x64_scope(dtype):
        return _fit(x, n_components, dtype=check_dtype(dtype).name, **kwargs)


def _fit(
    x: Any,
    n_components: int,
    *,
    dtype: str,
    mesh: Mesh | None = None,
    seed: int = 0,
    init: str | DiagGMM | Any = "k-means++",
    max_iter: int = 100,
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
    chunk_size: int | None = None,
    state: EMState | None = None,
    on_iteration: Callable[[int, float, EMState], Any] | None = None,
    precision: str | Any = "highest",
    nk_eps: float | None = None,
    exact_top: bool | None = None,
    m_step_top: int = 0,
    m_step_tol: float = 1e-7,
    gemms: tuple[Gemm, Gemm] | None = None,
) -> tuple[DiagGMM, dict]:
    k = int(n_components)
    if k < 1 or (chunk_size or 0) < 0 or max_iter < 0 or tol < 0 or reg_covar < 0:
        raise ValueError("need n_components >= 1, chunk_size >= 0 (0 or None: default_chunk), max_iter >= 0, "
                         "tol >= 0, reg_covar >= 0")
    m_top = int(m_step_top)
    if m_top < 0 or not 0 <= m_step_tol < 1:
        raise ValueError(f"need m_step_top >= 0 (0: dense M-step) and 0 <= m_step_tol < 1, got {m_step_top}, "
                         f"{m_step_tol}")
    m_top = 0 if m_top >= k else m_top  # keeping every component is the dense M-step
    precs = step_precisions(precision)
    if dtype == "float64" and precs != (lax.Precision.HIGHEST, lax.Precision.HIGHEST):
        raise ValueError(f"dtype='float64' needs precision='highest', got {precision!r}")
    nk_eps = default_nk_eps(dtype) if nk_eps is None else float(nk_eps)
    data = x if isinstance(x, ShardedSamples) else shard_samples(x, mesh, dtype=dtype)
    data = as_dtype(data, dtype)
    mesh, d = data.mesh, data.dim
    if data.n < k:
        raise ValueError(f"Expected n_samples >= n_components but got n_components = {k}, n_samples = {data.n}")
    t0 = time.perf_counter()
    init_indices = None
    if state is not None:
        params, start = replicate(state.params, mesh, dtype), int(state.iteration)
        prev, converged = float(state.lower_bound), bool(state.converged)
        _check_params(params, k, d)
        how = "resumed"
    else:
        start, prev, converged = 0, -np.inf, False
        if isinstance(init, DiagGMM):
            _check_params(init, k, d)
            params, how = replicate(init, mesh, dtype), "given"
        elif isinstance(init, str) and init == "k-means++":
            init_indices = kmeanspp.kmeans_plusplus_indices(data, k, seed=seed, precision=precs[0])
            params = kmeanspp.params_from_indices(data, init_indices, reg_covar=reg_covar, nk_eps=nk_eps)
            how = "k-means++"
        elif not isinstance(init, str) and np.ndim(init) == 1 and np.issubdtype(np.asarray(init).dtype, np.integer):
            init_indices = np.asarray(init, np.int64)
            if len(init_indices) != k:
                raise ValueError(f"init: {len(init_indices)} indices for n_components = {k}")
            params = kmeanspp.params_from_indices(data, init_indices, reg_covar=reg_covar, nk_eps=nk_eps)
            how = "indices"
        else:
            raise ValueError(f"init must be 'k-means++', a DiagGMM or {k} row indices, got {init!r}")
    jax.block_until_ready(params)
    init_seconds = time.perf_counter() - t0
    chunk = chunk_rows(chunk_size, mesh, data.local_len)
    if exact_top is None:
        exact_top = dtype == "float64" or precs[0] != lax.Precision.HIGHEST
    step = _build_step(mesh, data.axes, data.n, data.local_len, chunk, k, d, precs, bool(exact_top), m_top,
                       float(m_step_tol), dtype, GEMMS if gemms is None else tuple(gemms))
    shift, reg, nke = replicate((data.shift, np.float64(reg_covar), np.float64(nk_eps)), mesh, dtype)
    history: list[dict] = []
    it, lb, dropped_max = start, prev, 0.0
    while not converged and it < max_iter:
        it += 1
        t1 = time.perf_counter()
        params, *scalars = step(data.x, params, shift, reg, nke)
        lb, (dropped, counts) = jax.device_get(scalars)  # one transfer per iteration
        lb, dropped_max = float(lb), max(dropped_max, float(dropped))
        change = lb - prev
        converged = bool(abs(change) < tol)
        history.append(dict(iteration=it, lower_bound=lb, change=change, seconds=time.perf_counter() - t1,
                            **({"m_step_dropped": float(dropped), "m_step_dense_chunks": int(counts[0]),
                                "m_step_completed_rows": int(counts[1])} if m_top else {})))
        if not np.isfinite(lb):
            raise FloatingPointError(f"EM iteration {it}: lower bound is {lb}")
        if on_iteration is not None:
            on_iteration(it, lb, make_state(params, it, lb, converged))
        prev = lb
    info = dict(converged=converged, n_iter=it, lower_bound=lb, history=history, init=how,
                init_indices=None if init_indices is None else [int(i) for i in init_indices],
                init_seconds=init_seconds, n_samples=data.n, n_devices=int(mesh.devices.size), chunk_size=chunk,
                exact_top=bool(exact_top), n_chunks=-(-data.local_len // chunk) * data.n_shards, m_step_top=m_top,
                m_step_dropped=dropped_max, dtype=dtype)
    return params, info


def score(x: Any, gmm: DiagGMM, *, mesh: Mesh | None = None, chunk_size: int | None = None,
          precision: str | Any = "highest", exact_top: bool = True) -> float:
    """Mean log-likelihood per sample of ``x [N, D]`` (numpy, global array or :class:`ShardedSamples`) under
    ``gmm``, computed by one sharded E-step (each row's largest term directly when ``exact_top``); in float64 for
    float64 ``ShardedSamples``."""
    dtype = x.dtype.name if isinstance(x, ShardedSamples) else "float32"
    with x64_scope(dtype):
        data = x if isinstance(x, ShardedSamples) else shard_samples(x, mesh)
        k = int(gmm.weights.shape[0])
        _check_params(gmm, k, data.dim)
        step = _build_step(data.mesh, data.axes, data.n, data.local_len,
                           chunk_rows(chunk_size, data.mesh, data.local_len), k, data.dim,
                           step_precisions(precision), bool(exact_top), dtype=dtype, m_stats=False)
        shift, reg, nke = replicate((data.shift, 0.0, NK_EPS), data.mesh, dtype)
        return float(step(data.x, replicate(gmm, data.mesh, dtype), shift, reg, nke)[1])
