"""M-step statistics of one chunk: centred segment sums of each row's largest responsibilities, and the rest by GEMM.

Every row's largest responsibility (and, with ``em.fit(m_step_top=m)``, its ``m`` largest) is added by a *segment
sum*: ``upd_n = r_n [(x_n - c_j)^2, x_n - c_j]`` summed into row ``j = argmax_k r_nk`` of a ``[K, 2D]`` table,
centred on the component's reference point ``c_j`` (EM: the means entering the iteration). Centred before
squaring, so a tight component far from the data mean keeps its digits (:mod:`mmfm_jax.gmm.mstep`). It is memory
work: a row gather of ``c``, one ``[C, 2, D]`` update and a scatter-add. On XLA:CPU each of the three is
materialised on its own (``optimization_barrier``): fused, XLA:CPU evaluates the gather per element inside the
update and the update per element inside the scatter, about 10x slower than the three passes at memory speed.

The responsibilities not kept that way go through the GEMM ``r^T [x^2, x]`` about the origin (shifted frame) and are
re-centred algebraically (:func:`mmfm_jax.gmm.mstep.centre`); their rounding scales with their small mass. With
``m = 0`` (dense M-step, sklearn) that GEMM takes all of them. With ``m > 0`` (sparse): in 768-D a [CLS] vector's
posterior over 8192 components is nearly one-hot once EM settles, so the dense GEMM (half of an iteration's 8 N D K
FLOP) mostly multiplies zeros. The mass a row leaves out is summed directly from the entries not kept (no
``1 - kept`` cancellation). A row that would leave out more than ``tol`` gets the rest of its responsibilities by
a small dense GEMM over such rows only (up to ``C // 16`` of them per chunk; a chunk with more takes the GEMM over
all rows, ``lax.switch``). So every row's statistics are either exact or miss at most ``tol`` of its unit mass:
early, fuzzy iterations run dense, settled ones sparse, with no state to carry.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from mmfm_jax.gmm.mstep import centre

Dense = Callable[[jax.Array, jax.Array], jax.Array]


def segment_stats(v: jax.Array, idx: jax.Array, a: jax.Array, centres: jax.Array | None,
                  k: int) -> tuple[jax.Array, jax.Array]:
    """``v [C]`` weights, ``idx [C]`` components (in range), ``a = [x^2, x] [C, 2D]``, ``centres [K, D]`` ->
    ``(sum_{idx_n = k} v_n [K], sum_{idx_n = k} v_n [(x_n - c_k)^2, x_n - c_k] [K, 2D])``; ``centres=None``:
    ``sum_{idx_n = k} v_n a_n`` for any ``a [C, F]``."""
    c, f = a.shape
    if centres is None:
        upd = a
    else:
        y = a[:, f // 2:] - lax.optimization_barrier(centres.at[idx].get(mode="promise_in_bounds"))
        upd = jnp.stack([y * y, y], axis=1).reshape(c, f)  # stacked, not concatenated: XLA:CPU is faster so
    upd = lax.optimization_barrier(v[:, None] * upd)
    s = jnp.zeros((k, f), a.dtype).at[idx].add(upd, mode="promise_in_bounds")
    nk = jnp.zeros((k,), v.dtype).at[idx].add(v, mode="promise_in_bounds")
    return nk, s


def _top_m(r: jax.Array, a: jax.Array, m: int, centres: jax.Array | None):
    k = r.shape[1]
    cols = jnp.arange(k)[None, :]
    nk = jnp.zeros((k,), r.dtype)
    s = jnp.zeros((k, a.shape[1]), r.dtype)
    rest = r
    for _ in range(m):
        idx, v = jnp.argmax(rest, axis=1), jnp.max(rest, axis=1)
        nk_i, s_i = segment_stats(v, idx, a, centres, k)
        nk, s = nk + nk_i, s + s_i
        rest = jnp.where(cols == idx[:, None], 0.0, rest)  # responsibilities are >= 0: a taken entry reads as 0
    return nk, s, jnp.sum(rest, axis=1), rest


def top_m_stats(r: jax.Array, a: jax.Array, m: int,
                centres: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``r [C, K]`` responsibilities (rows sum to 1, or 0 for padding), ``a = [x^2, x] [C, 2D]`` ->
    ``(N_k [K], sum_kept r [(x - c)^2, x - c] [K, 2D], left-out mass per row [C], the entries not kept [C, K])``,
    keeping each row's ``m`` largest entries (``1 <= m < K``; ties broken by the lower index, as ``argmax``);
    ``centres [K, D]`` (None: the origin, i.e. ``sum r a``)."""
    c, k = r.shape
    if not 1 <= m < k:
        raise ValueError(f"m_step_top must be in [1, {k - 1}] for K = {k}, got {m}")
    return _top_m(r, a, m, centres)


