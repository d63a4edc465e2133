"""DiTDH (``DiTwDDTHead`` of RAE / MM-FM) in Flax NNX.

A DiT body ("s-branch") on the noisy latent with a fixed 2-D sin-cos position embedding and RoPE, conditioned on
``c = SiLU(t_emb [+ mode_emb])``; then ``s = SiLU(t_emb + s)`` per token, projected to the wide DDT head, which
re-embeds the noisy input and is conditioned per token on ``s``; a final adaLN layer gives the velocity, as the
official ``DiTwDDTHead`` (its state-dict layout: ``convert.ditdh``).

Conventions: input/output tokens-last ``[B, L, C_in]`` with ``L = H*W`` row-major (the official model uses
``[B, C, H, W]``: convert only at the edges); ``t`` in [0, 1] with t = 0 data, t = 1 source; the output is the
velocity ``x_source - x_data`` in fp32. Parameters are fp32; ``config.dtype`` is the matmul compute dtype; the
residual stream stays fp32 (as under torch autocast).

``head='gm'`` (GMFlow, ``docs/gmflow.md``): the final linear layer emits ``p^2 K (C_in + 1)`` channels per token
(xavier-uniform, zero bias: GMFlow's ``proj_out_2``; the velocity head keeps its zero init), unpatchified to
``K (C_in + 1)`` per latent pixel and split by ``models.gm_head.GMHead.split`` into K velocity means and K logits;
the shared log-std per sample comes from GMHead's MLP on the stop-gradient conditioning ``t_emb [+ mode_emb]``
(zero-initialised last layer: s = 1 at init). The model then returns the velocity GM
``ops.gm.GM(means [B, L, K, C_in], logweights [B, L, K], logstds [B, 1, 1, 1])`` in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from mmfm_jax.models.gm_head import GMHead
from mmfm_jax.models.layers import (
    ATTENTION_IMPLS,
    REMAT_POLICIES,
    Attention,
    Buffer,
    Dense,
    GaussianFourierEmbedding,
    GeluMlp,
    LayerNorm,
    RMSNorm,
    SwiGLU,
    maybe_remat,
    modulate,
    normal,
    param,
    preset_config,
    rope_2d_tables,
    sincos_pos_embed_2d,
    swiglu_hidden,
    xavier_uniform,
    zeros,
)
from mmfm_jax.ops.gm import GM
from mmfm_jax.parallel import constrain
from mmfm_jax.utils import dtype_from_name


@dataclass(frozen=True)
class DiTDHConfig:
    """DiTDH hyper-parameters. Pairs are ``(s-branch, head)``. ``num_modes`` is the mode/label table size
    (8192 for MM-FM GMM runs; 1000 for the Gaussian baseline). ``dtype``: matmul compute dtype
    (``'float32' | 'bfloat16'``), params are always fp32. ``residual_dtype``: dtype of the residual streams (and
    of the per-token conditioning) between blocks: ``'float32'`` as the official model under torch autocast (the
    default), ``'bfloat16'`` halves their memory traffic (an option for speed; normalisation statistics stay fp32).
    ``scan_layers``: scan over the identical s-branch blocks (faster compile; parameters stacked on a leading
    ``layers`` axis). ``remat``: ``'none' | 'block' | 'dots' | 'dots_all'``. ``attn_impl``:
    ``'auto' | 'xla' | 'cudnn' | 'matmul'`` (auto: cuDNN flash attention on GPU in bf16; ``layers.attention_impl``).
    Speed of these options on GPUs: ``docs/benchmarks.md`` ("Training").

    ``head``: ``'velocity'`` (the official model) or ``'gm'`` (GMFlow's Gaussian-mixture head: ``gm_components``
    K components per latent pixel, log-std MLP of width ``gm_logstd_inner``, or a fixed ``gm_constant_logstd``)."""

    in_channels: int = 768
    input_size: int = 16
    patch_size: int = 1
    hidden_size: tuple[int, int] = (1152, 2048)
    depth: tuple[int, int] = (28, 2)
    num_heads: tuple[int, int] = (16, 16)
    mlp_ratio: float = 4.0
    num_modes: int = 8192
    use_y_conditioning: bool = True
    use_rope: bool = True
    use_swiglu: bool = True
    use_rmsnorm: bool = True
    use_pos_embed: bool = True
    dtype: str = "float32"
    residual_dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"
    attn_impl: str = "auto"
    head: str = "velocity"
    time_embed_size: int = 256
    gm_components: int = 8
    gm_logstd_inner: int = 1024
    gm_constant_logstd: float | None = None

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "XL": dict(hidden_size=(1152, 2048), depth=(28, 2), num_heads=(16, 16)),
        "S": dict(hidden_size=(384, 2048), depth=(12, 2), num_heads=(6, 16)),
        # tests / demo: tiny widths; override in_channels/input_size for the data at hand
        "tiny": dict(in_channels=16, input_size=8, hidden_size=(64, 96), depth=(2, 1), num_heads=(4, 4),
                     num_modes=16),
        # the small official model of the parity fixture tests/fixtures/ditdh_small.json
        "parity": dict(in_channels=32, input_size=16, hidden_size=(64, 96), depth=(2, 1), num_heads=(4, 4),
                       num_modes=16),
    }

    @classmethod
    def preset(cls, name: str = "XL", **overrides: Any) -> DiTDHConfig:
        """A preset (``'XL' | 'S' | 'tiny' | 'parity'``) with field overrides, e.g.
        ``DiTDHConfig.preset('S', num_modes=1000)``."""
        return preset_config(cls, cls.PRESETS, name, overrides)

    def __post_init__(self):
        for f in ("hidden_size", "depth", "num_heads"):
            v = getattr(self, f)
            object.__setattr__(self, f, tuple(int(a) for a in (v if isinstance(v, (list, tuple)) else (v, v))))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field."""
        def bad(field: str, why: str):
            raise ValueError(f"DiTDHConfig.{field} = {getattr(self, field)!r}: {why}")

        for f in ("hidden_size", "depth", "num_heads"):
            if len(getattr(self, f)) != 2:
                bad(f, "must be a pair (s-branch, head)")
        for f in ("hidden_size", "depth", "num_heads"):
            if any(d <= 0 for d in getattr(self, f)):
                bad(f, "both entries must be > 0")
        for i in range(2):
            if self.hidden_size[i] % self.num_heads[i]:
                bad("num_heads", f"does not divide hidden_size {self.hidden_size}")
            hd = self.hidden_size[i] // self.num_heads[i]
            if self.use_rope and hd % 4:
                bad("num_heads", f"RoPE needs head_dim % 4 == 0, got head_dim {hd}")
        if self.use_pos_embed and self.hidden_size[0] % 4:
            bad("hidden_size", "the 2-D sin-cos position embedding needs hidden_size[0] % 4 == 0")
        if self.patch_size <= 0 or self.input_size % self.patch_size:
            bad("patch_size", f"must divide input_size={self.input_size}")
        if self.use_y_conditioning and self.num_modes <= 0:
            bad("num_modes", "must be > 0 when use_y_conditioning is True")
        if self.dtype not in ("float32", "bfloat16", "fp32", "bf16"):
            bad("dtype", "must be 'float32' or 'bfloat16'")
        if self.residual_dtype not in ("float32", "bfloat16"):
            bad("residual_dtype", "must be 'float32' (as under torch autocast) or 'bfloat16'")
        if self.remat not in REMAT_POLICIES:
            bad("remat", f"must be one of {sorted(REMAT_POLICIES)}")
        if self.attn_impl not in ATTENTION_IMPLS:
            bad("attn_impl", f"must be one of {ATTENTION_IMPLS}")
        if self.head not in HEADS:
            bad("head", f"must be one of {HEADS}")
        if self.head == "gm":
            if self.gm_components < 1:
                bad("gm_components", "must be >= 1")
            if self.gm_constant_logstd is None and self.gm_logstd_inner < 1:
                bad("gm_logstd_inner", "must be >= 1")

    @property
    def grid(self) -> int:
        """Tokens per side after patching."""
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid ** 2

    @property
    def token_channels(self) -> int:
        """Channels per token seen by the embedders (``in_channels * p * p``)."""
        return self.in_channels * self.patch_size ** 2

    @property
    def out_token_channels(self) -> int:
        """Channels per token of the final linear layer: ``token_channels`` (velocity) or
        ``p^2 K (in_channels + 1)`` (GM head: K means of C channels and K logits per latent pixel)."""
        if self.head == "gm":
            return self.patch_size ** 2 * self.gm_components * (self.in_channels + 1)
        return self.token_channels


