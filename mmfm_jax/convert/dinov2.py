"""HF hub DINOv2 checkpoints (``config.json`` + ``model.safetensors``) -> our ``Dinov2`` module, without torch.

Key names are the hub's (transformers 4.x, which is what the hub files hold): ``embeddings.*``,
``encoder.layer.{i}.attention.attention.{query,key,value}``, ``attention.output.dense``, ``mlp.fc1/fc2`` (or
``mlp.weights_in/weights_out`` for SwiGLU), ``layer_scale{1,2}.lambda1``, ``layernorm``. The transformers 5.x
in-memory names (``attention.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``) are accepted too. Every key is used or
explained (``mask_token``: masked pre-training only), every shape checked; errors name the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfm_jax.convert.common import CheckpointError, KeyTracker
from mmfm_jax.models.dinov2 import Dinov2, Dinov2Config
from mmfm_jax.utils import as_path, dtype_from_name, is_local

_BASE_PREFIXES = ("dinov2_with_registers.", "dinov2.")


def _strip_prefix(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Checkpoints of task heads nest the backbone under ``dinov2.``: keep the backbone keys only."""
    if any(k.startswith("embeddings.") for k in sd):
        return sd
    for pre in _BASE_PREFIXES:
        if any(k.startswith(pre + "embeddings.") for k in sd):
            return {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
    return sd


def _linear(tr: KeyTracker, names: tuple[str, ...], din: int, dout: int, bias: bool = True) -> tuple[np.ndarray, ...]:
    """First of the alternative key prefixes that exists -> (kernel [in, out], bias [out] or None)."""
    prefix = next((n for n in names if tr.has(f"{n}.weight")), names[0])
    w = tr.take(f"{prefix}.weight", (dout, din)).T
    b = tr.take(f"{prefix}.bias", (dout,)) if bias else None
    return w, b


def params_from_state_dict(sd: dict[str, np.ndarray], cfg: Dinov2Config, name: str = "dinov2") -> dict[str, Any]:
    """Flat hub state dict -> nested float32 numpy params in the layout of ``nnx.state(Dinov2(cfg), nnx.Param)``."""
    tr = KeyTracker(_strip_prefix(sd), name)
    d, p, c, g = cfg.hidden_size, cfg.patch_size, cfg.num_channels, cfg.pretrained_grid
    e = "embeddings"
    conv = tr.take(f"{e}.patch_embeddings.projection.weight", (d, c, p, p))
    out: dict[str, Any] = {
        "patch_embed": {"kernel": conv.transpose(2, 3, 1, 0).reshape(p * p * c, d),
                        "bias": tr.take(f"{e}.patch_embeddings.projection.bias", (d,))},
        "cls_token": tr.take(f"{e}.cls_token", (1, 1, d)),
        "position_embeddings": tr.take(f"{e}.position_embeddings", (1, 1 + g * g, d)),
        "norm": {"scale": tr.take("layernorm.weight", (d,)), "bias": tr.take("layernorm.bias", (d,))},
    }
    if cfg.num_register_tokens > 0:
        out["register_tokens"] = tr.take(f"{e}.register_tokens", (1, cfg.num_register_tokens, d))
    elif tr.has(f"{e}.register_tokens"):
        raise CheckpointError(f"{name}: checkpoint has {e}.register_tokens but the config has num_register_tokens=0")
    tr.explain([f"{e}.mask_token"], "mask token: masked-image pre-training only")
    m = cfg.mlp_hidden
    layers = {}
    for i in range(cfg.num_hidden_layers):
        pre = f"encoder.layer.{i}"
        a = f"{pre}.attention"
        q = _linear(tr, (f"{a}.attention.query", f"{a}.q_proj"), d, d, cfg.qkv_bias)
        k = _linear(tr, (f"{a}.attention.key", f"{a}.k_proj"), d, d, cfg.qkv_bias)
        v = _linear(tr, (f"{a}.attention.value", f"{a}.v_proj"), d, d, cfg.qkv_bias)
        o = _linear(tr, (f"{a}.output.dense", f"{a}.o_proj"), d, d)
        layer: dict[str, Any] = {
            "norm1": {"scale": tr.take(f"{pre}.norm1.weight", (d,)), "bias": tr.take(f"{pre}.norm1.bias", (d,))},
            "qkv": {"kernel": np.concatenate([q[0], k[0], v[0]], axis=1)},
            "proj": {"kernel": o[0], "bias": o[1]},
            "ls1": tr.take(f"{pre}.layer_scale1.lambda1", (d,)),
            "norm2": {"scale": tr.take(f"{pre}.norm2.weight", (d,)), "bias": tr.take(f"{pre}.norm2.bias", (d,))},
            "ls2": tr.take(f"{pre}.layer_scale2.lambda1", (d,)),
        }
        if cfg.qkv_bias:
            layer["qkv"]["bias"] = np.concatenate([q[1], k[1], v[1]])
        if cfg.use_swiglu_ffn:
            if tr.has(f"{pre}.mlp.weights_in.weight"):
                w_in, b_in = _linear(tr, (f"{pre}.mlp.weights_in",), d, 2 * m)
            else:
                gw, gb = _linear(tr, (f"{pre}.mlp.gate_proj",), d, m)
                uw, ub = _linear(tr, (f"{pre}.mlp.up_proj",), d, m)
                w_in, b_in = np.concatenate([gw, uw], axis=1), np.concatenate([gb, ub])
            w_out, b_out = _linear(tr, (f"{pre}.mlp.weights_out", f"{pre}.mlp.down_proj"), m, d)
        else:
            w_in, b_in = _linear(tr, (f"{pre}.mlp.fc1",), d, m)
            w_out, b_out = _linear(tr, (f"{pre}.mlp.fc2",), m, d)
        layer["fc1"] = {"kernel": w_in, "bias": b_in}
        layer["fc2"] = {"kernel": w_out, "bias": b_out}
        layers[i] = layer
    out["layers"] = layers
    tr.finish()
    return jax_tree_contiguous(out)


def jax_tree_contiguous(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: jax_tree_contiguous(v) for k, v in tree.items()}
    return np.ascontiguousarray(tree, dtype=np.float32)


def build_dinov2(params: dict[str, Any], cfg: Dinov2Config, image_sizes: tuple[int, ...] = (224,)) -> Dinov2:
    """A ``Dinov2`` holding ``params`` (nested numpy, as ``params_from_state_dict``), with the position table
    precomputed for ``image_sizes``. The tree must match the module's exactly (checked, naming the path)."""
    abstract = nnx.eval_shape(lambda: Dinov2(cfg, rngs=nnx.Rngs(0)))
    graphdef, pstate, rest = nnx.split(abstract, nnx.Param, ...)
    want = nnx.to_pure_dict(pstate)

    def fill(w: Any, h: Any, path: str) -> Any:
        if isinstance(w, dict):
            if not isinstance(h, dict) or set(map(str, w)) != set(map(str, h)):
                got = sorted(map(str, h)) if isinstance(h, dict) else type(h).__name__
                raise CheckpointError(f"params at {path or '/'}: expected keys {sorted(map(str, w))}, got {got}")
            hk = {str(k): v for k, v in h.items()}
            return {k: fill(v, hk[str(k)], f"{path}/{k}") for k, v in w.items()}
        if tuple(w.shape) != tuple(np.shape(h)):
            raise CheckpointError(f"params at {path}: shape {np.shape(h)}, expected {tuple(w.shape)}")
        return jnp.asarray(h, jnp.float32)

    nnx.replace_by_pure_dict(pstate, fill(want, params, ""))
    model = nnx.merge(graphdef, pstate, rest)
    if image_sizes:
        model.precompute_pos_embed(*image_sizes)
    return model


def _resolve_dir(path_or_repo_id: str | os.PathLike, local_files_only: bool) -> Path:
    if not is_local(path_or_repo_id):  # a gs:// folder, read through epath
        if not as_path(path_or_repo_id).is_dir():
            raise CheckpointError(f"load_dinov2: {path_or_repo_id} is not a folder")
        return as_path(path_or_repo_id)
    p = Path(path_or_repo_id).expanduser()
    if p.is_dir():
        return p
    if p.exists() or str(path_or_repo_id).startswith((".", "/", "~")) or str(path_or_repo_id).count("/") != 1:
        raise CheckpointError(f"load_dinov2: {path_or_repo_id!r} is neither a local directory nor a hub repo id "
                              "('owner/name')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_repo_id), local_files_only=local_files_only,
                                      allow_patterns=["config.json", "model.safetensors",
                                                      "model.safetensors.index.json", "model-*.safetensors"]))
    except Exception as e:  # noqa: BLE001  (offline / not cached / no access: say what to do)
        hint = " (not in the local HF cache; pass local_files_only=False to download)" if local_files_only else ""
        raise CheckpointError(f"load_dinov2: could not get {path_or_repo_id!r} from the hub{hint}: "
                              f"{type(e).__name__}: {e}") from e


