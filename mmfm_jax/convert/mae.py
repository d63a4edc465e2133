"""HF hub ViT-MAE checkpoints (``facebook/vit-mae-base``: ``config.json`` + ``model.safetensors``) -> our
``ViTMAEEncoder``, no torch.

The hub file is a ``ViTMAEForPreTraining``: the encoder's keys (``vit.embeddings.{cls_token,position_embeddings,
patch_embeddings.projection}``, ``vit.encoder.layer.{i}.{layernorm_before,attention.attention.{query,key,value},
attention.output.dense,layernorm_after,intermediate.dense,output.dense}``, ``vit.layernorm``) are mapped one by one
(shape-checked); the MAE pixel decoder (``decoder.*``) is ignored by rule. A bare ``ViTMAEModel`` file (no ``vit.``
prefix) loads too. Any other key is an error naming it.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from flax import nnx

from mmfm_jax.convert.common import KeyTracker
from mmfm_jax.convert.hf_vit import build_module, encoder_config, layer_norm, patch_embed, read_hf_dir, vit_block
from mmfm_jax.models.mae import MAEConfig, ViTMAEEncoder

IGNORED_PREFIXES = ("decoder.",)


def params_from_state_dict(sd: dict[str, np.ndarray], cfg: MAEConfig, name: str = "mae") -> dict[str, Any]:
    """Flat hub state dict -> nested float32 numpy params in the layout of ``nnx.state(ViTMAEEncoder(cfg),
    nnx.Param)``."""
    tr = KeyTracker(sd, name)
    tr.explain([k for k in sd if k.startswith(IGNORED_PREFIXES)], "MAE pixel decoder: not part of the encoder")
    v = "vit." if any(k.startswith("vit.embeddings.") for k in sd) else ""
    d, m, g = cfg.hidden_size, cfg.intermediate_size, cfg.pretrained_grid
    e = f"{v}embeddings"
    out: dict[str, Any] = {
        "patch_embed": patch_embed(tr, f"{e}.patch_embeddings.projection", d, cfg.num_channels, cfg.patch_size),
        "cls_token": tr.take(f"{e}.cls_token", (1, 1, d)),
        "position_embeddings": tr.take(f"{e}.position_embeddings", (1, 1 + g * g, d)),
        "layernorm": layer_norm(tr, f"{v}layernorm", d),
    }
    layers = {}
    for i in range(cfg.num_hidden_layers):
        p = f"{v}encoder.layer.{i}"
        a = f"{p}.attention"
        layers[i] = vit_block(tr, dict(norm1=f"{p}.layernorm_before", q=f"{a}.attention.query",
                                       k=f"{a}.attention.key", v=f"{a}.attention.value", o=f"{a}.output.dense",
                                       norm2=f"{p}.layernorm_after", fc1=f"{p}.intermediate.dense",
                                       fc2=f"{p}.output.dense"), d, m)
    out["layers"] = layers
    tr.finish()
    return out


def build_mae(params: dict[str, Any], cfg: MAEConfig) -> ViTMAEEncoder:
    """A ``ViTMAEEncoder`` holding ``params`` (checked against the module's tree, naming the path)."""
    return build_module(lambda: ViTMAEEncoder(cfg, rngs=nnx.Rngs(0)), params)


def load_mae(path_or_repo_id: str | os.PathLike, config: MAEConfig | None = None, local_files_only: bool = True,
             dtype: str | None = None) -> ViTMAEEncoder:
    """Load a hub ViT-MAE encoder (e.g. ``facebook/vit-mae-base``): a local directory with ``config.json`` +
    safetensors (hub key names), or a hub repo id (``huggingface_hub.snapshot_download``, from the local cache only
    unless ``local_files_only=False``). ``config`` overrides ``config.json``; ``dtype`` sets the matmul dtype."""
    who = "load_mae"
    hf_cfg, sd = read_hf_dir(path_or_repo_id, local_files_only, who)
    config = encoder_config(MAEConfig, hf_cfg, config, dtype, who, path_or_repo_id)
    return build_mae(params_from_state_dict(sd, config, name=str(path_or_repo_id)), config)