HEADS = ("velocity", "gm")
# activations [B, L, D] split on the batch (parallel.constrain; a no-op outside parallel.activation_sharding)
TOKENS = ("batch", None, None)


# ------------------------------------------------------------------------------------------------------------


class DDTBlock(nnx.Module):
    """``LightningDDTBlock``: 6-way adaLN (shift/scale/gate for attention and MLP) from ``Linear(SiLU(c))``."""

    def __init__(self, dim: int, heads: int, cfg: DiTDHConfig, *, rngs: nnx.Rngs):
        dt = dtype_from_name(cfg.dtype)
        norm = (lambda: RMSNorm(dim)) if cfg.use_rmsnorm else (lambda: LayerNorm(dim, elementwise_affine=False))
        self.norm1, self.norm2 = norm(), norm()
        self.attn = Attention(dim, heads, dtype=dt, impl=cfg.attn_impl, rngs=rngs)
        if cfg.use_swiglu:
            self.mlp = SwiGLU(dim, swiglu_hidden(dim, cfg.mlp_ratio), dtype=dt, rngs=rngs)
        else:
            self.mlp = GeluMlp(dim, int(dim * cfg.mlp_ratio), dtype=dt, rngs=rngs)
        self.adaLN = Dense(dim, 6 * dim, names=("embed", "mlp"), kernel_init=zeros, bias_init=zeros, dtype=dt,
                           rngs=rngs)

    def __call__(self, x: jax.Array, c: jax.Array, rope: tuple[jax.Array, jax.Array] | None) -> jax.Array:
        """x: ``[B, L, D]`` (fp32 residual); c: ``[B, D]`` or per-token ``[B, L, D]``."""
        x = constrain(x, TOKENS)
        m = self.adaLN(jax.nn.silu(c))
        if m.ndim == 2:
            m = m[:, None, :]
        sh1, sc1, g1, sh2, sc2, g2 = jnp.split(constrain(m, TOKENS), 6, axis=-1)
        x = x + g1 * constrain(self.attn(modulate(self.norm1(x), sh1, sc1), rope), TOKENS)
        x = x + g2 * constrain(self.mlp(modulate(self.norm2(x), sh2, sc2)), TOKENS)
        return constrain(x, TOKENS)


