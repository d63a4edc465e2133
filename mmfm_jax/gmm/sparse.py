"""Sparse M-step statistics: each row's ``m`` largest responsibilities only (``em.fit(m_step_top=m)``).

In 768-D, a [CLS] vector's posterior over 8192 components is nearly one-hot once EM settles, so the dense M-step
GEMM ``r^T [x^2, x]`` (half of an iteration's 8 N D K FLOP) mostly multiplies zeros. Here each row's ``m`` largest
responsibilities are taken by ``m`` argmax passes over the chunk's ``[C, K]`` responsibilities and scatter-added in
fp32 (exact products; memory-bound work instead of a GEMM). The mass a row leaves out is summed directly from the
entries not kept (no ``1 - kept`` cancellation). A row that would leave out more than ``tol`` gets the rest of its
responsibilities added by a small dense GEMM over such rows only (up to ``C // 16`` of them per chunk; a chunk with
more takes the full dense GEMM, ``lax.switch``). So every row's statistics are either exact or miss at most ``tol``
of its unit mass: early, fuzzy iterations run dense, settled ones sparse, with no state to carry.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

Dense = Callable[[jax.Array, jax.Array], jax.Array]


def top_m_stats(r: jax.Array, a: jax.Array, m: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``r [C, K]`` responsibilities (rows sum to 1, or 0 for padding), ``a [C, F]`` features ->
    ``(N_k [K], sum_kept r a [K, F], left-out mass per row [C], the entries not kept [C, K])``, keeping each row's
    ``m`` largest entries (``1 <= m < K``; ties broken by the lower index, as ``argmax``)."""
    c, k = r.shape
    if not 1 <= m < k:
        raise ValueError(f"m_step_top must be in [1, {k - 1}] for K = {k}, got {m}")
    cols = jnp.arange(k)[None, :]
    nk = jnp.zeros((k,), jnp.float32)
    s = jnp.zeros((k, a.shape[1]), jnp.float32)
    rest = r
    for _ in range(m):
        idx, v = jnp.argmax(rest, axis=1), jnp.max(rest, axis=1)
        nk = nk.at[idx].add(v)
        s = s.at[idx].add(v[:, None] * a)
        rest = jnp.where(cols == idx[:, None], 0.0, rest)  # responsibilities are >= 0: a taken entry reads as 0
    return nk, s, jnp.sum(rest, axis=1), rest


def dense_stats(r: jax.Array, a: jax.Array, dense: Dense) -> tuple[jax.Array, ...]:
    """The dense M-step statistics in :func:`chunk_stats`' layout: ``(sum_rows r, dense(r, a), 0, 1, 0)``."""
    return jnp.sum(r, 0), dense(r, a), jnp.zeros((), jnp.float32), jnp.ones((), jnp.int32), jnp.zeros((), jnp.int32)


def chunk_stats(r: jax.Array, a: jax.Array, m: int, tol: float, dense: Dense) -> tuple[jax.Array, ...]:
    """M-step statistics of one chunk: ``(N_k [K], S [K, F], largest left-out mass of a row, 1 if the chunk took the
    full dense GEMM ``dense(r, a)`` else 0, rows completed by the small dense GEMM)``; ``m = 0``: always dense."""
    if m == 0:
        return dense_stats(r, a, dense)
    c = r.shape[0]
    nk, s, left, rest = top_m_stats(r, a, m)
    fuzzy = left > tol
    n_fuzzy = jnp.sum(fuzzy.astype(jnp.int32))
    cap = max(1, c // 16)
    zero_i = jnp.zeros((), jnp.int32)

    def sparse_only(_):
        return nk, s, jnp.max(left), zero_i, zero_i

    def completed(_):  # add the left-out entries of the (at most cap) fuzzy rows: those rows become exact
        rows = jnp.nonzero(fuzzy, size=cap, fill_value=c)[0]
        rest_f = jnp.take(rest, rows, axis=0, mode="fill", fill_value=0.0)
        a_f = jnp.take(a, rows, axis=0, mode="fill", fill_value=0.0)
        return nk + jnp.sum(rest_f, 0), s + dense(rest_f, a_f), jnp.max(jnp.where(fuzzy, 0.0, left)), zero_i, n_fuzzy

    def full_dense(_):
        return dense_stats(r, a, dense)

    branch = jnp.where(n_fuzzy == 0, 0, jnp.where(n_fuzzy <= cap, 1, 2))
    return lax.switch(branch, (sparse_only, completed, full_dense), None)
