"""``python -m mmfm_jax.bench gmm_emulate [--e=tf32] [--m=f32] [--n=65536] [--k=2048] [--iters=4]``

Why single-pass TF32 breaks EM, on any machine: runs our EM (``bench gmm``'s data and initial parameters) with the
E-step and M-step GEMMs *emulated* in another matmul algorithm, exact fp32 arithmetic on rounded operands:

- ``f32``: fp32 (``highest``);
- ``tf32``: operands rounded to TF32 (10-bit mantissa, round to nearest even), exact products, fp32 sums;
- ``bf16``: operands rounded to bf16;
- ``bf16x3``: the 3-pass bf16 split ``hi*hi + hi*lo + lo*hi`` with ``x = hi + lo`` (``bf16_bf16_f32_x3``).

It prints the per-iteration lower bounds of the emulated fit next to the fp32 fit from the same start.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np
from jax import lax

from mmfm_jax.gmm.precision import DIMS_NT, DIMS_TN

MODES = ("f32", "tf32", "bf16", "bf16x3")


def _tf32(x):
    b = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    b = (b + jnp.uint32(0xFFF) + ((b >> 13) & jnp.uint32(1))) & jnp.uint32(0xFFFFE000)
    return lax.bitcast_convert_type(b, jnp.float32)


def _bf16(x):
    return x.astype(jnp.bfloat16).astype(jnp.float32)


def emulated_gemm(mode: str):
    """``(a, b, dims, precision) -> a . b`` computed as ``mode`` would (see the module docstring)."""
    hi = lax.Precision.HIGHEST

    def gemm(a, b, dims, precision=None):
        if mode == "f32":
            return lax.dot_general(a, b, dims, precision=hi)
        if mode in ("tf32", "bf16"):
            r = _tf32 if mode == "tf32" else _bf16
            return lax.dot_general(r(a), r(b), dims, precision=hi)
        ah, bh = _bf16(a), _bf16(b)
        al, bl = _bf16(a - ah), _bf16(b - bh)
        return sum(lax.dot_general(p, q, dims, precision=hi) for p, q in ((al, bh), (ah, bl), (ah, bh)))

    return gemm


def main(argv: list[str]) -> None:
    from mmfm_jax.bench.gmm import initial_params, make_data
    from mmfm_jax.gmm import diag, em

    p = argparse.ArgumentParser(prog="python -m mmfm_jax.bench gmm_emulate")
    p.add_argument("--e", default="tf32", choices=MODES, help="E-step GEMM")
    p.add_argument("--m", default="f32", choices=MODES, help="M-step GEMM")
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv[1:])
    x = make_data(a.n, a.d, a.seed)
    init = diag.DiagGMM(*initial_params(x, a.k, a.seed))
    out = {}
    for name, (e, m) in (("fp32", ("f32", "f32")), (f"E={a.e} M={a.m}", (a.e, a.m))):
        ge, gm = emulated_gemm(e), emulated_gemm(m)
        gemms = (lambda x_, w_, prec, ge=ge: ge(jnp.concatenate(x_, 1), jnp.concatenate(w_, 1), DIMS_NT),
                 lambda r_, x_, prec, gm=gm: gm(r_, x_, DIMS_TN))
        g, info = em.fit(x, a.k, init=init, max_iter=a.iters, tol=0.0, gemms=gemms)
        out[name] = [h["lower_bound"] for h in info["history"]]
        v = np.asarray(g.variances)
        print(f"{name:24s} lower bounds " + " ".join(f"{b:11.4f}" for b in out[name])
              + f"   (variances: min {v.min():.1e}, median {np.median(v):.3f})", flush=True)
    (ref, got) = out.values()
    print(f"|difference| after {a.iters} iterations: {abs(got[-1] - ref[-1]):.4f} nats per sample "
          f"(N={a.n}, K={a.k}, D={a.d})")