class FinalLayer(nnx.Module):
    """``linear(norm(x) * (1 + scale) + shift)`` with ``(shift, scale) = Linear(SiLU(c))`` per token (no gate)."""

    def __init__(self, dim: int, out: int, cfg: DiTDHConfig, *, rngs: nnx.Rngs, kernel_init: Any = zeros):
        dt = dtype_from_name(cfg.dtype)
        self.norm = RMSNorm(dim) if cfg.use_rmsnorm else LayerNorm(dim, elementwise_affine=False)
        self.adaLN = Dense(dim, 2 * dim, names=("embed", "mlp"), kernel_init=zeros, bias_init=zeros, dtype=dt,
                           rngs=rngs)
        self.linear = Dense(dim, out, names=("embed", "channels"), kernel_init=kernel_init, bias_init=zeros,
                            dtype=dt, rngs=rngs)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.adaLN(jax.nn.silu(c)), 2, axis=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


def _block_fn(block: DDTBlock, x: jax.Array, c: jax.Array, cos: jax.Array | None, sin: jax.Array | None):
    return block(x, c, None if cos is None else (cos, sin))


class DiTDH(nnx.Module):
    """``DiTDH(config, rngs)(x [B, L, C_in], t [B], y [B] int or None) -> velocity [B, L, C_in]`` (fp32), or with
    ``head='gm'`` the velocity GM ``GM(means [B, L, K, C_in], logweights [B, L, K], logstds [B, 1, 1, 1])`` (fp32).

    Initialised as the official model for training from scratch: patch embedders xavier-uniform / zero bias, mode
    table N(0, 0.02), t-MLP weights N(0, 0.02), adaLN and final linear zero, the rest PyTorch defaults.
    ``pos_embed`` and ``t_embedder.W`` are ``Buffer``s (non-trainable; saved and loaded).
    """

    def __init__(self, config: DiTDHConfig, rngs: nnx.Rngs):
        cfg = self.config = config
        dt = dtype_from_name(cfg.dtype)
        ds, dh = cfg.hidden_size
        cin = cfg.token_channels
        self.s_embedder = Dense(cin, ds, names=("channels", "embed"), kernel_init=xavier_uniform(),
                                bias_init=zeros, dtype=dt, rngs=rngs)
        self.x_embedder = Dense(cin, dh, names=("channels", "embed"), kernel_init=xavier_uniform(),
                                bias_init=zeros, dtype=dt, rngs=rngs)
        self.s_projector = (Dense(ds, dh, names=("embed", "mlp"), dtype=dt, rngs=rngs) if ds != dh else None)
        self.t_embedder = GaussianFourierEmbedding(ds, cfg.time_embed_size, rngs=rngs)
        self.y_embedder = (param(normal(0.02)(rngs.params(), (cfg.num_modes, ds), jnp.float32), ("vocab", "embed"))
                           if cfg.use_y_conditioning else None)
        self.pos_embed = Buffer(jnp.asarray(sincos_pos_embed_2d(ds, cfg.grid))) if cfg.use_pos_embed else None

        if cfg.scan_layers:
            @nnx.split_rngs(splits=cfg.depth[0])
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make(r):
                return DDTBlock(ds, cfg.num_heads[0], cfg, rngs=r)

            self.blocks = make(rngs)
        else:
            self.blocks = nnx.List([DDTBlock(ds, cfg.num_heads[0], cfg, rngs=rngs) for _ in range(cfg.depth[0])])
        self.head_blocks = nnx.List([DDTBlock(dh, cfg.num_heads[1], cfg, rngs=rngs) for _ in range(cfg.depth[1])])
        if cfg.head == "gm":
            self.final_layer = FinalLayer(dh, cfg.out_token_channels, cfg, rngs=rngs, kernel_init=xavier_uniform())
            self.gm_head = GMHead(dh, cfg.in_channels, cfg.gm_components, ds, rngs=rngs,
                                  constant_logstd=cfg.gm_constant_logstd, logstd_inner_dim=cfg.gm_logstd_inner,
                                  project=False)
        else:
            self.final_layer = FinalLayer(dh, cin, cfg, rngs=rngs)
            self.gm_head = None

    # -- tokens <-> patches (identity for patch_size 1) --------------------------------------------------------

    def _patchify(self, x: jax.Array) -> jax.Array:
        p, g, b = self.config.patch_size, self.config.grid, x.shape[0]
        if p == 1:
            return x
        x = x.reshape(b, g, p, g, p, -1).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, g * g, -1)

    def _unpatchify(self, x: jax.Array) -> jax.Array:
        p, g, b = self.config.patch_size, self.config.grid, x.shape[0]
        if p == 1:
            return x
        x = x.reshape(b, g, g, p, p, -1).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, g * p * g * p, -1)

    def _rope(self, head_dim: int) -> tuple[jax.Array, jax.Array] | tuple[None, None]:
        if not self.config.use_rope:
            return None, None
        cos, sin = rope_2d_tables(head_dim, self.config.grid)
        return jnp.asarray(cos), jnp.asarray(sin)

    def _scan_blocks(self, s: jax.Array, c: jax.Array, cos: jax.Array | None, sin: jax.Array | None) -> jax.Array:
        """``jax.lax.scan`` over the stacked s-branch blocks. A plain scan (not ``nnx.scan``) so the per-layer
        parameters are only read: nothing is written back into stacked outputs on every iteration."""
        gdef, stacked = nnx.split(self.blocks)

        def body(h, layer_state):
            return _block_fn(nnx.merge(gdef, layer_state), h, c, cos, sin), None

        policy = REMAT_POLICIES[self.config.remat]
        if self.config.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        return jax.lax.scan(body, s, stacked)[0]

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None) -> jax.Array | GM:
        cfg = self.config
        expect = (cfg.input_size ** 2, cfg.in_channels)
        if x.ndim != 3 or tuple(x.shape[1:]) != expect:
            raise ValueError(f"DiTDH input must be [B, {expect[0]}, {expect[1]}] (tokens-last), got {x.shape}")
        ds, dh = cfg.hidden_size
        x = self._patchify(x.astype(jnp.float32))
        t_emb = self.t_embedder(t)  # [B, Ds] fp32
        if cfg.use_y_conditioning:
            if y is None:
                raise ValueError("DiTDH: y is required when use_y_conditioning=True")
            cond = t_emb + jnp.take(self.y_embedder[...], y.astype(jnp.int32), axis=0)
        else:
            cond = t_emb
        c = constrain(jax.nn.silu(cond), TOKENS[:2])

        rdt = dtype_from_name(cfg.residual_dtype)
        s = self.s_embedder(x).astype(jnp.float32)
        if self.pos_embed is not None:
            s = s + self.pos_embed[...][None]
        s = constrain(s.astype(rdt), TOKENS)
        cos, sin = self._rope(ds // cfg.num_heads[0])
        fn = maybe_remat(_block_fn, cfg.remat)
        if cfg.scan_layers:
            s = self._scan_blocks(s, c, cos, sin)
        else:
            for blk in self.blocks:
                s = fn(blk, s, c, cos, sin)
        s = jax.nn.silu(t_emb[:, None, :] + s)
        if self.s_projector is not None:
            s = self.s_projector(s)  # compute dtype, as under autocast
        if cfg.residual_dtype != "float32":
            s = s.astype(rdt)

        s = constrain(s, TOKENS)
        h = constrain(self.x_embedder(x).astype(rdt), TOKENS)
        cos, sin = self._rope(dh // cfg.num_heads[1])
        for blk in self.head_blocks:
            h = fn(blk, h, s, cos, sin)
        out = self._unpatchify(constrain(self.final_layer(h, s).astype(jnp.float32), TOKENS))
        if self.gm_head is not None:
            return self.gm_head.split(out, cond)  # the log-std MLP applies SiLU to stop_gradient(cond) itself
        return out


# ------------------------------------------------------------------------------------------------------------


def abstract_ditdh(config: DiTDHConfig) -> DiTDH:
    """The model with ``ShapeDtypeStruct`` leaves (no allocation)."""
    return nnx.eval_shape(lambda: DiTDH(config, nnx.Rngs(0)))


def ditdh_param_count(config: DiTDHConfig, include_buffers: bool = True) -> int:
    """Number of parameters (``nnx.Param``; plus ``Buffer``s pos_embed and W if ``include_buffers``), as the
    official count (which includes the frozen pos_embed and W, not the RoPE buffers). No allocation."""
    state = nnx.state(abstract_ditdh(config), (nnx.Param, Buffer) if include_buffers else nnx.Param)
    leaves = jax.tree.leaves(state)
    return int(sum(int(jnp.prod(jnp.array(v.shape))) if v.shape else 1 for v in leaves))


def ditdh_flops_per_example(config: DiTDHConfig) -> float:
    """Forward matmul FLOPs per example (2 x multiply-accumulates), attention included, embedding lookups and
    element-wise ops excluded. A training step costs about 3x this (forward + backward)."""
    ds, dh = config.hidden_size
    n, cin = config.num_tokens, config.token_channels

    def block(d: int, per_token_cond: bool) -> float:
        f = swiglu_hidden(d, config.mlp_ratio) if config.use_swiglu else int(d * config.mlp_ratio)
        ffn = 3 * d * f if config.use_swiglu else 2 * d * f
        per_tok = 4 * d * d + ffn + 2 * n * d  # qkv + proj, FFN, q k^T and attn v
        ada = 6 * d * d * (n if per_token_cond else 1)
        return n * per_tok + ada

    macs = config.depth[0] * block(ds, False) + config.depth[1] * block(dh, True)
    macs += n * cin * (ds + dh)  # s/x embedders
    macs += n * ds * dh if ds != dh else 0  # s_projector
    macs += n * (dh * 2 * dh + dh * config.out_token_channels)  # final adaLN + linear (wider for the GM head)
    macs += 2 * config.time_embed_size * ds + ds * ds  # time MLP
    if config.head == "gm" and config.gm_constant_logstd is None:
        macs += ds * config.gm_logstd_inner + config.gm_logstd_inner  # GM log-std MLP (per example)
    return float(2 * macs)
