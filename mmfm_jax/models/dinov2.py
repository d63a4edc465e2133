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
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfm_jax.models.layers import Dense, HostRandom, LayerNorm, attention, attention_impl, param
from mmfm_jax.models.vit_encoder import ViTConfig, gelu, normalize_latent, patchify
from mmfm_jax.ops.resize import resize_token_grid
from mmfm_jax.utils import dtype_from_name


@dataclasses.dataclass(frozen=True)
class Dinov2Config(ViTConfig):
    """HF-like DINOv2 config: a ``ViTConfig`` with DINOv2's options (registers, LayerScale, SwiGLU FFN).
    Defaults = ``facebook/dinov2-with-registers-base``.

    ``num_register_tokens`` 0 gives the plain ``Dinov2Model``. ``layerscale_value``: initial LayerScale (``ls1``,
    ``ls2``). ``intermediate_size`` None: the MLP width from ``mlp_ratio`` as transformers computes it.
    ``pos_embed_antialias`` None = transformers' choice (True with registers, False without). ``dtype``:
    matmul/activation dtype (``'float32'`` or ``'bfloat16'``); parameters, LayerNorm statistics, softmax and the
    output stay float32. ``attention_impl``: ``'auto'`` picks heads-major batched matmuls (``'matmul'``) on CPU and
    ``layers.attention_impl``'s choice elsewhere (same numbers up to float rounding).
    """

    intermediate_size: int | None = None
    image_size: int = 518
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    layerscale_value: float = 1.0
    qkv_bias: bool = True
    use_swiglu_ffn: bool = False
    pos_embed_antialias: bool | None = None

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
        "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
        "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
        "giant": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True),
        # the tiny model of the parity fixture tests/fixtures/dinov2_reg_small.json
        "fixture_small": dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4),
    }

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mlp_hidden(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        hidden = int(self.hidden_size * self.mlp_ratio)
        if self.use_swiglu_ffn:  # transformers: two thirds, rounded up to a multiple of 8
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    @property
    def antialias(self) -> bool:
        return self.num_register_tokens > 0 if self.pos_embed_antialias is None else bool(self.pos_embed_antialias)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Dinov2Config:
        """``'small' | 'base' | 'large' | 'giant' | 'fixture_small'``, with registers; ``num_register_tokens=0``
        gives the plain ``Dinov2Model``."""
        return super().preset(name, **overrides)

    @classmethod
    def from_hf(cls, d: dict[str, Any], **overrides: Any) -> Dinov2Config:
        """From a transformers ``config.json`` dict (``model_type`` ``dinov2`` or ``dinov2_with_registers``); keys it
        leaves out take this class's defaults, except ``num_register_tokens`` (0)."""
        return cls.from_dict(d, dict(num_register_tokens=0), **overrides)


class Dinov2Layer(nnx.Module):
    """Pre-LN block: ``h += ls1 * Attn(LN1(h)); h += ls2 * MLP(LN2(h))`` (fused qkv projection). Matmuls in the
    config's dtype accumulate into float32 (the residual stream stays float32)."""

    def __init__(self, cfg: Dinov2Config, init: HostRandom, *, rngs: nnx.Rngs):
        d, dt = cfg.hidden_size, jnp.dtype(dtype_from_name(cfg.dtype))
        self.cfg = cfg
        self.dtype = dt

        def dense(din: int, dout: int, names: tuple[str, str], bias: bool = True) -> Dense:
            return Dense(din, dout, names=names, use_bias=bias, kernel_init=init.init(1.0 / math.sqrt(din)),
                         bias_init=nnx.initializers.zeros, dtype=dt, out_dtype=jnp.float32, rngs=rngs)

        self.norm1 = LayerNorm(d, cfg.layer_norm_eps)
        self.qkv = dense(d, 3 * d, ("embed", "heads"), bias=cfg.qkv_bias)
        self.proj = dense(d, d, ("heads", "embed"))
        self.ls1 = param(jnp.full((d,), cfg.layerscale_value, jnp.float32), ("embed",))
        self.norm2 = LayerNorm(d, cfg.layer_norm_eps)
        # SwiGLU: fc1 = [gate | up] concatenated, fc2 = down
        self.fc1 = dense(d, (2 if cfg.use_swiglu_ffn else 1) * cfg.mlp_hidden, ("embed", "mlp"))
        self.fc2 = dense(cfg.mlp_hidden, d, ("mlp", "embed"))
        self.ls2 = param(jnp.full((d,), cfg.layerscale_value, jnp.float32), ("embed",))

    def attention(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        h = self.cfg.num_attention_heads
        qkv = self.qkv(x).astype(self.dtype).reshape(b, n, 3, h, d // h)
        impl = attention_impl(self.cfg.attention_impl, self.dtype, d // h, cpu_impl="matmul")
        o = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], impl)
        return self.proj(o.reshape(b, n, d))

    def mlp(self, x: jax.Array) -> jax.Array:
        y = self.fc1(x)
        if self.cfg.use_swiglu_ffn:
            gate, up = jnp.split(y, 2, axis=-1)
            y = jax.nn.silu(gate) * up
        else:
            y = gelu(y, self.cfg.hidden_act)
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
        init = HostRandom(rngs)
        self.config = cfg
        d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
        g = cfg.pretrained_grid
        self.dtype = jnp.dtype(dtype_from_name(cfg.dtype))
        # Conv2d(k=p, s=p) as a matmul over patches flattened in (py, px, c) order.
        self.patch_embed = Dense(p * p * c, d, names=(None, "embed"), kernel_init=init.init(1 / math.sqrt(p * p * c)),
                                 bias_init=nnx.initializers.zeros, dtype=self.dtype, out_dtype=jnp.float32, rngs=rngs)
        self.cls_token = param(init.normal((1, 1, d)), (None, None, "embed"))
        self.register_tokens = (param(init.normal((1, cfg.num_register_tokens, d)), (None, None, "embed"))
                                if cfg.num_register_tokens > 0 else None)
        self.position_embeddings = param(init.normal((1, 1 + g * g, d)), (None, None, "embed"))
        self.layers = nnx.List([Dinov2Layer(cfg, init, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = LayerNorm(d, cfg.layer_norm_eps)
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
        b = pixels.shape[0]
        x, (gh, gw) = patchify(pixels, cfg.patch_size, cfg.num_channels)
        x = self.patch_embed(x)
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


def encode_mmfm(model: Dinov2, pixels: jax.Array, stats_var: jax.Array | np.ndarray | None = None,
                stats_mean: jax.Array | np.ndarray | None = None) -> tuple[jax.Array, jax.Array]:
    """MM-FM's encoder output: ``(latent [B, L, D], cls [B, D])``, both float32.

    Final LayerNorm without affine; CLS = token 0; registers dropped; the L patch tokens (row-major grid) are
    ``(z - mean) / sqrt(var + 1e-5)`` when ``stats_var`` is given (``[C, H, W]`` official layout or ``[L, C]``;
    ``stats_mean`` subtracted only if given). CLS is not normalised. Works eagerly and inside ``jax.jit``.
    """
    hs = model(pixels, final_affine=False)
    cls, z = hs[:, 0], hs[:, 1 + model.config.num_register_tokens:]
    return normalize_latent(z, stats_var, stats_mean), cls


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
