"""The RAE pixel decoder (``GeneralDecoder``: HF ViT-MAE-style decoder, ViT-XL) in Flax NNX, and ``RAE.decode``.

Forward: tokens ``[B, L, C]`` (de-normalised latent, row-major 16x16 grid) -> ``decoder_embed`` Linear
C -> D -> prepend the trainable [CLS] token -> ``+ decoder_pos_embed`` (fixed 2-D sin-cos, zero row for [CLS];
loaded from the checkpoint) -> N pre-LN layers (``x += O(Attn(LN(x)))``, ``x += W2(GELU(W1(LN(x))))``, exact-erf
GELU, LayerNorm eps 1e-12) -> ``decoder_norm`` -> ``decoder_pred`` Linear D -> p*p*3 -> drop [CLS] ->
unpatchify -> ``* std + mean`` (ImageNet). Images are NHWC.

``decode_latents`` adds ``RAE.decode``'s latent de-normalisation ``z * sqrt(var + 1e-5) (+ mean)``; ``to_uint8``
is the sampling scripts' conversion (clamp to [0, 1], x255, truncate).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfm_jax.models.layers import Attention, Buffer, Dense, LayerNorm, param, preset_config, sincos_pos_embed_2d
from mmfm_jax.utils import dtype_from_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LATENT_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Decoder shape. Defaults = RAE ``configs/decoder/ViTXL`` for DINOv2-B latents (415,352,704 params).

    ``dtype``: matmul dtype (``'float32'`` or ``'bfloat16'``); params, LayerNorm statistics, softmax and the output
    stay float32. ``attention``: ``'auto' | 'xla' | 'cudnn' | 'matmul'`` (see ``layers.attention_impl``).
    """

    latent_dim: int = 768
    hidden: int = 1152
    layers: int = 28
    heads: int = 16
    mlp: int = 4096
    patch: int = 16
    image_size: int = 256
    ln_eps: float = 1e-12
    channels: int = 3
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD
    dtype: str = "float32"
    attention: str = "auto"

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "XL": {},  # the official ViT-XL decoder
        # the small official decoder of the parity fixture tests/fixtures/rae_decoder_small.json
        "parity": dict(latent_dim=32, hidden=64, layers=2, heads=4, mlp=128, patch=4, image_size=64),
    }

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DecoderConfig:
        """``'XL'`` (the real decoder) or ``'parity'`` (the parity fixture's small decoder), with field overrides."""
        return preset_config(cls, cls.PRESETS, name, overrides)


