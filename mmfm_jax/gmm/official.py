"""Import the official MM-FM GMM pickles (reading them needs scikit-learn, whose objects they contain).

- ``gmm_n8192_diag_k-means++.pkl``: dict with ``model`` (a fitted ``sklearn.mixture.GaussianMixture``, diagonal:
  ``weights_`` [K], ``means_`` [K, D], ``covariances_`` [K, D]), ``labels``, ``config``, ``metrics``, ``metadata``.
- ``spatial_gmm_from_cls_n8192_diag_k-means++_flip.pkl``: dict with ``means`` [K, C*H*W] float64 in the official
  (C, H, W) order, ``variances`` [K] (one scalar per component), ``weights`` [K] (the [CLS] GMM's), ``cluster_counts``,
  ``config``, ``metadata`` (and a spherical ``model``).

Our layout is tokens-last: the spatial means become [K, L, C] with L = H*W row-major.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np

from mmfm_jax.gmm.diag import DiagGMM
from mmfm_jax.storage import as_path


class OfficialPickleError(ValueError):
    """The pickle lacks a key the official format has, or has the wrong shapes."""


def _load(path: str | os.PathLike) -> dict:
    try:
        with as_path(path).open("rb") as f:  # local or gs://
            obj = pickle.load(f)  # noqa: S301  (the user's own artifact; sklearn objects need pickle)
    except ModuleNotFoundError as e:
        raise OfficialPickleError(f"{path}: reading the official pickle needs scikit-learn ({e})") from e
    except Exception as e:  # noqa: BLE001  (truncated / corrupt)
        raise OfficialPickleError(f"{path}: cannot unpickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise OfficialPickleError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


def _need(d: dict, key: str, path) -> Any:
    if key not in d:
        raise OfficialPickleError(f"{path}: missing key {key!r} (have {sorted(d)})")
    return d[key]


def import_cls_gmm(path: str | os.PathLike) -> tuple[DiagGMM, dict]:
    """-> (DiagGMM in float32, metadata dict with config/metrics/metadata and the fit's ``labels`` count)."""
    d = _load(path)
    model = _need(d, "model", path)
    for attr in ("weights_", "means_", "covariances_"):
        if not hasattr(model, attr):
            raise OfficialPickleError(f"{path}: model has no attribute {attr!r} (not a fitted GaussianMixture?)")
    if getattr(model, "covariance_type", "diag") != "diag":
        raise OfficialPickleError(f"{path}: covariance_type {model.covariance_type!r}, expected 'diag'")
    w, mu, var = (np.asarray(getattr(model, a), np.float64) for a in ("weights_", "means_", "covariances_"))
    if mu.shape != var.shape or w.shape != (mu.shape[0],):
        raise OfficialPickleError(f"{path}: inconsistent shapes weights {w.shape}, means {mu.shape}, var {var.shape}")
    meta = {k: d.get(k) for k in ("config", "metrics", "metadata")}
    meta["source"] = str(path)
    gmm = DiagGMM(weights=np.float32(w / w.sum()), means=mu.astype(np.float32), variances=var.astype(np.float32))
    return gmm, meta


def import_spatial_table(path: str | os.PathLike, channels: int, height: int, width: int
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """-> (means [K, H*W, C] float32 tokens-last, variances [K] float32, weights [K] float32, metadata)."""
    d = _load(path)
    means = np.asarray(_need(d, "means", path))
    variances = np.asarray(_need(d, "variances", path), np.float64)
    weights = np.asarray(_need(d, "weights", path), np.float64)
    k = means.shape[0]
    if means.ndim != 2 or means.shape[1] != channels * height * width:
        raise OfficialPickleError(f"{path}: means have shape {means.shape}, expected [K, {channels * height * width}]"
                                  f" for C={channels}, H={height}, W={width}")
    if variances.shape != (k,) or weights.shape != (k,):
        raise OfficialPickleError(f"{path}: variances {variances.shape} / weights {weights.shape}, expected ({k},)")
    # (C, H, W) -> tokens-last, block by block into float32: no second float64 copy of the 12.9 GB official table
    tokens = np.empty((k, height * width, channels), np.float32)
    for s in range(0, k, 256):
        blk = means[s:s + 256].reshape(-1, channels, height, width)
        tokens[s:s + 256] = blk.transpose(0, 2, 3, 1).reshape(-1, height * width, channels)
    meta = {kk: d.get(kk) for kk in ("config", "metadata")}
    meta["cluster_counts"] = np.asarray(d.get("cluster_counts", np.zeros(k))).tolist()
    meta["source"] = str(path)
    return tokens, variances.astype(np.float32), np.float32(weights / weights.sum()), meta
