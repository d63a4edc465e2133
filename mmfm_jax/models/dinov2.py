"""DINOv2 ViT encoder (HF ``Dinov2WithRegistersModel`` / ``Dinov2Model``) in Flax NNX, and MM-FM's ``encode``.

Input: ImageNet-normalised pixels ``[B, H, W, 3]`` (NHWC float). Output: ``last_hidden_state [B, 1 + R + L, D]``
ordered ``[CLS, R registers, L patch tokens (row-major grid)]``, after the final LayerNorm (with or without its
affine). Position embeddings: the pretrained ``G x G`` grid (37 x 37 at ``image_size`` 518) is resized to the input
grid exactly as transformers does: torch bicubic **with** antialias for the register models, **without** for plain
``Dinov2Model`` (fp32), as a pair of matmuls with fixed weights (``ops.resize.resize_token_grid``). The resized
table is precomputed per input resolution (``precompute_pos_embed``; ``load_dinov2`` does it for 224) and cached on
the module; other resolutions are computed inside the forward.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mmfm_jax.parallel  # noqa: F401  (turns off flax's eager variable sharding: logical names are metadata)
from mmfm_jax.ops.resize import resize_token_grid
from mmfm_jax.utils import dtype_from_name

_PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "giant": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True),
    # the parity fixture's tiny model (shared/parity/dinov2_reg_small.json)
    "fixture_small": dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4),
}


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    """HF-like DINOv2 config. Defaults = ``facebook/dinov2-with-registers-base``.

    ``num_register_tokens`` 0 gives the plain ``Dinov2Model``. ``pos_embed_antialias`` None = transformers' choice
    (True with registers, False without). ``dtype``: matmul/activation dtype (``'float32'`` or ``'bfloat16'``);
    parameters, LayerNorm statistics, softmax and the output stay float32. ``attention_impl``: how attention is
    computed (same numbers up to float rounding); ``'auto'`` picks heads-major batched matmuls on CPU (the attention
    part ran about 2x faster than XLA's ``dot_product_attention`` on jax 0.10.2; on par on jax 0.11.2) and
    ``jax.nn.dot_product_attention`` elsewhere.
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 14
    num_channels: int = 3
    image_size: int = 518
    num_register_tokens: int = 4
    layerscale_value: float = 1.0
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    use_swiglu_ffn: bool = False
    hidden_act: str = "gelu"
    pos_embed_antialias: bool | None = None
    dtype: str = "float32"
    attention_impl: str = "auto"  # 'dpa' (jax.nn.dot_product_attention) | 'matmul' | 'auto' (matmul on CPU)

    def __post_init__(self):
        if self.attention_impl not in ("auto", "dpa", "matmul"):
            raise ValueError(f"Dinov2Config.attention_impl: {self.attention_impl!r} not in ('auto', 'dpa', 'matmul')")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"Dinov2Config: hidden_size {self.hidden_size} not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        dtype_from_name(self.dtype, "dinov2.dtype")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def pretrained_grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        hidden = int(self.hidden_size * self.mlp_ratio)
        if self.use_swiglu_ffn:  # transformers: two thirds, rounded up to a multiple of 8
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    @property
    def antialias(self) -> bool:
        return self.num_register_tokens > 0 if self.pos_embed_antialias is None else bool(self.pos_embed_antialias)

    @classmethod
    def preset(cls, name: str, registers: bool = True, **overrides: Any) -> Dinov2Config:
        """``'small' | 'base' | 'large' | 'giant' | 'fixture_small'``; ``registers=False`` -> plain Dinov2Model."""
        if name not in _PRESETS:
            raise ValueError(f"Dinov2Config.preset: unknown {name!r} (choose from {sorted(_PRESETS)})")
        kw = dict(_PRESETS[name], num_register_tokens=4 if registers else 0)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_hf(cls, d: dict[str, Any], **overrides: Any) -> Dinov2Config:
        """From a transformers ``config.json`` dict (``model_type`` ``dinov2`` or ``dinov2_with_registers``)."""
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                kw[f.name] = d[f.name]
        for k in ("image_size", "patch_size"):
            v = kw.get(k)
            if isinstance(v, list | tuple):
                if len(set(v)) != 1:
                    raise ValueError(f"config.json: non-square {k}={v} is not supported")
                kw[k] = int(v[0])
        if "num_register_tokens" not in d:
            kw["num_register_tokens"] = 0
        if kw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"config.json: hidden_act={kw['hidden_act']!r} is not supported (only 'gelu')")
        kw.update(overrides)
        return cls(**kw)


