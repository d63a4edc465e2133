"""M-step statistics of one chunk: centred segment sums of each row's largest responsibilities, and the rest by GEMM.

Every row's largest responsibility (and, with ``em.fit(m_step_top=m)``, its ``m`` largest) is added by a *segment
sum*: ``upd_n = r_n [(x_n - c_j)^2, x_n - c_j]`` summed into row ``j = argmax_k r_nk`` of a ``[K, 2D]`` table,
centred on the component's reference point ``c_j`` (EM: the means entering the iteration). Centred before
squaring, so a tight component far from the data mean keeps its digits (:mod:`mmfm_jax.gmm.mstep`). It is memory
work: a row gather of ``c``, one ``[C, 2, D]`` update and a scatter-add (the update stacked, not concatenated to
``[C, 2D]``: XLA:CPU runs the concatenated form several times slower). Rows are selected by
:func:`mmfm_jax.gmm.precision.row_max_argmax` (XLA:CPU's own ``argmax`` is ~30x slower than a max pass).

The responsibilities not kept that way go through the GEMM ``r^T [x^2, x]`` about the origin (shifted frame) and are
re-centred algebraically (:func:`mmfm_jax.gmm.mstep.centre`); their rounding scales with their small mass. With
``m = 0`` (dense M-step, sklearn) that GEMM takes all of them. With ``m > 0`` (sparse): in 768-D a [CLS] vector's
posterior over 8192 components is nearly one-hot once EM settles, so the dense GEMM (half of an iteration's 8 N D K
FLOP) mostly multiplies zeros. The mass a row leaves out is summed directly from the entries not kept (no
``1 - kept`` cancellation). A row that would leave out more than ``tol`` gets the rest of its responsibilities by
a small dense GEMM over such rows only (up to ``C // 16`` of them per chunk, in blocks of ``C // 64`` rows, as
many blocks as there are such rows; a chunk with more takes the GEMM over all rows, in blocks of ``C // 16`` rows;
``lax.switch``). So every row's statistics are either exact or miss at
most ``tol`` of its unit mass: early, fuzzy iterations run dense, settled ones sparse, with no state to carry.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from mmfm_jax.gmm.mstep import centre
from mmfm_jax.gmm.precision import row_max_argmax

Dense = Callable[[jax.Array, jax.Array], jax.Array]


def features(x: jax.Array, centres: jax.Array | None) -> jax.Array:
    """The M-step GEMM's operand of chunk rows ``x``: ``[x^2, x] [C, 2D]`` with ``centres`` (EM), else ``x``."""
    return x if centres is None else jnp.concatenate([x * x, x], axis=1)


def segment_stats(v: jax.Array, idx: jax.Array, x: jax.Array, centres: jax.Array | None,
                  k: int) -> tuple[jax.Array, jax.Array]:
    """``v [C]`` weights, ``idx [C]`` components (in range), ``x [C, D]`` rows, ``centres [K, D]`` ->
    ``(sum_{idx_n = k} v_n [K], sum_{idx_n = k} v_n [(x_n - c_k)^2, x_n - c_k] [K, 2D])``; ``centres=None``:
    ``sum_{idx_n = k} v_n x_n`` for any ``x [C, F]``."""
    c, f = x.shape
    nk = jnp.zeros((k,), v.dtype).at[idx].add(v, mode="promise_in_bounds")
    if centres is None:
        return nk, jnp.zeros((k, f), x.dtype).at[idx].add(v[:, None] * x, mode="promise_in_bounds")
    y = x - centres.at[idx].get(mode="promise_in_bounds")
    # the update [C, 2, D] with the stack at the root of its fusion (XLA:CPU writes each part in its own vectorised
    # loop): a stack inside the expression (v * stack(...)) or a [C, 2D] concatenation runs ~6x slower
    upd = jnp.stack([v[:, None] * (y * y), v[:, None] * y], axis=1)
    s = jnp.zeros((k, 2, f), x.dtype).at[idx].add(upd, mode="promise_in_bounds")
    return nk, s.reshape(k, 2 * f)


