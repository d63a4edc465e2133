"""Matmul precision of the EM step's two GEMMs: ``lax`` precisions, XLA dot-algorithm presets, and ``bf16x3_fused``.

The E-step GEMM is ``a [C, 2D] . w [K, 2D] -> [C, K]`` (``a = [x^2, x]``, ``w = [prec, -2 mu prec]``) and the
M-step GEMM ``r [C, K] . a [C, 2D] -> [K, 2D]`` (contraction over the C rows of a chunk).

``bf16x3_fused``: the 3-pass bf16 split of ``bf16_bf16_f32_x3`` (``v = hi + lo`` with ``hi = bf16(v)``,
``lo = bf16(v - hi)``; ``a . b ~ hi.hi + hi.lo + lo.hi``, products exact and sums in fp32: about 2^-16 relative
error per product instead of fp32's 2^-24), laid out as few, large bf16 GEMMs instead of XLA's three separate ones:

- E-step: one GEMM with a 3x longer contraction, ``[a_hi, a_lo, a_hi] . [w_hi, w_hi, w_lo]`` (``w`` is split once per
  iteration, outside the chunk loop: :func:`prepare_e_weights`);
- M-step: two GEMMs sharing ``r_hi``: ``r_hi . [a_hi, a_lo]`` and ``r_lo . a_hi``.

Emulated on CPUs (``bench gmm_emulate``), EM with this split in both steps fits as well as fp32 (README, "GMM EM");
single-pass TF32 or bf16 does not.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

FUSED_BF16X3 = "bf16x3_fused"
DIMS_NT = (((1,), (1,)), ((), ()))  # E-step: [C, 2D] . [K, 2D] -> [C, K]
DIMS_TN = (((0,), (0,)), ((), ()))  # M-step: [C, K] . [C, 2D] -> [K, 2D]


def matmul_precision(p: Any) -> Any:
    """'highest' | 'high' | 'default' (``lax.Precision``), ``'bf16x3_fused'`` (module docstring), or a
    ``lax.DotAlgorithmPreset`` name such as 'tf32_tf32_f32_x3' (3-pass TF32 on GPUs) or 'bf16_bf16_f32_x6'."""
    if isinstance(p, str):
        simple = {"highest": lax.Precision.HIGHEST, "high": lax.Precision.HIGH, "default": lax.Precision.DEFAULT}
        if p.lower() in simple:
            return simple[p.lower()]
        if p.lower() == FUSED_BF16X3:
            return FUSED_BF16X3
        try:
            return lax.DotAlgorithmPreset[p.upper()]
        except KeyError:
            raise ValueError(f"unknown precision {p!r}: highest, high, default, {FUSED_BF16X3} or a "
                             "DotAlgorithmPreset name") from None
    return p


def step_precisions(p: Any) -> tuple[Any, Any]:
    """EM's ``precision`` -> ``(E-step GEMM, M-step GEMM)`` precisions: one value for both, or ``'E,M'`` /
    a pair, e.g. ``'tf32_tf32_f32,highest'``."""
    if isinstance(p, str) and "," in p:
        p = tuple(x.strip() for x in p.split(","))
    if isinstance(p, (tuple, list)):
        if len(p) != 2:
            raise ValueError(f"precision pair must be (E-step, M-step), got {p!r}")
        return matmul_precision(p[0]), matmul_precision(p[1])
    q = matmul_precision(p)
    return q, q


def lax_precision(p: Any) -> Any:
    """A precision ``lax.dot_general`` accepts: ``bf16x3_fused`` -> ``HIGHEST`` (for GEMMs outside the EM step,
    e.g. the k-means++ distances), anything else unchanged."""
    return lax.Precision.HIGHEST if p == FUSED_BF16X3 else p


def split_bf16(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``v`` (fp32) -> ``(hi, lo)`` in bf16 with ``hi = bf16(v)``, ``lo = bf16(v - hi)``: ``hi + lo`` keeps about
    16 of fp32's 24 mantissa bits."""
    hi = v.astype(jnp.bfloat16)
    return hi, (v - hi.astype(jnp.float32)).astype(jnp.bfloat16)


def _dot_f32(a: jax.Array, b: jax.Array, dims: Any) -> jax.Array:
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _halves(v: Any) -> tuple[jax.Array, jax.Array]:
    """``(v2, v1)`` from a pair or from a ``[..., 2D]`` array split in two."""
    if isinstance(v, (tuple, list)):
        return v[0], v[1]
    d = v.shape[-1] // 2
    return v[..., :d], v[..., d:]


def prepare_e_weights(w: Any, precision: Any) -> Any:
    """The E-step's weights ``w = (prec, -2 mu prec)`` (a pair of ``[K, D]``, or ``[K, 2D]``) as the GEMM reads
    them: the pair for fp32 precisions (two ``D``-deep GEMMs), ``[w_hi, w_hi, w_lo]`` ([K, 6D] bf16) for
    ``bf16x3_fused``. Call once per iteration, outside the chunk loop (XLA:CPU does not hoist slices of it)."""
    w2, w1 = _halves(w)
    if precision != FUSED_BF16X3:
        return w2, w1
    hi, lo = split_bf16(jnp.concatenate([w2, w1], axis=1))
    return jnp.concatenate([hi, hi, lo], axis=1)


