"""EM numerics: the float64 path against scikit-learn's float64 GaussianMixture (and an extended-precision reference
where sklearn itself cancels), exact one-hot initial parameters and centred M-step variances in float32, and
fit-gmm's refusal of non-finite [CLS] rows."""

import warnings

import jax
import numpy as np
import pytest
from sklearn.cluster import kmeans_plusplus
from sklearn.datasets import make_blobs
from sklearn.mixture import GaussianMixture

from mmfm_jax.gmm import em, kmeanspp, mstep

EPS64 = 10 * float(np.finfo(np.float64).eps)


def _np(g):
    return [np.asarray(a, np.float64) for a in (g.weights, g.means, g.variances)]


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) / np.asarray(b, np.float64) - 1)))


def _sets():
    """(name, x float64, K): well-separated blobs; over-complete (K = 40 on 1,000 points); duplicates (10 points x 4
    and one point x 41, a collapsed component) plus a constant feature."""
    blobs, _ = make_blobs(n_samples=600, n_features=5, centers=4, cluster_std=0.6, center_box=(-10, 10),
                          random_state=0)
    over, _ = make_blobs(n_samples=1000, n_features=4, centers=5, cluster_std=1.0, random_state=1)
    deg, _ = make_blobs(n_samples=300, n_features=4, centers=3, cluster_std=0.5, center_box=(-8, 12), random_state=2)
    deg = np.concatenate([deg, np.repeat(deg[:10], 3, 0), np.repeat(deg[[50]], 40, 0)])
    deg = np.concatenate([deg, np.full((len(deg), 1), 7.25)], axis=1)
    return {"blobs": (blobs, 4), "overcomplete": (over, 40), "degenerate": (deg, 8)}


SETS = _sets()


