"""ViT-MAE encoder (HF ``ViTMAEForPreTraining(...).vit``, ``facebook/vit-mae-base``) in Flax NNX, without masking;
and MM-FM's MAE-B encode.

MM-FM sets ``mask_ratio = 0`` and passes ``noise = arange(num_patches)``: ``argsort(noise)`` is the identity, so
every patch is kept in order and the random masking is a no-op (not implemented here). Forward: patch embedding +
the patch rows of the position table, then ``[CLS + table row 0]`` in front -> pre-LN blocks (exact-GELU MLP) ->
final ``layernorm`` (eps 1e-12). ``interpolate_pos_encoding=True``: the checkpoint's ``G x G`` (+ CLS) table
(14 x 14 for ``image_size`` 224) is resized to the input grid (16 x 16 at 256 px) with torch bicubic,
``align_corners=False``, no antialias (cubic a = -0.75), the CLS row kept.

MM-FM (``encode_mmfm``): final LayerNorm without affine; latent = tokens ``1:``; global descriptor = token 0 (never
normalised).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfm_jax.models.layers import Dense, LayerNorm, param, sincos_pos_embed_2d
from mmfm_jax.models.vit_encoder import ViTBlock, ViTConfig, normalize_latent, patchify
from mmfm_jax.ops.resize import resize_token_grid
from mmfm_jax.utils import dtype_from_name

# transformers' ViTMAEConfig defaults (what a config.json leaves out)
HF_DEFAULTS: dict[str, Any] = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                   num_attention_heads=12, image_size=224, patch_size=16, num_channels=3,
                                   hidden_act="gelu", layer_norm_eps=1e-12)



@dataclasses.dataclass(frozen=True)
class MAEConfig(ViTConfig):
    """Defaults = ``facebook/vit-mae-base``'s encoder (pretrained at 224: a 14 x 14 position table)."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "base": dict(HF_DEFAULTS),  # ViT-MAE-B/16: facebook/vit-mae-base
        # the tiny model of the parity fixture tests/fixtures/mae_small.json
        "fixture_small": dict(HF_DEFAULTS, hidden_size=48, intermediate_size=192, num_hidden_layers=2,
                              num_attention_heads=4, image_size=48),
    }

    @classmethod
    def from_hf(cls, d: dict[str, Any], **overrides: Any) -> MAEConfig:
        """From a transformers ``config.json`` (``model_type`` ``vit_mae``); ``qkv_bias`` must be true."""
        if not d.get("qkv_bias", True):
            raise ValueError("config.json: qkv_bias=false is not supported")
        return cls.from_dict(d, HF_DEFAULTS, **overrides)


def mae_pos_table(dim: int, grid: int) -> np.ndarray:
    """``[1, 1 + grid^2, dim]``: a zero CLS row, then the fixed 2-D sin-cos table (what ViT-MAE initialises and
    stores); the random-init models use it, loaded models take the checkpoint's."""
    return np.concatenate([np.zeros((1, dim), np.float32), sincos_pos_embed_2d(dim, grid)])[None]


class ViTMAEEncoder(nnx.Module):
    """``__call__(pixels [B, H, W, C]) -> last_hidden_state [B, 1 + L, D]`` (CLS first)."""

    def __init__(self, config: MAEConfig, rngs: nnx.Rngs):
        cfg = config
        self.config = cfg
        d, p, c, g = cfg.hidden_size, cfg.patch_size, cfg.num_channels, cfg.pretrained_grid
        dtype = dtype_from_name(cfg.dtype, "encoder.dtype")
        self.patch_embed = Dense(p * p * c, d, names=(None, "embed"), dtype=dtype, rngs=rngs)
        self.cls_token = param(0.02 * jax.random.normal(rngs.params(), (1, 1, d), jnp.float32), (None, None, "embed"))
        self.position_embeddings = param(jnp.asarray(mae_pos_table(d, g)), (None, None, "embed"))
        self.layers = nnx.List([ViTBlock(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.layernorm = LayerNorm(d, cfg.layer_norm_eps)

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        return height // self.config.patch_size, width // self.config.patch_size

    def pos_embed(self, grid: tuple[int, int]) -> jax.Array:
        """``[1, 1 + gh*gw, D]`` float32: CLS row kept, the grid resized (torch bicubic, no antialias) if needed."""
        g = self.config.pretrained_grid
        pos = self.position_embeddings[...].astype(jnp.float32)
        return jnp.concatenate([pos[:, :1], resize_token_grid(pos[:, 1:], (g, g), grid)], axis=1)

    def __call__(self, pixels: jax.Array, final_affine: bool = True) -> jax.Array:
        x, grid = patchify(pixels, self.config.patch_size, self.config.num_channels)
        pos = self.pos_embed(grid)
        x = self.patch_embed(x).astype(jnp.float32) + pos[:, 1:]
        cls = jnp.broadcast_to(self.cls_token[...] + pos[:, :1], (x.shape[0], 1, x.shape[2]))
        x = jnp.concatenate([cls, x], axis=1)
        for layer in self.layers:
            x = layer(x)
        return self.layernorm(x, affine=final_affine)


def encode_mmfm(model: ViTMAEEncoder, pixels: jax.Array, stats_var: Any = None,
                stats_mean: Any = None) -> tuple[jax.Array, jax.Array]:
    """MM-FM's MAE output: ``(latent [B, L, D], global [B, D])`` float32. Affine-stripped final LayerNorm;
    latent = tokens 1: (normalised per position when ``stats_var`` / ``stats_mean`` are given: the MAE statistics
    carry a mean); global = token 0, not normalised."""
    hs = model(pixels, final_affine=False)
    return normalize_latent(hs[:, 1:], stats_var, stats_mean), hs[:, 0]
