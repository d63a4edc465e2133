"""Images -> encoder -> latent shards: the encode job's program and its resumable, multi-process shard loop.

Shard ``s`` holds the examples with global index ``[s * S, (s + 1) * S)``. Processes take the unfinished shards
(:func:`pending_encode_shards`) round-robin and step in lockstep; every step encodes one global batch over every
device of the mesh (each process feeds its own shard's rows; a process without a shard feeds padding). Per shard,
the sidecars ``cls-XXXXX.npz`` ([CLS], index, flip) and ``stats-XXXXX.npz`` (partial (count, mean, M2) of the
un-flipped latents) are written first and the shard itself last (``LatentShardWriter``: its ``shard-XXXXX.json``
is the commit point), so a killed job never leaves a half shard. Bad images are counted per shard (in the shard's
sidecar, so restarted runs total the whole dataset) and per run.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import PartitionSpec

from mmfm_jax import parallel
from mmfm_jax.data import images as images_lib
from mmfm_jax.data import latents as latents_lib
from mmfm_jax.data import stats as stats_lib
from mmfm_jax.data.preprocess import mmfm_pixels
from mmfm_jax.data.shards import pending_shards
from mmfm_jax.models import encoders
from mmfm_jax.storage import load_npz, read_json, save_npz_atomic
from mmfm_jax.utils import progress

log = logging.getLogger("mmfm_jax")


def build_encoder(cfg: ml_collections.ConfigDict):
    """The ``encoder.name`` model: hub weights (``encoder.weights``), or random weights of ``encoder.preset``."""
    spec = encoders.get(cfg.encoder.name)
    if cfg.encoder.random_init:
        log.warning("encode: random encoder weights (encoder.random_init=True): for tests only")
        return spec.random(cfg.encoder.preset, cfg.encoder.dtype, int(cfg.data.image_size))
    from mmfm_jax.convert.encoders import load_encoder

    return load_encoder(spec.name, cfg.encoder.weights, dtype=cfg.encoder.dtype,
                        local_files_only=cfg.encoder.local_files_only, image_size=int(cfg.data.image_size))


def encode_program(graphdef, mesh, image_size: int, name: str = "dinov2_b"):
    """The jitted step ``(state, uint8 crops [B, S, S, 3], flip [B]) -> (raw latent [B, L, D], global descriptor
    [B, D])``, batch-sharded, with the ``name`` encoder's pixel mean/std and outputs (the ``plan`` job compiles it
    with abstract inputs)."""
    from flax import nnx

    spec = encoders.get(name)
    out_sh = (parallel.batch_sharding(mesh, 3), parallel.batch_sharding(mesh, 2))

    def step(state, images, flip):
        m = nnx.merge(graphdef, state)
        return spec.encode(m, mmfm_pixels(images, image_size, flip, spec.mean, spec.std))

    return jax.jit(step, out_shardings=out_sh)


def make_encode_step(model, mesh, image_size: int, name: str = "dinov2_b"):
    """jit over the mesh: uint8 crops [B, S, S, 3] + flip [B] -> (raw latent [B, L, D], global descriptor [B, D])
    batch-sharded (:func:`encode_program` with the model's state replicated)."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    state = jax.device_put(state, parallel.replicated(mesh))
    step_sh = encode_program(graphdef, mesh, image_size, name)
    return lambda images, flip: step_sh(state, images, flip)


def local_rows(x: jax.Array, mesh) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    axes = parallel.batch_sharding(mesh, x.ndim).spec
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, PartitionSpec(*axes)))


def shard_stats_path(out: Any, sid: int) -> Any:
    return out / f"stats-{sid:05d}.npz"


def pending_encode_shards(writer: latents_lib.LatentShardWriter, out: Any, n_shards: int) -> list[int]:
    """Shards without a finished data file or a stats sidecar. Process 0 removes stale temp files and decides;
    the answer is broadcast, so every process takes the same round-robin (and nobody writes before the cleanup)."""

    def cleanup() -> None:
        removed = writer.cleanup_stale()
        if removed:
            log.warning("encode: removed %d temp files of an interrupted run: %s", len(removed), removed[:8])

    return pending_shards(n_shards, lambda: (s for s in writer.finished_shards()
                                             if s < n_shards and shard_stats_path(out, s).exists()), cleanup)


