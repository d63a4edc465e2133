"""Data-parallel Inception feature extraction over a mesh.

``extract_features(images, model, mesh, batch_size)`` runs one jitted function (preprocess -> Inception) over global
batches of uint8 NHWC images split over every device of the mesh (``parallel.batch_sharding``), and returns host
float32 arrays:
  - ``pool``: ``[N, 2048]`` pool3 (FID, precision/recall),
  - ``spatial``: ``[N, 2023]`` sFID features (TF ``mixed_6/conv``, first 7 channels, (H, W, C) order),
  - ``logits``: ``[N, 1008]`` **bias-free** logits ``pool @ W`` (ADM's Inception Score input).
A last partial batch is padded with zeros to the batch size and the padded rows are dropped (results never depend
on the batch size or the device count). Multi-process: every process iterates over the same global image stream and
feeds its ``parallel.local_batch_slice`` of each batch; every process gets all results.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from mmfm_jax import parallel
from mmfm_jax.eval.resize import INPUT_PATHS, input_fn
from mmfm_jax.models.inception import InceptionV3

FEATURE_KEYS = ("pool", "spatial", "logits")


@functools.lru_cache(maxsize=16)
def _compiled(graphdef: Any, input_path: str, mesh: Mesh) -> Callable:
    """One jitted function per (network graph, input path, mesh); shapes are cached by jit itself."""
    preprocess = input_fn(input_path)

    def fn(state, images):
        out = nnx.merge(graphdef, state)(preprocess(images))
        return {"pool": out["pool"], "spatial": out["spatial"], "logits": out["logits_nobias"]}

    return jax.jit(fn, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh, 4)),
                   out_shardings=parallel.batch_sharding(mesh, 2))


def feature_function(model: InceptionV3, mesh: Mesh, input_path: str = "adm") -> Callable[[Any, Any], dict]:
    """``(fn, state)``-style access for callers that manage their own batches: returns ``fn(state, images)`` where
    ``state = parallel.put_replicated(nnx.state(model), mesh)`` and ``images`` a batch-sharded ``[B, H, W, 3]``
    uint8 global array (``B`` a multiple of ``parallel.batch_size_multiple(mesh)``)."""
    if input_path not in INPUT_PATHS:
        raise ValueError(f"input_path must be one of {INPUT_PATHS}, got {input_path!r}")
    graphdef = nnx.graphdef(model)
    return _compiled(graphdef, input_path, mesh)


def _rebatch(images: np.ndarray | Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Yield ``[<=batch_size, H, W, 3]`` host batches from an array or an iterable of arrays of any sizes."""
    if hasattr(images, "shape") and hasattr(images, "__getitem__"):
        for i in range(0, len(images), batch_size):
            yield np.asarray(images[i:i + batch_size])
        return
    buf: list[np.ndarray] = []
    have = 0
    for chunk in images:
        chunk = np.asarray(chunk)
        if chunk.ndim == 3:
            chunk = chunk[None]
        buf.append(chunk)
        have += len(chunk)
        while have >= batch_size:
            cat = np.concatenate(buf) if len(buf) > 1 else buf[0]
            yield cat[:batch_size]
            rest = cat[batch_size:]
            buf, have = ([rest] if len(rest) else []), len(rest)
    if have:
        yield np.concatenate(buf) if len(buf) > 1 else buf[0]


def extract_features(
    images: np.ndarray | Iterable[np.ndarray],
    model: InceptionV3,
    mesh: Mesh,
    batch_size: int,
    input_path: str = "adm",
    progress: Callable[[Iterable], Iterable] | None = None,
) -> dict[str, np.ndarray]:
    """Inception features of uint8 NHWC images (any size; resized to 299 by the chosen input path).

    ``images``: an array ``[N, H, W, 3]`` (a memmap is fine) or an iterable of such batches (any sizes).
    ``batch_size``: the global batch, a multiple of the mesh's batch shards. ``input_path``: ``'adm'`` (default,
    the ADM evaluator's TF1 resize and scaling) or ``'pytorch_fid'``. Returns host float32 ``pool [N, 2048]``,
    ``spatial [N, 2023]``, ``logits [N, 1008]`` (bias-free).
    """
    mult = parallel.batch_size_multiple(mesh)
    if batch_size <= 0 or batch_size % mult:
        raise ValueError(f"extract_features: batch_size {batch_size} must be a positive multiple of {mult} "
                         f"(the mesh's batch shards)")
    if batch_size % jax.process_count():
        raise ValueError(f"extract_features: batch_size {batch_size} is not divisible by {jax.process_count()} "
                         "processes")
    fn = feature_function(model, mesh, input_path)
    state = parallel.put_replicated(nnx.state(model), mesh)
    local = parallel.local_batch_slice(batch_size)
    outs: dict[str, list[np.ndarray]] = {k: [] for k in FEATURE_KEYS}
    batches = _rebatch(images, batch_size)
    if progress is not None:
        batches = progress(batches)
    for batch in batches:
        n = len(batch)
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"extract_features: expected [N, H, W, 3] images, got shape {batch.shape}")
        if n < batch_size:
            pad = np.zeros((batch_size - n,) + batch.shape[1:], batch.dtype)
            batch = np.concatenate([batch, pad])
        out = parallel.global_to_host(fn(state, parallel.host_to_global(batch[local], mesh)))
        for k in FEATURE_KEYS:
            outs[k].append(np.asarray(out[k][:n], np.float32))
    if not outs["pool"]:
        raise ValueError("extract_features: no images")
    return {k: np.concatenate(v) for k, v in outs.items()}
