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

import jax
import ml_collections

from mmfm_jax import distributed, parallel
from mmfm_jax.config_utils import ConfigError, check, check_choice, check_positive, validate_base
from mmfm_jax.data import encoding
from mmfm_jax.data import images as images_lib
from mmfm_jax.data import latents as latents_lib
from mmfm_jax.data import stats as stats_lib
from mmfm_jax.models import encoders
from mmfm_jax.storage import as_path
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


def run(cfg: ml_collections.ConfigDict, ctx) -> dict:
    mesh = ctx.mesh
    source = build_source(cfg)
    n_total = len(source) if not cfg.data.limit else min(len(source), int(cfg.data.limit))
    per_shard = int(cfg.output.examples_per_shard)
    n_shards = math.ceil(n_total / per_shard)
    out = as_path(cfg.output.dir) if cfg.output.dir else ctx.path("latents")
    spec = encoders.get(cfg.encoder.name)
    model = encoding.build_encoder(cfg)
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
    todo = encoding.pending_encode_shards(writer, out, n_shards)
    log.info("encode: %d images -> %d shards of %d (%d already done), %dx%d tokens x %d", n_total, n_shards,
             per_shard, n_shards - len(todo), grid, grid, dim)
    crop = int(cfg.data.crop_size) if cfg.data.path == "train" else image_size
    step = encoding.make_encode_step(model, mesh, image_size, spec.name)
    gb = parallel.round_up_batch(int(cfg.data.batch_size), mesh)
    bad, written = encoding.encode_shards(step, images_lib.LoadExample(source, crop), writer, out, todo,
                                          n_total=n_total, per_shard=per_shard, global_batch=gb, mesh=mesh,
                                          flip_views=bool(cfg.output.flip_views),
                                          num_threads=int(cfg.data.num_threads))
    distributed.sync("encode_shards")
    summary = dict(images=n_total, shards=n_shards, shards_written_now=len(todo), output=str(out),
                   grid=[grid, grid], dim=dim, encoder=spec.name)
    summary.update(encoding.gather_counts(bad, written))
    summary.update(encoding.dataset_bad_counts(out, n_shards, bad.keep))
    if jax.process_index() == 0:
        manifest, stats = encoding.finalize_dataset(writer, out, n_shards, imported, bool(cfg.stats.keep_mean))
        summary["stats"] = f"imported {cfg.stats.import_path}" if stats is None else stats
        summary["num_examples"] = manifest["num_examples"]
    distributed.sync("encode_done")
    return summary
