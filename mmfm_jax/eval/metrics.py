"""FID, sFID, Inception Score and precision/recall as the guided-diffusion ADM evaluator defines them.

Statistics and the Frechet distance run on the host in float64 (numpy / scipy ``sqrtm``); the k-NN distances of
the precision/recall manifold estimator run in jax, blocked like ADM's ``ManifoldEstimator`` (10,000 x 10,000
blocks), with ADM's float16 distances by default. Feature conventions (see ``mmfm_jax.eval.features``):
``pool [N, 2048]`` -> FID, precision/recall; ``spatial [N, 2023]`` -> sFID; bias-free ``logits [N, 1008]`` -> IS.
The reference batch is ADM's npz (``VIRTUAL_imagenet256_labeled.npz``: ``mu``, ``sigma``, ``mu_s``, ``sigma_s``,
``arr_0`` uint8 images [N, 256, 256, 3]); FID/sFID use its stored statistics, precision/recall its images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

from mmfm_jax.storage import as_path

DISTANCE_DTYPES = ("float16", "float32")


# ----------------------------------------------------------------------------------------------------------------
# FID / sFID


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[N, D]`` features -> (``mu [D]``, ``sigma [D, D]``) in float64 (``np.cov(rowvar=False)``, ddof 1)."""
    f = np.asarray(feats, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"feature_stats: need [N>=2, D] features, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


SQRTM_METHODS = ("scipy", "eigh")


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """``tr(sqrtm(S1 S2))`` for symmetric PSD S1, S2 via two symmetric eigendecompositions (float64):
    ``S1 S2`` is similar to ``S1^1/2 S2 S1^1/2`` (PSD), so the trace is the sum of the square roots of its
    eigenvalues. Several times faster than ``scipy.linalg.sqrtm`` at 2048 dims and exact for singular products."""
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sum(np.sqrt(np.clip(ev, 0, None))))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, method: str = "scipy") -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))`` in float64.

    ``method='scipy'`` (default) is ADM (TTUR): ``scipy.linalg.sqrtm``; if it is not finite, retry with ``eps * I``
    added to both covariances; an imaginary part is dropped when the diagonal's is below 1e-3, otherwise it is an
    error. ``method='eigh'``: :func:`trace_sqrt_product` (same value to ~1e-8 relative on well-conditioned inputs;
    much faster, for tests and quick looks)."""
    if method not in SQRTM_METHODS:
        raise ValueError(f"frechet_distance: method must be one of {SQRTM_METHODS}, got {method!r}")
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"frechet_distance: shapes differ: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    if method == "eigh":
        return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates",
                      stacklevel=2)
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fid_from_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """Frechet distance between the Gaussian fits of two feature sets (FID on pool, sFID on spatial features)."""
    return frechet_distance(*feature_stats(feats1), *feature_stats(feats2))


# ----------------------------------------------------------------------------------------------------------------
# Inception Score


def _softmax64(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


def inception_score(logits_or_probs: np.ndarray, split_size: int | None = 5000, splits: int | None = None,
                    from_logits: bool = True) -> float:
    """ADM's Inception Score: ``exp(mean_i KL(p(y|x_i) || p(y)))`` per split, averaged over splits.

    ``logits_or_probs [N, 1008]``: the **bias-free** logits ``pool @ W`` (ADM's softmax input; float64 softmax
    here) or probabilities (``from_logits=False``). Splits: consecutive chunks of ``split_size`` (ADM: 5000, i.e.
    10 splits for 50k samples); or ``splits`` equal parts (``np.array_split``) when given. Terms with p = 0 count 0.
    """
    p = _softmax64(logits_or_probs) if from_logits else np.asarray(logits_or_probs, np.float64)
    if splits is not None:
        parts = np.array_split(p, splits)
    else:
        parts = [p[i:i + split_size] for i in range(0, len(p), split_size)]
    scores = []
    for part in parts:
        py = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(py)), 0.0)
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------------------------------
# Precision / recall (ADM's ManifoldEstimator, k-NN hyperspheres in squared-distance space)


def _sq_dists_block(a: jax.Array, b: jax.Array, dt: Any) -> jax.Array:
    a, b = a.astype(dt), b.astype(dt)
    na = jnp.sum(jnp.square(a).astype(jnp.float32), axis=1).astype(dt)
    nb = jnp.sum(jnp.square(b).astype(jnp.float32), axis=1).astype(dt)
    prec = "highest" if dt == jnp.float32 else None  # fp32 without TF32; fp16 inputs are exact in any mode
    ab = jnp.matmul(a, b.T, precision=prec, preferred_element_type=jnp.float32).astype(dt)
    d = (na[:, None] - (2 * ab).astype(dt)).astype(dt) + nb[None, :]
    return jnp.maximum(d.astype(dt), 0).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _sq_dists(u: jax.Array, v: jax.Array, dtype: str) -> jax.Array:
    """Squared distances ``max(|u|^2 - 2 u.v + |v|^2, 0)`` ``[R, C]`` float32. ``'float16'``: ADM's TF block (inputs
    and every intermediate rounded to float16, float32 accumulation), falling back to float32 if non-finite."""
    if dtype == "float32":
        return _sq_dists_block(u, v, jnp.float32)
    d16 = _sq_dists_block(u, v, jnp.float16)
    return jax.lax.cond(jnp.all(jnp.isfinite(d16)), lambda: d16, lambda: _sq_dists_block(u, v, jnp.float32))


@functools.partial(jax.jit, static_argnames=("k",))
def _kth_smallest(d: jax.Array, col_valid: jax.Array, k: int) -> jax.Array:
    d = jnp.where(col_valid[None, :], d, jnp.inf)
    return -jax.lax.top_k(-d, k + 1)[0][:, k]


def _check_dtype(distance_dtype: str) -> None:
    if distance_dtype not in DISTANCE_DTYPES:
        raise ValueError(f"distance_dtype must be one of {DISTANCE_DTYPES}, got {distance_dtype!r}")


def _padded_blocks(x: np.ndarray, size: int, fill: float = 0.0) -> list[tuple[int, int, jax.Array]]:
    """``[(start, n_valid, block)]`` with every block padded to ``min(size, len(x))`` rows (one compiled shape)."""
    size = min(size, len(x))
    out = []
    for s in range(0, len(x), size):
        b = x[s:s + size]
        n = len(b)
        if n < size:
            b = np.concatenate([b, np.full((size - n,) + b.shape[1:], fill, b.dtype)])
        out.append((s, n, jnp.asarray(b)))
    return out


def manifold_radii(feats: np.ndarray, k: int = 3, row_batch: int = 10000, col_batch: int = 10000,
                   distance_dtype: str = "float16") -> np.ndarray:
    """``[N]`` float32: squared distance of each point to its k-th nearest neighbour (the point itself is the 0th,
    as ADM's ``np.partition(..., k)`` over a row that includes the self-distance)."""
    _check_dtype(distance_dtype)
    f = np.asarray(feats, np.float32)
    n = len(f)
    if n <= k:
        raise ValueError(f"manifold_radii: need more than k={k} points, got {n}")
    cols = _padded_blocks(f, col_batch)
    col_valid = jnp.asarray(np.concatenate([np.arange(b.shape[0]) < m for _, m, b in cols]))
    radii = np.zeros(n, np.float32)
    for r0, m, rows in _padded_blocks(f, row_batch):
        d = jnp.concatenate([_sq_dists(rows, b, distance_dtype) for _, _, b in cols], axis=1)
        radii[r0:r0 + m] = np.asarray(_kth_smallest(d, col_valid, k))[:m]
    return radii


@jax.jit
def _in_balls(d: jax.Array, radii_rows: jax.Array, radii_cols: jax.Array) -> tuple[jax.Array, jax.Array]:
    rows_in = jnp.any(d <= radii_cols[None, :], axis=1)  # row point inside some column point's ball
    cols_in = jnp.any(d <= radii_rows[:, None], axis=0)  # column point inside some row point's ball
    return rows_in, cols_in


def precision_recall(real_feats: np.ndarray, fake_feats: np.ndarray, k: int = 3, row_batch: int = 10000,
                     col_batch: int = 10000, distance_dtype: str = "float16") -> tuple[float, float]:
    """ADM's improved precision and recall (Kynkaanniemi et al.) with k-NN radii (k = 3).

    precision = fraction of fake points inside the union of real balls; recall = fraction of real points inside
    the union of fake balls. Distances are squared Euclidean, computed in padded blocks of ``row_batch`` x
    ``col_batch`` (``distance_dtype`` ``'float16'`` as ADM's TF graph, or ``'float32'``).
    """
    _check_dtype(distance_dtype)
    real = np.asarray(real_feats, np.float32)
    fake = np.asarray(fake_feats, np.float32)
    r_real = manifold_radii(real, k, row_batch, col_batch, distance_dtype)
    r_fake = manifold_radii(fake, k, row_batch, col_batch, distance_dtype)
    real_in = np.zeros(len(real), bool)  # real point inside the fake manifold -> recall
    fake_in = np.zeros(len(fake), bool)  # fake point inside the real manifold -> precision
    rr = {s: b for s, _, b in _padded_blocks(r_real, row_batch, fill=-np.inf)}  # padding: empty balls
    rf = {s: b for s, _, b in _padded_blocks(r_fake, col_batch, fill=-np.inf)}
    fake_blocks = _padded_blocks(fake, col_batch)
    for r0, m, rows in _padded_blocks(real, row_batch):
        for c0, mc, cols in fake_blocks:
            a, b = _in_balls(_sq_dists(rows, cols, distance_dtype), rr[r0], rf[c0])
            real_in[r0:r0 + m] |= np.asarray(a)[:m]
            fake_in[c0:c0 + mc] |= np.asarray(b)[:mc]
    return float(fake_in.mean()), float(real_in.mean())


# ----------------------------------------------------------------------------------------------------------------
# Reference batches and image npz files


@contextlib.contextmanager
def _npy_member(path: str | os.PathLike, key: str) -> Iterator[tuple[Any, tuple[int, ...], np.dtype]]:
    with as_path(path).open("rb") as raw, zipfile.ZipFile(raw) as zf:  # local or gs://
        name = f"{key}.npy"
        if name not in zf.namelist():
            raise KeyError(f"{os.fspath(path)}: no array {key!r} (have {[n[:-4] for n in zf.namelist()]})")
        with zf.open(name) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"{os.fspath(path)}:{key}: unsupported .npy format version {version}")
            if fortran or dtype.hasobject:
                raise ValueError(f"{os.fspath(path)}:{key}: Fortran-ordered or object arrays are not supported")
            yield f, tuple(shape), dtype