def encode_shards(step: Any, loader: Any, writer: latents_lib.LatentShardWriter, out: Any, todo: list[int], *,
                  n_total: int, per_shard: int, global_batch: int, mesh, flip_views: bool, num_threads: int
                  ) -> tuple[images_lib.BadImageCounter, int]:
    """Encode and write the shards ``todo`` (every process calls it, with the same list): ``loader`` maps a global
    index (-1: padding) to an example, ``step(images, flip)`` is :func:`make_encode_step`'s function, and
    ``global_batch`` a multiple of the mesh's batch shards. ``flip_views`` also encodes each image's horizontal flip
    (flip=1). Returns this process's bad-image counter and the number of examples it wrote."""
    n_proc, pid = jax.process_count(), jax.process_index()
    tokens, dim = writer.latent_shape
    store_dtype = latents_lib.LATENT_DTYPES[writer.latent_dtype]
    local_bs = global_batch // n_proc
    batches_per_shard = math.ceil(per_shard / local_bs)
    rounds = math.ceil(len(todo) / n_proc)
    views = (False, True) if flip_views else (False,)
    bad = images_lib.BadImageCounter()
    bar = progress(total=rounds * batches_per_shard, desc="encode")
    written = 0
    for r in range(rounds):
        slot = r * n_proc + pid
        sid = todo[slot] if slot < len(todo) else None
        if sid is not None:
            lo, hi = sid * per_shard, min((sid + 1) * per_shard, n_total)
            idx = np.full(batches_per_shard * local_bs, -1, np.int64)
            idx[: hi - lo] = np.arange(lo, hi)
        else:
            idx = np.full(batches_per_shard * local_bs, -1, np.int64)  # lockstep padding
        ds = grain.MapDataset.source(idx.tolist()).map(loader)
        it = images_lib.to_batches(ds, local_bs, num_threads=int(num_threads))
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("latent", "cls", "label", "index", "flip")}
        shard_bad = images_lib.BadImageCounter()  # kept in the shard's sidecar: restarts total the whole dataset
        moments = stats_lib.NO_MOMENTS  # of the unflipped latents of this shard, merged batch by batch
        for batch in it:
            bad.update(batch)
            shard_bad.update(batch)
            valid = np.asarray(batch["valid"])
            for view in views:
                flip = np.full(local_bs, view, bool)
                g = parallel.host_to_global({"image": np.asarray(batch["image"]), "flip": flip}, mesh)
                lat, cls = step(g["image"], g["flip"])
                lat, cls = local_rows(lat, mesh)[valid], local_rows(cls, mesh)[valid]
                if not view:
                    moments = stats_lib.merge_moments(moments, stats_lib.batch_moments(lat))
                parts["latent"].append(lat.astype(store_dtype))  # held in the storage dtype: half the memory
                parts["cls"].append(cls)
                parts["label"].append(np.asarray(batch["label"])[valid])
                parts["index"].append(np.asarray(batch["index"])[valid])
                parts["flip"].append(np.full(int(valid.sum()), int(view), np.int32))
            bar.update(1)
        if sid is None:
            continue
        ex = {k: np.concatenate(v) for k, v in parts.items()}
        parts.clear()
        order = np.lexsort((ex["flip"], ex["index"]))
        ex = {k: v[order] for k, v in ex.items()}
        count, mean, m2 = moments
        if not count:
            mean, m2 = np.zeros((tokens, dim)), np.zeros((tokens, dim))
        save_npz_atomic(out / f"cls-{sid:05d}.npz", cls=ex["cls"], index=ex["index"], flip=ex["flip"])
        save_npz_atomic(shard_stats_path(out, sid), count=np.float64(count), mean=mean, m2=m2)
        writer.write_shard(sid, ex, info={"images": shard_bad.seen, **{
            k: v for k, v in shard_bad.summary().items() if k != "seen"}})  # last: its sidecar marks it finished
        written += len(ex["index"])
    bar.close()
    return bad, written


