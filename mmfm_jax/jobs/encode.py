"""``python -m mmfm_jax encode``: images -> encoder -> sharded latent dataset (+ global descriptor, statistics).

``encoder.name``: ``dinov2_b`` | ``siglip2_b`` | ``mae_b`` (``models.encoders``: input size, mean/std, which token
is the global descriptor). The global descriptor is stored where the [CLS] is (``cls``; the GMM's input).

Shard ``s`` holds the examples with global index ``[s * S, (s + 1) * S)`` (S = ``output.examples_per_shard``).
Processes take the unfinished shards round-robin and step in lockstep; every step encodes one global batch over
every device of the mesh (each process feeds its own shard's rows). Finished shards are skipped on restart.
Latents are written raw (``normalized: false``) with ``stats.npz`` beside them; readers normalise on the fly.
Per-shard sidecars: ``cls-XXXXX.npz`` ([CLS], index, flip: the fit-gmm [CLS] pass reads only these) and
``stats-XXXXX.npz`` (partial (count, mean, M2), merged at the end, so resumed runs stay exact).

Kill safety: a shard is marked finished only by its ``shard-XXXXX.json`` (the commit point, written last, after
both sidecars and the data file are complete and fsynced: ``LatentShardWriter``), so a killed job never leaves a
half shard in the manifest. At start, process 0 removes a killed run's temp files and decides which shards are
left; the list is broadcast, so every process takes the same round-robin.

Pixel paths (spec 2a/2c): ``data.path = 'train'`` (ADM crop 256 -> torch bicubic to ``data.image_size``: 224 for
DINOv2, none for SigLIP2 / MAE, fed at 256) or ``'cls'`` (ADM crop to ``data.image_size`` directly, the official
GMM-fit path). ``output.flip_views`` also encodes each image's horizontal flip (flip=1).
Bad images are skipped and counted in the summary.
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
from mmfm_jax.config_utils import ConfigError, check, check_choice, check_positive, validate_base
from mmfm_jax.data import images as images_lib
from mmfm_jax.data import latents as latents_lib
from mmfm_jax.data import stats as stats_lib
from mmfm_jax.data.preprocess import mmfm_pixels
from mmfm_jax.models import encoders
from mmfm_jax.storage import as_path, load_npz, read_json, save_npz_atomic
from mmfm_jax.utils import progress
from mmfm_jax.workdir import Stage

DEFAULT_CONFIG = "encode.py:tiny"
# what the latents depend on (workdir.py): a re-run with other values stops; config.overwrite=True starts afresh
STAGE = Stage(keys=("data", "encoder", "output", "stats"), ignore=("data.num_threads", "data.batch_size"),
              inputs=("stats.import_path",), outputs=("latents",), output_keys=("output.dir",))
log = logging.getLogger("mmfm_jax")


def validate(cfg: ml_collections.ConfigDict) -> None:
    validate_base(cfg)
    check_choice(cfg, "data.source", ("folder", "tfds"))
    if cfg.data.source == "folder" and not cfg.data.root:
        raise ConfigError("config.data.root: required for data.source='folder'")
    check_choice(cfg, "data.path", ("train", "cls"))
    check_positive(cfg, "data.batch_size")
    check_positive(cfg, "output.examples_per_shard")
    check_choice(cfg, "output.latent_dtype", ("bfloat16", "float32"))
    check_choice(cfg, "encoder.name", encoders.NAMES)
    check_choice(cfg, "encoder.dtype", ("float32", "bfloat16"))
    check(cfg, "encoder.weights", lambda v: bool(v) or cfg.encoder.random_init, "required (a local HF directory or a "
          f"hub id such as {encoders.get(cfg.encoder.name).hub_id}); random_init=True is for tests only")
    check_positive(cfg, "data.image_size")
    check_positive(cfg, "data.limit", allow_zero=True)


def build_source(cfg: ml_collections.ConfigDict):
    if cfg.data.source == "folder":
        return images_lib.ImageFolderSource(cfg.data.root)
    return images_lib.TfdsSource(cfg.data.tfds_name, split=cfg.data.split, data_dir=cfg.data.tfds_dir or None)


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


def _local_rows(x: jax.Array, mesh) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    axes = parallel.batch_sharding(mesh, x.ndim).spec
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, PartitionSpec(*axes)))


def _shard_stats_path(out: Any, sid: int) -> Any:
    return out / f"stats-{sid:05d}.npz"


def _shards_to_do(writer: latents_lib.LatentShardWriter, out: Any, n_shards: int) -> list[int]:
    """Shards without a finished data file or a stats sidecar. Process 0 removes stale temp files and decides;
    the answer is broadcast, so every process takes the same round-robin (and nobody writes before the cleanup)."""
    todo = np.ones(n_shards, np.int32)
    if jax.process_index() == 0:
        removed = writer.cleanup_stale()
        if removed:
            log.warning("encode: removed %d temp files of an interrupted run: %s", len(removed), removed[:8])
        for s in writer.finished_shards():
            if s < n_shards and _shard_stats_path(out, s).exists():
                todo[s] = 0
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        todo = np.asarray(multihost_utils.broadcast_one_to_all(todo))
    return [int(s) for s in np.flatnonzero(todo)]


def _merge_stats(paths: list[Any]) -> stats_lib.Moments:
    acc = stats_lib.NO_MOMENTS
    for p in paths:
        z = load_npz(p)
        acc = stats_lib.merge_moments(acc, (float(z["count"]), z["mean"].astype(np.float64),
                                            z["m2"].astype(np.float64)))
    return acc


def run(cfg: ml_collections.ConfigDict, ctx) -> dict:
    mesh = ctx.mesh
    source = build_source(cfg)
    n_total = len(source) if not cfg.data.limit else min(len(source), int(cfg.data.limit))
    per_shard = int(cfg.output.examples_per_shard)
    n_shards = math.ceil(n_total / per_shard)
    out = as_path(cfg.output.dir) if cfg.output.dir else ctx.path("latents")
    spec = encoders.get(cfg.encoder.name)
    model = build_encoder(cfg)
    image_size = int(cfg.data.image_size)
    if image_size != spec.image_size and not cfg.encoder.random_init:
        log.warning("encode: %s is fed %d px here; MM-FM feeds it %d px", spec.name, image_size, spec.image_size)
    grid, dim = encoders.geometry(model, image_size)
    tokens = grid * grid
    writer = latents_lib.LatentShardWriter(out, (tokens, dim), cfg.output.latent_dtype, cls_dim=dim,
                                           grid=(grid, grid), normalized=False, num_shards=n_shards,
                                           extra=dict(encoder=cfg.encoder.weights or f"random:{cfg.encoder.preset}",
                                                      encoder_name=spec.name,
                                                      path=cfg.data.path, flip_views=bool(cfg.output.flip_views),
                                                      source=cfg.data.source),
                                           update_manifest=jax.process_index() == 0)
    imported = None
    if cfg.stats.import_path:  # read (and shape-checked) before any encoding: a bad file fails fast
        imported = stats_lib.load_stats(cfg.stats.import_path, tokens, dim)
    todo = _shards_to_do(writer, out, n_shards)
    store_dtype = latents_lib.LATENT_DTYPES[writer.latent_dtype]
    log.info("encode: %d images -> %d shards of %d (%d already done), %dx%d tokens x %d", n_total, n_shards,
             per_shard, n_shards - len(todo), grid, grid, dim)
    crop = int(cfg.data.crop_size) if cfg.data.path == "train" else image_size
    loader = images_lib.LoadExample(source, crop)
    step = make_encode_step(model, mesh, image_size, spec.name)
    n_proc, pid = jax.process_count(), jax.process_index()
    gb = int(cfg.data.batch_size)
    mult = parallel.batch_size_multiple(mesh)
    gb = -(-gb // mult) * mult
    local_bs = gb // n_proc
    batches_per_shard = math.ceil(per_shard / local_bs)
    rounds = math.ceil(len(todo) / n_proc)
    views = (False, True) if cfg.output.flip_views else (False,)
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
        it = images_lib.to_batches(ds, local_bs, num_threads=int(cfg.data.num_threads))
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
                lat, cls = _local_rows(lat, mesh)[valid], _local_rows(cls, mesh)[valid]
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
        save_npz_atomic(_shard_stats_path(out, sid), count=np.float64(count), mean=mean, m2=m2)
        writer.write_shard(sid, ex, info={"images": shard_bad.seen, **{
            k: v for k, v in shard_bad.summary().items() if k != "seen"}})  # last: its sidecar marks it finished
        written += len(ex["index"])
    bar.close()
    parallel.sync("encode_shards")
    summary = dict(images=n_total, shards=n_shards, shards_written_now=len(todo), output=str(out),
                   grid=[grid, grid], dim=dim, encoder=spec.name)
    summary.update(_gather_counts(bad, written))
    summary.update(_dataset_bad_counts(out, n_shards, bad.keep))
    if jax.process_index() == 0:
        count, mean, m2 = _merge_stats([_shard_stats_path(out, s) for s in range(n_shards)])
        if imported is not None:
            var, smean = imported
            stats = {"var": var} if smean is None else {"var": var, "mean": smean}
            summary["stats"] = f"imported {cfg.stats.import_path}"
        else:
            stats = {"var": (m2 / max(count, 1.0)).astype(np.float32), "mean": mean.astype(np.float32)}
            if not cfg.stats.keep_mean:
                stats.pop("mean")  # as the official DINOv2-B / SigLIP2-B statistics: variance only
            summary["stats"] = dict(count=count, var_mean=float(stats["var"].mean()))
        stats["eps"] = np.float32(1e-5)
        manifest = writer.finalize(stats)
        summary["num_examples"] = manifest["num_examples"]
    parallel.sync("encode_done")
    return summary


def _dataset_bad_counts(out: epath.Path, n_shards: int, keep: int) -> dict:
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


def _gather_counts(bad: images_lib.BadImageCounter, written: int) -> dict:
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