def npz_array_shape(path: str | os.PathLike, key: str = "arr_0") -> tuple[int, ...]:
    """Shape of one array inside an npz without reading its data."""
    with _npy_member(path, key) as (_, shape, _dtype):
        return shape


def iter_npz_batches(path: str | os.PathLike, key: str = "arr_0", batch_size: int = 1000,
                     start: int = 0) -> Iterator[np.ndarray]:
    """Stream ``[<=batch_size, ...]`` batches of one array of an npz (compressed or not) without loading it whole."""
    with _npy_member(path, key) as (f, shape, dtype):
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        if start:
            f.seek(f.tell() + start * row) if f.seekable() else f.read(start * row)
        for i in range(start, shape[0], batch_size):
            n = min(batch_size, shape[0] - i)
            buf = f.read(n * row)
            if len(buf) != n * row:
                raise ValueError(f"{os.fspath(path)}:{key}: truncated at row {i}")
            yield np.frombuffer(buf, dtype=dtype).reshape((n,) + shape[1:])


@dataclasses.dataclass
class ReferenceBatch:
    """An ADM reference batch: stored pool (``mu``, ``sigma``) and spatial (``mu_s``, ``sigma_s``) statistics, float64,
    and the images ``arr_0`` (streamed with ``iter_images``; ``num_images`` 0 if absent)."""

    path: str
    mu: np.ndarray | None
    sigma: np.ndarray | None
    mu_s: np.ndarray | None
    sigma_s: np.ndarray | None
    num_images: int

    def iter_images(self, batch_size: int = 1000) -> Iterator[np.ndarray]:
        return iter_npz_batches(self.path, "arr_0", batch_size)

    @property
    def has_stats(self) -> bool:
        return all(x is not None for x in (self.mu, self.sigma, self.mu_s, self.sigma_s))


