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
import time

import ml_collections

from mmfm_jax import parallel
from mmfm_jax.config_utils import ConfigError, check, check_choice, check_positive, validate_base
from mmfm_jax.data import gmm_inputs
from mmfm_jax.data import latents as latents_lib
from mmfm_jax.data.gmm_inputs import read_cls
from mmfm_jax.gmm import diag
from mmfm_jax.gmm import fit as gmm_fit
from mmfm_jax.gmm import io as gmm_io
from mmfm_jax.gmm.precision import FUSED_BF16X3, step_precisions
from mmfm_jax.gmm.source import ModeSource, save_source
from mmfm_jax.models import encoders
from mmfm_jax.utils import progress
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
        check_positive(cfg, "gmm.chunk_size", allow_zero=True)
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


def fit_cls_gmm(cfg: ml_collections.ConfigDict, ctx, cls) -> tuple[diag.DiagGMM, dict]:
    """The [CLS] EM of ``gmm.*`` on ``cls`` [N, D], resumed from ``WORKDIR/em_state``, logged every iteration."""
    g = cfg.gmm
    state_dir = ctx.path("em_state")
    state = gmm_fit.resume_state(state_dir, ctx.mesh, g.dtype)
    bar = progress(total=int(g.max_iter), desc="EM", initial=int(state.iteration) if state else 0)
    t_last = [time.time()]

    def on_iteration(it: int, lower_bound: float) -> None:
        now = time.time()
        ctx.writer.scalars(it, {"gmm/lower_bound": lower_bound, "gmm/seconds_per_iter": now - t_last[0]},
                           console=it % max(1, cfg.log_every) == 0 or it == 1)
        t_last[0] = now
        bar.update(1)
        bar.set_postfix(ll=f"{lower_bound:.4f}")

    gmm, info = gmm_fit.fit_resumable(cls, int(g.n_components), mesh=ctx.mesh, state_dir=state_dir, state=state,
                                      checkpoint_every=int(g.checkpoint_every), on_iteration=on_iteration,
                                      before_checkpoint=ctx.writer.flush, dtype=g.dtype, seed=int(g.seed),
                                      init=g.init, max_iter=int(g.max_iter), tol=float(g.tol),
                                      reg_covar=float(g.reg_covar), chunk_size=int(g.chunk_size),
                                      precision=g.precision, m_step_top=int(g.m_step_top))
    bar.close()
    return gmm, info


def spatial_pass(cfg: ml_collections.ConfigDict, ctx, gmm: diag.DiagGMM):
    """-> (means [K, L, C], variances [K], info). Reads the normalised latents of the un-flipped examples."""
    ds = latents_lib.LatentShards(cfg.data.latents_dir, normalize=True)
    tokens, channels = ds.latent_shape
    h, w = (int(v) for v in cfg.latent.grid)
    if h * w != tokens:
        raise ConfigError(f"config.latent.grid = {tuple(cfg.latent.grid)} does not match {tokens} tokens")
    k = int(cfg.gmm.n_components) if not cfg.import_official.cls_pkl else gmm.n_components
    shift = gmm_inputs.mean_shift(ds) if cfg.spatial.shift == "mean" else None
    batches = gmm_inputs.spatial_batches(ds, parallel.round_up_batch(int(cfg.data.batch_size), ctx.mesh), ctx.mesh)
    return gmm_fit.spatial_table(batches, gmm, k, tokens, channels, mesh=ctx.mesh, height=h, width=w,
                                 flip=bool(cfg.spatial.flip), compensated=bool(cfg.spatial.compensated), shift=shift)


def run(cfg: ml_collections.ConfigDict, ctx) -> dict:
    if cfg.import_official.cls_pkl:
        h, w = (int(v) for v in cfg.latent.grid)
        return gmm_fit.import_official(cfg.import_official.cls_pkl, cfg.import_official.spatial_pkl,
                                       int(cfg.latent.channels), h, w, ctx.path("cls_gmm"), ctx.path("source"))
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
