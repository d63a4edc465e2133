"""What both digits studies share (``demo.py``: MM-FM vs the Gaussian baseline; ``gm.py``: GMFlow's solvers vs
steps): the settings, the GMM source fitted on the digits, the data split and scoring classifier, the sampling-time
source draw, and the train job's program (``train.trainer.Trainer``) for one setting."""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmfm_jax import parallel
from mmfm_jax.data import digits
from mmfm_jax.data import latents as latents_lib
from mmfm_jax.eval import classifier as clf_lib
from mmfm_jax.eval.metrics import feature_stats, frechet_distance
from mmfm_jax.gmm import em, spatial
from mmfm_jax.gmm.source import ModeSource, sample_prior, sample_source
from mmfm_jax.train.trainer import Trainer

SETTINGS = {  # name -> (source kind, model sees the mode)
    "gaussian": ("gaussian", False),
    "gmm_indep": ("gmm_indep", False),
    "gmm_mode": ("gmm_mode", False),
    "gmm_mode_cond": ("gmm_mode", True),
}
log = logging.getLogger("mmfm_jax")


def fit_source(cfg, mesh, train: dict[str, np.ndarray]) -> tuple[ModeSource, dict]:
    """EM on the [CLS] vectors, then the spatial pass (hard assignment, per-mode mean + scalar variance)."""
    g = cfg.gmm
    gmm, info = em.fit(train["cls"], int(g.n_components), mesh=mesh, seed=int(cfg.seed), max_iter=int(g.max_iter),
                       tol=float(g.tol), reg_covar=float(g.reg_covar), chunk_size=int(g.chunk_size))
    from mmfm_jax.gmm.diag import predict

    labels = np.asarray(predict(gmm, jnp.asarray(train["cls"])))
    n, tokens, ch = train["latent"].shape
    st = spatial.init_stats(int(g.n_components), tokens * ch, mesh)
    gb = -(-n // parallel.batch_size_multiple(mesh)) * parallel.batch_size_multiple(mesh)
    lat = np.zeros((gb, tokens, ch), np.float32)
    lat[:n] = train["latent"]
    lab = np.zeros(gb, np.int32)
    lab[:n] = labels
    valid = np.arange(gb) < n
    b = parallel.host_to_global({"x": lat, "l": lab, "v": valid}, mesh)
    st = spatial.accumulate(st, b["x"], b["l"], b["v"], mesh=mesh, height=digits.HEIGHT, width=digits.WIDTH,
                            flip=False)
    means, var, counts = spatial.finalize(st, int(g.n_components), tokens, ch)
    src = ModeSource(gmm=gmm, means=np.asarray(means), variances=np.asarray(var))
    return src, dict(em_iterations=int(info["n_iter"]), em_converged=bool(info["converged"]),
                     em_lower_bound=float(info["lower_bound"]), empty_modes=int((np.asarray(counts) == 0).sum()),
                     mode_variance_mean=float(np.mean(var)))


def setting_config(cfg, name: str) -> ml_collections.ConfigDict:
    """The demo config with setting ``name``'s source kind, conditioning and adaptive weighting."""
    kind, cond = SETTINGS[name]
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.source.kind = kind
    c.source.y_from = "mode" if cond else "none"
    c.model.use_y_conditioning = cond
    c.adaptive.enabled = bool(cfg.adaptive.enabled) and kind != "gaussian"
    return c


def draw_source(base: jax.Array, kind: str, source: ModeSource | None, indices: jax.Array):
    """Sampling-time source draw for sample ``i`` keyed by ``fold_in(base, i)`` -> (z0 [B, 64, 1], k [B])."""
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)
    if kind == "gaussian":
        return sample_source("gaussian", None, None, keys, (indices.shape[0], 64, 1))
    return sample_prior(source, keys)


def make_trainer(c: ml_collections.ConfigDict, mesh, train: dict, src: ModeSource | None):
    """The train job's program for one setting's config ``c`` (``src``: the fitted GMM source, used by the GMM
    settings): ``(trainer, fresh state, data iterator)``."""
    ds = latents_lib.InMemoryLatents(train)
    trainer = Trainer.from_config(c, mesh, latent_shape=ds.latent_shape, cls_dim=ds.cls_dim,
                                  source=src if c.source.kind != "gaussian" else None)
    it = latents_lib.make_iterator(ds, int(c.train.global_batch_size), seed=int(c.seed), num_threads=1, prefetch=2)
    return trainer, trainer.init_state(), it


def prepare(cfg) -> dict[str, Any]:
    """The digits split, the scoring classifier (trained on the training split), its test accuracy, the reference
    feature statistics and class frequencies, and the FD floor (held-out split vs training split)."""
    data = digits.load_digits_split(float(cfg.test_fraction), int(cfg.seed))
    train = data["train"]
    clf = clf_lib.train_classifier(train["cls"], train["label"], 10, steps=int(cfg.classifier_steps),
                                   seed=int(cfg.seed))
    _, test_pred = clf_lib.features_and_predictions(clf, data["test"]["cls"])
    clf_acc = float(np.mean(test_pred == data["test"]["label"]))
    ref_feats, _ = clf_lib.features_and_predictions(clf, train["cls"])
    freq = np.bincount(train["label"], minlength=10) / len(train["label"])
    ref_stats = {"fd": feature_stats(ref_feats), "freq": freq}
    test_feats, _ = clf_lib.features_and_predictions(clf, data["test"]["cls"])
    fd_floor = float(frechet_distance(*feature_stats(test_feats), *ref_stats["fd"]))
    tv_floor = clf_lib.mode_coverage(test_pred, 10, freq)["tv"]
    log.info("demo: classifier test accuracy %.3f; held-out split vs training split: FD %.3f, class-histogram TV "
             "%.3f (the floors)", clf_acc, fd_floor, tv_floor)
    return dict(train=train, clf=clf, clf_acc=clf_acc, ref_stats=ref_stats, fd_floor=fd_floor, tv_floor=tv_floor)


def score(clf, ref_stats, x: np.ndarray) -> dict[str, float]:
    """FD (classifier features, against the training split) and class coverage of samples x [n, 64, 1]."""
    n = x.shape[0]
    feats, pred = clf_lib.features_and_predictions(clf, np.clip(x.reshape(n, -1), -1.5, 1.5))
    cov = clf_lib.mode_coverage(pred, 10, ref_stats["freq"])
    return dict(fd=float(frechet_distance(*feature_stats(feats), *ref_stats["fd"])), covered=cov["covered"],
                tv=cov["tv"])