def load_reference_batch(path: str | os.PathLike) -> ReferenceBatch:
    """Read an ADM reference npz (``VIRTUAL_imagenet256_labeled.npz``): the statistics now, the images lazily."""
    path = os.fspath(path)
    if not as_path(path).exists():  # local or gs://
        raise FileNotFoundError(f"reference batch not found: {path}")
    with as_path(path).open("rb") as f, np.load(f) as z:
        keys = set(z.files)
        stats = {k: (np.asarray(z[k], np.float64) if k in keys else None) for k in ("mu", "sigma", "mu_s", "sigma_s")}
    if not ({"mu", "sigma"} <= keys or "arr_0" in keys):
        raise ValueError(f"{path}: neither statistics (mu, sigma) nor images (arr_0) found; keys {sorted(keys)}")
    n = npz_array_shape(path, "arr_0")[0] if "arr_0" in keys else 0
    return ReferenceBatch(path=path, num_images=n, **stats)


# ----------------------------------------------------------------------------------------------------------------
# Everything ADM prints


def adm_metrics(sample: Mapping[str, np.ndarray], ref: ReferenceBatch | None = None,
                ref_feats: Mapping[str, np.ndarray] | None = None, k: int = 3, split_size: int = 5000,
                distance_dtype: str = "float16", sqrtm: str = "scipy") -> dict[str, float]:
    """ADM ``evaluator.py main()``: Inception Score, FID, sFID, precision, recall.

    ``sample``/``ref_feats``: ``extract_features`` outputs (``pool``, ``spatial``, ``logits``). FID/sFID use the
    reference's stored statistics when present, else ``ref_feats``; precision/recall need ``ref_feats['pool']``
    (skipped, and absent from the result, without it).
    """
    out = {"inception_score": inception_score(sample["logits"], split_size=split_size)}
    mu, sigma = feature_stats(sample["pool"])
    mu_s, sigma_s = feature_stats(sample["spatial"])
    if ref is not None and ref.has_stats:
        r, r_s = (ref.mu, ref.sigma), (ref.mu_s, ref.sigma_s)
    elif ref_feats is not None:
        r, r_s = feature_stats(ref_feats["pool"]), feature_stats(ref_feats["spatial"])
    else:
        raise ValueError("adm_metrics: need reference statistics or reference features")
    out["fid"] = frechet_distance(mu, sigma, *r, method=sqrtm)
    out["sfid"] = frechet_distance(mu_s, sigma_s, *r_s, method=sqrtm)
    if ref_feats is not None:
        out["precision"], out["recall"] = precision_recall(ref_feats["pool"], sample["pool"], k=k,
                                                           distance_dtype=distance_dtype)
    return out
