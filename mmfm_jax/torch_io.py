"""Reading torch ``.pt`` files on the CPU without running code from them.

:func:`torch_load` reads with ``weights_only=True`` (no code runs) and the globals in ``SAFE_GLOBALS``
(``argparse.Namespace``: the ``args`` entry of DiT/RAE training checkpoints) allowlisted; any other refused global is
a ``CheckpointError`` naming it. ``trust_pickle=True`` (or ``MMFM_TRUST_PICKLE=1``) loads with ``weights_only=False``,
which can run arbitrary code: only for files you trust. :func:`torch_to_numpy` turns one tensor into numpy.
Used by the checkpoint converters (:mod:`mmfm_jax.convert.common`) and the reference statistics
(:mod:`mmfm_jax.data.stats`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

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
