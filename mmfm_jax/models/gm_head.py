"""GMFlow's Gaussian-mixture output head (Flax NNX), for any backbone with per-token features.

Per token: K velocity means and K mixture logits (log-softmax over K); per sample: one shared log-std from a small
MLP on the *stop-gradient* conditioning vector (SiLU -> Linear(cond, inner) -> SiLU -> Linear(inner, 1), the last
layer zero-initialised so s = 1 at init), or a fixed ``constant_logstd``. The output is a ``ops.gm.GM``:
``means [B, L, K, C]``, ``logweights [B, L, K]``, ``logstds [B, 1, 1, 1]``, all fp32, describing the velocity
``u = x_source - x_data`` (our convention: ``x_t = (1 - t) x_data + t x_source``).

Two entry points: ``head(features [B, L, D], cond [B, Dc])`` projects the features with the head's own linear layer
(xavier-uniform, zero bias, as GMFlow's ``proj_out_2``); ``head.split(raw [B, L, K (C + 1)], cond)`` takes raw
channels a backbone produced itself (e.g. after its own final layer and unpatchify, so the mixture stays per latent
pixel). Raw channel layout: the first K*C are the means, k-major (``reshape(K, C)``), the last K the logits.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mmfm_jax.models.layers import Dense, param
from mmfm_jax.ops.gm import GM

F32 = jnp.float32


class GMHead(nnx.Module):
    """GM output head: ``in_features`` per token -> GM over ``out_channels`` with ``num_gaussians`` components.

    ``cond_features``: width of the conditioning vector (timestep + class/mode embedding) fed to the log-std MLP
    (ignored when ``constant_logstd`` is set). ``dtype``: compute dtype of the projection (params fp32); the GM
    itself is returned in fp32. ``project=False`` builds no projection (use :meth:`split` only).
    """

    def __init__(self, in_features: int, out_channels: int, num_gaussians: int, cond_features: int, *,
                 rngs: nnx.Rngs, constant_logstd: float | None = None, logstd_inner_dim: int = 1024,
                 num_logstd_layers: int = 2, project: bool = True, dtype: Any = F32):
        if num_gaussians < 1 or out_channels < 1:
            raise ValueError(f"GMHead: num_gaussians and out_channels must be >= 1, got {num_gaussians}, "
                             f"{out_channels}")
        if constant_logstd is None and num_logstd_layers < 1:
            raise ValueError(f"GMHead: num_logstd_layers must be >= 1, got {num_logstd_layers}")
        self.k, self.c, self.dtype = num_gaussians, out_channels, dtype
        self.constant_logstd = constant_logstd
        xavier, zeros = nnx.initializers.xavier_uniform(), nnx.initializers.zeros_init()
        n_out = num_gaussians * (out_channels + 1)
        if project:  # two top-level parameters (not a Dense): the checkpoint layout names them proj_kernel/bias
            self.proj_kernel = param(xavier(rngs.params(), (in_features, n_out), F32), ("embed", "channels"))
            self.proj_bias = param(zeros(rngs.params(), (n_out,), F32), ("channels",))
        else:
            self.proj_kernel = self.proj_bias = None
        self.logstd_layers = nnx.List()
        if constant_logstd is None:
            dims = [cond_features] + [logstd_inner_dim] * (num_logstd_layers - 1) + [1]
            for li, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
                last = li == len(dims) - 2
                kinit = zeros if last else xavier
                names = ("mlp", None) if last else ("embed", "mlp")
                self.logstd_layers.append(Dense(din, dout, names=names, kernel_init=kinit, bias_init=zeros,
                                                rngs=rngs))

    def logstd(self, cond: jax.Array) -> jax.Array:
        """Shared log-std per sample from the stop-gradient ``cond`` [B, Dc]: [B, 1, 1, 1] fp32."""
        b = cond.shape[0]
        if self.constant_logstd is not None:
            return jnp.full((b, 1, 1, 1), self.constant_logstd, F32)
        h = jax.lax.stop_gradient(jnp.asarray(cond, F32))
        for layer in self.logstd_layers:
            h = layer(jax.nn.silu(h))
        return h.reshape(b, 1, 1, 1)

    def split(self, raw: jax.Array, cond: jax.Array) -> GM:
        """Raw per-token channels [B, *T, K (C + 1)] (means k-major, then K logits) -> u-GM (fp32)."""
        raw = jnp.asarray(raw, F32)
        if raw.shape[-1] != self.k * (self.c + 1):
            raise ValueError(f"GMHead.split: expected {self.k * (self.c + 1)} channels, got {raw.shape[-1]}")
        means = raw[..., : self.k * self.c].reshape(raw.shape[:-1] + (self.k, self.c))
        logweights = jax.nn.log_softmax(raw[..., self.k * self.c:], axis=-1)
        ls = self.logstd(cond)
        return GM(means, logweights, ls.reshape((ls.shape[0],) + (1,) * (means.ndim - 1)))

    def __call__(self, features: jax.Array, cond: jax.Array) -> GM:
        """Per-token features [B, *T, D] and conditioning [B, Dc] -> u-GM (means [B, *T, K, C])."""
        if self.proj_kernel is None:
            raise ValueError("GMHead was built with project=False: call split(raw, cond)")
        kern = self.proj_kernel[...].astype(self.dtype)
        raw = jnp.asarray(features).astype(self.dtype) @ kern + self.proj_bias[...].astype(self.dtype)
        return self.split(raw, cond)
