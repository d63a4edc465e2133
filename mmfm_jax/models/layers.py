"""Transformer building blocks shared by every model (Flax NNX): the only home of Dense, LayerNorm, RMSNorm,
attention and the parameter helper.

Conventions:
- Parameters are fp32 and carry logical axis names (``out_sharding`` metadata: ``embed``, ``mlp``, ``heads``,
  ``vocab``, ``channels``), created by :func:`param` only: metadata, never sharded at creation
  (``eager_sharding=False``, whatever flax's global default); ``parallel.state_shardings`` maps them onto a mesh.
- ``dtype`` is the *compute* dtype of matmuls (inputs and kernels are cast, accumulation is the backend's);
  normalisation statistics, softmax and RoPE run in fp32.
- Sequences are ``[B, L, D]``; attention works in ``[B, L, H, hd]`` (the layout ``jax.nn.dot_product_attention``
  takes), so no transposes are needed around it.
- Fixed tables (2-D sin-cos position embedding, RoPE angles) are built with numpy, following the official RAE
  recipes (``get_2d_sincos_pos_embed`` of MAE/DiT and ``VisionRotaryEmbeddingFast``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfm_jax.parallel import constrain

Names = tuple[str | None, ...]


class Buffer(nnx.Variable):
    """A non-trainable array that belongs to the model state (saved and loaded, ignored by optimizers that
    select ``nnx.Param``), e.g. the fixed position embedding and the Gaussian-Fourier frequencies."""


def param(value: jax.Array, names: Names) -> nnx.Param:
    """An ``nnx.Param`` carrying logical axis names (metadata only: never sharded at creation; see
    ``parallel.state_shardings``)."""
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def preset_config(cls: type, presets: dict[str, dict[str, Any]], name: str, overrides: dict[str, Any]) -> Any:
    """``cls(**presets[name], **overrides)``: the one preset convention (each model config's ``preset``); an unknown
    preset or field raises ``ValueError`` naming the choices."""
    if name not in presets:
        raise ValueError(f"{cls.__name__}.preset: unknown {name!r} (choose from {sorted(presets)})")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"{cls.__name__}.preset: unknown fields {unknown} (have {sorted(fields)})")
    return cls(**{**presets[name], **overrides})


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


class HostRandom:
    """Sequential N(0, std^2) initial values for models whose real weights are always loaded (the encoders: random
    weights serve tests and benchmarks only). Hand-rolled because eager ``jax.random`` compiles once per shape
    (seconds for a whole model): a concrete key draws with numpy; a traced key (``nnx.eval_shape``, ``nnx.jit``)
    uses ``jax.random``. Values depend on the order of the draws, not on the keys an initializer is handed."""

    def __init__(self, rngs: nnx.Rngs):
        key = rngs.params()
        self.key, self.gen = key, None
        if not isinstance(key, jax.core.Tracer):
            self.gen = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())

    def normal(self, shape: tuple[int, ...], std: float = 0.02) -> jax.Array:
        """The next ``shape`` draw of N(0, std^2), float32."""
        if self.gen is not None:
            return jnp.asarray(self.gen.standard_normal(shape, dtype=np.float32) * np.float32(std))
        self.key, k = jax.random.split(self.key)
        return jax.random.normal(k, shape, jnp.float32) * std

    def init(self, std: float) -> Callable:
        """An initializer ``(key, shape, dtype) -> array`` drawing from this stream (the key is ignored)."""
        return lambda key, shape, dtype=jnp.float32: self.normal(tuple(shape), std)


# ------------------------------------------------------------------------------------------------------------
# Layers


class Dense(nnx.Module):
    """``y = x @ kernel + bias`` with kernel ``[in, out]`` (fp32 param), computed in ``dtype``.

    ``names``: logical axis names of the kernel ``(in_axis, out_axis)``; the bias gets ``(out_axis,)``.
    Default init is PyTorch's ``nn.Linear`` default (what the official model keeps for most layers).
    ``out_dtype``: None returns ``dtype`` (bias added in ``dtype``); a dtype (DINOv2: float32) makes the matmul
    accumulate into it (``preferred_element_type``) and adds the bias in it.
    """

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, names: Names = ("embed", "mlp"),
                 use_bias: bool = True, kernel_init: Callable | None = None, bias_init: Callable | None = None,
                 dtype: Any = jnp.float32, out_dtype: Any = None):
        self.in_features, self.out_features, self.dtype, self.out_dtype = in_features, out_features, dtype, out_dtype
        kernel_init = kernel_init or torch_kernel_init()
        self.kernel = param(kernel_init(rngs.params(), (in_features, out_features), jnp.float32), names)
        if use_bias:
            bias_init = bias_init or torch_bias_init(in_features)
            self.bias = param(bias_init(rngs.params(), (out_features,), jnp.float32), (names[1],))
        else:
            self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.dtype if self.out_dtype is None else self.out_dtype
        kw = {} if self.out_dtype is None else dict(preferred_element_type=self.out_dtype)
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype), **kw)
        if self.bias is not None:
            y = y + self.bias[...].astype(out)
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


class LayerNorm(nnx.Module):
    """torch ``LayerNorm`` (biased variance): statistics and the affine in fp32, result in ``x.dtype``.

    ``elementwise_affine=False`` builds no ``scale``/``bias`` (DiTDH's ``use_rmsnorm=False`` variant); otherwise they
    are ``embed``-named parameters and ``affine=False`` at call time leaves them out (the encoders' affine-stripped
    final LayerNorm).
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, elementwise_affine: bool = True):
        self.eps = eps
        if elementwise_affine:
            self.scale = param(jnp.ones((dim,), jnp.float32), ("embed",))
            self.bias = param(jnp.zeros((dim,), jnp.float32), ("embed",))
        else:
            self.scale = self.bias = None

    def __call__(self, x: jax.Array, affine: bool = True) -> jax.Array:
        xf = x.astype(jnp.float32)
        xc = xf - jnp.mean(xf, axis=-1, keepdims=True)
        y = xc * jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + self.eps)
        if affine and self.scale is not None:
            y = y * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


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


