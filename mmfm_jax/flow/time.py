"""Training-time samplers and the resolution shift.

Convention (the official code's, used everywhere in this package): ``x_t = (1 - t) x_data + t x_source``;
t = 0 is data, t = 1 is the source (noise or GMM sample); the network predicts ``x_source - x_data``.

The reference (``Transport.sample``) draws t on ``[0, t_max]`` with ``t_max = 1 - 1/1000``:
- ``'uniform'``: ``t = u * t_max``, u ~ U[0, 1);
- ``'logit_normal'``: ``logit(t) ~ N(mean, std^2)`` truncated to ``t in [0, t_max]`` by inverse-CDF sampling
  (u ~ U[Phi(a), Phi(b)], z = mean + std Phi^{-1}(u), t = sigmoid(z), clamped to the interval);
then applies the resolution shift ``t <- s t / (1 + (s - 1) t)`` with ``s = sqrt(dim / 4096)`` (dim = C*H*W),
which moves mass toward t = 1 (noisier states) for large latents. For s = sqrt(48) the shifted logit-normal has
mean ~0.836 and median ~0.874.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri

TIME_KINDS = ("logit_normal", "uniform")


def resolution_shift(dim: int, base: int = 4096) -> float:
    """``s = sqrt(dim / base)``; dim = C*H*W of the latent (768*16*16 -> sqrt(48) ~ 6.928)."""
    if dim <= 0 or base <= 0:
        raise ValueError(f"resolution_shift: dim and base must be positive, got {dim}, {base}")
    return math.sqrt(dim / base)


def shift_time(t, s: float):
    """``s t / (1 + (s - 1) t)``: maps [0, 1] onto itself, fixes 0 and 1; s > 1 pushes t toward 1 (source).

    Works on numpy or jax arrays (and floats) in their own dtype.
    """
    return s * t / (1 + (s - 1) * t)


def _normal_cdf(x: float) -> float:
    """Standard normal CDF of a Python float, rounded to fp32 (a trace-time constant: works under ``jit``)."""
    return float(np.float32(0.5 * math.erfc(-x / math.sqrt(2.0))))


def truncated_logit_normal(key: jax.Array, shape: tuple[int, ...], mean: float = 0.0, std: float = 1.0,
                           low: float = 0.0, high: float = 0.999) -> jax.Array:
    """t in [low, high] with ``logit(t) ~ N(mean, std^2)`` truncated, by inverse-CDF sampling (fp32)."""
    z_lo = -math.inf if low <= 0 else math.log(low / (1 - low))
    z_hi = math.inf if high >= 1 else math.log(high / (1 - high))
    c_lo = _normal_cdf((z_lo - mean) / std) if math.isfinite(z_lo) else 0.0
    c_hi = _normal_cdf((z_hi - mean) / std) if math.isfinite(z_hi) else 1.0
    u = jax.random.uniform(key, shape, jnp.float32)
    u = c_lo + (c_hi - c_lo) * u
    z = mean + std * ndtri(u)
    return jnp.clip(jax.nn.sigmoid(z), low, high)


def sample_time(key: jax.Array, shape: tuple[int, ...] = (), kind: str = "logit_normal", shift: float = 1.0,
                mean: float = 0.0, std: float = 1.0, t_max: float = 0.999) -> jax.Array:
    """Training times in the reference's way: draw on ``[0, t_max]`` (``kind``), then ``shift_time(., shift)``.

    Returns fp32 of ``shape``. t = 0 data, t = 1 source.
    """
    if kind == "logit_normal":
        t = truncated_logit_normal(key, shape, mean, std, 0.0, t_max)
    elif kind == "uniform":
        t = jax.random.uniform(key, shape, jnp.float32) * jnp.float32(t_max)
    else:
        raise ValueError(f"sample_time: unknown kind {kind!r} (choose from {TIME_KINDS})")
    if shift != 1.0:
        t = shift_time(t, jnp.float32(shift))
    return t.astype(jnp.float32)


def sample_time_per_example(keys: jax.Array, kind: str = "logit_normal", shift: float = 1.0, mean: float = 0.0,
                            std: float = 1.0, t_max: float = 0.999) -> jax.Array:
    """One time per example from its own key: keys [B] (typed or raw uint32 [B, 2]) -> t [B] fp32.

    Each t depends only on its example's key (``fold_in(step_key, global_index)``), never on the batch split.
    """
    return jax.vmap(lambda k: sample_time(k, (), kind, shift, mean, std, t_max))(keys)