class DecoderLayer(nnx.Module):
    """HF ``ViTMAELayer``: pre-LN attention and exact-GELU MLP with residuals. q/k/v are fused (rows [q | k | v])."""

    def __init__(self, cfg: DecoderConfig, dtype: Any, *, rngs: nnx.Rngs):
        self.layernorm_before = LayerNorm(cfg.hidden, cfg.ln_eps)
        self.attention = Attention(cfg.hidden, cfg.heads, dtype=dtype, impl=cfg.attention, rngs=rngs)
        self.layernorm_after = LayerNorm(cfg.hidden, cfg.ln_eps)
        self.intermediate = Dense(cfg.hidden, cfg.mlp, names=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.output = Dense(cfg.mlp, cfg.hidden, names=("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.layernorm_before(x)).astype(jnp.float32)
        h = jax.nn.gelu(self.intermediate(self.layernorm_after(x)), approximate=False)
        return x + self.output(h).astype(jnp.float32)


def decoder_pos_embed(hidden: int, grid: int) -> np.ndarray:
    """``[1, 1 + grid^2, hidden]``: a zero row for [CLS], then the MAE 2-D sin-cos table (row-major tokens)."""
    table = sincos_pos_embed_2d(hidden, grid)
    return np.concatenate([np.zeros((1, hidden), np.float32), table], axis=0)[None]


class RAEDecoder(nnx.Module):
    """RAE ``GeneralDecoder``. ``__call__(tokens [B, L, C]) -> images [B, H, W, 3]`` (ImageNet-de-normalised)."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        cfg = config
        if cfg.image_size % cfg.patch:
            raise ValueError(f"DecoderConfig: image_size {cfg.image_size} is not a multiple of patch {cfg.patch}")
        self.config = cfg
        dtype = dtype_from_name(cfg.dtype, "decoder.dtype")
        self.decoder_embed = Dense(cfg.latent_dim, cfg.hidden, names=("channels", "embed"), dtype=dtype, rngs=rngs)
        self.trainable_cls_token = param(0.02 * jax.random.normal(rngs.params(), (1, 1, cfg.hidden)),
                                         (None, None, "embed"))
        self.decoder_pos_embed = Buffer(jnp.asarray(decoder_pos_embed(cfg.hidden, cfg.grid)))
        self.decoder_layers = nnx.List([DecoderLayer(cfg, dtype, rngs=rngs) for _ in range(cfg.layers)])
        self.decoder_norm = LayerNorm(cfg.hidden, cfg.ln_eps)
        out = cfg.patch * cfg.patch * cfg.channels
        self.decoder_pred = Dense(cfg.hidden, out, names=("embed", "channels"), dtype=dtype, rngs=rngs)

    def logits(self, tokens: jax.Array) -> jax.Array:
        """tokens ``[B, L, C]`` -> per-patch predictions ``[B, L, p*p*3]`` (pixel order (p, q, c)), fp32."""
        cfg = self.config
        b, n, c = tokens.shape
        if n != cfg.num_patches or c != cfg.latent_dim:
            raise ValueError(f"RAEDecoder: expected tokens [B, {cfg.num_patches}, {cfg.latent_dim}], got "
                             f"{tokens.shape}")
        x = self.decoder_embed(tokens).astype(jnp.float32)
        cls = jnp.broadcast_to(self.trainable_cls_token[...], (b, 1, cfg.hidden))
        x = jnp.concatenate([cls, x], axis=1) + self.decoder_pos_embed[...]
        for layer in self.decoder_layers:
            x = layer(x)
        x = self.decoder_pred(self.decoder_norm(x)).astype(jnp.float32)
        return x[:, 1:]

    def unpatchify(self, logits: jax.Array) -> jax.Array:
        """``[B, L, p*p*3]`` -> ``[B, H, W, 3]`` (official einsum ``nhwpqc->nchpwq``, here kept channels-last)."""
        cfg = self.config
        b = logits.shape[0]
        x = logits.reshape(b, cfg.grid, cfg.grid, cfg.patch, cfg.patch, cfg.channels)
        x = x.transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, cfg.grid * cfg.patch, cfg.grid * cfg.patch, cfg.channels)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """De-normalised latent tokens ``[B, L, C]`` -> float images ``[B, H, W, 3]``, nominally in [0, 1]."""
        cfg = self.config
        img = self.unpatchify(self.logits(tokens))
        return img * jnp.asarray(cfg.image_std, jnp.float32) + jnp.asarray(cfg.image_mean, jnp.float32)


def latent_stats_to_tokens(stat: jax.Array | np.ndarray, num_tokens: int, dim: int) -> jax.Array:
    """A latent statistic as ``[L, C]``: accepts ``[L, C]``, the official ``[C, H, W]`` (-> ``[C, L].T``), or
    ``[C]`` / a scalar (broadcast)."""
    a = jnp.asarray(stat, jnp.float32)
    if a.ndim == 3:
        if a.shape[0] != dim or a.shape[1] * a.shape[2] != num_tokens:
            raise ValueError(f"latent stat: expected [{dim}, H, W] with H*W={num_tokens}, got {a.shape}")
        return a.reshape(dim, num_tokens).T
    if a.ndim == 2 and a.shape != (num_tokens, dim):
        raise ValueError(f"latent stat: expected [{num_tokens}, {dim}], got {a.shape}")
    if a.ndim == 1 and a.shape != (dim,):
        raise ValueError(f"latent stat: expected [{dim}], got {a.shape}")
    return jnp.broadcast_to(a, (num_tokens, dim))


def decode_latents(decoder: RAEDecoder, z: jax.Array, var: jax.Array | np.ndarray | None,
                   mean: jax.Array | np.ndarray | None = None, eps: float = LATENT_EPS) -> jax.Array:
    """``RAE.decode``: normalised latents ``z [B, L, C]`` -> images ``[B, H, W, 3]`` (float, ImageNet-de-normalised).

    ``z * sqrt(var + eps) + mean`` (``var``/``mean`` ``[L, C]`` or official ``[C, H, W]``; None = 1 / 0; the
    DINOv2-B stats have no mean), then the decoder.
    """
    cfg = decoder.config
    z = z.astype(jnp.float32)
    if var is not None:
        z = z * jnp.sqrt(latent_stats_to_tokens(var, cfg.num_patches, cfg.latent_dim) + jnp.float32(eps))
    if mean is not None:
        z = z + latent_stats_to_tokens(mean, cfg.num_patches, cfg.latent_dim)
    return decoder(z)


def to_uint8(images: jax.Array) -> jax.Array:
    """Float images in [0, 1] -> uint8 as the official sampler: clamp to [0, 1], x255, truncate (no rounding)."""
    return (jnp.clip(images.astype(jnp.float32), 0.0, 1.0) * 255.0).astype(jnp.uint8)


def abstract_decoder(config: DecoderConfig) -> RAEDecoder:
    """An ``RAEDecoder`` with abstract (shape-only) parameters, for converters and Orbax restores."""
    return nnx.eval_shape(lambda: RAEDecoder(config, rngs=nnx.Rngs(0)))