class _Init:
    """Random initial values (tests and benchmarks only: real weights are loaded). Concrete keys draw with numpy
    (eager ``jax.random`` compiles once per shape: seconds for a whole model); traced keys (``nnx.eval_shape``,
    ``nnx.jit``) use ``jax.random``."""

    def __init__(self, rngs: nnx.Rngs):
        key = rngs.params()
        self.key, self.gen = key, None
        if not isinstance(key, jax.core.Tracer):
            self.gen = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())

    def __call__(self, shape: tuple[int, ...], names: tuple[str | None, ...], std: float | None = None,
                 value: float | None = None) -> nnx.Param:
        std = 0.02 if std is None else std
        if value is not None:
            x = jnp.asarray(np.full(shape, value, np.float32))
        elif self.gen is not None:
            x = jnp.asarray(self.gen.standard_normal(shape, dtype=np.float32) * np.float32(std))
        else:
            self.key, k = jax.random.split(self.key)
            x = jax.random.normal(k, shape, jnp.float32) * std
        return nnx.Param(x, sharding_names=names)


def layer_norm(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, eps: float) -> jax.Array:
    """LayerNorm over the last axis in float32 (biased variance, as torch); ``scale``/``bias`` None = no affine."""
    x = x.astype(jnp.float32)
    mu = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    var = jnp.mean(xc * xc, axis=-1, keepdims=True)
    y = xc * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, init: _Init):
        self.eps = eps
        self.scale = init((dim,), ("embed",), value=1.0)
        self.bias = init((dim,), ("embed",), value=0.0)

    def __call__(self, x: jax.Array, affine: bool = True) -> jax.Array:
        if not affine:
            return layer_norm(x, None, None, self.eps)
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