def _not_kept(k: int, idx: list[jax.Array]) -> jax.Array:
    """``[C, K]`` mask of the entries not in ``idx`` (a fused expression: only build it where it is consumed)."""
    cols = jnp.arange(k)[None, :]
    out = cols != idx[0][:, None]
    for i in idx[1:]:
        out = out & (cols != i[:, None])
    return out


def _select(scores: jax.Array, m: int) -> tuple[list[jax.Array], list[jax.Array]]:
    """Each row's ``m`` largest entries of ``scores [C, K]`` (ties: the lower index first): ``(indices [C] each,
    values [C] each)``. Every pass masks ``scores`` itself, so XLA fuses it into one read of ``scores``."""
    idx, val = [], []
    for _ in range(m):
        v, i = row_max_argmax(scores if not idx else jnp.where(_not_kept(scores.shape[1], idx), scores, -jnp.inf))
        idx.append(i)
        val.append(v)
    return idx, val


def _segments(v: list[jax.Array], idx: list[jax.Array], x: jax.Array, centres: jax.Array | None, k: int):
    nk, s = 0.0, 0.0
    for v_i, i in zip(v, idx):
        nk_i, s_i = segment_stats(v_i, i, x, centres, k)
        nk, s = nk + nk_i, s + s_i
    return nk, s