ATTENTION_IMPLS = ("auto", "xla", "cudnn", "matmul")


def attention_impl(impl: str, dtype: Any, head_dim: int, cpu_impl: str = "xla") -> str:
    """Resolve ``'auto'``: ``'cudnn'`` on a GPU for 16-bit inputs with head_dim % 8 == 0 and <= 128, ``cpu_impl``
    on CPU, else ``'xla'``. Other values (``ATTENTION_IMPLS``) are returned as they are."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    ok = (backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
          and head_dim % 8 == 0 and head_dim <= 128)
    return "cudnn" if ok else (cpu_impl if backend == "cpu" else "xla")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = "xla") -> jax.Array:
    """``softmax(q k^T / sqrt(hd)) v`` per head: q ``[B, Lq, H, hd]``, k/v ``[B, Lk, H, hd]`` -> ``[B, Lq, H, hd]``.

    ``'xla'`` / ``'cudnn'``: ``jax.nn.dot_product_attention`` with that implementation. ``'matmul'``: heads-major
    batched matmuls accumulating in fp32, softmax in fp32, the result in ``q.dtype`` (faster on XLA:CPU; see
    ``docs/benchmarks.md``).
    """
    if impl != "matmul":
        return jax.nn.dot_product_attention(q, k, v, implementation=impl)
    dt = q.dtype
    qh, kh, vh = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, H, L, hd]
    s = jnp.matmul(qh, kh.swapaxes(-1, -2), preferred_element_type=jnp.float32)
    p = jax.nn.softmax(s * q.shape[-1] ** -0.5, axis=-1).astype(dt)
    return jnp.matmul(p, vh, preferred_element_type=jnp.float32).astype(dt).transpose(0, 2, 1, 3)


QKV_AXES = ("batch", None, "heads", None)  # q, k, v, attention output [B, L, H, hd]


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection (rows ``[q | k | v]``, heads contiguous), optional
    RoPE on q and k, ``softmax(q k^T / sqrt(hd)) v`` (logits and softmax in fp32), and an output projection."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32, impl: str = "auto"):
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLS}, got {impl!r}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.dtype, self.impl = dtype, impl
        self.qkv = Dense(dim, 3 * dim, names=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.proj = Dense(dim, dim, names=("heads", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = (constrain(qkv[:, :, i], QKV_AXES) for i in range(3))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        o = constrain(attention(q, k, v, attention_impl(self.impl, self.dtype, self.head_dim)), QKV_AXES)
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