class Dense(nnx.Module):
    """``y = x @ kernel + bias`` with the kernel in ``[in, out]`` layout; matmul in ``dtype``, result float32."""

    def __init__(self, din: int, dout: int, names: tuple[str | None, str | None], init: _Init,
                 bias: bool = True, dtype: Any = jnp.float32):
        self.dtype = dtype
        self.kernel = init((din, dout), names, std=1.0 / math.sqrt(din))
        self.bias = init((dout,), (names[1],), value=0.0) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype), preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class Dinov2Layer(nnx.Module):
    """Pre-LN block: ``h += ls1 * Attn(LN1(h)); h += ls2 * MLP(LN2(h))`` (fused qkv projection)."""

    def __init__(self, cfg: Dinov2Config, init: _Init):
        d, dt = cfg.hidden_size, jnp.dtype(dtype_from_name(cfg.dtype))
        self.cfg = cfg
        self.dtype = dt
        self.norm1 = LayerNorm(d, cfg.layer_norm_eps, init)
        self.qkv = Dense(d, 3 * d, ("embed", "heads"), init, bias=cfg.qkv_bias, dtype=dt)
        self.proj = Dense(d, d, ("heads", "embed"), init, dtype=dt)
        self.ls1 = init((d,), ("embed",), value=cfg.layerscale_value)
        self.norm2 = LayerNorm(d, cfg.layer_norm_eps, init)
        if cfg.use_swiglu_ffn:  # fc1 = [gate | up] concatenated, fc2 = down
            self.fc1 = Dense(d, 2 * cfg.mlp_hidden, ("embed", "mlp"), init, dtype=dt)
        else:
            self.fc1 = Dense(d, cfg.mlp_hidden, ("embed", "mlp"), init, dtype=dt)
        self.fc2 = Dense(cfg.mlp_hidden, d, ("mlp", "embed"), init, dtype=dt)
        self.ls2 = init((d,), ("embed",), value=cfg.layerscale_value)

    def attention(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        h = self.cfg.num_attention_heads
        qkv = self.qkv(x).astype(self.dtype).reshape(b, n, 3, h, d // h)
        impl = self.cfg.attention_impl
        if impl == "auto":
            impl = "matmul" if jax.default_backend() == "cpu" else "dpa"
        if impl == "dpa":
            o = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        else:  # heads-major batched matmuls (faster than dot_product_attention on XLA:CPU in jax 0.10)
            qkv = qkv.transpose(2, 0, 3, 1, 4)  # [3, B, H, N, hd]
            s = jnp.matmul(qkv[0], qkv[1].swapaxes(-1, -2), preferred_element_type=jnp.float32)
            p = jax.nn.softmax(s * (d // h) ** -0.5, axis=-1).astype(self.dtype)
            o = jnp.matmul(p, qkv[2], preferred_element_type=jnp.float32).astype(self.dtype).transpose(0, 2, 1, 3)
        return self.proj(o.reshape(b, n, d))

    def mlp(self, x: jax.Array) -> jax.Array:
        y = self.fc1(x)
        if self.cfg.use_swiglu_ffn:
            gate, up = jnp.split(y, 2, axis=-1)
            y = jax.nn.silu(gate) * up
        else:
            y = jax.nn.gelu(y, approximate=False)
        return self.fc2(y)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.ls1[...] * self.attention(self.norm1(x))
        return x + self.ls2[...] * self.mlp(self.norm2(x))


class PosEmbedCache(nnx.Variable):
    """A position-embedding table resized for one input grid (derived from the parameters; not trained)."""


def interpolate_pos_embed(pos: jax.Array, grid: tuple[int, int], antialias: bool) -> jax.Array:
    """``pos [1, 1 + G*G, D]`` (pretrained square grid) -> ``[1, 1 + gh*gw, D]`` for an input grid ``(gh, gw)``.

    The CLS entry is kept; the patch grid is resized like torch ``F.interpolate(size=(gh, gw), mode='bicubic',
    align_corners=False, antialias=antialias)`` in float32 (highest precision). Returns ``pos`` unchanged when the
    grid already is ``G x G`` (transformers does not interpolate then).
    """
    n = pos.shape[1] - 1
    g = int(round(math.sqrt(n)))
    if g * g != n:
        raise ValueError(f"position embeddings: {n} patch positions are not a square grid")
    gh, gw = grid
    if (gh, gw) == (g, g):
        return pos
    patch = resize_token_grid(pos[:, 1:], (g, g), (gh, gw), antialias)
    return jnp.concatenate([pos[:, :1].astype(jnp.float32), patch], axis=1)


class Dinov2(nnx.Module):
    """DINOv2 / DINOv2-with-registers ViT. ``__call__(pixels [B, H, W, C]) -> last_hidden_state [B, 1+R+L, D]``."""

    def __init__(self, config: Dinov2Config, rngs: nnx.Rngs):
        cfg = config
        init = _Init(rngs)
        self.config = cfg
        d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
        g = cfg.pretrained_grid
        self.dtype = jnp.dtype(dtype_from_name(cfg.dtype))
        # Conv2d(k=p, s=p) as a matmul over patches flattened in (py, px, c) order.
        self.patch_embed = Dense(p * p * c, d, (None, "embed"), init, dtype=self.dtype)
        self.cls_token = init((1, 1, d), (None, None, "embed"))
        self.register_tokens = (init((1, cfg.num_register_tokens, d), (None, None, "embed"))
                                if cfg.num_register_tokens > 0 else None)
        self.position_embeddings = init((1, 1 + g * g, d), (None, None, "embed"))
        self.layers = nnx.List([Dinov2Layer(cfg, init) for _ in range(cfg.num_hidden_layers)])
        self.norm = LayerNorm(d, cfg.layer_norm_eps, init)
        self.pos_cache_grids: tuple[tuple[int, int], ...] = ()

    # -- position embeddings -----------------------------------------------------------------------------------
    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        return height // self.config.patch_size, width // self.config.patch_size

    def precompute_pos_embed(self, *image_sizes: int | tuple[int, int]) -> None:
        """Resize the position table once for each input resolution (e.g. 224) and cache it on the module."""
        for s in image_sizes:
            hw = (s, s) if isinstance(s, int) else tuple(s)
            grid = self.grid_for(*hw)
            table = interpolate_pos_embed(self.position_embeddings[...], grid, self.config.antialias)
            setattr(self, f"pos_embed_{grid[0]}x{grid[1]}", PosEmbedCache(jnp.asarray(table, jnp.float32)))
            if grid not in self.pos_cache_grids:
                self.pos_cache_grids = self.pos_cache_grids + (grid,)

    def pos_embed(self, grid: tuple[int, int]) -> jax.Array:
        """``[1, 1 + gh*gw, D]`` for ``grid``: the cached table if precomputed, else computed now."""
        if grid in self.pos_cache_grids:
            return getattr(self, f"pos_embed_{grid[0]}x{grid[1]}")[...]
        return interpolate_pos_embed(self.position_embeddings[...], grid, self.config.antialias)

    # -- forward -----------------------------------------------------------------------------------------------
    def embed(self, pixels: jax.Array) -> jax.Array:
        """Patch embedding + CLS + position embedding, then the registers after CLS: ``[B, 1+R+L, D]`` float32."""
        cfg = self.config
        b, hgt, wid, c = pixels.shape
        if c != cfg.num_channels:
            raise ValueError(f"Dinov2: expected {cfg.num_channels} channels (NHWC), got input shape {pixels.shape}")
        p = cfg.patch_size
        gh, gw = self.grid_for(hgt, wid)
        x = pixels[:, :gh * p, :gw * p].reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = self.patch_embed(x.reshape(b, gh * gw, p * p * c))
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed((gh, gw))
        if self.register_tokens is not None:
            reg = jnp.broadcast_to(self.register_tokens[...], (b, cfg.num_register_tokens, cfg.hidden_size))
            x = jnp.concatenate([x[:, :1], reg, x[:, 1:]], axis=1)
        return x

    def __call__(self, pixels: jax.Array, final_affine: bool = True) -> jax.Array:
        """pixels ``[B, H, W, C]`` (ImageNet-normalised) -> ``last_hidden_state [B, 1+R+L, D]`` float32.

        ``final_affine=False``: final LayerNorm without its weight/bias (MM-FM / RAE ``normalize: True``).
        """
        x = self.embed(pixels)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x, affine=final_affine)


def _stats_to_tokens(a: jax.Array | np.ndarray, num_tokens: int, dim: int, name: str) -> jax.Array:
    a = jnp.asarray(a, jnp.float32)
    if a.ndim == 3:  # official [C, H, W]
        if a.shape[0] != dim or a.shape[1] * a.shape[2] != num_tokens:
            raise ValueError(f"encode_mmfm: {name} has shape {a.shape}, expected [{dim}, H, W] with H*W={num_tokens}")
        return a.reshape(dim, num_tokens).T
    if a.shape != (num_tokens, dim):
        raise ValueError(f"encode_mmfm: {name} has shape {a.shape}, expected [{num_tokens}, {dim}] or [C, H, W]")
    return a


def encode_mmfm(model: Dinov2, pixels: jax.Array, stats_var: jax.Array | np.ndarray | None = None,
                stats_mean: jax.Array | np.ndarray | None = None) -> tuple[jax.Array, jax.Array]:
    """MM-FM's encoder output: ``(latent [B, L, D], cls [B, D])``, both float32.

    Final LayerNorm without affine; CLS = token 0; registers dropped; the L patch tokens (row-major grid) are
    ``(z - mean) / sqrt(var + 1e-5)`` when ``stats_var`` is given (``[C, H, W]`` official layout or ``[L, C]``;
    ``stats_mean`` subtracted only if given). CLS is not normalised. Works eagerly and inside ``jax.jit``.
    """
    gh, gw = model.grid_for(pixels.shape[1], pixels.shape[2])
    n, d = gh * gw, model.config.hidden_size
    mean = None if stats_mean is None else _stats_to_tokens(stats_mean, n, d, "stats_mean")
    var = None if stats_var is None else _stats_to_tokens(stats_var, n, d, "stats_var")
    hs = model(pixels, final_affine=False)
    cls, z = hs[:, 0], hs[:, 1 + model.config.num_register_tokens:]
    if mean is not None:
        z = z - mean
    if var is not None:
        z = z / jnp.sqrt(var + 1e-5)
    return z, cls


def make_encode_fn(model: Dinov2, stats_var: Any = None, stats_mean: Any = None):
    """A jitted ``fn(pixels) -> (latent, cls)`` over a split copy of ``model`` (graphdef/state split outside)."""
    graphdef, state = nnx.split(model)
    var = None if stats_var is None else jnp.asarray(stats_var, jnp.float32)
    mean = None if stats_mean is None else jnp.asarray(stats_mean, jnp.float32)

    @jax.jit
    def _fn(state, pixels, var, mean):
        return encode_mmfm(nnx.merge(graphdef, state), pixels, var, mean)

    return lambda pixels: _fn(state, pixels, var, mean)


def make_forward_fn(model: Dinov2, final_affine: bool = True):
    """A jitted ``fn(pixels) -> last_hidden_state`` over a split copy of ``model``."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def _fn(state, pixels):
        return nnx.merge(graphdef, state)(pixels, final_affine=final_affine)

    return lambda pixels: _fn(state, pixels)