def top_m_stats(r: jax.Array, x: jax.Array, m: int,
                centres: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``r [C, K]`` responsibilities (rows sum to 1, or 0 for padding), ``x [C, D]`` rows ->
    ``(N_k [K], sum_kept r [(x - c)^2, x - c] [K, 2D], left-out mass per row [C], the entries not kept [C, K])``,
    keeping each row's ``m`` largest entries (``1 <= m < K``; ties broken by the lower index, as ``argmax``);
    ``centres [K, D]`` (None: ``sum_kept r x`` for any ``x [C, F]``)."""
    c, k = r.shape
    if not 1 <= m < k:
        raise ValueError(f"m_step_top must be in [1, {k - 1}] for K = {k}, got {m}")
    idx, val = _select(r, m)
    nk, s = _segments(val, idx, x, centres, k)
    rest = jnp.where(_not_kept(k, idx), r, 0.0)
    return nk, s, jnp.sum(rest, axis=1), rest


def chunk_stats(logits: jax.Array, valid: jax.Array, x: jax.Array, m: int, tol: float, dense: Dense,
                centres: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """Softmax and M-step statistics of one chunk from its log-joint densities ``logits [C, K]`` (rows with
    ``valid [C]`` False count nothing): ``(log-likelihood per row [C], N_k [K], S [K, 2D], largest left-out mass of
    a row, 1 if the chunk took the GEMM over all rows else 0, rows completed by the small dense GEMM)``;
    ``S = sum r [(x - c)^2, x - c]`` about ``centres [K, D]`` of the rows ``x [C, D]`` (None: ``sum r x`` for any
    ``x [C, F]``); ``dense(r [C, K], a) -> r^T a`` with ``a = features(x, centres)``. ``m = 0``: dense
    (each row's largest entry by a segment sum, all others by ``dense``); ``m > 0``: sparse (module docstring).

    One exp pass over ``[C, K]``: the kept entries are selected on the logits, and the responsibilities not kept
    are summed in the same pass (their mass, without ``1 - kept`` cancellation); the ``[C, K]`` responsibilities
    are only formed where a GEMM needs them."""
    c, k = logits.shape
    if not 0 <= m < k and k > 1:
        raise ValueError(f"m_step_top must be in [0, {k - 1}] for K = {k}, got {m}")
    idx, val = _select(logits, max(1, min(m, k - 1)) if k > 1 else 1)
    mx = val[0]
    e_kept = [jnp.exp(v - mx) for v in val]  # the first is 1
    # the only exp pass over [C, K]: the mass not kept, summed directly
    s_rest = jnp.sum(jnp.where(_not_kept(k, idx), jnp.exp(logits - mx[:, None]), 0.0), axis=1)
    inv = jnp.where(valid, 1.0 / (sum(e_kept) + s_rest), 0.0)
    lse = mx + jnp.log(sum(e_kept) + s_rest)
    nk, s = _segments([ek * inv for ek in e_kept], idx, x, centres, k)
    zero_i = jnp.zeros((), jnp.int32)

    # The branches below get only raw inputs and rebuild every [C, K] operand inside: a mask or responsibilities
    # handed in would be materialised before the branch, for every chunk (XLA:CPU: 5x the sparse chunk's cost);
    # so would the GEMM operand [x^2, x] (a [C, 2D] concatenation): it is built inside, from x.
    def add_rest(ops, nk_=nk, s_=s):
        logits_, mx_, inv_, idx_, x_ = ops
        rest = jnp.where(_not_kept(k, idx_), jnp.exp(logits_ - mx_[:, None]), 0.0) * inv_[:, None]
        g, rsum = dense(rest, features(x_, centres)), jnp.sum(rest, 0)
        return nk_ + rsum, s_ + (g if centres is None else centre(g, rsum, centres))

    ops = (logits, mx, inv, idx, x)
    if m == 0 or k == 1:
        return (lse, *add_rest(ops), jnp.zeros((), logits.dtype), jnp.ones((), jnp.int32), zero_i)
    left = s_rest * inv
    fuzzy = left > tol
    n_fuzzy = jnp.sum(fuzzy.astype(jnp.int32))
    cap = max(1, c // 16)
    sub = max(1, cap // 4)

    def sparse_only(ops_):
        return nk, s, jnp.max(left), zero_i, zero_i

    def completed(ops_):  # add the left-out entries of the (at most cap) fuzzy rows: those rows become exact,
        # in blocks of `sub` rows, as many as there are fuzzy rows (a settled chunk has a few)
        n_sub = -(-cap // sub)
        rows = jnp.nonzero(fuzzy, size=n_sub * sub, fill_value=c)[0]
        logits_, mx_, inv_, idx_, x_ = ops_

        def block(j, acc):
            rows_j = lax.dynamic_slice_in_dim(rows, j * sub, sub, 0)

            def take(v, fill):
                return jnp.take(v, rows_j, axis=0, mode="fill", fill_value=fill)

            part = (take(logits_, -jnp.inf), take(mx_, 0.0), take(inv_, 0.0), [take(i, 0) for i in idx_],
                    take(x_, 0.0))
            return add_rest(part, *acc)

        nk_f, s_f = lax.fori_loop(0, (n_fuzzy + sub - 1) // sub, block, (nk, s))
        return nk_f, s_f, jnp.max(jnp.where(fuzzy, 0.0, left)), zero_i, n_fuzzy

    def full_dense(ops_):  # block by block: a [C, K] GEMM inside a branch costs XLA:CPU ~2x a sparse chunk even
        # when the branch is not taken; blocks of `cap` rows, as `completed`, do not
        logits_, mx_, inv_, idx_, x_ = ops_

        def block(j, acc):
            start = jnp.minimum(j * cap, c - cap)  # the last block overlaps the one before: rows seen get inv 0

            def sl(v):
                return lax.dynamic_slice_in_dim(v, start, cap, 0)

            inv_b = jnp.where(start + jnp.arange(cap) >= j * cap, sl(inv_), 0.0)
            return add_rest((sl(logits_), sl(mx_), inv_b, [sl(i) for i in idx_], sl(x_)), *acc)

        nk_f, s_f = lax.fori_loop(0, -(-c // cap), block, (nk, s))
        return nk_f, s_f, jnp.zeros((), logits.dtype), jnp.ones((), jnp.int32), zero_i

    branch = jnp.where(n_fuzzy == 0, 0, jnp.where(n_fuzzy <= cap, 1, 2))
    return (lse, *lax.switch(branch, (sparse_only, completed, full_dense), ops))
