"""M-step statistics of one chunk, accumulated in place: centred segment sums of each row's largest
responsibilities, the rest by GEMM.

Every row's largest responsibility (and, with ``em.fit(m_step_top=m)``, its ``m`` largest) is added by a *segment
sum*: ``r_n [(x_n - c_j)^2, x_n - c_j]`` scatter-added into row ``j = argmax_k r_nk`` of the carried ``[K, 2, D]``
table :attr:`Acc.s`, centred on the component's reference point ``c_j`` (EM: the means entering the iteration).
Centred before squaring, so a tight component far from the data mean keeps its digits (:mod:`mmfm_jax.gmm.mstep`).
It is memory work: a row gather of ``c``, one ``[C, 2, D]`` update (stacked, not concatenated to ``[C, 2D]``:
XLA:CPU runs the concatenated form several times slower) and a scatter-add into the loop-carried table, which XLA
updates in place. Rows are selected by :func:`mmfm_jax.gmm.precision.row_max_argmax` (XLA:CPU's own ``argmax`` is
~30x slower than a max pass).

The responsibilities not kept that way go through the GEMM ``r^T [x^2, x]`` about the origin (shifted frame), into
the carried :attr:`Acc.g`, and are re-centred algebraically once, after the chunk loop (:func:`finish`); their
rounding scales with their small mass. With ``m = 0`` (dense M-step, sklearn) that GEMM takes all of them. With
``m > 0`` (sparse): in 768-D a [CLS] vector's posterior over 8192 components is nearly one-hot once EM settles, so
the dense GEMM (half of an iteration's 8 N D K FLOP) mostly multiplies zeros. The mass a row leaves out is summed
directly from the entries not kept (no ``1 - kept`` cancellation). A row that would leave out more than ``tol`` is
*recorded* (:class:`Pending`: its position, kept components, row maximum and normaliser) and completed after the
chunk loop by :func:`complete`, which recomputes those rows' log-densities and adds the rest of their
responsibilities by small GEMMs, in blocks of ``C // 4`` recorded rows; a chunk with more than ``C // 16`` such rows
takes the GEMM over all its rows instead (in blocks of ``C // 4`` rows, ``lax.cond``). So every row's statistics
are either exact or miss at most ``tol`` of its unit mass: early, fuzzy iterations run dense, settled ones sparse,
with no state carried between iterations.

The tables are summed in the working dtype directly, chunk after chunk (no compensation: docs/gmm.md,
"Summation"): a component's centred sums add the rows assigned to it, small terms that do not cancel against a
large total.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mmfm_jax.gmm.mstep import centre
from mmfm_jax.gmm.precision import row_max_argmax

Dense = Callable[[jax.Array, jax.Array], jax.Array]


class Acc(NamedTuple):
    """M-step statistics carried through the chunk loop: ``nk [K]`` and ``s [K, 2, D]`` (``sum r [(x - c)^2,
    x - c]``, centred; ``[K, 1, F]`` ``sum r x`` without centres) of the segment-summed entries; ``rsum [K]`` and
    ``g [K, 2D]`` (``r^T [x^2, x]`` about the origin; ``[K, F]`` ``r^T x`` without centres) of the GEMM-ed ones."""

    nk: jax.Array
    s: jax.Array
    rsum: jax.Array
    g: jax.Array


def zeros(k: int, f: int, dtype, centred: bool = True) -> Acc:
    """Empty :class:`Acc` for ``K = k`` components of ``f`` features."""
    z = jnp.zeros((k,), dtype)
    return Acc(z, jnp.zeros((k, 2 if centred else 1, f), dtype), z, jnp.zeros((k, (2 if centred else 1) * f), dtype))


def finish(acc: Acc, centres: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """``(sum r [K], sum r [(x - c)^2, x - c] [K, 2D])`` about ``centres [K, D]`` (None: ``sum r x [K, F]``)."""
    k = acc.nk.shape[0]
    s = acc.s.reshape(k, -1)
    g = acc.g if centres is None else centre(acc.g, acc.rsum, centres)
    return acc.nk + acc.rsum, s + g


def features(x: jax.Array, centres: jax.Array | None) -> jax.Array:
    """The M-step GEMM's operand of chunk rows ``x``: ``[x^2, x] [C, 2D]`` with ``centres`` (EM), else ``x``."""
    return x if centres is None else jnp.concatenate([x * x, x], axis=1)


