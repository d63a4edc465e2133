"""A small MLP velocity field ``v(x, t)`` for low-dimensional (toy) flow matching, Flax NNX.

Input ``x [B, D]`` and ``t [B]`` (t = 0 data, t = 1 source); ``t`` enters through Fourier features
``[sin(2 pi f t), cos(2 pi f t)]`` for ``f = 1..n_freq`` plus ``t`` itself, concatenated to x. Output ``[B, D]``
(the predicted ``x_source - x_data``). Hidden kernels carry the logical axes ``('embed', 'mlp')``.

Options:
- ``num_modes > 0``: mode-conditional (MM-FM): ``y [B]`` int (the source mode k) enters as a one-hot concatenated
  to the input.
- ``head='gm'`` (GMFlow): the output is the velocity GM of the flat vector as one token,
  ``ops.gm.GM(means [B, 1, K, D], logweights [B, 1, K], logstds [B, 1, 1, 1])`` (fp32), from a
  ``models.gm_head.GMHead`` on the last hidden layer (xavier projection; the shared log-std from its MLP on the
  stop-gradient time features [+ one-hot mode], zero-initialised last layer, or ``gm_constant_logstd``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mmfm_jax.models.gm_head import GMHead
from mmfm_jax.models.layers import Dense
from mmfm_jax.ops.gm import GM

HEADS = ("velocity", "gm")


def fourier_time(t: jax.Array, n_freq: int) -> jax.Array:
    """t [B] -> [B, 2 n_freq + 1] features (fp32)."""
    t = jnp.asarray(t, jnp.float32)[:, None]
    f = 2 * math.pi * jnp.arange(1, n_freq + 1, dtype=jnp.float32)[None]
    return jnp.concatenate([t, jnp.sin(f * t), jnp.cos(f * t)], axis=-1)


class MLPVelocity(nnx.Module):
    """``depth`` hidden layers of ``width`` units with SiLU; the velocity output layer starts at zero.

    ``__call__(x [B, D], t [B], y [B] int | None = None)`` -> velocity [B, D] or (``head='gm'``) the velocity GM.
    """

    def __init__(self, dim: int, width: int = 128, depth: int = 3, n_freq: int = 8, *, rngs: nnx.Rngs,
                 head: str = "velocity", num_modes: int = 0, gm_components: int = 8,
                 gm_logstd_inner: int = 64, gm_constant_logstd: float | None = None):
        if head not in HEADS:
            raise ValueError(f"MLPVelocity: head must be one of {HEADS}, got {head!r}")
        self.dim, self.n_freq, self.head, self.num_modes = dim, n_freq, head, num_modes
        init, zeros = nnx.initializers.lecun_normal(), nnx.initializers.zeros
        layers = []
        d_in = dim + 2 * n_freq + 1 + num_modes
        for _ in range(depth):
            layers.append(Dense(d_in, width, names=("embed", "mlp"), kernel_init=init, bias_init=zeros, rngs=rngs))
            d_in = width
        self.hidden = nnx.List(layers)
        if head == "gm":
            self.out = None
            self.gm_head = GMHead(width, dim, gm_components, 2 * n_freq + 1 + num_modes, rngs=rngs,
                                  constant_logstd=gm_constant_logstd, logstd_inner_dim=gm_logstd_inner)
        else:
            self.out = Dense(width, dim, names=("mlp", "embed"), kernel_init=zeros, bias_init=zeros, rngs=rngs)
            self.gm_head = None

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None) -> jax.Array | GM:
        cond = fourier_time(t, self.n_freq)
        if self.num_modes:
            if y is None:
                raise ValueError("MLPVelocity: y (the mode) is required when num_modes > 0")
            cond = jnp.concatenate([cond, jax.nn.one_hot(y, self.num_modes, dtype=jnp.float32)], axis=-1)
        h = jnp.concatenate([x.astype(jnp.float32), cond], axis=-1)
        for layer in self.hidden:
            h = jax.nn.silu(layer(h))
        if self.gm_head is not None:
            return self.gm_head(h[:, None, :], cond)
        return self.out(h)
