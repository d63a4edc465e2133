"""Official ``DiTwDDTHead`` (RAE / MM-FM) state dicts -> our :class:`~mmfm_jax.models.ditdh.DiTDH`.

Strict: every official key is used or explained, shapes are checked, errors name the key. Key pattern and layouts
are the official RAE / MM-FM ``DiTwDDTHead`` state dict's (PyTorch ``[out, in]`` weights): ``x_embedder`` /
``s_embedder`` 1x1 convs, ``t_embedder.mlp``, ``y_embedder.embedding_table``, ``blocks.{i}`` (``attn.qkv`` rows
[q | k | v], ``mlp.w12`` rows [gate | value], ``adaLN_modulation.1`` in six chunks; indices >= ``depth[0]`` are head
blocks), ``final_layer``; ``tests/fixtures/ditdh_small.npz`` (``param/``) holds a small official state dict that
the tests convert. Explained (not loaded) keys:

- ``enc_feat_rope.freqs_{cos,sin}`` / ``dec_feat_rope.freqs_{cos,sin}``: persistent RoPE buffers. We recompute the
  tables from the config (:func:`mmfm_jax.models.layers.rope_2d_tables`); the converter checks the stored values
  equal ours (atol 1e-5) so a checkpoint with a different RoPE layout is refused, not silently mis-read.
- ``y_embedder.embedding_table.weight`` when ``use_y_conditioning=False``: MM-FM's unconditional checkpoints carry
  the (unused) mode table; the unconditional model has no table, so it is dropped.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfm_jax.convert.common import CheckpointError, KeyTracker, linear, load_state_dict
from mmfm_jax.models.ditdh import DiTDH, DiTDHConfig, abstract_ditdh
from mmfm_jax.models.layers import rope_2d_tables, swiglu_hidden

ROPE_ATOL = 1e-5
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


def strip_wrapper_prefixes(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop a ``module.`` (DDP) / ``_orig_mod.`` (torch.compile) / ``model.`` prefix shared by *every* key."""
    sd = dict(sd)
    changed = True
    while changed and sd:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    return sd


def _patch_embed(tr: KeyTracker, prefix: str, c: int, p: int, out: int) -> dict[str, np.ndarray]:
    """timm ``PatchEmbed`` conv ``[out, C, p, p]`` -> Dense kernel ``[p*p*C, out]`` in our (ph, pw, c) order."""
    w = tr.take(f"{prefix}.weight", (out, c, p, p))
    return {"kernel": w.transpose(2, 3, 1, 0).reshape(p * p * c, out).copy(),
            "bias": tr.take(f"{prefix}.bias", (out,))}


