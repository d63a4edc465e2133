"""``python -m mmfm_jax fit-gmm``: the MM-FM source from a latent dataset (or from the official pickles).

1. [CLS] pass: the [CLS] vectors of every image (un-flipped examples only) go onto the mesh, sharded along N, and
   the sharded EM fits the diagonal GMM (official settings: K = 8192, k-means++, max_iter 100, reg_covar 1e-6,
   tol 1e-3). Every iteration is logged; the EM state is checkpointed (Orbax) so a killed fit resumes.
2. Spatial pass: every image's normalised latent (and its latent-space horizontal flip) is hard-assigned by the
   [CLS] GMM and summed per component, K-sharded; then per component the mean latent and one scalar variance.
3. Output ``WORKDIR/source`` (a ``ModeSource``: the training and sample jobs read it) and ``WORKDIR/cls_gmm``.

With ``import_official.cls_pkl`` / ``.spatial_pkl`` set, the official pickles are converted instead.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmfm_jax import parallel
from mmfm_jax.config_utils import ConfigError, check, check_choice, check_positive, validate_base
from mmfm_jax.data import latents as latents_lib
from mmfm_jax.gmm import diag, em, spatial
from mmfm_jax.gmm import io as gmm_io
from mmfm_jax.gmm.precision import FUSED_BF16X3, step_precisions
from mmfm_jax.gmm.source import ModeSource, save_source
from mmfm_jax.models import encoders
from mmfm_jax.storage import as_path, load_npz
from mmfm_jax.workdir import Stage

DEFAULT_CONFIG = "fit_gmm.py:tiny"
# what the GMM and the source depend on (workdir.py): a re-run with other values stops before the EM
STAGE = Stage(keys=("data", "gmm", "spatial", "latent", "import_official"),
              ignore=("data.batch_size", "gmm.checkpoint_every", "gmm.chunk_size", "gmm.max_iter"),
              inputs=("data.latents_dir", "import_official.cls_pkl", "import_official.spatial_pkl"),
              outputs=("cls_gmm", "cls_gmm.*", "em_state", "em_state.*", "source", "source.*"))
log = logging.getLogger("mmfm_jax")


def _precision_ok(v: str) -> bool:
    try:
        step_precisions(v)
    except (ValueError, TypeError):
        return False
    return True


def validate(cfg: ml_collections.ConfigDict) -> None:
    validate_base(cfg)
    official = bool(cfg.import_official.cls_pkl)
    if not official and not cfg.data.latents_dir:
        raise ConfigError("config.data.latents_dir: required (or set config.import_official.cls_pkl)")
    try:  # '' = any; else the latents must come from that encoder
        encoders.check_encoder(cfg.encoder.name, None if official else cfg.data.latents_dir,
                               data_key="data.latents_dir")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.import_official.spatial_pkl and not official:
        raise ConfigError("config.import_official.spatial_pkl: needs config.import_official.cls_pkl too")
    if not official:
        check_positive(cfg, "gmm.n_components")
        check_positive(cfg, "gmm.max_iter")
        check_positive(cfg, "gmm.tol", allow_zero=True)
        check_positive(cfg, "gmm.reg_covar")
        check_positive(cfg, "gmm.chunk_size")
        check_positive(cfg, "gmm.m_step_top", allow_zero=True)
        check(cfg, "gmm.init", lambda v: v in ("k-means++", "random_from_data"), "must be 'k-means++'")
        check_positive(cfg, "data.batch_size")
        check_choice(cfg, "spatial.shift", ("none", "mean"))
        check_choice(cfg, "gmm.dtype", ("float32", "float64"))
        if cfg.gmm.dtype == "float64" and cfg.gmm.precision != "highest":
            raise ConfigError(f"config.gmm.precision: must be 'highest' with config.gmm.dtype=float64, got "
                              f"{cfg.gmm.precision!r}")
        check(cfg, "gmm.precision", _precision_ok, f"must be highest | high | default | {FUSED_BF16X3} | a "
              "lax.DotAlgorithmPreset name, or 'E,M' for the E-step and M-step GEMMs (e.g. 'tf32_tf32_f32,highest')")
    check(cfg, "latent.grid", lambda v: len(v) == 2 and all(int(g) > 0 for g in v), "must be (H, W)")


# ----------------------------------------------------------------------------------------------------------------


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


def fit_cls_gmm(cfg: ml_collections.ConfigDict, ctx, cls: np.ndarray) -> tuple[diag.DiagGMM, dict]:
    g = cfg.gmm
    state_dir = ctx.path("em_state")
    with em.x64_scope(g.dtype):  # a float64 fit's state is float64: restore it with 64-bit types on
        state = gmm_io.load_em_state(state_dir, mesh=ctx.mesh) if gmm_io.has_em_state(state_dir) else None
    if state is not None:
        log.info("fit-gmm: resuming EM at iteration %d", int(state.iteration))
    from mmfm_jax.utils import progress

    ctx_progress = progress(total=int(g.max_iter), desc="EM", initial=int(state.iteration) if state else 0)
    t_last = [time.time()]

    def on_iteration(it: int, lower_bound: float, st) -> None:
        now = time.time()
        ctx.writer.scalars(it, {"gmm/lower_bound": lower_bound, "gmm/seconds_per_iter": now - t_last[0]},
                           console=it % max(1, cfg.log_every) == 0 or it == 1)
        t_last[0] = now
        ctx_progress.update(1)
        ctx_progress.set_postfix(ll=f"{lower_bound:.4f}")
        if g.checkpoint_every and it % g.checkpoint_every == 0:
            ctx.writer.flush()  # the logged iterations are durable before the EM checkpoint that covers them
            gmm_io.save_em_state(state_dir, st)

    gmm, info = em.fit(cls, int(g.n_components), mesh=ctx.mesh, seed=int(g.seed), init=g.init,
                       max_iter=int(g.max_iter), tol=float(g.tol), reg_covar=float(g.reg_covar),
                       chunk_size=int(g.chunk_size), state=state, on_iteration=on_iteration, precision=g.precision,
                       m_step_top=int(g.m_step_top), dtype=g.dtype)
    ctx_progress.close()
    if g.dtype == "float64":  # the source and the samplers are float32
        gmm = em.replicate(jax.tree.map(lambda a: np.asarray(a, np.float32), gmm), ctx.mesh)
    return gmm, info


def spatial_pass(cfg: ml_collections.ConfigDict, ctx, gmm: diag.DiagGMM) -> tuple[jax.Array, jax.Array, dict]:
    """-> (means [K, L, C], variances [K], info). Reads the normalised latents of the un-flipped examples."""
    ds = latents_lib.LatentShards(cfg.data.latents_dir, normalize=True)
    tokens, channels = ds.latent_shape
    h, w = (int(v) for v in cfg.latent.grid)
    if h * w != tokens:
        raise ConfigError(f"config.latent.grid = {tuple(cfg.latent.grid)} does not match {tokens} tokens")
    k = int(cfg.gmm.n_components) if not cfg.import_official.cls_pkl else gmm.n_components
    mesh = ctx.mesh
    stats = spatial.init_stats(k, tokens * channels, mesh)
    shift = None
    if cfg.spatial.shift == "mean" and ds.stats is not None and "mean" in ds.stats:
        shift = jnp.asarray(latents_lib.normalize_latents(ds.stats["mean"][None], ds.stats)[0])
    predict = jax.jit(diag.predict)
    gb = int(cfg.data.batch_size)
    gb = -(-gb // parallel.batch_size_multiple(mesh)) * parallel.batch_size_multiple(mesh)
    n = len(ds)
    # pass over every example in index order; each process reads its rows of each global batch
    local = parallel.local_batch_slice(gb)
    from mmfm_jax.utils import progress

    bar = progress(total=n, desc="spatial pass")
    n_used = 0
    for start in range(0, n, gb):
        idx = np.arange(start, start + gb)[local]
        valid = idx < n
        ex = ds.fetch(np.where(valid, idx, 0))
        valid &= ex["flip"] == 0
        batch = parallel.host_to_global({"latent": ex["latent"].astype(np.float32), "cls": ex["cls"],
                                         "valid": valid}, mesh)
        labels = predict(gmm, batch["cls"])
        stats = spatial.accumulate(stats, batch["latent"], labels, batch["valid"], mesh=mesh, height=h, width=w,
                                   flip=bool(cfg.spatial.flip), compensated=bool(cfg.spatial.compensated),
                                   shift=shift)
        n_used += int(valid.sum())
        bar.update(min(gb, n - start))
    bar.close()
    means, var, counts = spatial.finalize(stats, k, tokens, channels, shift=shift)
    counts = np.asarray(counts)
    info = dict(images=int(parallel.global_to_host(jnp.sum(counts)) // (2 if cfg.spatial.flip else 1)),
                empty_components=int((counts == 0).sum()), variance_mean=float(jnp.mean(var)),
                variance_min=float(jnp.min(var)), variance_max=float(jnp.max(var)))
    return means, var, info


def import_official(cfg: ml_collections.ConfigDict, ctx) -> dict:
    from mmfm_jax.gmm import official

    gmm, meta = official.import_cls_gmm(cfg.import_official.cls_pkl)
    gmm_io.save_gmm(ctx.path("cls_gmm"), gmm, {"imported_from": cfg.import_official.cls_pkl})
    out = dict(n_components=gmm.n_components, cls_dim=gmm.dim, imported=True)
    if cfg.import_official.spatial_pkl:
        h, w = (int(v) for v in cfg.latent.grid)
        means, var, weights, smeta = official.import_spatial_table(cfg.import_official.spatial_pkl,
                                                                   int(cfg.latent.channels), h, w)
        if not np.allclose(weights, np.asarray(gmm.weights), rtol=1e-4, atol=1e-7):
            log.warning("fit-gmm: the spatial pickle's weights differ from the [CLS] GMM's; using the [CLS] GMM's")
        src = ModeSource(gmm=gmm, means=means, variances=var)
        save_source(ctx.path("source"), src, {"imported_from": [cfg.import_official.cls_pkl,
                                                                 cfg.import_official.spatial_pkl]})
        out.update(event_shape=list(means.shape[1:]), variance_mean=float(var.mean()))
    return out


def run(cfg: ml_collections.ConfigDict, ctx) -> dict:
    if cfg.import_official.cls_pkl:
        return import_official(cfg, ctx)
    t0 = time.time()
    gmm_dir = ctx.path("cls_gmm")
    if (gmm_dir / "metadata.json").exists():
        gmm, meta = gmm_io.load_gmm(gmm_dir, mesh=ctx.mesh)
        info = meta.get("fit", {})
        log.info("fit-gmm: [CLS] GMM already fitted (%s); skipping EM", gmm_dir)
    else:
        x, _ = read_cls(cfg.data.latents_dir)
        log.info("fit-gmm: [CLS] EM on %d x %d, K=%d", len(x), x.shape[1], cfg.gmm.n_components)
        gmm, info = fit_cls_gmm(cfg, ctx, x)
        info = {k: v for k, v in info.items() if k not in ("history", "init_indices")}
        gmm_io.save_gmm(gmm_dir, gmm, {"fit": info, "latents_dir": cfg.data.latents_dir})
    t_em = time.time() - t0
    summary = dict(n_components=gmm.n_components, cls_dim=gmm.dim, em=info, em_seconds=round(t_em, 2))
    if cfg.spatial.enabled:
        t1 = time.time()
        means, var, sinfo = spatial_pass(cfg, ctx, gmm)
        src = ModeSource(gmm=gmm, means=means, variances=var)
        save_source(ctx.path("source"), src, {"latents_dir": cfg.data.latents_dir, "flip": bool(cfg.spatial.flip),
                                              "em": info, "encoder": encoders.recorded_encoder(cfg.data.latents_dir)})
        summary.update(spatial=sinfo, spatial_seconds=round(time.time() - t1, 2), source=str(ctx.path("source")))
    return summary
