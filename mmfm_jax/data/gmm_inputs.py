"""What the GMM fit reads from a latent dataset (``data.latents``): the un-flipped [CLS] vectors for the EM, and
this process's rows of each global batch for the spatial pass (``gmm.fit``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmfm_jax import parallel
from mmfm_jax.data import latents as latents_lib
from mmfm_jax.storage import as_path, load_npz
from mmfm_jax.utils import progress

log = logging.getLogger("mmfm_jax")


def read_cls(directory: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """All un-flipped [CLS] vectors in image-index order -> (cls [N, D] fp32, image index [N]).

    Only a finished dataset is read (manifest ``complete``; an EM over a half-encoded dataset would fit the wrong
    data), and only the shards its manifest lists: from the encode job's ``cls-XXXXX.npz`` sidecars when every
    listed shard has one whose row count matches (no latent decoding), else from the records. Every process reads
    all of them (1.28M x 768 fp32 = 3.9 GB); ``em.fit`` places each device's rows.
    """
    directory = as_path(directory)
    ds = latents_lib.LatentShards(directory)  # raises unless the manifest is complete and every shard is there
    shards = ds.manifest["shards"]
    side = [directory / f"cls-{int(sh['id']):05d}.npz" for sh in shards]
    parts = [load_npz(p) for p in side] if all(p.exists() for p in side) else None
    if parts is not None and any(len(p["index"]) != int(sh["count"]) for p, sh in zip(parts, shards)):
        log.warning("fit-gmm: [CLS] sidecars in %s do not match the shards' counts: reading the records", directory)
        parts = None
    if parts is None:
        parts = [ds.fetch(np.arange(s, min(s + 4096, len(ds)))) for s in range(0, len(ds), 4096)]
    cls = np.concatenate([p["cls"] for p in parts]).astype(np.float32)
    idx = np.concatenate([p["index"] for p in parts]).astype(np.int64)
    flip = np.concatenate([p["flip"] for p in parts]).astype(np.int32)
    keep = flip == 0
    shard_of = np.repeat([int(sh["id"]) for sh in shards], [int(sh["count"]) for sh in shards])[keep]
    cls, idx = cls[keep], idx[keep]
    check_finite_cls(cls, shard_of, directory)
    order = np.argsort(idx, kind="stable")
    return cls[order], idx[order]


def check_finite_cls(cls: np.ndarray, shard_of: np.ndarray, directory: Any) -> None:
    """Raise before EM if any [CLS] row has a NaN or inf, naming how many and the shards (``shard_of [N]``) holding
    them: EM cannot fit them and a single one makes every lower bound NaN."""
    bad = ~np.isfinite(cls).all(axis=1)
    if bad.any():
        ids, counts = np.unique(shard_of[bad], return_counts=True)
        where = ", ".join(f"{int(i)} ({int(c)})" for i, c in zip(ids, counts))
        raise ValueError(f"fit-gmm: {int(bad.sum())} of {len(cls)} [CLS] vectors in {directory} are not finite, in "
                         f"shards (rows): {where}; re-encode those shards")


def mean_shift(ds: latents_lib.LatentShards) -> jax.Array | None:
    """The dataset's mean latent, normalised as its latents are ([L, C]), or None without a stored mean."""
    if ds.stats is None or "mean" not in ds.stats:
        return None
    return jnp.asarray(latents_lib.normalize_latents(ds.stats["mean"][None], ds.stats)[0])


def spatial_batches(ds: latents_lib.LatentShards, global_batch: int, mesh: Any) -> Iterator[dict[str, np.ndarray]]:
    """Every example in index order, ``global_batch`` at a time (a multiple of the mesh's batch shards): this
    process's rows as ``latent`` [b, L, C] float32, ``cls`` [b, D] and ``valid`` [b] (False for the padding past the
    end and for flipped examples), with a progress bar."""
    n = len(ds)
    local = parallel.local_batch_slice(global_batch)
    bar = progress(total=n, desc="spatial pass")
    for start in range(0, n, global_batch):
        idx = np.arange(start, start + global_batch)[local]
        valid = idx < n
        ex = ds.fetch(np.where(valid, idx, 0))
        valid &= ex["flip"] == 0
        yield {"latent": ex["latent"].astype(np.float32), "cls": ex["cls"], "valid": valid}
        bar.update(min(global_batch, n - start))
    bar.close()