def add_segments(acc: Acc, v: jax.Array, idx: jax.Array, x: jax.Array, centres: jax.Array | None) -> Acc:
    """``acc`` plus ``v [C]`` weights of rows ``x [C, D]`` into components ``idx [C]`` (in range): ``nk += v``,
    ``s[idx] += v [(x - c)^2, x - c]`` (``centres=None``: ``v x``)."""
    nk = acc.nk.at[idx].add(v, mode="promise_in_bounds")
    if centres is None:
        upd = (v[:, None] * x)[:, None, :]
    else:
        y = x - centres.at[idx].get(mode="promise_in_bounds")
        # the update [C, 2, D] with the stack at the root of its fusion (XLA:CPU writes each part in its own
        # vectorised loop): a stack inside the expression (v * stack(...)) or a [C, 2D] concatenation is ~6x slower
        upd = jnp.stack([v[:, None] * (y * y), v[:, None] * y], axis=1)
    return acc._replace(nk=nk, s=acc.s.at[idx].add(upd, mode="promise_in_bounds"))


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
    acc = zeros(k, x.shape[1], x.dtype, centres is not None)
    for v_i, i in zip(val, idx):
        acc = add_segments(acc, v_i, i, x, centres)
    rest = jnp.where(_not_kept(k, idx), r, 0.0)
    return acc.nk, acc.s.reshape(k, -1), jnp.sum(rest, axis=1), rest


class Pending(NamedTuple):
    """Rows recorded for :func:`complete` (capacity ``B``; entries at and past ``count`` are unused): ``rows [B]``
    (int32 positions, meaning given by the caller), ``kept [m, B]`` (their kept components), ``mx [B]`` (row
    maximum of the log-densities) and ``inv [B]`` (``1 / sum_k exp(logit - mx)``), ``count []``."""

    rows: jax.Array
    kept: jax.Array
    mx: jax.Array
    inv: jax.Array
    count: jax.Array


def pending(capacity: int, m: int, dtype) -> Pending:
    """An empty :class:`Pending` for ``capacity`` rows with ``m`` kept components each."""
    zi = jnp.zeros((capacity,), jnp.int32)
    return Pending(zi, jnp.zeros((m, capacity), jnp.int32), jnp.zeros((capacity,), dtype),
                   jnp.zeros((capacity,), dtype), jnp.zeros((), jnp.int32))


