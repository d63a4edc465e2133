"""Shared by the HF hub converters (DINOv2, SigLIP, ViT-MAE): hub directory / repo id resolution, safetensors
reading, filling a module's parameters from a converted tree (checked, naming the path), and the pre-LN ViT block
mapping (separate q/k/v fused into our rows ``[q | k | v]``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfm_jax.convert.common import CheckpointError, KeyTracker, linear
from mmfm_jax.storage import as_path, is_local


def build_module(factory: Callable[[], nnx.Module], params: dict[str, Any]) -> nnx.Module:
    """``factory()``'s module (built abstractly: no random init) holding ``params`` (nested numpy in the layout of
    ``nnx.state(module, nnx.Param)``). The tree must match exactly: a wrong key set or shape raises
    ``CheckpointError`` naming the path. Non-parameter state keeps the factory's values."""
    abstract = nnx.eval_shape(factory)
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
    return nnx.merge(graphdef, pstate, rest)


def resolve_hf_dir(path_or_repo_id: str | os.PathLike, local_files_only: bool, who: str = "load_dinov2") -> Path:
    """A local directory as is, or a hub repo id fetched (config.json + safetensors) with ``snapshot_download``;
    errors start with ``who``. A ``gs://`` folder is returned as an epath path (read through it)."""
    if not is_local(path_or_repo_id):
        if not as_path(path_or_repo_id).is_dir():
            raise CheckpointError(f"{who}: {path_or_repo_id} is not a folder")
        return as_path(path_or_repo_id)
    p = Path(path_or_repo_id).expanduser()
    if p.is_dir():
        return p
    if p.exists() or str(path_or_repo_id).startswith((".", "/", "~")) or str(path_or_repo_id).count("/") != 1:
        raise CheckpointError(f"{who}: {path_or_repo_id!r} is neither a local directory nor a hub repo id "
                              "('owner/name')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_repo_id), local_files_only=local_files_only,
                                      allow_patterns=["config.json", "model.safetensors",
                                                      "model.safetensors.index.json", "model-*.safetensors"]))
    except Exception as e:  # noqa: BLE001  (offline / not cached / no access: say what to do)
        hint = " (not in the local HF cache; pass local_files_only=False to download)" if local_files_only else ""
        raise CheckpointError(f"{who}: could not get {path_or_repo_id!r} from the hub{hint}: "
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


def read_hf_dir(path_or_repo_id: str | os.PathLike, local_files_only: bool, who: str
                ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """-> (``config.json`` as a dict, the safetensors state dict) of a local directory or hub repo id."""
    d = resolve_hf_dir(path_or_repo_id, local_files_only, who)
    cfg_path = d / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{who}: {cfg_path} not found (or pass config=)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{who}: bad {cfg_path}: {e}") from e
    return cfg, read_safetensors_dir(d)


def encoder_config(config_cls: Any, hf_cfg: dict[str, Any], config: Any, dtype: str | None, who: str,
                   source: Any) -> Any:
    """The model config of a hub encoder: ``config`` if given, else ``config_cls.from_hf(hf_cfg)`` (a bad
    ``config.json`` is a ``CheckpointError`` naming ``source``); ``dtype`` (if given) sets its matmul dtype."""
    if config is None:
        try:
            config = config_cls.from_hf(hf_cfg)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{who}: bad config.json in {source}: {e}") from e
    return config if dtype is None else dataclasses.replace(config, dtype=dtype)


def layer_norm(tr: KeyTracker, prefix: str, dim: int) -> dict[str, np.ndarray]:
    """torch ``LayerNorm`` -> ``{'scale', 'bias'}``."""
    return {"scale": tr.take(f"{prefix}.weight", (dim,)), "bias": tr.take(f"{prefix}.bias", (dim,))}


def patch_embed(tr: KeyTracker, prefix: str, dim: int, channels: int, patch: int) -> dict[str, np.ndarray]:
    """torch ``Conv2d(C, D, k=p, s=p)`` -> a Dense over patches flattened in ``(py, px, c)`` order."""
    w = tr.take(f"{prefix}.weight", (dim, channels, patch, patch))
    return {"kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(patch * patch * channels, dim)),
            "bias": tr.take(f"{prefix}.bias", (dim,))}


def vit_block(tr: KeyTracker, names: dict[str, str], dim: int, hidden: int) -> dict[str, Any]:
    """One pre-LN block -> our ``ViTBlock`` tree. ``names``: the checkpoint prefixes of ``norm1, q, k, v, o, norm2,
    fc1, fc2``."""
    q, k, v = (linear(tr, names[n], dim, dim) for n in ("q", "k", "v"))
    return {
        "norm1": layer_norm(tr, names["norm1"], dim),
        "attn": {"qkv": {"kernel": np.concatenate([q["kernel"], k["kernel"], v["kernel"]], axis=1),
                         "bias": np.concatenate([q["bias"], k["bias"], v["bias"]])},
                 "proj": linear(tr, names["o"], dim, dim)},
        "norm2": layer_norm(tr, names["norm2"], dim),
        "mlp": {"fc1": linear(tr, names["fc1"], dim, hidden), "fc2": linear(tr, names["fc2"], hidden, dim)},
    }
