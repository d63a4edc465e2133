"""HF hub SigLIP / SigLIP2 checkpoints (``config.json`` + ``model.safetensors``) -> our ``SiglipVision``, no torch.

The hub file of ``google/siglip2-base-patch16-256`` is a whole ``SiglipModel``: the vision tower's keys
(``vision_model.embeddings.patch_embedding``, ``vision_model.embeddings.position_embedding``,
``vision_model.encoder.layers.{i}.{layer_norm1,self_attn.{q,k,v,out}_proj,layer_norm2,mlp.fc1,mlp.fc2}``,
``vision_model.post_layernorm``, ``vision_model.head.{probe,attention.in_proj_*,attention.out_proj,layernorm,
mlp.fc1,mlp.fc2}``) are mapped one by one (shape-checked); ``text_model.*``, ``logit_scale`` and ``logit_bias`` are
ignored by rule (the image encoder has no use for them). Any other key is an error naming it.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from flax import nnx

from mmfm_jax.convert.common import CheckpointError, KeyTracker, linear
from mmfm_jax.convert.hf_vit import build_module, encoder_config, layer_norm, patch_embed, read_hf_dir, vit_block
from mmfm_jax.models.siglip import SiglipVision, SiglipVisionConfig

IGNORED_PREFIXES = ("text_model.",)
IGNORED_KEYS = ("logit_scale", "logit_bias")


def params_from_state_dict(sd: dict[str, np.ndarray], cfg: SiglipVisionConfig, name: str = "siglip"
                           ) -> dict[str, Any]:
    """Flat hub state dict -> nested float32 numpy params in the layout of ``nnx.state(SiglipVision(cfg),
    nnx.Param)``."""
    tr = KeyTracker(sd, name)
    tr.explain([k for k in sd if k.startswith(IGNORED_PREFIXES) or k in IGNORED_KEYS],
               "SigLIP text tower / contrastive logit scale and bias: not part of the image encoder")
    d, m, g = cfg.hidden_size, cfg.intermediate_size, cfg.pretrained_grid
    e, v = "vision_model.embeddings", "vision_model"
    out: dict[str, Any] = {
        "patch_embed": patch_embed(tr, f"{e}.patch_embedding", d, cfg.num_channels, cfg.patch_size),
        "position_embedding": tr.take(f"{e}.position_embedding.weight", (g * g, d)),
        "post_layernorm": layer_norm(tr, f"{v}.post_layernorm", d),
    }
    layers = {}
    for i in range(cfg.num_hidden_layers):
        p = f"{v}.encoder.layers.{i}"
        a = f"{p}.self_attn"
        layers[i] = vit_block(tr, dict(norm1=f"{p}.layer_norm1", q=f"{a}.q_proj", k=f"{a}.k_proj", v=f"{a}.v_proj",
                                       o=f"{a}.out_proj", norm2=f"{p}.layer_norm2", fc1=f"{p}.mlp.fc1",
                                       fc2=f"{p}.mlp.fc2"), d, m)
    out["layers"] = layers
    h = f"{v}.head"
    if cfg.vision_use_head:
        w_in, b_in = tr.take(f"{h}.attention.in_proj_weight", (3 * d, d)), tr.take(f"{h}.attention.in_proj_bias",
                                                                                    (3 * d,))
        out["head"] = {
            "probe": tr.take(f"{h}.probe", (1, 1, d)),
            "q": {"kernel": np.ascontiguousarray(w_in[:d].T), "bias": b_in[:d]},
            "kv": {"kernel": np.ascontiguousarray(w_in[d:].T), "bias": b_in[d:]},
            "out": linear(tr, f"{h}.attention.out_proj", d, d),
            "layernorm": layer_norm(tr, f"{h}.layernorm", d),
            "mlp": {"fc1": linear(tr, f"{h}.mlp.fc1", d, m), "fc2": linear(tr, f"{h}.mlp.fc2", m, d)},
        }
    elif tr.has(f"{h}.probe"):
        raise CheckpointError(f"{name}: checkpoint has {h}.probe but the config has vision_use_head=False")
    tr.finish()
    return out


def build_siglip(params: dict[str, Any], cfg: SiglipVisionConfig) -> SiglipVision:
    """A ``SiglipVision`` holding ``params`` (checked against the module's tree, naming the path)."""
    return build_module(lambda: SiglipVision(cfg, rngs=nnx.Rngs(0)), params)


def load_siglip(path_or_repo_id: str | os.PathLike, config: SiglipVisionConfig | None = None,
                local_files_only: bool = True, dtype: str | None = None) -> SiglipVision:
    """Load a hub SigLIP/SigLIP2 vision tower (e.g. ``google/siglip2-base-patch16-256``): a local directory with
    ``config.json`` + safetensors (hub key names), or a hub repo id (``huggingface_hub.snapshot_download``, from the
    local cache only unless ``local_files_only=False``). ``config`` overrides ``config.json``; ``dtype`` sets the
    matmul dtype."""
    who = "load_siglip"
    hf_cfg, sd = read_hf_dir(path_or_repo_id, local_files_only, who)
    config = encoder_config(SiglipVisionConfig, hf_cfg, config, dtype, who, path_or_repo_id)
    return build_siglip(params_from_state_dict(sd, config, name=str(path_or_repo_id)), config)
