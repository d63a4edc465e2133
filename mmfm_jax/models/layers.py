"""Transformer building blocks shared by the DiT-style models (Flax NNX).

Conventions:
- Parameters are fp32 and carry logical axis names (``out_sharding`` metadata: ``embed``, ``mlp``, ``heads``,
  ``vocab``, ``channels``); ``mmfm_jax.parallel`` maps them onto the mesh.
- ``dtype`` is the *compute* dtype of matmuls (inputs and kernels are cast, accumulation is the backend's);
  normalisation statistics, softmax and RoPE run in fp32.
- Sequences are ``[B, L, D]``; attention works in ``[B, L, H, hd]`` (the layout ``jax.nn.dot_product_attention``
  takes), so no transposes are needed around it.
- Fixed tables (2-D sin-cos position embedding, RoPE angles) are built with numpy, following the official
  recipes (see ``shared/reference/mmfm_rae_spec.md`` section 2b).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Names = tuple[str | None, ...]


class Buffer(nnx.Variable):
    """A non-trainable array that belongs to the model state (saved and loaded, ignored by optimizers that
    select ``nnx.Param``), e.g. the fixed position embedding and the Gaussian-Fourier frequencies."""


def param(value: jax.Array, names: Names) -> nnx.Param:
    """An ``nnx.Param`` carrying logical axis names (metadata only: never sharded at creation; see
    ``parallel.state_shardings``)."""
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


# ------------------------------------------------------------------------------------------------------------
# Initialisers (PyTorch defaults and the official DiT choices)


def torch_kernel_init() -> Callable:
    """PyTorch ``nn.Linear`` default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for an ``[in, out]`` kernel."""
    return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> Callable:
    """PyTorch ``nn.Linear`` default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


xavier_uniform = nnx.initializers.xavier_uniform
zeros = nnx.initializers.zeros
normal = nnx.initializers.normal


# ------------------------------------------------------------------------------------------------------------
# Layers


