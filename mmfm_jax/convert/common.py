"""Reading official state dicts and strict key/shape bookkeeping shared by every converter.

``load_state_dict(path)`` reads ``.pt``/``.pth`` (needs torch; the ``ema`` entry is used when present),
``.safetensors`` and ``.npz`` (no torch) into ``{key: np.ndarray}``. ``KeyTracker`` hands out tensors by official
key with shape checks, and at the end fails naming every official key that was neither used nor explained.

Torch files are read by :func:`torch_load`: ``weights_only=True`` (no code runs) with the globals in
``SAFE_GLOBALS`` (``argparse.Namespace``: the ``args`` entry of DiT/RAE training checkpoints) allowlisted; any other
refused global is a ``CheckpointError`` naming it. ``trust_pickle=True`` (or ``MMFM_TRUST_PICKLE=1``) loads with
``weights_only=False``, which can run arbitrary code: only for files you trust.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmfm_jax.storage import as_path, is_local, local_copy

TRUST_PICKLE_ENV = "MMFM_TRUST_PICKLE"
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)  # allowlisted for weights_only loads (plain data holders)
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
_REFUSED_RE = re.compile(r"Unsupported (?:global: GLOBAL|class) ([\w.]+)")


class CheckpointError(ValueError):
    """A checkpoint is missing keys, has unexpected keys or wrong shapes, or cannot be read."""


def trust_pickle_from_env() -> bool:
    """``MMFM_TRUST_PICKLE``: ``1/true/yes/on`` -> True; unset, empty or ``0/false/no/off`` -> False."""
    value = os.environ.get(TRUST_PICKLE_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise CheckpointError(f"{TRUST_PICKLE_ENV}={value!r}: expected 1 or 0")


def _import_torch(path: str | os.PathLike) -> Any:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"reading {Path(path).name} needs torch (pip install torch==2.13.0), or convert it to "
                              ".safetensors/.npz") from None
    return torch


def _global_name(g: Any) -> str:
    return f"{g.__module__}.{g.__qualname__}"


def _refusal(e: BaseException) -> str | None:
    """torch's message when ``e`` is a weights_only refusal (not a corrupt file), else None."""
    msg = str(e)
    return msg if isinstance(e, pickle.UnpicklingError) and "weights only" in msg.lower() else None


def _refused_globals(torch: Any, path: Path, message: str, skip: Sequence[str]) -> list[str]:
    """Globals torch refused: those its message names, then (torch >= 2.6) every unsafe global a static scan of the
    file finds, minus ``skip`` (the ones the read allowlisted)."""
    names = _REFUSED_RE.findall(message)
    scan = getattr(getattr(torch, "serialization", None), "get_unsafe_globals_in_checkpoint", None)
    if scan is not None:
        try:
            names += [n for n in scan(str(path)) if n not in skip]
        except Exception:  # noqa: BLE001  (legacy non-zip files cannot be scanned; the message is enough)
            pass
    return list(dict.fromkeys(names))


def torch_load(path: str | os.PathLike, trust_pickle: bool = False) -> Any:
    """``torch.load`` onto the CPU without running code from the file.

    One read with ``weights_only=True`` and ``SAFE_GLOBALS`` allowlisted (``torch.serialization.safe_globals``,
    torch >= 2.5; older torch: nothing allowlisted); any other refused global is a ``CheckpointError`` naming the file
    and the global(s). ``trust_pickle=True`` or ``MMFM_TRUST_PICKLE=1`` uses ``weights_only=False`` instead
    (arbitrary code execution: only for files you trust). Without torch: ``CheckpointError``.
    """
    path = Path(path)
    torch = _import_torch(path)
    if trust_pickle or trust_pickle_from_env():
        return torch.load(str(path), map_location="cpu", weights_only=False)
    safe_globals = getattr(getattr(torch, "serialization", None), "safe_globals", None)
    allow = safe_globals(list(SAFE_GLOBALS)) if safe_globals is not None else contextlib.nullcontext()
    try:
        with allow:
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        message = _refusal(e)  # keep only the text: the traceback holds every tensor read so far
        if message is None:
            raise
    skip = [_global_name(g) for g in SAFE_GLOBALS] if safe_globals is not None else []  # allowlisted: not the problem
    names = _refused_globals(torch, path, message, skip)
    if names:
        what = f"the global(s) {', '.join(names)}"
    else:
        lines = [s.strip() for s in message.splitlines() if "WeightsUnpickler error" in s]
        what = f"an object ({(lines[0] if lines else message.strip())[:300]})"
    raise CheckpointError(
        f"{path}: torch.load(weights_only=True) refused {what}. If you trust this file, pass trust_pickle=True (or set "
        f"{TRUST_PICKLE_ENV}=1) to load it with weights_only=False, which can run arbitrary code: only for files you "
        "trust.")


def torch_to_numpy(value: Any, key: str, source: str | os.PathLike) -> np.ndarray:
    """One state-dict tensor -> numpy on the CPU (bf16 and other dtypes numpy lacks -> float32); a non-tensor value
    is a ``CheckpointError`` naming ``key``."""
    import torch

    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{source}: state dict entry {key!r} is a {type(value).__name__}, not a tensor")
    t = value.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    try:
        return t.numpy()
    except (TypeError, RuntimeError):  # float8 / other dtypes without a numpy equivalent
        return t.float().numpy()


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