def record_rows(chunk: int) -> int:
    """The most rows one ``chunk``-row chunk records (more: the chunk runs dense): ``chunk // 16``."""
    return max(1, chunk // 16)


def completion_rows(chunk: int) -> int:
    """Rows per block of :func:`complete` and of a dense chunk's GEMM for ``chunk``-row chunks: ``chunk // 4`` (a
    settled chunk records a few rows: one block usually holds several chunks' rows)."""
    return max(1, chunk // 4)


def capacity(n_chunks: int, chunk: int) -> int:
    """The :class:`Pending` capacity that never overflows: each chunk records at most :func:`record_rows` rows (a
    chunk with more runs dense), plus room for the last chunk's fixed-size write; a multiple of
    :func:`completion_rows`."""
    b = completion_rows(chunk)
    return -(-(n_chunks + 1) * record_rows(chunk) // b) * b


def _rest(logits, mx, inv, kept, valid):
    """The responsibilities not kept, ``[C, K]`` (0 on rows not ``valid``): a fused expression."""
    keep = _not_kept(logits.shape[1], kept) & valid[:, None]
    return jnp.where(keep, jnp.exp(logits - mx[:, None]) * inv[:, None], 0.0)


def _add_gemm(acc: Acc, rest: jax.Array, x: jax.Array, centres: jax.Array | None, dense: Dense) -> Acc:
    return acc._replace(rsum=acc.rsum + jnp.sum(rest, 0), g=acc.g + dense(rest, features(x, centres)))


def chunk_stats(logits: jax.Array, valid: jax.Array, x: jax.Array, m: int, tol: float, dense: Dense,
                acc: Acc, centres: jax.Array | None = None, rec: Pending | None = None,
                rows: jax.Array | None = None) -> tuple[jax.Array, Acc, Pending | None, jax.Array, jax.Array,
                                                        jax.Array]:
    """Softmax and M-step statistics of one chunk from its log-joint densities ``logits [C, K]`` (rows with
    ``valid [C]`` False count nothing), added to ``acc``: ``(log-likelihood per row [C], acc, rec, largest
    left-out mass of a row not recorded, 1 if the chunk took the GEMM over all rows else 0, rows recorded)``.
    ``x [C, D]`` rows (``centres [K, D]``: statistics centred on them; None: ``sum r x`` for any ``x [C, F]``);
    ``dense(r [C, K], a) -> r^T a`` with ``a = features(x, centres)``. ``m = 0``: dense (each row's largest entry
    by a segment sum, all others by ``dense``); ``m > 0``: sparse (module docstring): rows leaving out more than
    ``tol`` are recorded in ``rec`` under their ``rows [C]`` positions, for :func:`complete`.

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
    unkept = jnp.where(_not_kept(k, idx), jnp.exp(logits - mx[:, None]), 0.0)
    s_rest = jnp.sum(unkept, axis=1)
    inv = jnp.where(valid, 1.0 / (sum(e_kept) + s_rest), 0.0)
    lse = mx + jnp.log(sum(e_kept) + s_rest)
    for ek, i in zip(e_kept, idx):
        acc = add_segments(acc, ek * inv, i, x, centres)
    if m == 0 or k == 1:  # the responsibilities not kept from the same exp pass (inv is 0 on rows not valid)
        acc = _add_gemm(acc, unkept * inv[:, None], x, centres, dense)
        return lse, acc, rec, jnp.zeros((), logits.dtype), jnp.ones((), jnp.int32), jnp.zeros((), jnp.int32)
    if rec is None or rows is None:
        raise ValueError("a sparse M-step (m > 0) records its fuzzy rows: pass rec and rows")
    left = s_rest * inv
    fuzzy = left > tol
    n_fuzzy = jnp.sum(fuzzy.astype(jnp.int32))
    cap = record_rows(c)
    many = n_fuzzy > cap

    def full_dense(ops):  # block by block: a [C, K] GEMM inside a branch costs XLA:CPU ~2x a sparse chunk even
        # when the branch is not taken; blocks of C / 4 rows do not
        rsum, g, logits_, mx_, inv_, idx_, x_ = ops
        bl = completion_rows(c)

        def block(j, a):
            start = jnp.minimum(j * bl, c - bl)  # the last block overlaps the one before: rows seen get inv 0

            def sl(v):
                return lax.dynamic_slice_in_dim(v, start, bl, 0)

            fresh = start + jnp.arange(bl) >= j * bl
            r = _rest(sl(logits_), sl(mx_), sl(inv_), [sl(i) for i in idx_], fresh)
            return _add_gemm(a, r, sl(x_), centres, dense)

        out = lax.fori_loop(0, -(-c // bl), block, Acc(None, None, rsum, g))
        return out.rsum, out.g

    rsum, g = lax.cond(many, full_dense, lambda ops: (ops[0], ops[1]),
                       (acc.rsum, acc.g, logits, mx, inv, idx, x))
    acc = acc._replace(rsum=rsum, g=g)
    # record the fuzzy rows (none from a dense chunk): a fixed-size write at `count`
    pos = jnp.nonzero(fuzzy & ~many, size=cap, fill_value=c)[0]

    def put(buf, v, fill):
        new = jnp.take(v, pos, mode="fill", fill_value=fill).astype(buf.dtype)
        return lax.dynamic_update_slice_in_dim(buf, new, rec.count, 0)

    n_rec = jnp.where(many, 0, n_fuzzy).astype(jnp.int32)
    rec = Pending(put(rec.rows, rows, 0), jnp.stack([put(rec.kept[j], i, 0) for j, i in enumerate(idx)]),
                  put(rec.mx, mx, 0.0), put(rec.inv, inv, 0.0), rec.count + n_rec)
    worst = jnp.where(many, 0.0, jnp.max(jnp.where(fuzzy, 0.0, left)))
    return lse, acc, rec, worst, many.astype(jnp.int32), n_rec


def complete(rec: Pending, acc: Acc, logits_of: Callable[[jax.Array], tuple[jax.Array, jax.Array]], block: int,
             dense: Dense, centres: jax.Array | None = None) -> Acc:
    """``acc`` plus the responsibilities the recorded rows left out, by GEMMs over blocks of ``block`` rows (as many
    blocks as rows recorded). ``logits_of(rows [block]) -> (logits [block, K], x [block, D])`` recomputes the
    recorded rows' log-joint densities as the chunk computed them."""
    def body(j, a):
        def sl(v):
            return lax.dynamic_slice_in_dim(v, j * block, block, v.ndim - 1)

        logits, x = logits_of(sl(rec.rows))
        valid = j * block + jnp.arange(block) < rec.count
        kept = sl(rec.kept)
        r = _rest(logits, sl(rec.mx), sl(rec.inv), [kept[i] for i in range(kept.shape[0])], valid)
        return _add_gemm(a, r, x, centres, dense)

    return lax.fori_loop(0, (rec.count + block - 1) // block, body, acc)