def finalize_dataset(writer: latents_lib.LatentShardWriter, out: Any, n_shards: int,
                     imported: tuple[np.ndarray, np.ndarray | None] | None, keep_mean: bool) -> tuple[dict, Any]:
    """Process 0, after every shard: the dataset's statistics (``imported`` (var, mean) as given, else merged from
    the shards' partial moments: var, and mean when ``keep_mean``; as the official DINOv2-B / SigLIP2-B statistics,
    variance only otherwise) and the finished manifest. Returns (manifest, statistics summary or None if
    imported)."""
    count, mean, m2 = merge_shard_stats([shard_stats_path(out, s) for s in range(n_shards)])
    info = None
    if imported is not None:
        var, smean = imported
        stats = {"var": var} if smean is None else {"var": var, "mean": smean}
    else:
        stats = {"var": (m2 / max(count, 1.0)).astype(np.float32), "mean": mean.astype(np.float32)}
        if not keep_mean:
            stats.pop("mean")
        info = dict(count=count, var_mean=float(stats["var"].mean()))
    stats["eps"] = np.float32(1e-5)
    return writer.finalize(stats), info


def merge_shard_stats(paths: list[Any]) -> stats_lib.Moments:
    """The (count, mean, M2) of the per-shard partial moments in ``paths`` (``stats-XXXXX.npz``), merged."""
    acc = stats_lib.NO_MOMENTS
    for p in paths:
        z = load_npz(p)
        acc = stats_lib.merge_moments(acc, (float(z["count"]), z["mean"].astype(np.float64),
                                            z["m2"].astype(np.float64)))
    return acc


def dataset_bad_counts(out: epath.Path, n_shards: int, keep: int) -> dict:
    """Bad-image tallies of the whole dataset, from every shard's sidecar (shards written before a restart too).
    Shards whose sidecar has no counts are listed under ``bad_counts_missing_shards``."""
    total, seen, missing = 0, 0, []
    reasons, examples = dict.fromkeys(images_lib.REASONS[1:images_lib.PADDING], 0), []
    for s in range(n_shards):
        meta = read_json(out / f"shard-{s:05d}.json")
        if "bad" not in meta:
            missing.append(s)
            continue
        total += int(meta["bad"])
        seen += int(meta.get("images", 0))
        for k, v in meta.get("bad_by_reason", {}).items():
            reasons[k] = reasons.get(k, 0) + int(v)
        examples += meta.get("bad_examples", [])
    out_d = {"images_seen": seen, "bad_images": total, "bad_by_reason": reasons,
             "bad_examples": sorted(examples, key=lambda e: e["index"])[:keep]}
    if missing:
        out_d["bad_counts_missing_shards"] = missing
    return out_d


def gather_counts(bad: images_lib.BadImageCounter, written: int) -> dict:
    """This run's bad-image tallies (``bad_images_now``, ...; the dataset's totals come from the shard sidecars),
    their first examples (by index) and the examples written, summed over processes."""
    s = bad.summary()
    keys = list(s["bad_by_reason"])
    vec = np.asarray([s["seen"], s["bad"], written] + [s["bad_by_reason"][k] for k in keys], np.int64)
    codes = {r: i for i, r in enumerate(images_lib.REASONS)}
    ex = np.full((bad.keep, 2), -1, np.int64)  # (index, reason code) rows, -1 = none
    for i, e in enumerate(s["bad_examples"][: bad.keep]):
        ex[i] = (e["index"], codes[e["reason"]])
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        vec = np.asarray(multihost_utils.process_allgather(vec)).reshape(jax.process_count(), -1).sum(0)
        ex = np.asarray(multihost_utils.process_allgather(ex)).reshape(-1, 2)
    ex = ex[ex[:, 1] >= 0]
    ex = ex[np.argsort(ex[:, 0], kind="stable")][: bad.keep]
    return {"images_seen_now": int(vec[0]), "bad_images_now": int(vec[1]), "examples_written_now": int(vec[2]),
            "bad_by_reason_now": {k: int(v) for k, v in zip(keys, vec[3:])},
            "bad_examples_now": [{"index": int(i), "reason": images_lib.REASONS[r]} for i, r in ex]}