def read_safetensors_dir(d: Path) -> dict[str, np.ndarray]:
    """``model.safetensors`` (or the shards listed in ``model.safetensors.index.json``) -> ``{key: ndarray}``."""
    from safetensors.numpy import load, load_file

    if not is_local(d):  # gs://: read the bytes through epath
        load_file = lambda f: load(as_path(f).read_bytes())  # noqa: E731
    single, index = d / "model.safetensors", d / "model.safetensors.index.json"
    try:
        if single.exists():
            return dict(load_file(str(single)))
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sd: dict[str, np.ndarray] = {}
            for f in files:
                sd.update(load_file(str(d / f)))
            return sd
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"could not read safetensors in {d}: {type(e).__name__}: {e}") from e
    raise CheckpointError(f"{d}: no model.safetensors (or model.safetensors.index.json); torch .bin files are not "
                          "supported here (convert them with safetensors first)")


def load_dinov2(path_or_repo_id: str | os.PathLike, config: Dinov2Config | None = None,
                local_files_only: bool = True, dtype: str | None = None,
                image_sizes: tuple[int, ...] = (224,)) -> Dinov2:
    """Load a hub DINOv2 (e.g. ``facebook/dinov2-with-registers-base`` or ``facebook/dinov2-base``) into ``Dinov2``.

    ``path_or_repo_id``: a local directory with ``config.json`` + ``model.safetensors`` (hub key names), or a hub
    repo id fetched with ``huggingface_hub.snapshot_download`` (from the local HF cache only unless
    ``local_files_only=False``). ``config``: overrides ``config.json`` (shapes are still checked key by key).
    ``dtype``: compute dtype (``'bfloat16'``...). The position table is precomputed for ``image_sizes``.
    """
    d = _resolve_dir(path_or_repo_id, local_files_only)
    if config is None:
        cfg_path = d / "config.json"
        if not cfg_path.exists():
            raise CheckpointError(f"load_dinov2: {cfg_path} not found (or pass config=)")
        try:
            config = Dinov2Config.from_hf(json.loads(cfg_path.read_text()))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"load_dinov2: bad {cfg_path}: {e}") from e
    if dtype is not None:
        config = dataclasses.replace(config, dtype=jnp.dtype(dtype_from_name(dtype)).name)
    params = params_from_state_dict(read_safetensors_dir(d), config, name=str(path_or_repo_id))
    return build_dinov2(params, config, image_sizes)
