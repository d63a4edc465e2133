"""Sharded, chunked EM for a diagonal Gaussian mixture (scikit-learn ``GaussianMixture(covariance_type='diag')``).

Layout: data ``x [N, D]`` split along N (logical axis ``samples``) over every device of the mesh, padded to a
multiple of the number of shards; padding rows are masked. One EM iteration is one jitted call: a ``shard_map``
scans each device's shard in chunks of ``chunk_size`` rows (so a device never holds more than chunk x K
responsibilities) and accumulates N_k, sum r x, sum r x^2 and the log-likelihood in fp32 with Kahan
compensation; they are ``psum``-ed over the devices and the M-step runs replicated. Per chunk there are exactly two
fused GEMMs: ``logits = c_k - 0.5 [x^2, x] @ [prec; -2 mu prec]^T`` and ``stats = r^T @ [x^2, x]`` (8 N D K FLOP
per iteration in all; no N x K x D intermediate). Their precision: :mod:`mmfm_jax.gmm.precision`; with a
low-precision E-step each row's largest log-density is recomputed directly (``exact_top``, see :func:`fit`).
``m_step_top`` replaces the second GEMM by scatter-adds of each row's largest responsibilities (:mod:`.sparse`).

Numerics: before anything is accumulated, the data are shifted by a fixed per-feature reference (the float64 mean
of up to 4096 evenly spaced rows; identical for every mesh). EM is shift-equivariant, so this changes no result
but removes most of the cancellation in ``E[x^2] - mu^2``; the variance is then clamped at 0 before ``reg_covar``
is added. Constant features and duplicated points therefore fit without NaN (sklearn's float32 fit raises there).

scikit-learn semantics (1.x): ``N_k = sum_n r_nk + 10 eps``; ``weights = N_k / sum N_k``; ``means = S1 / N_k``;
``variances = S2 / N_k - means^2 + reg_covar``; the lower bound of iteration i is the mean log-likelihood of the
parameters *entering* iteration i (computed in its E-step); stop when ``|lb_i - lb_{i-1}| < tol``. The k-means++
initialisation is sklearn's ``_initialize`` with one-hot responsibilities (see :mod:`mmfm_jax.gmm.kmeanspp`).
Differences: empty components get the reference point as mean (sklearn: 0) and variance reg_covar; fp32 throughout.
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

from mmfm_jax import parallel
from mmfm_jax.gmm import precision as gp
from mmfm_jax.gmm import sparse
from mmfm_jax.gmm.diag import DiagGMM
from mmfm_jax.gmm.precision import step_precisions

F32_EPS = float(np.finfo(np.float32).eps)
NK_EPS = 10.0 * F32_EPS  # sklearn's 10 * eps for float32 data (the official fit ran on float32 [CLS] tokens)
SHIFT_ROWS = 4096


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


@dataclasses.dataclass(frozen=True)
class ShardedSamples:
    """Data prepared for EM: ``x [n_shards * local_len, D]`` split along N over ``axes`` of ``mesh``."""

    x: jax.Array
    n: int
    local_len: int
    shift: np.ndarray  # [D] float32 reference point subtracted before accumulation
    mesh: Mesh
    axes: tuple[str, ...]

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    @property
    def n_shards(self) -> int:
        return int(np.prod([self.mesh.shape[a] for a in self.axes])) if self.axes else 1

    @property
    def spec(self) -> PartitionSpec:
        return PartitionSpec(_axes_entry(self.axes), None)


def _axes_entry(axes: tuple[str, ...]) -> Any:
    return None if not axes else axes[0] if len(axes) == 1 else axes


def shard_index(axes: tuple[str, ...]) -> jax.Array:
    """Linear index of this device along ``axes`` (inside ``shard_map``); 0 without axes."""
    return lax.axis_index(axes) if axes else jnp.int32(0)


def psum(x: Any, axes: tuple[str, ...]) -> Any:
    return lax.psum(x, axes) if axes else x


@functools.lru_cache(maxsize=64)
def jitted(fn: Callable, out_sharding: Any, static_argnums: tuple[int, ...] = ()) -> Callable:
    """``jax.jit(fn, out_shardings=out_sharding)``, cached so repeated calls hit the compilation cache."""
    return jax.jit(fn, out_shardings=out_sharding, static_argnums=static_argnums)


def _identity(a):
    return a


def _pad_rows(a, n_pad):
    return jnp.pad(a, ((0, n_pad - a.shape[0]), (0, 0)))


def take_rows(a, rows):
    """``a[rows]`` as float32."""
    return a[rows].astype(jnp.float32)


def shard_samples(x: Any, mesh: Mesh | None = None) -> ShardedSamples:
    """Put ``x [N, D]`` (numpy: the full array, identical on every process; or a global ``jax.Array``) on ``mesh``
    split along N over all devices (logical axis ``samples``), zero-padded to a multiple of the shard count."""
    mesh = parallel.make_mesh() if mesh is None else mesh
    spec = parallel.logical_to_mesh_spec(("samples", None), mesh=mesh)
    entry = spec[0] if len(spec) else None
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    n_shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if len(x.shape) != 2 or x.shape[0] < 1:
        raise ValueError(f"x must be [N, D] with N >= 1, got shape {tuple(x.shape)}")
    n, d = int(x.shape[0]), int(x.shape[1])
    local_len = -(-n // n_shards)
    n_pad = local_len * n_shards
    sharding = NamedSharding(mesh, PartitionSpec(_axes_entry(axes), None))
    if isinstance(x, jax.Array):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(jnp.float32)
        if x.sharding.device_set != set(mesh.devices.flat):  # move onto the mesh first (sharded if it divides)
            x = jax.device_put(x, NamedSharding(mesh, parallel.fit_spec_to_shape(sharding.spec, x.shape, mesh)))
        if n_pad == n and x.sharding.is_equivalent_to(sharding, 2):
            xg = x
        else:
            xg = jitted(_pad_rows, sharding, (1,))(x, n_pad)
    else:
        xn = np.asarray(x)
        if xn.dtype not in (np.float32, np.float16) and xn.dtype.name != "bfloat16":
            xn = xn.astype(np.float32)

        def cb(idx):
            rows = idx[0]
            start, stop = rows.start or 0, n_pad if rows.stop is None else rows.stop
            block = xn[start:min(stop, n)][:, idx[1]]
            if stop > n:
                block = np.concatenate([block, np.zeros((stop - max(start, n),) + block.shape[1:], xn.dtype)])
            return block

        xg = jax.make_array_from_callback((n_pad, d), sharding, cb)
    rows = np.unique(np.round(np.linspace(0, n - 1, min(n, SHIFT_ROWS))).astype(np.int64))
    ref = jitted(take_rows, NamedSharding(mesh, PartitionSpec()))(xg, replicate(rows.astype(np.int32), mesh))
    shift = np.asarray(ref, dtype=np.float64).mean(0).astype(np.float32)
    return ShardedSamples(xg, n, local_len, shift, mesh, axes)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host values or arrays -> fully replicated global arrays on ``mesh`` (float32 for floating leaves)."""
    sh = NamedSharding(mesh, PartitionSpec())

    def one(v):
        if isinstance(v, jax.Array):
            if v.sharding.is_equivalent_to(sh, v.ndim):
                return v
            return jitted(_identity, sh)(v)
        a = np.asarray(v)
        a = a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a
        return jax.make_array_from_callback(a.shape, sh, lambda idx: a[idx])

    return jax.tree.map(one, tree)


