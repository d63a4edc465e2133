"""A small MLP velocity field ``v(x, t)`` for low-dimensional (toy) flow matching, Flax NNX.

Input ``x [B, D]`` and ``t [B]`` (t = 0 data, t = 1 source); ``t`` enters through Fourier features
``[sin(2 pi f t), cos(2 pi f t)]`` for ``f = 1..n_freq`` plus ``t`` itself, concatenated to x. Output ``[B, D]``
(the predicted ``x_source - x_data``). Hidden kernels carry the logical axes ``('embed', 'mlp')``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

import mmfm_jax.parallel  # noqa: F401  (logical axis names are metadata only; parallel.py maps them)


def fourier_time(t: jax.Array, n_freq: int) -> jax.Array:
    """t [B] -> [B, 2 n_freq + 1] features (fp32)."""
    t = jnp.asarray(t, jnp.float32)[:, None]
    f = 2 * math.pi * jnp.arange(1, n_freq + 1, dtype=jnp.float32)[None]
    return jnp.concatenate([t, jnp.sin(f * t), jnp.cos(f * t)], axis=-1)


class MLPVelocity(nnx.Module):
    """``depth`` hidden layers of ``width`` units with SiLU; the output layer starts at zero."""

    def __init__(self, dim: int, width: int = 128, depth: int = 3, n_freq: int = 8, *, rngs: nnx.Rngs):
        self.dim, self.n_freq = dim, n_freq
        init = nnx.initializers.lecun_normal()
        layers = []
        d_in = dim + 2 * n_freq + 1
        for _ in range(depth):
            layers.append(nnx.Linear(d_in, width, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
                                     rngs=rngs))
            d_in = width
        self.hidden = nnx.List(layers)
        self.out = nnx.Linear(width, dim, kernel_init=nnx.with_partitioning(nnx.initializers.zeros, ("mlp", "embed")),
                              rngs=rngs)

    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        h = jnp.concatenate([x.astype(jnp.float32), fourier_time(t, self.n_freq)], axis=-1)
        for layer in self.hidden:
            h = jax.nn.silu(layer(h))
        return self.out(h)