def _sklearn(x, k, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GaussianMixture(k, covariance_type="diag", init_params="k-means++", random_state=seed,
                               max_iter=200).fit(x)


def _extended_reference(x, idx, k, reg=1e-6, tol=1e-3, max_iter=200):
    """sklearn's EM from the one-hot init at ``idx``, in numpy long double (64-bit mantissa), variances two-pass."""
    x = x.astype(np.longdouble)
    n, d = x.shape
    eps = np.longdouble(EPS64)

    def m_step(resp):
        nk = resp.sum(0) + eps
        mu = resp.T @ x / nk[:, None]
        ss = np.einsum("nk,nkd->kd", resp, (x[:, None] - mu[None]) ** 2) + eps * mu * mu  # = S2 - N_k mu^2
        return nk, mu, ss / nk[:, None] + reg

    resp = np.zeros((n, k), np.longdouble)
    resp[idx, np.arange(k)] = 1
    nk, m, v = m_step(resp)
    w, lbs = nk / n, []
    for _ in range(max_iter):
        lp = np.log(w) - 0.5 * (d * np.log(2 * np.pi) + np.log(v).sum(1)) \
            - 0.5 * (((x[:, None] - m[None]) ** 2) / v[None]).sum(-1)
        mx = lp.max(1, keepdims=True)
        lse = mx[:, 0] + np.log(np.exp(lp - mx).sum(1))
        lbs.append(lse.mean())
        nk, m, v = m_step(np.exp(lp - lse[:, None]))
        w = nk / nk.sum()
        if len(lbs) > 1 and abs(lbs[-1] - lbs[-2]) < tol:
            break
    return [np.asarray(a, np.float64) for a in (w, m, v)], float(lbs[-1]), len(lbs)


@pytest.mark.parametrize("name", sorted(SETS))
def test_float64_fit_matches_sklearn_float64_from_the_same_kmeanspp_indices(name):
    x, k = SETS[name]
    _, idx = kmeans_plusplus(x, k, random_state=3)  # what GaussianMixture(init_params='k-means++') draws
    sk = _sklearn(x, k, 3)
    g, info = em.fit(x, k, init=idx, dtype="float64", max_iter=200, chunk_size=64)
    assert not jax.config.jax_enable_x64  # enabled only inside the fit
    assert g.means.dtype == np.float64 and info["dtype"] == "float64" and info["init"] == "indices"
    w, m, v = _np(g)
    assert info["n_iter"] == sk.n_iter_ and info["converged"]
    if name != "degenerate":  # well-conditioned: sklearn's float64 fit is itself exact to ~1e-13
        assert max(_rel(w, sk.weights_), _rel(v, sk.covariances_)) < 1e-10
        assert np.abs(m - sk.means_).max() < 1e-10 * np.abs(sk.means_).max()
        assert abs(info["lower_bound"] / sk.lower_bound_ - 1) < 1e-10
        return
    # duplicates, a collapsed component and a constant feature (variances = reg_covar): sklearn's S2/N - mu^2
    # cancels (relative errors ~1e-7; some of its variances fall below reg_covar); ours is exact
    (w0, m0, v0), lb0, n_iter0 = _extended_reference(x, idx, k)
    assert n_iter0 == info["n_iter"]
    assert max(_rel(w, w0), _rel(v, v0)) < 1e-10 and np.abs(m - m0).max() < 1e-10 * np.abs(m0).max()
    assert abs(info["lower_bound"] / lb0 - 1) < 1e-10
    assert _rel(sk.covariances_, v0) > 1e-9 and sk.covariances_.min() < 1e-6 <= v.min()
    assert max(_rel(w, sk.weights_), _rel(v, sk.covariances_)) < 1e-5


def test_float32_initial_parameters_are_exact():
    """sklearn's one-hot init: variance = S2 / N_k - mu^2 + reg = nk_eps x^2 / N_k^2 + reg exactly; float32 gets it
    to a few ulp (the uncentred form left up to 12x reg_covar of rounding)."""
    x, k = SETS["overcomplete"]
    x32 = (x * 10 + 40).astype(np.float32)  # far from the origin: x^2 ~ 2500
    idx = kmeans_plusplus(x, k, random_state=0)[1]
    for eps in (mstep.NK_EPS, EPS64):
        w, m, v = _np(kmeanspp.params_from_indices(x32, idx, nk_eps=eps))
        pts = x32[idx].astype(np.float64)
        nk = 1 + eps
        np.testing.assert_allclose(v, eps * pts**2 / nk**2 + 1e-6, rtol=2e-6)
        np.testing.assert_allclose(m, pts / nk, rtol=1e-6)  # a few ulp: the points pass through x - shift
        np.testing.assert_allclose(w, nk / len(x), rtol=1e-6)
    g64, _ = em.fit(x32, k, init=idx, dtype="float64", max_iter=0)  # the float64 path: the same formula, exact
    np.testing.assert_allclose(_np(g64)[2], EPS64 * pts**2 / (1 + EPS64) ** 2 + 1e-6, rtol=1e-14)


def test_float32_centred_variances_of_a_tight_far_component():
    """51 copies of a point far from the data mean form one component: its variance is reg_covar (+ sklearn's
    nk_eps mu^2 / N_k), not reg_covar plus fp32 cancellation of (distance)^2; the rest matches the float64 fit."""
    x, k = SETS["blobs"]
    far = np.concatenate([x, np.repeat(x[[7]] + 40.0, 51, 0)]).astype(np.float32)
    idx = np.append(kmeans_plusplus(x, k, random_state=1)[1], len(x))
    # exact_top: the E-step's expanded form loses ~eps32 prec x^2 D ~ 20 nats of the tight component's density
    g32, i32 = em.fit(far, k + 1, init=idx, max_iter=6, tol=0.0, chunk_size=64, exact_top=True)
    g64, i64 = em.fit(far, k + 1, init=idx, max_iter=6, tol=0.0, chunk_size=64, dtype="float64",
                      nk_eps=mstep.NK_EPS)
    w32, m32, v32 = _np(g32)
    w64, m64, v64 = _np(g64)
    pt, nk = far[-1].astype(np.float64), 51 + mstep.NK_EPS  # sklearn's S2/N_k - mu^2 for 51 copies of pt
    np.testing.assert_allclose(v64[-1], 1e-6 + mstep.NK_EPS * 51 * pt * pt / nk**2, rtol=1e-9)
    np.testing.assert_allclose(v32[-1], v64[-1], rtol=1e-4)
    np.testing.assert_allclose(v32[:-1], v64[:-1], rtol=1e-4)
    np.testing.assert_allclose(m32, m64, atol=2e-5)
    np.testing.assert_allclose([h["lower_bound"] for h in i32["history"]],
                               [h["lower_bound"] for h in i64["history"]], rtol=1e-4)  # fp32 E-step


def test_float64_arguments():
    x = SETS["blobs"][0][:64]
    with pytest.raises(ValueError, match="precision='highest'"):
        em.fit(x, 2, dtype="float64", precision="bf16x3_fused")
    with pytest.raises(ValueError, match="dtype"):
        em.fit(x, 2, dtype="float16")
    with pytest.raises(ValueError, match="indices"):
        em.fit(x, 2, init=np.arange(3))


def test_fit_gmm_stops_on_non_finite_cls(tmp_path):
    from mmfm_jax.data import latents as latents_lib
    from mmfm_jax.jobs import fit_gmm

    rng = np.random.default_rng(0)
    writer = latents_lib.LatentShardWriter(tmp_path, (4, 2), "float32", cls_dim=3, grid=(2, 2), normalized=False,
                                           num_shards=3)
    for s in range(3):
        cls = rng.normal(size=(8, 3)).astype(np.float32)
        flip = np.zeros(8, np.int32)
        if s == 1:
            cls[2, 0], cls[5, 1] = np.nan, np.inf
        if s == 2:
            cls[0, 2], flip[1], cls[1, 0] = np.nan, 1, np.nan  # a flipped row is not fitted: not counted
        writer.write_shard(s, {"latent": rng.normal(size=(8, 4, 2)).astype(np.float32), "cls": cls,
                               "label": np.zeros(8, np.int32), "index": np.arange(8 * s, 8 * s + 8), "flip": flip})
    writer.finalize({"var": np.ones((4, 2), np.float32)})
    with pytest.raises(ValueError, match=r"3 of 23 \[CLS\] vectors .* in shards \(rows\): 1 \(2\), 2 \(1\)"):
        fit_gmm.read_cls(tmp_path)
