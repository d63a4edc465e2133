"""Reading official state dicts and strict key/shape bookkeeping shared by every converter.

``load_state_dict(path)`` reads ``.pt``/``.pth`` (needs torch; the ``ema`` entry is used when present),
``.safetensors`` and ``.npz`` (no torch) into ``{key: np.ndarray}``. ``KeyTracker`` hands out tensors by official
key with shape checks, and at the end fails naming every official key that was neither used nor explained.

Torch files are read by :func:`mmfm_jax.torch_io.torch_load` (``weights_only=True``: no code runs, unless
``trust_pickle=True`` or ``MMFM_TRUST_PICKLE=1``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmfm_jax.storage import as_path, is_local, local_copy
from mmfm_jax.torch_io import CheckpointError, torch_load, torch_to_numpy


def select_state_dict(obj: Any, prefer_ema: bool = True, source: str | os.PathLike = "checkpoint") -> Mapping:
    """A loaded torch object -> its state dict: ``obj['ema']`` (when ``prefer_ema``), else ``obj['model']`` /
    ``obj['state_dict']``, else ``obj`` itself (a whole pickled module gives its ``state_dict()``)."""
    if not isinstance(obj, Mapping) and callable(getattr(obj, "state_dict", None)):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a state dict (a dict of tensors), got {type(obj).__name__}")
    for k in (("ema",) if prefer_ema else ()) + ("model", "state_dict"):
        if k in obj:
            v = obj[k]
            if not isinstance(v, Mapping) and callable(getattr(v, "state_dict", None)):
                v = v.state_dict()
            if isinstance(v, Mapping):
                return v
    return obj


def load_state_dict(path: str | os.PathLike, prefix: str = "", prefer_ema: bool = True, *,
                    trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """Read a flat state dict. ``prefix`` (e.g. ``'param/'`` in our fixtures) is stripped and other keys dropped.

    For ``.pt`` files (read by :func:`torch_load`; ``trust_pickle`` see there): ``obj['ema']`` if present (and
    ``prefer_ema``), else ``obj['model']`` / ``obj['state_dict']`` if present, else ``obj`` itself, as the official
    loader does; every value of the chosen dict must be a tensor (bf16 -> float32).
    """
    if not is_local(path):  # gs://...: read from a local copy (torch and safetensors open local files)
        if not as_path(path).exists():
            raise CheckpointError(f"checkpoint file not found: {path}")
        with local_copy(path) as local:
            return load_state_dict(local, prefix, prefer_ema, trust_pickle=trust_pickle)
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".pt", ".pth", ".bin", ".ckpt"):
            obj = select_state_dict(torch_load(path, trust_pickle=trust_pickle), prefer_ema, path)
            sd = {k: torch_to_numpy(v, k, path) for k, v in obj.items()}
        elif suffix == ".safetensors":
            from safetensors.numpy import load_file

            sd = dict(load_file(str(path)))
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                sd = {k: z[k] for k in z.files}
        else:
            raise CheckpointError(f"unknown checkpoint format {suffix!r} for {path} (use .pt, .safetensors or .npz)")
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001  (truncated / corrupt files: say which file)
        raise CheckpointError(f"could not read checkpoint {path}: {type(e).__name__}: {e}") from e
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if prefer_ema and any(k.startswith("ema.") for k in sd):
        sd = {k[4:]: v for k, v in sd.items() if k.startswith("ema.")}
    return {k: np.asarray(v) for k, v in sd.items() if isinstance(v, np.ndarray) or np.isscalar(v)}


class KeyTracker:
    """Strict access to an official state dict.

    ``take(key, shape)`` returns the array (float32 unless ``dtype`` is given) and records the key; ``explain(keys,
    why)`` marks keys deliberately unused (e.g. RoPE buffers we recompute); ``finish()`` raises ``CheckpointError``
    listing every unused, unexplained key.
    """

    def __init__(self, state_dict: Mapping[str, np.ndarray], name: str = "checkpoint"):
        self.sd = dict(state_dict)
        self.name = name
        self.used: set[str] = set()
        self.explained: dict[str, str] = {}

    def has(self, key: str) -> bool:
        return key in self.sd

    def take(self, key: str, shape: Sequence[int] | None = None, dtype=np.float32) -> np.ndarray:
        if key not in self.sd:
            raise CheckpointError(f"{self.name}: missing key {key!r}" + (f" (expected shape {tuple(shape)})" if shape
                                                                          is not None else ""))
        v = np.asarray(self.sd[key])
        if shape is not None and tuple(v.shape) != tuple(shape):
            raise CheckpointError(f"{self.name}: key {key!r} has shape {tuple(v.shape)}, expected {tuple(shape)}")
        self.used.add(key)
        return v.astype(dtype) if dtype is not None else v

    def explain(self, keys: Iterable[str], why: str) -> None:
        for k in keys:
            if k in self.sd:
                self.explained[k] = why

    def unused(self) -> list[str]:
        return sorted(k for k in self.sd if k not in self.used and k not in self.explained)

    def finish(self) -> None:
        left = self.unused()
        if left:
            more = f" (and {len(left) - 10} more)" if len(left) > 10 else ""
            raise CheckpointError(f"{self.name}: unexpected keys {left[:10]}{more}")


def linear(tr: KeyTracker, prefix: str, in_dim: int, out_dim: int, bias: bool = True) -> dict[str, np.ndarray]:
    """torch ``Linear`` (weight [out, in]) -> ``{'kernel': [in, out], 'bias': [out]}``."""
    out = {"kernel": tr.take(f"{prefix}.weight", (out_dim, in_dim)).T.copy()}
    if bias:
        out["bias"] = tr.take(f"{prefix}.bias", (out_dim,))
    return out


def conv1x1(tr: KeyTracker, prefix: str, in_dim: int, out_dim: int) -> dict[str, np.ndarray]:
    """torch 1x1 ``Conv2d`` (weight [out, in, 1, 1]) -> a Dense ``{'kernel': [in, out], 'bias': [out]}``."""
    w = tr.take(f"{prefix}.weight", (out_dim, in_dim, 1, 1))
    return {"kernel": w[:, :, 0, 0].T.copy(), "bias": tr.take(f"{prefix}.bias", (out_dim,))}