class Dense(nnx.Module):
    """``y = x @ kernel + bias`` with kernel ``[in, out]`` (fp32 param), computed in ``dtype``.

    ``names``: logical axis names of the kernel ``(in_axis, out_axis)``; the bias gets ``(out_axis,)``.
    Default init is PyTorch's ``nn.Linear`` default (what the official model keeps for most layers).
    """

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, names: Names = ("embed", "mlp"),
                 use_bias: bool = True, kernel_init: Callable | None = None, bias_init: Callable | None = None,
                 dtype: Any = jnp.float32):
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        kernel_init = kernel_init or torch_kernel_init()
        self.kernel = param(kernel_init(rngs.params(), (in_features, out_features), jnp.float32), names)
        if use_bias:
            bias_init = bias_init or torch_bias_init(in_features)
            self.bias = param(bias_init(rngs.params(), (out_features,), jnp.float32), (names[1],))
        else:
            self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight``, statistics in fp32, result in ``x.dtype``."""

    def __init__(self, dim: int, eps: float = 1e-6, *, name: str | None = "embed"):
        self.eps = eps
        self.weight = param(jnp.ones((dim,), jnp.float32), (name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...]).astype(x.dtype)


class LayerNormNoAffine(nnx.Module):
    """``LayerNorm(elementwise_affine=False, eps=1e-6)`` in fp32 (the ``use_rmsnorm=False`` variant)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mu = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
        return ((xf - mu) * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """torch ``LayerNorm`` (biased variance) in fp32 with ``scale``/``bias`` (``embed``); float32 result.
    ``affine=False`` at call time leaves them out (the encoders' affine-stripped final LayerNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        self.eps = eps
        self.scale = param(jnp.ones((dim,), jnp.float32), ("embed",))
        self.bias = param(jnp.zeros((dim,), jnp.float32), ("embed",))

    def __call__(self, x: jax.Array, affine: bool = True) -> jax.Array:
        xf = x.astype(jnp.float32)
        xc = xf - jnp.mean(xf, axis=-1, keepdims=True)
        y = xc * jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + self.eps)
        return y * self.scale[...] + self.bias[...] if affine else y


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """Hidden width of the official SwiGLU FFN: ``int(2/3 * int(dim * mlp_ratio))``."""
    return int(2 / 3 * int(dim * mlp_ratio))


class SwiGLU(nnx.Module):
    """``w3(SiLU(a) * b)`` with ``[a | b] = w12(x)`` (fused, a = first half)."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.hidden = hidden
        self.w12 = Dense(dim, 2 * hidden, names=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.w3 = Dense(hidden, dim, names=("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.w12(x)
        a, b = h[..., : self.hidden], h[..., self.hidden:]
        return self.w3(jax.nn.silu(a) * b)


class GeluMlp(nnx.Module):
    """timm ``Mlp`` with tanh-GELU (the ``use_swiglu=False`` variant): ``fc2(gelu(fc1(x)))``."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.fc1 = Dense(dim, hidden, names=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.fc2 = Dense(hidden, dim, names=("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


# ------------------------------------------------------------------------------------------------------------
# Rotary and absolute position tables


@functools.lru_cache(maxsize=32)
def rope_2d_tables(head_dim: int, grid: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """2-D RoPE tables ``(cos, sin)``, each ``[grid*grid, head_dim]`` float32 (row-major tokens).

    The official ``VisionRotaryEmbeddingFast(dim=head_dim // 2)``: frequencies
    ``theta ** (-2j / (head_dim/2))`` for ``j < head_dim/4``, each repeated for an adjacent pair; a token at
    (row, col) gets angles ``concat(row * f, col * f)``. Computed in float32 like the reference.
    """
    if head_dim % 4:
        raise ValueError(f"RoPE needs head_dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    freqs = (1.0 / (np.float32(theta) ** (np.arange(0, half, 2, dtype=np.float32) / np.float32(half))))
    freqs = np.repeat(freqs.astype(np.float32), 2)  # [half]
    pos = np.arange(grid, dtype=np.float32)
    ang = pos[:, None] * freqs[None, :]  # [grid, half] float32
    rows = np.broadcast_to(ang[:, None, :], (grid, grid, half))
    cols = np.broadcast_to(ang[None, :, :], (grid, grid, half))
    angles = np.concatenate([rows, cols], axis=-1).reshape(grid * grid, head_dim)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x * cos + rot(x) * sin`` with ``rot`` mapping each adjacent pair (a, b) to (-b, a).

    x: ``[B, L, H, hd]``; cos/sin: ``[L, hd]``. Computed in fp32, returned in ``x.dtype``.
    """
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*xf.shape[:-1], xf.shape[-1] // 2, 2)
    rot = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xf.shape)
    return (xf * cos[:, None, :] + rot * sin[:, None, :]).astype(x.dtype)


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos embedding ``[grid*grid, dim]`` float32 (MAE/DiT recipe).

    First half of the channels encodes the column index, second half the row index, each ``[sin(p*w), cos(p*w)]``
    with ``w_i = 10000 ** (-i / (dim/4))``.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs dim divisible by 4, got {dim}")

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None].astype(np.float64) * omega[None, :]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_d(dim // 2, cols), one_d(dim // 2, rows)], axis=1).astype(np.float32)


# ------------------------------------------------------------------------------------------------------------
# Attention, modulation, embeddings


def attention_impl(impl: str, dtype: Any, head_dim: int) -> str:
    """Resolve ``'auto'`` to ``'cudnn'`` (GPU, 16-bit, head_dim % 8 == 0, <= 128) or ``'xla'``."""
    if impl != "auto":
        return impl
    ok = (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
          and head_dim % 8 == 0 and head_dim <= 128)
    return "cudnn" if ok else "xla"


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection (rows ``[q | k | v]``, heads contiguous), optional
    RoPE on q and k, ``softmax(q k^T / sqrt(hd)) v`` (logits and softmax in fp32), and an output projection."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32, impl: str = "auto"):
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.dtype, self.impl = dtype, impl
        self.qkv = Dense(dim, 3 * dim, names=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.proj = Dense(dim, dim, names=("heads", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        impl = attention_impl(self.impl, self.dtype, self.head_dim)
        o = jax.nn.dot_product_attention(q, k, v, implementation=impl)
        return self.proj(o.reshape(b, n, self.dim))


def modulate(x: jax.Array, shift: jax.Array | None, scale: jax.Array) -> jax.Array:
    """adaLN modulation ``x * (1 + scale) + shift`` (shift/scale ``[B, 1, D]`` or per-token ``[B, L, D]``)."""
    y = x * (1 + scale)
    return y if shift is None else y + shift


class GaussianFourierEmbedding(nnx.Module):
    """Time embedding ``MLP([sin(2 pi t W), cos(2 pi t W)])`` with fixed frequencies ``W ~ N(0, scale^2)``
    (a ``Buffer``: stored in checkpoints, never trained). The MLP runs in fp32 (it is tiny)."""

    def __init__(self, hidden: int, embedding_size: int = 256, scale: float = 1.0, *, rngs: nnx.Rngs):
        self.W = Buffer(scale * jax.random.normal(rngs.params(), (embedding_size,), jnp.float32))
        init = normal(0.02)
        self.mlp_0 = Dense(2 * embedding_size, hidden, names=(None, "embed"), kernel_init=init, rngs=rngs)
        self.mlp_2 = Dense(hidden, hidden, names=("embed", "mlp"), kernel_init=init, rngs=rngs)

    def __call__(self, t: jax.Array) -> jax.Array:
        """t: ``[B]`` float in [0, 1] (used raw) -> ``[B, hidden]`` fp32."""
        ang = t.astype(jnp.float32)[:, None] * self.W[...][None, :] * 2 * jnp.float32(np.pi)
        emb = jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)
        return self.mlp_2(jax.nn.silu(self.mlp_0(emb)))


REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_all": jax.checkpoint_policies.checkpoint_dots,
}


def maybe_remat(fn: Callable, remat: str, static_argnums: Sequence[int] = ()) -> Callable:
    """Wrap ``fn`` (a function of modules and arrays) in ``nnx.remat`` with the named policy (``'none'``: as is)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
    if remat == "none":
        return fn
    return nnx.remat(fn, policy=REMAT_POLICIES[remat], static_argnums=tuple(static_argnums))
