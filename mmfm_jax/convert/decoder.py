"""Official RAE decoder ``model.pt`` (``GeneralDecoder`` state dict) -> ``mmfm_jax.models.decoder.RAEDecoder``.

Keys (spec 2f): ``decoder_pos_embed [1, 1+L, D]``, ``trainable_cls_token [1, 1, D]``, ``decoder_embed.*``,
``decoder_layers.{i}.attention.attention.{query,key,value}.*`` (fused into our ``attention.qkv``, rows
``[q | k | v]``), ``decoder_layers.{i}.attention.output.dense.*`` (-> ``attention.proj``),
``decoder_layers.{i}.intermediate.dense.*``, ``decoder_layers.{i}.output.dense.*``,
``decoder_layers.{i}.layernorm_{before,after}.*``, ``decoder_norm.*``, ``decoder_pred.*``. Strict: a missing key,
a wrong shape, or a key we do not use is an error naming the key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfm_jax.convert.common import CheckpointError, KeyTracker, linear, load_state_dict
from mmfm_jax.models.decoder import DecoderConfig, RAEDecoder, abstract_decoder


def _ln(tr: KeyTracker, prefix: str, dim: int) -> dict[str, np.ndarray]:
    return {"scale": tr.take(f"{prefix}.weight", (dim,)), "bias": tr.take(f"{prefix}.bias", (dim,))}


def decoder_params_from_state_dict(sd: Mapping[str, np.ndarray], config: DecoderConfig,
                                   name: str = "decoder") -> dict[str, Any]:
    """Official state dict -> nested dict of float32 numpy arrays shaped like ``nnx.state(RAEDecoder(config))``."""
    cfg = config
    d, tr = cfg.hidden, KeyTracker(sd, name)
    out: dict[str, Any] = {
        "decoder_pos_embed": tr.take("decoder_pos_embed", (1, cfg.num_patches + 1, d)),
        "trainable_cls_token": tr.take("trainable_cls_token", (1, 1, d)),
        "decoder_embed": linear(tr, "decoder_embed", cfg.latent_dim, d),
        "decoder_norm": _ln(tr, "decoder_norm", d),
        "decoder_pred": linear(tr, "decoder_pred", d, cfg.patch * cfg.patch * cfg.channels),
    }
    layers = {}
    for i in range(cfg.layers):
        p = f"decoder_layers.{i}"
        q, k, v = (linear(tr, f"{p}.attention.attention.{n}", d, d) for n in ("query", "key", "value"))
        layers[i] = {
            "layernorm_before": _ln(tr, f"{p}.layernorm_before", d),
            "layernorm_after": _ln(tr, f"{p}.layernorm_after", d),
            "attention": {
                "qkv": {"kernel": np.concatenate([q["kernel"], k["kernel"], v["kernel"]], axis=1),
                        "bias": np.concatenate([q["bias"], k["bias"], v["bias"]])},
                "proj": linear(tr, f"{p}.attention.output.dense", d, d),
            },
            "intermediate": linear(tr, f"{p}.intermediate.dense", d, cfg.mlp),
            "output": linear(tr, f"{p}.output.dense", cfg.mlp, d),
        }
    if tr.has(f"decoder_layers.{cfg.layers}.layernorm_before.weight"):
        raise CheckpointError(f"{name}: checkpoint has more than config.layers={cfg.layers} decoder layers")
    out["decoder_layers"] = layers
    tr.finish()
    return out


def _check_against_model(params: dict[str, Any], state: Any, name: str) -> None:
    want = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(state)}
    have = {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))[:6]
        raise CheckpointError(f"{name}: converted tree does not match the model (first differences: {diff})")


def load_decoder(source: str | os.PathLike | Mapping[str, np.ndarray], config: DecoderConfig | str = "XL",
                 prefix: str = "") -> RAEDecoder:
    """Build an ``RAEDecoder`` from the official ``model.pt`` (needs torch), a ``.safetensors``/``.npz`` with the same
    key names (``prefix`` stripped, e.g. ``'param/'`` for our fixtures), or an in-memory state dict."""
    cfg = DecoderConfig.preset(config) if isinstance(config, str) else config
    if isinstance(source, Mapping):
        sd, name = dict(source), "decoder"
    else:
        sd, name = load_state_dict(source, prefix=prefix, prefer_ema=False), os.fspath(source)
    params = decoder_params_from_state_dict(sd, cfg, name)
    graphdef, state = nnx.split(abstract_decoder(cfg))
    pure = nnx.to_pure_dict(state)
    _check_against_model(params, pure, name)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)
