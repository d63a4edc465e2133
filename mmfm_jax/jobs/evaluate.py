"""``python -m mmfm_jax evaluate``: FID / sFID / Inception Score / precision / recall, as the ADM evaluator.

Inputs (``input.path``): an ``.npz`` with ``arr_0`` [N, H, W, 3] uint8 (the ADM sample-batch format), a folder of
npz shards written by the sample job (``images-*.npz``), or a folder of image files (png/jpg/...; any model's
samples). Inception features are computed data-parallel over every device of every process. Statistics, the
matrix square root and the metrics run on the host in float64, against the reference batch's stored ``mu``/``sigma``
(``VIRTUAL_imagenet256_labeled.npz``); precision/recall use the reference images' features (k = 3).
"""

from __future__ import annotations

import logging

import ml_collections

from mmfm_jax import parallel
from mmfm_jax.config_utils import ConfigError, check, check_choice, check_positive, validate_base
from mmfm_jax.eval import metrics as metrics_lib
from mmfm_jax.eval.features import extract_features
from mmfm_jax.eval.inputs import image_stream
from mmfm_jax.storage import save_npz_atomic, write_json_atomic
from mmfm_jax.utils import progress
from mmfm_jax.workdir import Stage

DEFAULT_CONFIG = "evaluate.py:imagenet256"
log = logging.getLogger("mmfm_jax")
# what the metrics depend on (workdir.py)
STAGE = Stage(keys=("input", "ref", "inception", "limit", "nearest_k", "is_split_size", "sqrtm"),
              inputs=("input.path", "ref.path", "inception.weights"), outputs=("metrics.json", "features.npz"))


def validate(cfg: ml_collections.ConfigDict) -> None:
    validate_base(cfg)
    check(cfg, "input.path", lambda v: bool(v), "required: an .npz, a sample-job folder or a folder of images")
    check_choice(cfg, "inception.input_path", ("adm", "pytorch_fid"))
    check(cfg, "inception.weights", lambda v: bool(v) or cfg.inception.random_init,
          "required: pytorch-fid's pt_inception-2015-12-05-*.pth (or the same state dict as .npz/.safetensors)")
    check_positive(cfg, "batch_size")
    check_positive(cfg, "nearest_k")
    check_choice(cfg, "sqrtm", metrics_lib.SQRTM_METHODS)
    check_positive(cfg, "limit", allow_zero=True)
    if not cfg.ref.path and not cfg.ref.allow_none:
        raise ConfigError("config.ref.path: required (e.g. VIRTUAL_imagenet256_labeled.npz)")


def build_inception(cfg: ml_collections.ConfigDict):
    from mmfm_jax.convert.inception import load_inception

    if cfg.inception.random_init:
        from flax import nnx

        from mmfm_jax.models.inception import InceptionV3

        log.warning("evaluate: random Inception weights (inception.random_init=True): for tests only")
        return InceptionV3(rngs=nnx.Rngs(int(cfg.seed)))
    return load_inception(cfg.inception.weights)


def run(cfg: ml_collections.ConfigDict, ctx) -> dict:
    model = build_inception(cfg)
    gb = parallel.round_up_batch(int(cfg.batch_size), ctx.mesh)
    n, stream = image_stream(cfg.input.path, gb, int(cfg.limit))
    log.info("evaluate: %d images from %s", n, cfg.input.path)
    bar = lambda it: progress(it, total=-(-n // gb), desc="inception (samples)")  # noqa: E731
    feats = extract_features(stream, model, ctx.mesh, gb, cfg.inception.input_path, progress=bar)
    ref = ref_feats = None
    if cfg.ref.path:
        ref = metrics_lib.load_reference_batch(cfg.ref.path)
        need_images = cfg.ref.precision_recall or not ref.has_stats
        if need_images and ref.num_images:
            rbar = lambda it: progress(it, total=-(-ref.num_images // gb), desc="inception (reference)")  # noqa: E731
            ref_feats = extract_features(ref.iter_images(gb), model, ctx.mesh, gb, cfg.inception.input_path,
                                         progress=rbar)
        elif not ref.has_stats:
            raise ConfigError(f"config.ref.path: {cfg.ref.path} has neither statistics nor images")
    if ref is None and ref_feats is None:
        out = {"inception_score": metrics_lib.inception_score(feats["logits"], split_size=int(cfg.is_split_size))}
    else:
        out = metrics_lib.adm_metrics(feats, ref, ref_feats, k=int(cfg.nearest_k), split_size=int(cfg.is_split_size),
                                      sqrtm=cfg.sqrtm)
    if ctx.is_main and cfg.save_features:
        save_npz_atomic(ctx.path("features.npz"), **feats)
    summary = dict(num_images=n, input=str(cfg.input.path), reference=cfg.ref.path or None,
                   input_path=cfg.inception.input_path, **{k: float(v) for k, v in out.items()})
    if ctx.is_main:
        write_json_atomic(ctx.path("metrics.json"), summary)
    log.info("evaluate: %s", ", ".join(f"{k}={v:.4f}" for k, v in out.items()))
    return summary
