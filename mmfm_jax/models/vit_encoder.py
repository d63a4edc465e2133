"""The HF-style ViT image encoders' family (DINOv2, SigLIP vision tower, ViT-MAE) in Flax NNX: the config every
encoder config extends, the pre-LN block, the patch embedding and the latent normalisation.

Conventions: pixels NHWC float (already normalised with the encoder's mean/std); tokens
``[B, L, D]`` row-major over the patch grid; parameters float32 with logical axis names; ``dtype`` is the matmul
dtype; LayerNorm statistics, softmax and the residual stream stay float32. The patch embedding (torch ``Conv2d``
with kernel = stride = patch) is a Dense over patches flattened in ``(py, px, c)`` order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfm_jax.models.layers import ATTENTION_IMPLS, Attention, Dense, LayerNorm, preset_config
from mmfm_jax.utils import dtype_from_name

ACTIVATIONS = ("gelu", "gelu_pytorch_tanh")
NORM_EPS = 1e-5  # latent statistics: z / sqrt(var + 1e-5)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Shape of a pre-LN ViT encoder (HF field names). ``dtype``: matmul dtype (``'float32'`` | ``'bfloat16'``).
    ``attention_impl``: ``'auto' | 'xla' | 'cudnn' | 'matmul'`` (``layers.attention_impl``). Subclasses name their
    configurations in ``PRESETS`` (complete field dicts) for :meth:`preset`."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    dtype: str = "float32"
    attention_impl: str = "auto"

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"{type(self).__name__}.hidden_act: {self.hidden_act!r} not in {ACTIVATIONS}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{type(self).__name__}: hidden_size {self.hidden_size} not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"{type(self).__name__}.attention_impl: {self.attention_impl!r} not in {ATTENTION_IMPLS}")
        dtype_from_name(self.dtype, "encoder.dtype")

    @property
    def pretrained_grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def preset(cls, name: str, **overrides: Any):
        """The configuration ``cls.PRESETS[name]`` with field ``overrides``."""
        return preset_config(cls, cls.PRESETS, name, overrides)

    @classmethod
    def from_dict(cls, d: dict[str, Any], defaults: dict[str, Any], **overrides: Any):
        """From a transformers config dict (missing keys take the transformers ``defaults``); unknown keys are
        ignored, non-square sizes refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in {**defaults, **d}.items() if k in names}
        for k in ("image_size", "patch_size"):
            v = kw.get(k)
            if isinstance(v, list | tuple):
                if len(set(v)) != 1:
                    raise ValueError(f"config.json: non-square {k}={v} is not supported")
                kw[k] = int(v[0])
        kw.update(overrides)
        return cls(**kw)


def gelu(x: jax.Array, act: str) -> jax.Array:
    """``'gelu'`` (exact erf) or ``'gelu_pytorch_tanh'``."""
    return jax.nn.gelu(x, approximate=act == "gelu_pytorch_tanh")


class Mlp(nnx.Module):
    """``fc2(act(fc1(x)))``, float32 result."""

    def __init__(self, dim: int, hidden: int, act: str, dtype: Any, *, rngs: nnx.Rngs):
        self.act = act
        self.fc1 = Dense(dim, hidden, names=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.fc2 = Dense(hidden, dim, names=("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x), self.act)).astype(jnp.float32)


class ViTBlock(nnx.Module):
    """Pre-LN block ``h += Attn(LN1(h)); h += MLP(LN2(h))`` with a fused qkv projection (rows ``[q | k | v]``)."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        d, dtype = cfg.hidden_size, dtype_from_name(cfg.dtype, "encoder.dtype")
        self.norm1 = LayerNorm(d, cfg.layer_norm_eps)
        self.attn = Attention(d, cfg.num_attention_heads, dtype=dtype, impl=cfg.attention_impl, rngs=rngs)
        self.norm2 = LayerNorm(d, cfg.layer_norm_eps)
        self.mlp = Mlp(d, cfg.intermediate_size, cfg.hidden_act, dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x)).astype(jnp.float32)
        return x + self.mlp(self.norm2(x))


def patchify(pixels: jax.Array, patch: int, channels: int) -> tuple[jax.Array, tuple[int, int]]:
    """``[B, H, W, C]`` -> (``[B, gh*gw, p*p*C]`` in ``(py, px, c)`` order, ``(gh, gw)``); a remainder that does
    not fill a patch is dropped, as torch's strided convolution does."""
    b, h, w, c = pixels.shape
    if c != channels:
        raise ValueError(f"encoder: expected {channels} channels (NHWC), got input shape {pixels.shape}")
    gh, gw = h // patch, w // patch
    if gh == 0 or gw == 0:
        raise ValueError(f"encoder: input {h}x{w} is smaller than one {patch}x{patch} patch")
    x = pixels[:, :gh * patch, :gw * patch].reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * gw, patch * patch * c), (gh, gw)


def stats_to_tokens(a: jax.Array | np.ndarray, num_tokens: int, dim: int, name: str) -> jax.Array:
    """A latent statistic as ``[L, C]`` float32 (accepts ours ``[L, C]`` or the official ``[C, H, W]``)."""
    a = jnp.asarray(a, jnp.float32)
    if a.ndim == 3:
        if a.shape[0] != dim or a.shape[1] * a.shape[2] != num_tokens:
            raise ValueError(f"encode_mmfm: {name} has shape {a.shape}, expected [{dim}, H, W] with H*W={num_tokens}")
        return a.reshape(dim, num_tokens).T
    if a.shape != (num_tokens, dim):
        raise ValueError(f"encode_mmfm: {name} has shape {a.shape}, expected [{num_tokens}, {dim}] or [C, H, W]")
    return a


def normalize_latent(z: jax.Array, stats_var: Any = None, stats_mean: Any = None) -> jax.Array:
    """``(z - mean) / sqrt(var + 1e-5)`` per position for ``z [B, L, C]`` (each part only when given)."""
    _, n, d = z.shape
    if stats_mean is not None:
        z = z - stats_to_tokens(stats_mean, n, d, "stats_mean")
    if stats_var is not None:
        z = z / jnp.sqrt(stats_to_tokens(stats_var, n, d, "stats_var") + NORM_EPS)
    return z