def e_step_gemm(a: Any, w: Any, precision: Any) -> jax.Array:
    """``a = (x^2, x)`` (a pair of ``[C, D]``, or ``[C, 2D]``) ``. w -> [C, K]`` fp32; ``w`` from
    :func:`prepare_e_weights`."""
    a2, a1 = _halves(a)
    if precision != FUSED_BF16X3:  # two D-deep GEMMs: XLA:CPU runs one 2D-deep GEMM over a concatenation slower
        w2, w1 = _halves(w)
        return (lax.dot_general(a2, w2, DIMS_NT, precision=precision)
                + lax.dot_general(a1, w1, DIMS_NT, precision=precision))
    hi, lo = split_bf16(jnp.concatenate([a2, a1], axis=1))
    return _dot_f32(jnp.concatenate([hi, lo, hi], axis=1), w, DIMS_NT)


def m_step_gemm(r: jax.Array, a: jax.Array, precision: Any) -> jax.Array:
    """``r [C, K] . a [C, 2D] -> [K, 2D]`` fp32 (contraction over the rows)."""
    if precision != FUSED_BF16X3:
        d = a.shape[1] // 2
        return jnp.concatenate([lax.dot_general(r, a[:, :d], DIMS_TN, precision=precision),
                                lax.dot_general(r, a[:, d:], DIMS_TN, precision=precision)], axis=1)
    r_hi, r_lo = split_bf16(r)
    a_hi, a_lo = split_bf16(a)
    width = a.shape[1]
    both = _dot_f32(r_hi, jnp.concatenate([a_hi, a_lo], axis=1), DIMS_TN)  # [K, 4D]: hi.hi and hi.lo
    return both[:, :width] + (both[:, width:] + _dot_f32(r_lo, a_hi, DIMS_TN))


def row_max_argmax(scores: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(max, argmax)`` of each row of ``scores [C, K]`` (ties: the lower index, as ``jnp.argmax``; a row without
    a maximum, e.g. NaN, gets index ``K - 1``). A max reduction and a min reduction over the positions of the max
    (as floats, exact below 2^24: XLA:CPU reduces floats ~1.4x faster than int32): XLA:CPU runs ``jnp.argmax`` (a
    variadic reduction) about 30x slower than these two."""
    k = scores.shape[-1]
    mx = jnp.max(scores, axis=-1)
    cols = jnp.arange(k, dtype=jnp.promote_types(scores.dtype, jnp.float32))
    idx = jnp.min(jnp.where(scores == mx[..., None], cols, k), axis=-1).astype(jnp.int32)
    return mx, jnp.minimum(idx, k - 1)


# ------------------------------------------------------------------------------------------------------------
# exact_top: recompute the winners of the expanded form directly

_ROUNDING = {FUSED_BF16X3: 2.0 ** -15, "TF32_TF32_F32": 2.0 ** -10, "BF16_BF16_F32": 2.0 ** -7,
             "BF16_BF16_BF16": 2.0 ** -7, "F16_F16_F32": 2.0 ** -10, "BF16_BF16_F32_X3": 2.0 ** -15}
_ACCUMULATION = 2.0 ** -18  # fp32 sums of ~1.5k products: the floor for every algorithm


def rounding_bound(precision: Any) -> float:
    """A generous relative error bound of one E-step GEMM entry (w.r.t. the sum of its |products|)."""
    name = precision if isinstance(precision, str) else getattr(precision, "name", str(precision))
    if precision == lax.Precision.DEFAULT:
        name = "TF32_TF32_F32"  # GPUs run DEFAULT fp32 dots as one TF32 pass
    elif precision == lax.Precision.HIGH:
        name = "BF16_BF16_F32_X3"
    return max(_ROUNDING.get(str(name).upper() if name != FUSED_BF16X3 else name, _ACCUMULATION), _ACCUMULATION)


def refine_top(logits: jax.Array, xc: jax.Array, mu: jax.Array, prec: jax.Array, base: jax.Array,
               precision: Any) -> jax.Array:
    """Replace two likely winners of each row of ``logits [C, K]`` by their direct fp32 values
    ``base_k - 0.5 sum_d prec_kd (x_d - mu_kd)^2`` (``xc [C, D]`` and ``mu [K, D]`` shifted alike): the row's argmax,
    and the argmax of ``logits + bound_k``, where ``bound_k = eps * sum_d prec_kd (sqrt(r_d) + |mu_kd|)^2`` bounds
    the expanded form's rounding error over this chunk (``r_d = max_rows xc_d^2``). The second catches a collapsed
    component (variance ~ reg_covar) that rounding ranked below another at its own point. Recomputing can only
    make a logit more accurate."""
    span = jnp.sqrt(jnp.max(xc * xc, axis=0))[None, :] + jnp.abs(mu)  # [K, D]
    bound = rounding_bound(precision) * jnp.sum(prec * span * span, axis=-1)  # [K]
    cols = jnp.arange(logits.shape[1])[None, :]
    out = logits
    for cand in (row_max_argmax(logits)[1], row_max_argmax(logits + bound[None, :])[1]):
        diff = xc - jnp.take(mu, cand, axis=0)
        direct = jnp.take(base, cand) - 0.5 * jnp.sum(jnp.take(prec, cand, axis=0) * diff * diff, axis=1)
        out = jnp.where(cols == cand[:, None], direct[:, None], out)
    return out
