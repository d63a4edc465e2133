"""SigLIP vision tower (HF ``SiglipVisionModel``, which also loads the fixed-resolution SigLIP2 checkpoints such as
``google/siglip2-base-patch16-256``) with its MAP head, in Flax NNX; and MM-FM's SigLIP2-B encode.

Forward: patch embedding (Conv k = s = 16 as a Dense) + the learned position table ``[G*G, D]`` (no CLS token;
resized like transformers' ``interpolate_pos_encoding`` -- torch bicubic, ``align_corners=False``, no antialias --
when the input grid differs from the pretrained one) -> pre-LN blocks (tanh-GELU MLP) -> ``post_layernorm``.
MAP head (``SiglipMultiheadAttentionPoolingHead``): a learned probe attends to the tokens (``nn.MultiheadAttention``:
fused in-projection, rows ``[q | k | v]``), then ``y = a + MLP(LayerNorm(a))``, token 0 -> ``[B, D]``.

MM-FM (``encode_mmfm``): ``post_layernorm`` without its affine; latent = all tokens; global descriptor = the MAP
head applied to those affine-stripped tokens (the head's own LayerNorm keeps its affine), never normalised.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from mmfm_jax.models.layers import Dense, LayerNorm, attention, attention_impl, param
from mmfm_jax.models.vit_encoder import Mlp, ViTBlock, ViTConfig, normalize_latent, patchify
from mmfm_jax.ops.resize import resize_token_grid
from mmfm_jax.utils import dtype_from_name

# transformers' SiglipVisionConfig defaults (what a config.json leaves out)
HF_DEFAULTS: dict[str, Any] = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                   num_attention_heads=12, image_size=224, patch_size=16, num_channels=3,
                                   hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True)



@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig(ViTConfig):
    """Defaults = ``google/siglip2-base-patch16-256``'s vision tower."""

    image_size: int = 256
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "base": dict(HF_DEFAULTS, image_size=256),  # SigLIP2-B/16 at 256: google/siglip2-base-patch16-256
        # the tiny model of the parity fixture tests/fixtures/siglip2_small.json
        "fixture_small": dict(HF_DEFAULTS, hidden_size=48, intermediate_size=192, num_hidden_layers=2,
                              num_attention_heads=4, image_size=64),
    }

    @classmethod
    def from_hf(cls, d: dict[str, Any], **overrides: Any) -> SiglipVisionConfig:
        """From a transformers ``config.json``: a ``SiglipModel``'s (its ``vision_config``) or a
        ``SiglipVisionModel``'s (flat)."""
        vision = d.get("vision_config", d) if isinstance(d.get("vision_config"), dict) else d
        return cls.from_dict(vision, HF_DEFAULTS, **overrides)


class MAPHead(nnx.Module):
    """``SiglipMultiheadAttentionPoolingHead``: ``[B, L, D]`` -> ``[B, D]``."""

    def __init__(self, cfg: SiglipVisionConfig, *, rngs: nnx.Rngs):
        d, dtype = cfg.hidden_size, dtype_from_name(cfg.dtype, "encoder.dtype")
        self.num_heads, self.impl, self.dtype = cfg.num_attention_heads, cfg.attention_impl, dtype
        self.probe = param(jax.random.normal(rngs.params(), (1, 1, d), jnp.float32), (None, None, "embed"))
        self.q = Dense(d, d, names=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.kv = Dense(d, 2 * d, names=("embed", "heads"), dtype=dtype, rngs=rngs)
        self.out = Dense(d, d, names=("heads", "embed"), dtype=dtype, rngs=rngs)
        self.layernorm = LayerNorm(d, cfg.layer_norm_eps)
        self.mlp = Mlp(d, cfg.intermediate_size, cfg.hidden_act, dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        h = self.num_heads
        probe = jnp.broadcast_to(self.probe[...], (b, 1, d))
        q = self.q(probe).reshape(b, 1, h, d // h)
        kv = self.kv(x).reshape(b, n, 2, h, d // h)
        o = attention(q, kv[:, :, 0], kv[:, :, 1], attention_impl(self.impl, self.dtype, d // h))
        a = self.out(o.reshape(b, 1, d)).astype(jnp.float32)
        return (a + self.mlp(self.layernorm(a)))[:, 0]


class SiglipVision(nnx.Module):
    """``__call__(pixels [B, H, W, C]) -> (last_hidden_state [B, L, D], pooler_output [B, D] | None)``."""

    def __init__(self, config: SiglipVisionConfig, rngs: nnx.Rngs):
        cfg = config
        self.config = cfg
        d, p, c, g = cfg.hidden_size, cfg.patch_size, cfg.num_channels, cfg.pretrained_grid
        dtype = dtype_from_name(cfg.dtype, "encoder.dtype")
        self.patch_embed = Dense(p * p * c, d, names=(None, "embed"), dtype=dtype, rngs=rngs)
        self.position_embedding = param(0.02 * jax.random.normal(rngs.params(), (g * g, d), jnp.float32),
                                        (None, "embed"))
        self.layers = nnx.List([ViTBlock(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.post_layernorm = LayerNorm(d, cfg.layer_norm_eps)
        self.head = MAPHead(cfg, rngs=rngs) if cfg.vision_use_head else None

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        return height // self.config.patch_size, width // self.config.patch_size

    def pos_embed(self, grid: tuple[int, int]) -> jax.Array:
        """``[gh*gw, D]``: the pretrained table, resized (torch bicubic, no antialias) for another grid."""
        g = self.config.pretrained_grid
        return resize_token_grid(self.position_embedding[...], (g, g), grid)

    def tokens(self, pixels: jax.Array, final_affine: bool = True) -> jax.Array:
        """``last_hidden_state [B, L, D]`` float32 (``final_affine=False``: ``post_layernorm`` without affine)."""
        x, grid = patchify(pixels, self.config.patch_size, self.config.num_channels)
        x = self.patch_embed(x).astype(jnp.float32) + self.pos_embed(grid)
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x, affine=final_affine)

    def pool(self, tokens: jax.Array) -> jax.Array:
        if self.head is None:
            raise ValueError("SiglipVision: the config has vision_use_head=False (no MAP head)")
        return self.head(tokens)

    def __call__(self, pixels: jax.Array, final_affine: bool = True) -> tuple[jax.Array, jax.Array | None]:
        hs = self.tokens(pixels, final_affine)
        return hs, (self.head(hs) if self.head is not None else None)


def encode_mmfm(model: SiglipVision, pixels: jax.Array, stats_var: Any = None,
                stats_mean: Any = None) -> tuple[jax.Array, jax.Array]:
    """MM-FM's SigLIP2 output: ``(latent [B, L, D], global [B, D])`` float32. Latent = the affine-stripped tokens,
    normalised per position when ``stats_var`` (``[L, C]`` or ``[C, H, W]``; ``stats_mean`` if given); global =
    the MAP head on the affine-stripped tokens (not normalised)."""
    hs = model.tokens(pixels, final_affine=False)
    return normalize_latent(hs, stats_var, stats_mean), model.pool(hs)