def _block(tr: KeyTracker, prefix: str, d: int, cfg: DiTDHConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if cfg.use_rmsnorm:
        out["norm1"] = {"weight": tr.take(f"{prefix}.norm1.weight", (d,))}
        out["norm2"] = {"weight": tr.take(f"{prefix}.norm2.weight", (d,))}
    out["attn"] = {"qkv": linear(tr, f"{prefix}.attn.qkv", d, 3 * d), "proj": linear(tr, f"{prefix}.attn.proj", d, d)}
    if cfg.use_swiglu:
        f = swiglu_hidden(d, cfg.mlp_ratio)
        out["mlp"] = {"w12": linear(tr, f"{prefix}.mlp.w12", d, 2 * f), "w3": linear(tr, f"{prefix}.mlp.w3", f, d)}
    else:
        f = int(d * cfg.mlp_ratio)
        out["mlp"] = {"fc1": linear(tr, f"{prefix}.mlp.fc1", d, f), "fc2": linear(tr, f"{prefix}.mlp.fc2", f, d)}
    out["adaLN"] = linear(tr, f"{prefix}.adaLN_modulation.1", d, 6 * d)
    return out


def _check_rope(tr: KeyTracker, name: str, head_dim: int, grid: int) -> None:
    cos, sin = rope_2d_tables(head_dim, grid)
    for kind, ours in (("cos", cos), ("sin", sin)):
        key = f"{name}.freqs_{kind}"
        v = tr.take(key, ours.shape)  # marks it used; the values are only verified
        err = float(np.max(np.abs(v - ours))) if v.size else 0.0
        if not err <= ROPE_ATOL:
            raise CheckpointError(f"{tr.name}: key {key!r} differs from the recomputed 2-D RoPE table "
                                  f"(max abs diff {err:.3g} > {ROPE_ATOL}); unsupported RoPE layout")


def _stack(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    return jax.tree.map(lambda *xs: np.stack(xs, axis=0), *blocks)


def convert_ditdh_state_dict(sd: Mapping[str, np.ndarray], config: DiTDHConfig,
                             name: str = "checkpoint") -> dict[str, Any]:
    """Official flat state dict (torch layouts, numpy values) -> our nested pure dict (fp32 numpy), the structure of
    ``nnx.to_pure_dict(nnx.state(DiTDH(config)))`` (s-branch blocks stacked when ``config.scan_layers``).

    Raises ``CheckpointError`` naming the key for a missing key, a wrong shape or an unexpected key.
    """
    cfg = config
    tr = KeyTracker(strip_wrapper_prefixes(sd), name)
    ds, dh = cfg.hidden_size
    c, p, e = cfg.in_channels, cfg.patch_size, cfg.time_embed_size
    out: dict[str, Any] = {
        "s_embedder": _patch_embed(tr, "s_embedder.proj", c, p, ds),
        "x_embedder": _patch_embed(tr, "x_embedder.proj", c, p, dh),
        "t_embedder": {"W": tr.take("t_embedder.W", (e,)),
                       "mlp_0": linear(tr, "t_embedder.mlp.0", 2 * e, ds),
                       "mlp_2": linear(tr, "t_embedder.mlp.2", ds, ds)},
    }
    if ds != dh:
        out["s_projector"] = linear(tr, "s_projector", ds, dh)
    table = "y_embedder.embedding_table.weight"
    if cfg.use_y_conditioning:
        out["y_embedder"] = tr.take(table, (cfg.num_modes, ds))
    else:
        tr.explain([table], "mode table of the unconditional variant (use_y_conditioning=False): unused")
    if cfg.use_pos_embed:
        out["pos_embed"] = tr.take("pos_embed", (1, cfg.num_tokens, ds))[0]
    blocks = [_block(tr, f"blocks.{i}", ds, cfg) for i in range(cfg.depth[0])]
    out["blocks"] = _stack(blocks) if cfg.scan_layers else dict(enumerate(blocks))
    out["head_blocks"] = {j: _block(tr, f"blocks.{cfg.depth[0] + j}", dh, cfg) for j in range(cfg.depth[1])}
    fl: dict[str, Any] = {"adaLN": linear(tr, "final_layer.adaLN_modulation.1", dh, 2 * dh),
                          "linear": linear(tr, "final_layer.linear", dh, cfg.token_channels)}
    if cfg.use_rmsnorm:
        fl["norm"] = {"weight": tr.take("final_layer.norm_final.weight", (dh,))}
    out["final_layer"] = fl
    if cfg.use_rope:
        _check_rope(tr, "enc_feat_rope", ds // cfg.num_heads[0], cfg.grid)
        _check_rope(tr, "dec_feat_rope", dh // cfg.num_heads[1], cfg.grid)
    tr.finish()
    _check_against_model(out, cfg, name)
    return out


def _flat(tree: Mapping[Any, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flat(v, path))
        else:
            out[path] = v
    return out


def _check_against_model(tree: Mapping[str, Any], cfg: DiTDHConfig, name: str) -> None:
    want = _flat(nnx.to_pure_dict(nnx.state(abstract_ditdh(cfg))))
    have = _flat(tree)
    for k in sorted(set(want) | set(have)):
        if k not in have:
            raise CheckpointError(f"{name}: converted tree lacks model entry {k!r}")
        if k not in want:
            raise CheckpointError(f"{name}: converted entry {k!r} has no place in the model")
        if tuple(want[k].shape) != tuple(np.shape(have[k])):
            raise CheckpointError(f"{name}: model entry {k!r} wants shape {tuple(want[k].shape)}, "
                                  f"converted {tuple(np.shape(have[k]))}")


def ditdh_from_pure_dict(tree: Mapping[str, Any], config: DiTDHConfig) -> DiTDH:
    """Build a ``DiTDH`` whose state is ``tree`` (no random initialisation, no double allocation)."""
    graphdef, state = nnx.split(abstract_ditdh(config))
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), dict(tree)))
    return nnx.merge(graphdef, state)


def _block_ids(sd: Mapping[str, np.ndarray]) -> list[int]:
    ids = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    return sorted(ids)


def infer_ditdh_config(sd: Mapping[str, np.ndarray], **overrides: Any) -> DiTDHConfig:
    """A ``DiTDHConfig`` from the shapes of an official state dict; ``overrides`` win (and are required where the
    shapes are silent: ``use_y_conditioning`` cannot be read from shapes, uncond MM-FM checkpoints carry the table
    too, so it defaults to True; ``depth`` when both widths are equal; ``num_heads`` without RoPE buffers)."""
    sd = strip_wrapper_prefixes(sd)

    def need(key: str) -> np.ndarray:
        if key not in sd:
            raise CheckpointError(f"cannot infer the DiTDH config: missing key {key!r}")
        return np.asarray(sd[key])

    kw: dict[str, Any] = {}
    ws = need("s_embedder.proj.weight")
    ds, c, p = int(ws.shape[0]), int(ws.shape[1]), int(ws.shape[2])
    dh = int(need("x_embedder.proj.weight").shape[0])
    kw.update(in_channels=c, patch_size=p, hidden_size=(ds, dh), time_embed_size=int(need("t_embedder.W").shape[0]))
    kw["use_rope"] = "enc_feat_rope.freqs_cos" in sd
    kw["use_pos_embed"] = "pos_embed" in sd
    kw["use_rmsnorm"] = "blocks.0.norm1.weight" in sd
    kw["use_swiglu"] = "blocks.0.mlp.w12.weight" in sd
    if "y_embedder.embedding_table.weight" in sd:
        kw["num_modes"] = int(sd["y_embedder.embedding_table.weight"].shape[0])
    ids = _block_ids(sd)
    if ids != list(range(len(ids))) or not ids:
        raise CheckpointError(f"cannot infer the DiTDH config: block indices {ids} are not 0..N-1")
    if "depth" not in overrides:
        if ds == dh:
            raise CheckpointError("cannot infer DiTDH depth (s-branch and head widths are equal): pass depth=(n, m)")
        widths = [int(need(f"blocks.{i}.attn.qkv.weight").shape[1]) for i in ids]
        n_s = sum(w == ds for w in widths)
        if widths != [ds] * n_s + [dh] * (len(ids) - n_s):
            raise CheckpointError(f"cannot infer DiTDH depth from block widths {widths}")
        kw["depth"] = (n_s, len(ids) - n_s)
    if "num_heads" not in overrides:
        if not kw["use_rope"]:
            raise CheckpointError("cannot infer DiTDH num_heads without RoPE buffers: pass num_heads=(h_s, h_head)")
        hd_s = int(need("enc_feat_rope.freqs_cos").shape[1])
        hd_h = int(need("dec_feat_rope.freqs_cos").shape[1])
        kw["num_heads"] = (ds // hd_s, dh // hd_h)
    n_tok = (int(need("pos_embed").shape[1]) if kw["use_pos_embed"]
             else int(need("enc_feat_rope.freqs_cos").shape[0]) if kw["use_rope"] else None)
    if n_tok is not None:
        kw["input_size"] = int(round(math.sqrt(n_tok))) * p
    if "mlp_ratio" not in overrides:
        if kw["use_swiglu"]:
            f = int(need("blocks.0.mlp.w12.weight").shape[0]) // 2
            cands = [r for r in (4.0, 2.0, 3.0, 8.0, 1.0, 6.0) if swiglu_hidden(ds, r) == f]
            if not cands:
                raise CheckpointError(f"cannot infer DiTDH mlp_ratio from SwiGLU width {f}: pass mlp_ratio")
            kw["mlp_ratio"] = cands[0]
        else:
            kw["mlp_ratio"] = int(need("blocks.0.mlp.fc1.weight").shape[0]) / ds
    kw.update(overrides)
    return DiTDHConfig(**kw)


def load_official_ditdh(path: str | os.PathLike, config: DiTDHConfig | None = None, *, prefix: str = "",
                        **overrides: Any) -> DiTDH:
    """Read an official checkpoint (``.pt`` via torch with its ``ema`` entry, ``.safetensors`` or ``.npz``) into a
    ``DiTDH``. Without ``config`` it is inferred from shapes (:func:`infer_ditdh_config`); ``overrides`` replace
    config fields (e.g. ``use_y_conditioning=False`` for unconditional checkpoints, ``dtype='bfloat16'``,
    ``scan_layers=True``). ``prefix`` selects keys (e.g. ``'param/'`` in our fixtures)."""
    sd = load_state_dict(path, prefix=prefix)
    if not sd:
        raise CheckpointError(f"{path}: no tensors" + (f" under prefix {prefix!r}" if prefix else ""))
    if config is None:
        config = infer_ditdh_config(sd, **overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    tree = convert_ditdh_state_dict(sd, config, name=os.fspath(path) + (f"[{prefix}]" if prefix else ""))
    return ditdh_from_pure_dict(tree, config)