def dense_stats(r: jax.Array, a: jax.Array, dense: Dense, centres: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """The dense M-step statistics in :func:`chunk_stats`' layout: ``(sum_rows r, S, 0, 1, 0)``; about the origin
    (``S = dense(r, a)``) without ``centres``, else each row's largest entry by a centred segment sum and the rest
    by ``dense``."""
    one, zero = jnp.ones((), jnp.int32), jnp.zeros((), jnp.int32)
    if centres is None or r.shape[1] == 1:
        s = dense(r, a)
        return jnp.sum(r, 0), s if centres is None else centre(s, jnp.sum(r, 0), centres), \
            jnp.zeros((), r.dtype), one, zero
    nk, s, _, rest = _top_m(r, a, 1, centres)
    return nk + jnp.sum(rest, 0), s + centre(dense(rest, a), jnp.sum(rest, 0), centres), jnp.zeros((), r.dtype), \
        one, zero


def chunk_stats(r: jax.Array, a: jax.Array, m: int, tol: float, dense: Dense,
                centres: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """M-step statistics of one chunk: ``(N_k [K], S [K, 2D], largest left-out mass of a row, 1 if the chunk took
    the GEMM over all rows else 0, rows completed by the small dense GEMM)``; ``S = sum r [(x - c)^2, x - c]``
    about ``centres [K, D]`` (None: the origin, ``sum r a``). ``m = 0``: always dense (:func:`dense_stats`)."""
    if m == 0:
        return dense_stats(r, a, dense, centres)
    c = r.shape[0]
    nk, s, left, rest = top_m_stats(r, a, m, centres)
    fuzzy = left > tol
    n_fuzzy = jnp.sum(fuzzy.astype(jnp.int32))
    cap = max(1, c // 16)
    zero_i = jnp.zeros((), jnp.int32)

    def add_rest(rest_, a_):
        g, rsum = dense(rest_, a_), jnp.sum(rest_, 0)
        return nk + rsum, s + (g if centres is None else centre(g, rsum, centres))

    def sparse_only(_):
        return nk, s, jnp.max(left), zero_i, zero_i

    def completed(_):  # add the left-out entries of the (at most cap) fuzzy rows: those rows become exact
        rows = jnp.nonzero(fuzzy, size=cap, fill_value=c)[0]
        rest_f = jnp.take(rest, rows, axis=0, mode="fill", fill_value=0.0)
        a_f = jnp.take(a, rows, axis=0, mode="fill", fill_value=0.0)
        return *add_rest(rest_f, a_f), jnp.max(jnp.where(fuzzy, 0.0, left)), zero_i, n_fuzzy

    def full_dense(_):
        return *add_rest(rest, a), jnp.zeros((), r.dtype), jnp.ones((), jnp.int32), zero_i

    branch = jnp.where(n_fuzzy == 0, 0, jnp.where(n_fuzzy <= cap, 1, 2))
    return lax.switch(branch, (sparse_only, completed, full_dense), None)
