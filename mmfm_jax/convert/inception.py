"""pytorch-fid's FID Inception weights (``pt_inception-2015-12-05-*.pth``) -> ``mmfm_jax.models.inception``.

Key names are torchvision's Inception3 names (``Mixed_6d.branch1x1.conv.weight``, ``...bn.running_var``,
``fc.weight``). The mapping is driven by our module tree: every parameter we have is read by its torch key with a
shape check, the ``*.num_batches_tracked`` counters are explained away, and any other key is an error.

Layouts: conv OIHW -> HWIO; ``bn.weight/bias/running_mean/running_var`` -> ``bn.scale/bias/mean/var``;
``fc.weight [1008, 2048]`` -> ``fc.kernel [2048, 1008]``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfm_jax.convert.common import CheckpointError, KeyTracker, load_state_dict
from mmfm_jax.models.inception import InceptionV3, abstract_inception

_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _flatten(d: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, v in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return out


def _one(tr: KeyTracker, path: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
    *mod, kind, leaf = path
    base = ".".join(mod)
    if kind == "conv" and leaf == "kernel":  # HWIO <- OIHW
        kh, kw, ci, co = shape
        return np.ascontiguousarray(tr.take(f"{base}.conv.weight", (co, ci, kh, kw)).transpose(2, 3, 1, 0))
    if kind == "bn" and leaf in _BN:
        return tr.take(f"{base}.bn.{_BN[leaf]}", shape)
    if tuple(path) == ("fc", "kernel"):
        return np.ascontiguousarray(tr.take("fc.weight", shape[::-1]).T)
    if tuple(path) == ("fc", "bias"):
        return tr.take("fc.bias", shape)
    raise CheckpointError(f"inception converter: no torch key for parameter {'/'.join(path)}")


def inception_params_from_state_dict(sd: Mapping[str, np.ndarray], name: str = "inception") -> dict[str, Any]:
    """Official state dict -> nested dict of float32 numpy arrays shaped like ``nnx.state(InceptionV3)``."""
    tr = KeyTracker(sd, name)
    tr.explain([k for k in sd if k.endswith(".num_batches_tracked")], "BatchNorm step counter (unused in eval)")
    target = _flatten(nnx.to_pure_dict(nnx.state(abstract_inception())))
    flat = {path: _one(tr, path, tuple(sds.shape)) for path, sds in target.items()}
    tr.finish()
    return _unflatten(flat)


def load_inception(source: str | os.PathLike | Mapping[str, np.ndarray], *, dtype: Any = jnp.float32,
                   precision: Any = "highest") -> InceptionV3:
    """Build an ``InceptionV3`` from a pytorch-fid ``.pth`` (needs torch), a ``.npz``/``.safetensors`` with the same
    key names, or an in-memory state dict."""
    if isinstance(source, Mapping):
        sd, name = dict(source), "inception"
    else:
        sd, name = load_state_dict(source, prefer_ema=False), os.fspath(source)
    params = inception_params_from_state_dict(sd, name)
    model = abstract_inception(dtype=dtype, precision=precision)
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, jnp_tree(params))
    return nnx.merge(graphdef, state)


def jnp_tree(tree: Any) -> Any:
    """Nested dict of numpy arrays -> the same of ``jax.Array`` (float32 kept)."""
    if isinstance(tree, Mapping):
        return {k: jnp_tree(v) for k, v in tree.items()}
    return jnp.asarray(tree)
