"""Latent normalisation statistics: per-position (token, channel) mean and variance.

The official DINOv2-B file (``stat.pt``) holds only ``var`` [C, H, W] (``mean`` is None); latents are divided by
``sqrt(var + 1e-5)`` (and the mean subtracted only when present). Ours are tokens-last ``[L, C]`` and saved as
``stats.npz`` with ``var`` (and ``mean`` when computed), plus ``count``.

Streaming: :func:`update` merges a (global, batch-sharded) batch into running (count, mean, M2) with Chan's
parallel formula, in fp32 on the device; the reduction over the global batch is done by ``jit`` across all devices
and processes, so multi-host runs need no extra merge. :func:`merge` combines two partial results (e.g. resumed runs).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmfm_jax.storage import load_npz, local_copy, save_npz_atomic
from mmfm_jax.torch_io import CheckpointError, torch_load, torch_to_numpy

NORM_EPS = 1e-5


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RunningStats:
    count: jax.Array  # [] float32
    mean: jax.Array  # [L, C]
    m2: jax.Array  # [L, C] sum of squared deviations


def init(shape: tuple[int, int]) -> RunningStats:
    return RunningStats(jnp.zeros((), jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))


def merge(a: RunningStats, b: RunningStats) -> RunningStats:
    n = a.count + b.count
    safe = jnp.maximum(n, 1.0)
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / safe)
    m2 = a.m2 + b.m2 + delta * delta * (a.count * b.count / safe)
    return RunningStats(n, mean, m2)


@jax.jit
def update(stats: RunningStats, latents: jax.Array, valid: jax.Array) -> RunningStats:
    """Merge a batch ``latents`` [B, L, C] with ``valid`` [B] (padding rows excluded)."""
    x = latents.astype(jnp.float32)
    w = valid.astype(jnp.float32)[:, None, None]
    n = jnp.sum(w)
    mean = jnp.sum(x * w, 0) / jnp.maximum(n, 1.0)
    m2 = jnp.sum(w * (x - mean) ** 2, 0)
    return merge(stats, RunningStats(n, mean, m2))


# Host counterpart in float64 (exact over 1.28M images; the encode job's per-shard statistics), same formulas.
Moments = tuple[float, Any, Any]  # (count, mean [L, C], m2 [L, C]) float64; mean/m2 are None while count is 0
NO_MOMENTS: Moments = (0.0, None, None)


def batch_moments(x: np.ndarray) -> Moments:
    """Per-position moments of ``x [n, L, C]`` in float64."""
    if not len(x):
        return NO_MOMENTS
    mean = x.mean(0, dtype=np.float64)
    dev = x.astype(np.float64) - mean
    return float(len(x)), mean, np.einsum("nlc,nlc->lc", dev, dev)


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Chan et al.'s parallel merge of two (count, mean, sum of squared deviations) triples (:func:`merge` on the
    host)."""
    (n, mean, m2), (nb, mb, m2b) = a, b
    if nb == 0:
        return a
    if n == 0:
        return b
    tot = n + nb
    delta = mb - mean
    return tot, mean + delta * (nb / tot), m2 + m2b + delta * delta * (n * nb / tot)


def variance(stats: RunningStats) -> np.ndarray:
    """Population variance [L, C] (ddof 0)."""
    return np.asarray(stats.m2) / max(float(stats.count), 1.0)


def save_stats(path: str | os.PathLike, var: np.ndarray, mean: np.ndarray | None = None, count: float = 0.0) -> None:
    arrays = {"var": np.asarray(var, np.float32), "count": np.float64(count)}
    if mean is not None:
        arrays["mean"] = np.asarray(mean, np.float32)
    save_npz_atomic(path, **arrays)


def load_stats(path: str | os.PathLike, tokens: int | None = None, channels: int | None = None
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """-> (var [L, C], mean [L, C] or None). Reads our ``stats.npz`` or the official ``stat.pt`` (needs torch)."""
    path = str(path)  # local or gs://
    if path.endswith((".pt", ".pth")):
        with local_copy(path) as local:
            var, mean = import_official_stats(local)
    else:
        z = load_npz(path)
        var, mean = z["var"], z.get("mean")
    if tokens is not None and var.shape != (tokens, channels):
        raise ValueError(f"{path}: var has shape {var.shape}, expected ({tokens}, {channels})")
    return var, mean


def chw_to_tokens(a: np.ndarray) -> np.ndarray:
    """Official [C, H, W] -> ours [H*W, C]."""
    c, h, w = a.shape
    return np.ascontiguousarray(a.transpose(1, 2, 0).reshape(h * w, c))


def import_official_stats(path: str | os.PathLike, trust_pickle: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """The official ``stat.pt`` ({'mean': None | Tensor[C,H,W], 'var': Tensor[C,H,W]}) -> ([L, C], [L, C] | None).

    Read with :func:`mmfm_jax.torch_io.torch_load` (weights_only; ``trust_pickle`` / ``MMFM_TRUST_PICKLE=1``
    for trusted files with other objects). Raises ``CheckpointError`` (a ``ValueError``) naming the file.
    """
    obj = torch_load(path, trust_pickle=trust_pickle)
    if not isinstance(obj, Mapping) or obj.get("var") is None:
        raise CheckpointError(f"{path}: expected a dict with a 'var' tensor (and 'mean'), got {type(obj).__name__}"
                              + (f" with keys {sorted(map(str, obj))}" if isinstance(obj, Mapping) else ""))
    var = np.asarray(torch_to_numpy(obj["var"], "var", path), np.float32)
    mean = obj.get("mean")
    mean = None if mean is None else np.asarray(torch_to_numpy(mean, "mean", path), np.float32)
    if var.ndim != 3 or (mean is not None and mean.shape != var.shape):
        raise CheckpointError(f"{path}: expected 'var' [C, H, W] and 'mean' None or the same shape, got "
                              f"{var.shape} and {None if mean is None else mean.shape}")
    return chw_to_tokens(var), (None if mean is None else chw_to_tokens(mean))


def normalize(latents: jax.Array, var: jax.Array, mean: jax.Array | None = None) -> jax.Array:
    """``(z - mean) / sqrt(var + 1e-5)`` (mean only when given); latents [..., L, C], var/mean [L, C]."""
    z = latents if mean is None else latents - mean
    return z / jnp.sqrt(var + NORM_EPS)


def denormalize(latents: jax.Array, var: jax.Array, mean: jax.Array | None = None) -> jax.Array:
    z = latents * jnp.sqrt(var + NORM_EPS)
    return z if mean is None else z + mean