def _kahan(carry: tuple, new: Any) -> tuple:
    s, c = carry
    y = jax.tree.map(jnp.subtract, new, c)
    t = jax.tree.map(jnp.add, s, y)
    c = jax.tree.map(lambda t_, s_, y_: (t_ - s_) - y_, t, s, y)
    return t, c


def _e_gemm(a: jax.Array, w: jax.Array, precision: Any) -> jax.Array:
    """E-step GEMM ``[C, 2D] . [K, 2D]^T`` (``bench gmm_emulate`` swaps it to emulate other matmul algorithms)."""
    return gp.e_step_gemm(a, w, precision)


def _m_gemm(r: jax.Array, a: jax.Array, precision: Any) -> jax.Array:
    """M-step GEMM ``[C, K]^T . [C, 2D]`` (swapped by ``bench gmm_emulate`` too)."""
    return gp.m_step_gemm(r, a, precision)


@functools.lru_cache(maxsize=32)
def _build_step(mesh: Mesh, axes: tuple[str, ...], n: int, local_len: int, chunk: int, k: int, d: int,
                precision: tuple[Any, Any], exact_top: bool = False, m_top: int = 0, m_tol: float = 0.0) -> Callable:
    """Jitted ``step(x, params, shift, reg_covar, nk_eps) -> (new_params, mean log-likelihood of params,
    (largest left-out mass of a row, [chunks that ran dense, rows completed densely]))``; ``m_top`` > 0: sparse
    M-step where each row leaves out at most ``m_tol`` (:mod:`mmfm_jax.gmm.sparse`).
    ``precision``: ``(E-step GEMM, M-step GEMM)``. ``exact_top``: recompute each row's likely winners directly,
    ``log w_k - 0.5 (D log 2 pi + sum log var_k + sum prec_k (x - mu_k)^2)`` in fp32, before the softmax
    (:func:`mmfm_jax.gmm.precision.refine_top`)."""
    e_prec, m_prec = precision
    n_chunks = -(-local_len // chunk)

    def local(xl, weights, means, variances, shift):
        dev = shard_index(axes)
        mu = means - shift
        prec = 1.0 / variances
        base = jnp.log(weights) - 0.5 * (d * math.log(2 * math.pi) + jnp.sum(jnp.log(variances), -1))
        const = base - 0.5 * jnp.sum(mu * mu * prec, -1)
        w = gp.prepare_e_weights(jnp.concatenate([prec, -2.0 * mu * prec], axis=1), e_prec)  # [K, 2D] (or split)

        def body(carry, i):
            start = jnp.minimum(i * chunk, local_len - chunk)
            xc = lax.dynamic_slice_in_dim(xl, start, chunk, 0).astype(jnp.float32) - shift
            a = jnp.concatenate([xc * xc, xc], axis=1)  # [C, 2D]
            logits = const - 0.5 * _e_gemm(a, w, e_prec)
            if exact_top:  # the expanded form's rounding grows with prec * x^2: recompute the likely winners
                logits = gp.refine_top(logits, xc, mu, prec, base, e_prec)
            rows = start + jnp.arange(chunk)
            valid = (rows >= i * chunk) & (dev * local_len + rows < n)
            mx = jnp.max(logits, axis=1, keepdims=True)
            e = jnp.exp(logits - mx)  # the only exp pass over [C, K]
            s = jnp.sum(e, axis=1)
            r = e * jnp.where(valid, 1.0 / s, 0.0)[:, None]
            lse = mx[:, 0] + jnp.log(s)
            nk_c, s_c, drop, n_dense, n_fixed = sparse.chunk_stats(r, a, m_top, m_tol,
                                                                  lambda r_, a_: _m_gemm(r_, a_, m_prec))
            kahan, dmax, counts = carry
            new = (nk_c, s_c, jnp.sum(jnp.where(valid, lse, 0.0)))
            return (_kahan(kahan, new), jnp.maximum(dmax, drop), counts + jnp.stack([n_dense, n_fixed])), None

        zeros = (jnp.zeros((k,), jnp.float32), jnp.zeros((k, 2 * d), jnp.float32), jnp.zeros((), jnp.float32))
        init = ((zeros, zeros), jnp.zeros((), jnp.float32), jnp.zeros((2,), jnp.int32))
        ((tot, _), dmax, counts), _ = lax.scan(body, init, jnp.arange(n_chunks))
        return psum(tot, axes), (lax.pmax(dmax, axes) if axes else dmax, psum(counts, axes))

    xspec = PartitionSpec(_axes_entry(axes), None)
    rep = PartitionSpec()
    stats = jax.shard_map(local, mesh=mesh, in_specs=(xspec, rep, rep, rep, rep), out_specs=rep,
                          check_vma=False)

    def step(x, params: DiagGMM, shift, reg_covar, nk_eps):
        f32 = jnp.float32
        (nk, s, ll), sparse_info = stats(x, params.weights.astype(f32), params.means.astype(f32),
                                     params.variances.astype(f32), shift)
        new = m_step(nk, s[:, d:], s[:, :d], shift, reg_covar, nk_eps)
        return new, ll / n, sparse_info

    sh = NamedSharding(mesh, rep)
    return jax.jit(step, out_shardings=(sh, sh, sh))


def m_step(nk: jax.Array, s1: jax.Array, s2: jax.Array, shift: jax.Array, reg_covar: float,
           nk_eps: float = NK_EPS) -> DiagGMM:
    """sklearn's M-step from shifted sufficient statistics ``N_k [K]``, ``sum r x' [K, D]``, ``sum r x'^2 [K, D]``
    (``x' = x - shift``); ``N_k += nk_eps``; variances clamped at 0 before ``reg_covar``."""
    nk = nk + nk_eps
    mu = s1 / nk[:, None]
    var = jnp.maximum(s2 / nk[:, None] - mu * mu, 0.0) + reg_covar
    return DiagGMM(weights=nk / jnp.sum(nk), means=mu + shift, variances=var)


def _check_params(gmm: DiagGMM, k: int, d: int) -> None:
    shapes = (tuple(gmm.weights.shape), tuple(gmm.means.shape), tuple(gmm.variances.shape))
    if shapes != ((k,), (k, d), (k, d)):
        raise ValueError(f"initial DiagGMM has shapes {shapes}, expected {((k,), (k, d), (k, d))}")
    if not np.all(np.asarray(gmm.variances) > 0) or not np.all(np.asarray(gmm.weights) >= 0):
        raise ValueError("initial DiagGMM needs variances > 0 and weights >= 0")


def fit(
    x: Any,
    n_components: int,
    *,
    mesh: Mesh | None = None,
    seed: int = 0,
    init: str | DiagGMM = "k-means++",
    max_iter: int = 100,
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
    chunk_size: int = 4096,
    state: EMState | None = None,
    on_iteration: Callable[[int, float, EMState], Any] | None = None,
    precision: str | Any = "highest",
    nk_eps: float = NK_EPS,
    exact_top: bool | None = None,
    m_step_top: int = 0,
    m_step_tol: float = 1e-7,
) -> tuple[DiagGMM, dict]:
    """Fit a diagonal GMM to ``x [N, D]`` with EM, data sharded along N over all devices of ``mesh``.

    ``x``: numpy (the full array, identical on every process), a global ``jax.Array`` (e.g. from
    ``parallel.host_to_global`` of per-process rows), or a :class:`ShardedSamples` from :func:`shard_samples` (to
    reuse one placement for several fits). ``mesh``: default all devices (``parallel.make_mesh()``).

    ``init``: ``"k-means++"`` (sklearn semantics, seeded by ``seed``) or a ``DiagGMM`` used as the parameters of the
    first E-step (sklearn's ``weights_init``/``means_init``/``precisions_init = 1 / variances``).
    ``state``: resume an interrupted fit exactly (same data, mesh and arguments). ``on_iteration(it, lower_bound,
    state)`` runs on the host after every iteration (1-based ``it``). ``precision``: of the two GEMMs (the E-step's
    also for the k-means++ distances, fp32 for ``bf16x3_fused``): ``highest`` = true fp32 (default); ``default``
    lets GPUs use TF32; ``bf16x3_fused`` (3-pass bf16 split as few large GEMMs, :mod:`mmfm_jax.gmm.precision`); a
    ``lax.DotAlgorithmPreset`` name, e.g. ``tf32_tf32_f32_x3``; or ``'E,M'`` / a pair for the E-step and M-step
    GEMMs separately. ``exact_top`` (default: on unless the E-step is ``highest``): recompute each row's two likely
    winners directly, ``sum prec (x - mu)^2`` in fp32 (``precision.refine_top``); without it a low-precision E-step
    misreports the lower bound (by 50-140 nats per sample with one-pass TF32, ~1 with ``bf16x3_fused``; README).
    ``m_step_top`` > 0: sparse M-step (:mod:`mmfm_jax.gmm.sparse`): each row adds its ``m_step_top`` largest
    responsibilities (fp32 scatter-adds); a row whose others exceed ``m_step_tol`` gets them too, by a small dense
    GEMM (by the full one in a chunk with more than chunk/16 such rows). ``info['m_step_dropped']``: the largest mass
    any row left out; history entries count ``m_step_dense_chunks`` (of ``info['n_chunks']``) and
    ``m_step_completed_rows``. 0 (default): always dense, as sklearn.
    ``nk_eps``: sklearn's ``N_k += 10 eps``; the default is float32's eps (sklearn on float32 data, as in the
    official fit); it biases a component's variance up by about ``nk_eps / N_k * (mean - shift)^2`` (visible only
    for near-empty or collapsed components and in the k-means++ initial variances); ``10 * float64 eps`` gives
    sklearn's float64 behaviour.

    Returns ``(gmm, info)``: ``gmm`` holds replicated global arrays; ``info`` has ``converged``, ``n_iter``,
    ``lower_bound`` (mean log-likelihood per sample of the last E-step, sklearn's ``lower_bound_``), ``history``
    (one dict per iteration: iteration, lower_bound, change, seconds), ``init_indices`` (k-means++ picks or None),
    ``init_seconds``, ``n_samples``, ``n_devices``, ``n_chunks``, ``m_step_top``, ``m_step_dropped``.
    """
    from mmfm_jax.gmm import kmeanspp

    k = int(n_components)
    if k < 1 or chunk_size < 1 or max_iter < 0 or tol < 0 or reg_covar < 0:
        raise ValueError("need n_components >= 1, chunk_size >= 1, max_iter >= 0, tol >= 0, reg_covar >= 0")
    m_top = int(m_step_top)
    if m_top < 0 or not 0 <= m_step_tol < 1:
        raise ValueError(f"need m_step_top >= 0 (0: dense M-step) and 0 <= m_step_tol < 1, got {m_step_top}, "
                         f"{m_step_tol}")
    m_top = 0 if m_top >= k else m_top  # keeping every component is the dense M-step
    data = x if isinstance(x, ShardedSamples) else shard_samples(x, mesh)
    mesh, d = data.mesh, data.dim
    if data.n < k:
        raise ValueError(f"Expected n_samples >= n_components but got n_components = {k}, n_samples = {data.n}")
    t0 = time.perf_counter()
    init_indices = None
    precs = step_precisions(precision)
    if state is not None:
        params, start = replicate(state.params, mesh), int(state.iteration)
        prev, converged = float(state.lower_bound), bool(state.converged)
        _check_params(params, k, d)
        how = "resumed"
    else:
        start, prev, converged = 0, -np.inf, False
        if isinstance(init, DiagGMM):
            _check_params(init, k, d)
            params, how = replicate(init, mesh), "given"
        elif init == "k-means++":
            init_indices = kmeanspp.kmeans_plusplus_indices(data, k, seed=seed, precision=precs[0])
            params = kmeanspp.params_from_indices(data, init_indices, reg_covar=reg_covar, nk_eps=nk_eps)
            how = "k-means++"
        else:
            raise ValueError(f"init must be 'k-means++' or a DiagGMM, got {init!r}")
    jax.block_until_ready(params)
    init_seconds = time.perf_counter() - t0
    chunk = max(1, min(int(chunk_size), data.local_len))
    if exact_top is None:
        exact_top = precs[0] != lax.Precision.HIGHEST
    step = _build_step(mesh, data.axes, data.n, data.local_len, chunk, k, d, precs, bool(exact_top), m_top,
                       float(m_step_tol))
    shift, reg, nke = replicate((data.shift, np.float32(reg_covar), np.float32(nk_eps)), mesh)
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
                m_step_dropped=dropped_max)
    return params, info


def score(x: Any, gmm: DiagGMM, *, mesh: Mesh | None = None, chunk_size: int = 4096,
          precision: str | Any = "highest", exact_top: bool = True) -> float:
    """Mean log-likelihood per sample of ``x [N, D]`` (numpy, global array or :class:`ShardedSamples`) under
    ``gmm``, computed by one sharded E-step (each row's largest term directly when ``exact_top``)."""
    data = x if isinstance(x, ShardedSamples) else shard_samples(x, mesh)
    k = int(gmm.weights.shape[0])
    _check_params(gmm, k, data.dim)
    step = _build_step(data.mesh, data.axes, data.n, data.local_len, max(1, min(int(chunk_size), data.local_len)),
                       k, data.dim, step_precisions(precision), bool(exact_top))
    shift, reg, nke = replicate((data.shift, np.float32(0.0), np.float32(NK_EPS)), data.mesh)
    return float(step(data.x, replicate(gmm, data.mesh), shift, reg, nke)[1])
