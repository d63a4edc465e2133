"""Sharded diagonal GMM EM: sklearn parity, k-means++ semantics, sharding/chunking invariance, degenerate data,
resume, save/load."""

import warnings

import jax
import numpy as np
import pytest
from sklearn.cluster._kmeans import _kmeans_plusplus
from sklearn.mixture import GaussianMixture

from mmfm_jax import parallel
from mmfm_jax.gmm import diag, em, io, kmeanspp
from mmfm_jax.gmm.precision import step_precisions

F64_NK_EPS = 10 * float(np.finfo(np.float64).eps)


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    return dict(np.load(fixtures_dir / "gmm_cls_small.npz"))


def _mesh(n):
    return parallel.make_mesh(None, jax.devices()[:n])


def _np(g):
    return [np.asarray(a, np.float64) for a in (g.weights, g.means, g.variances)]


def _blobs(n, d, k, seed, scale=3.0, noise=1.0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * scale
    return (centers[rng.integers(0, k, n)] + rng.normal(size=(n, d)) * noise).astype(np.float32)


# One shared problem (same shapes -> compiled kernels are reused across tests): N = 1003 = 8 * 125 + 3 (padded and
# masked on 8 devices), D = 8, K = 6.
X = _blobs(1003, 8, 6, seed=5, noise=1.2) + 4.0
K = 6


def test_fixture_posteriors_and_loglik(fixture):
    g = diag.DiagGMM(*(np.asarray(fixture[f"param/{k}"]) for k in ("weights_", "means_", "covariances_")))
    q = fixture["input/query_cls"]
    # exact float64 log-likelihoods of the fixture's parameters
    w, m, v = (np.asarray(a, np.float64) for a in (g.weights, g.means, g.variances))
    q64 = q.astype(np.float64)
    lj = np.log(w) - 0.5 * (q.shape[1] * np.log(2 * np.pi) + np.log(v).sum(1)
                            + (((q64[:, None] - m[None]) ** 2) / v[None]).sum(-1))
    exact = np.logaddexp.reduce(lj, axis=1)
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(diag.responsibilities(g, q), fixture["output/predict_proba"], atol=1e-5)
        np.testing.assert_array_equal(diag.predict(g, q), fixture["output/predict"])
        # Both fp32 two-GEMM evaluations (sklearn's stored score_samples and ours) sit within ~5e-5 of the exact
        # values (terms of size ~500 cancel to ~5), so they agree to 1e-4, not 1e-5.
        lp = np.asarray(diag.log_prob(g, q), np.float64)
    np.testing.assert_allclose(lp, exact, atol=5e-5)
    np.testing.assert_allclose(fixture["output/score_samples"], exact, atol=6e-5)
    np.testing.assert_allclose(lp, fixture["output/score_samples"], atol=1e-4)


def test_fit_reproduces_sklearn_fixture_from_its_kmeanspp_picks(fixture):
    """sklearn's own k-means++ picks (random_state=42) -> our one-hot init + EM == the fixture's fitted model."""
    x = fixture["input/train_cls"]
    _, idx = _kmeans_plusplus(x.astype(np.float64), 8, (x.astype(np.float64) ** 2).sum(1), np.ones(len(x)),
                              np.random.RandomState(42))
    mesh = _mesh(8)
    init = kmeanspp.params_from_indices(x, idx, mesh=mesh)
    g, info = em.fit(x, 8, mesh=mesh, init=init, chunk_size=64)
    w, m, v = _np(g)
    np.testing.assert_allclose(w, fixture["param/weights_"], atol=1e-6)
    np.testing.assert_allclose(m, fixture["param/means_"], atol=1e-5)
    # sklearn's float32 variances are themselves 1.5e-4 (relative) from its float64 fit; ours are 5e-5 from it
    np.testing.assert_allclose(v, fixture["param/covariances_"], rtol=3e-4)
    sk64 = GaussianMixture(8, covariance_type="diag", reg_covar=1e-6, random_state=42).fit(x.astype(np.float64))
    np.testing.assert_allclose(v, sk64.covariances_, rtol=1e-4)
    np.testing.assert_allclose(m, sk64.means_, atol=1e-6)
    assert info["n_iter"] == int(fixture["output/n_iter_"]) and info["converged"] == bool(fixture["output/converged_"])
    assert info["init"] == "given" and len(info["history"]) == info["n_iter"]
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(diag.responsibilities(g, fixture["input/query_cls"]),
                                   fixture["output/predict_proba"], atol=1e-4)


def test_fit_matches_sklearn_from_explicit_init():
    """Explicit DiagGMM init == sklearn weights_init / means_init / precisions_init (= 1 / variances)."""
    x = _blobs(1500, 6, 4, seed=1, noise=1.5)  # overlapping: EM needs many iterations
    rng = np.random.default_rng(2)
    init = diag.DiagGMM(np.full(4, 0.25, np.float32), x[rng.choice(len(x), 4, replace=False)],
                        np.full((4, 6), 2.0, np.float32))
    sk = GaussianMixture(4, covariance_type="diag", init_params="random_from_data", reg_covar=1e-6, tol=1e-3,
                         max_iter=100, weights_init=np.asarray(init.weights, np.float64),
                         means_init=np.asarray(init.means, np.float64),
                         precisions_init=1.0 / np.asarray(init.variances, np.float64)).fit(x.astype(np.float64))
    g, info = em.fit(x, 4, mesh=_mesh(8), init=init, chunk_size=128, nk_eps=F64_NK_EPS)
    assert info["n_iter"] == sk.n_iter_ > 5 and info["converged"]
    w, m, v = _np(g)
    np.testing.assert_allclose(w, sk.weights_, atol=2e-5)
    np.testing.assert_allclose(m, sk.means_, atol=1e-4)
    np.testing.assert_allclose(v, sk.covariances_, rtol=2e-4)
    assert abs(info["lower_bound"] - sk.lower_bound_) < 1e-5
    np.testing.assert_allclose([h["lower_bound"] for h in info["history"]], sk.lower_bounds_, atol=1e-5)


class _FeedRandomState:
    """Stands in for sklearn's RandomState and replays our k-means++ draws."""

    def __init__(self, seed, k):
        self.u, self.c = kmeanspp.draws(seed, k, kmeanspp.n_local_trials_default(k)), 0

    def choice(self, n, p=None):
        return min(int(np.floor(self.u[0, 0] * np.float32(n))), n - 1)

    def uniform(self, size):
        self.c += 1
        assert size == self.u.shape[1]
        return self.u[self.c].astype(np.float64)


@pytest.mark.parametrize("n_dev", [1, 8])
def test_kmeanspp_is_sklearns_algorithm(n_dev):
    """Fed the same random numbers, sklearn's own ``_kmeans_plusplus`` picks the same points (N % 8 != 0)."""
    x64 = X.astype(np.float64)
    for seed in (7, 8):
        ours = kmeanspp.kmeans_plusplus_indices(X, K, seed=seed, mesh=_mesh(n_dev))
        _, ref = _kmeans_plusplus(x64, K, (x64**2).sum(1), np.ones(len(X)), _FeedRandomState(seed, K))
        np.testing.assert_array_equal(ours, ref)
    assert kmeanspp.n_local_trials_default(8192) == 2 + int(np.log(8192)) == 11


def test_kmeanspp_init_is_sklearn_initialize():
    idx = kmeanspp.kmeans_plusplus_indices(X, K, seed=0, mesh=_mesh(8))
    assert len(set(idx.tolist())) == K
    for nk_eps in (em.NK_EPS, F64_NK_EPS):
        g = kmeanspp.params_from_indices(X, idx, mesh=_mesh(8), nk_eps=nk_eps)
        resp = np.zeros((len(X), K))
        resp[idx, np.arange(K)] = 1
        nk = resp.sum(0) + nk_eps
        means = resp.T @ X.astype(np.float64) / nk[:, None]
        w, m, v = _np(g)
        np.testing.assert_allclose(w, nk / len(X), rtol=1e-6)  # sklearn: not normalised in _initialize
        # x / N_k is taken in the shifted frame: with float32's eps the means move by shift * 1.2e-6 (~6e-6 here)
        np.testing.assert_allclose(m, means, atol=1e-6 if nk_eps == F64_NK_EPS else 1e-5)
    assert np.float32(1e-6) <= v.min() and v.max() < 2e-6  # reg_covar (+ fp32 rounding of x^2 - x^2)


def test_sharded_equals_single_device_and_chunked_equals_unchunked():
    ref, info_ref = em.fit(X, K, mesh=_mesh(1), seed=11, chunk_size=4096, max_iter=30)
    assert info_ref["n_iter"] > 3
    for n_dev, chunk in [(1, 100), (8, 17)]:
        g, info = em.fit(X, K, mesh=_mesh(n_dev), seed=11, chunk_size=chunk, max_iter=30)
        assert info["init_indices"] == info_ref["init_indices"]
        assert info["n_iter"] == info_ref["n_iter"] and info["converged"] == info_ref["converged"]
        for a, b in zip(_np(g), _np(ref)):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
        assert abs(info["lower_bound"] - info_ref["lower_bound"]) < 1e-5


def test_global_jax_array_input_matches_numpy():
    mesh = _mesh(8)
    g1, i1 = em.fit(X, K, mesh=mesh, seed=1, max_iter=5, chunk_size=17)
    xg = jax.device_put(X, jax.devices()[3])  # on another device set: moved onto the mesh, then padded
    g2, i2 = em.fit(xg, K, mesh=mesh, seed=1, max_iter=5, chunk_size=17)
    assert i1["init_indices"] == i2["init_indices"]
    for a, b in zip(_np(g1), _np(g2)):
        np.testing.assert_array_equal(a, b)


def test_constant_feature_and_duplicates_fit_where_sklearn_fails():
    rng = np.random.default_rng(0)
    base = (rng.normal(size=(40, 6)) * 0.7 + 30).astype(np.float32)
    x = np.concatenate([np.repeat(base, 5, axis=0), np.full((200, 1), 7.3, np.float32)], axis=1)
    with warnings.catch_warnings(), pytest.raises(ValueError, match="ill-defined empirical covariance"):
        warnings.simplefilter("ignore")
        GaussianMixture(16, covariance_type="diag", random_state=0).fit(x)
    g, info = em.fit(x, 16, mesh=_mesh(8), seed=0, chunk_size=32)
    w, m, v = _np(g)
    assert info["converged"] and np.isfinite(info["lower_bound"])
    assert all(np.isfinite(a).all() for a in (w, m, v)) and v.min() >= np.float32(1e-6) and abs(w.sum() - 1) < 1e-6
    # same start in float64 sklearn (which can fit it): same model up to fp32 resolution of the data
    idx = np.asarray(info["init_indices"])
    init = diag.DiagGMM(np.full(16, 1 / 16, np.float32), x[idx], np.full((16, 7), 1e-6, np.float32))
    g, info = em.fit(x, 16, mesh=_mesh(8), init=init, chunk_size=32, nk_eps=F64_NK_EPS)
    sk = GaussianMixture(16, covariance_type="diag", init_params="random_from_data", weights_init=np.full(16, 1 / 16),
                         means_init=x[idx].astype(np.float64), precisions_init=np.full((16, 7), 1e6))
    sk.fit(x.astype(np.float64))
    w, m, v = _np(g)
    assert info["n_iter"] == sk.n_iter_
    np.testing.assert_allclose(w, sk.weights_, atol=1e-6)
    np.testing.assert_allclose(m, sk.means_, atol=4e-6)  # fp32 ulp at 30 is 1.9e-6
    np.testing.assert_allclose(v, sk.covariances_, rtol=1e-3, atol=5e-7)
    assert abs(info["lower_bound"] - sk.lower_bound_) < 0.05


def test_empty_component_no_nan():
    means = np.concatenate([X[:K - 1], np.full((1, X.shape[1]), 1e4, np.float32)])
    init = diag.DiagGMM(np.full(K, 1 / K, np.float32), means, np.ones((K, X.shape[1]), np.float32))
    g, info = em.fit(X, K, mesh=_mesh(8), init=init, max_iter=5, chunk_size=17)
    w, m, v = _np(g)
    assert all(np.isfinite(a).all() for a in (w, m, v)) and np.isfinite(info["lower_bound"])
    assert w[-1] < 1e-6 and v.min() >= np.float32(1e-6) and info["n_iter"] == 5


def test_resume_from_mid_fit_state_is_exact(tmp_path):
    x, k = X, K
    mesh = _mesh(8)
    states = {}
    g_full, info_full = em.fit(x, k, mesh=mesh, seed=2, chunk_size=17,
                               on_iteration=lambda it, lb, s: states.__setitem__(it, s))
    assert info_full["n_iter"] >= 4 and sorted(states) == list(range(1, info_full["n_iter"] + 1))
    assert float(states[3].lower_bound) == info_full["history"][2]["lower_bound"]
    io.save_em_state(tmp_path / "em", states[2], {"job": "test"})
    io.save_em_state(tmp_path / "em", states[3], {"job": "test"})  # replaces the previous state
    state = io.load_em_state(tmp_path / "em", mesh=mesh)
    assert io.read_metadata(tmp_path / "em")["metadata"] == {"job": "test"}
    assert int(state.iteration) == 3 and not bool(state.converged)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["em"]
    g, info = em.fit(x, k, mesh=mesh, chunk_size=17, state=state)
    assert info["n_iter"] == info_full["n_iter"] and info["init"] == "resumed"
    assert [h["lower_bound"] for h in info["history"]] == [h["lower_bound"] for h in info_full["history"][3:]]
    for a, b in zip(_np(g), _np(g_full)):
        np.testing.assert_array_equal(a, b)
    # a converged state returns at once
    _, info = em.fit(x, k, mesh=mesh, chunk_size=17, state=states[info_full["n_iter"]])
    assert info["history"] == [] and info["converged"]


def test_save_load_gmm_roundtrip(tmp_path):
    g, _ = em.fit(X, K, mesh=_mesh(8), max_iter=3, chunk_size=17)
    io.save_gmm(tmp_path / "gmm", g, {"n_iter": 3, "note": "x"})
    with pytest.raises(FileExistsError):
        io.save_gmm(tmp_path / "gmm", g)
    io.save_gmm(tmp_path / "gmm", g, {"n_iter": 3, "note": "y"}, overwrite=True)
    g2, meta = io.load_gmm(tmp_path / "gmm")
    assert meta == {"n_iter": 3, "note": "y"}
    for a, b in zip(_np(g), _np(g2)):
        np.testing.assert_array_equal(a, b)
    mesh = _mesh(8)
    m2 = _mesh(2)  # K = 6 components split over 2 devices ('modes')
    sh = {"weights": parallel.batch_sharding(m2, 1), "means": parallel.batch_sharding(m2, 2),
          "variances": parallel.batch_sharding(m2, 2)}
    g3, _ = io.load_gmm(tmp_path / "gmm", sharding=sh)
    assert g3.means.addressable_shards[0].data.shape == (K // 2, X.shape[1])
    np.testing.assert_array_equal(np.asarray(g3.means), np.asarray(g.means))
    g4, _ = io.load_gmm(tmp_path / "gmm", mesh=mesh)
    assert g4.means.sharding.is_fully_replicated and len(g4.means.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(g4.variances), np.asarray(g.variances))
    with pytest.raises(FileNotFoundError):
        io.load_gmm(tmp_path / "nothing")


def test_separate_e_and_m_step_precisions():
    from jax import lax

    assert step_precisions("highest") == (lax.Precision.HIGHEST, lax.Precision.HIGHEST)
    assert step_precisions("tf32_tf32_f32, highest") == (lax.DotAlgorithmPreset.TF32_TF32_F32,
                                                             lax.Precision.HIGHEST)
    assert step_precisions(("default", "bf16_bf16_f32_x6")) == (lax.Precision.DEFAULT,
                                                                   lax.DotAlgorithmPreset.BF16_BF16_F32_X6)
    with pytest.raises(ValueError, match="E-step, M-step"):
        step_precisions("highest,highest,highest")
    with pytest.raises(ValueError, match="unknown precision"):
        step_precisions("highest,fast")
    # a pair of equal precisions is the single value, bit for bit (k-means++ init included)
    x = np.random.default_rng(3).normal(size=(300, 6)).astype(np.float32)
    g1, i1 = em.fit(x, 4, max_iter=3, tol=0.0, precision="highest")
    g2, i2 = em.fit(x, 4, max_iter=3, tol=0.0, precision="highest,highest")
    assert [h["lower_bound"] for h in i1["history"]] == [h["lower_bound"] for h in i2["history"]]
    np.testing.assert_array_equal(np.asarray(g1.variances), np.asarray(g2.variances))


def test_emulated_gemms_round_as_documented():
    from mmfm_jax.bench.gmm_emulate import _tf32, emulated_gemm

    one = np.float32(1.0)
    ulp = np.float32(2.0 ** -10)  # TF32 keeps 10 mantissa bits
    vals = np.array([one + ulp, one + ulp / 2, one + 3 * ulp / 2, one + ulp / 4], np.float32)
    np.testing.assert_array_equal(np.asarray(_tf32(vals)), [one + ulp, one, one + 2 * ulp, one])  # nearest, ties even
    r = np.random.default_rng(0)
    a, b = r.normal(size=(16, 32)).astype(np.float32), r.normal(size=(8, 32)).astype(np.float32)
    dims = (((1,), (1,)), ((), ()))
    exact = a.astype(np.float64) @ b.T.astype(np.float64)
    errs = {m: np.abs(np.asarray(emulated_gemm(m)(a, b, dims)) - exact).max() for m in ("f32", "tf32", "bf16x3")}
    assert errs["f32"] < 1e-5 and errs["bf16x3"] < 1e-4 < errs["tf32"] < 5e-2, errs


def test_fused_bf16x3_gemms_and_fit():
    from mmfm_jax.bench.gmm_emulate import emulated_gemm
    from mmfm_jax.gmm import precision as gp

    r = np.random.default_rng(5)
    a, w = r.normal(size=(64, 48)).astype(np.float32), r.normal(size=(32, 48)).astype(np.float32)
    resp = r.uniform(size=(64, 32)).astype(np.float32)
    fused = gp.step_precisions("bf16x3_fused")
    assert fused == (gp.FUSED_BF16X3, gp.FUSED_BF16X3)
    w3 = gp.prepare_e_weights(w, gp.FUSED_BF16X3)
    assert w3.shape == (32, 144) and w3.dtype == np.dtype("bfloat16")  # [w_hi, w_hi, w_lo], split once
    got_e = np.asarray(gp.e_step_gemm(a, w3, gp.FUSED_BF16X3))
    got_m = np.asarray(gp.m_step_gemm(resp, a, gp.FUSED_BF16X3))
    exact_e = a.astype(np.float64) @ w.T.astype(np.float64)
    exact_m = resp.T.astype(np.float64) @ a.astype(np.float64)
    # the 3-pass split: ~2^-16 relative per product (single bf16: ~2^-8), as the documented emulation
    for got, exact, dims, x, y in ((got_e, exact_e, gp.DIMS_NT, a, w), (got_m, exact_m, gp.DIMS_TN, resp, a)):
        scale = np.abs(x).max() * np.abs(y).max() * x.shape[1 if dims == gp.DIMS_NT else 0]
        assert np.abs(got - exact).max() < 2.0 ** -15 * scale
        np.testing.assert_allclose(got, np.asarray(emulated_gemm("bf16x3")(x, y, dims)), atol=2.0 ** -20 * scale)
    assert gp.lax_precision(gp.FUSED_BF16X3) == jax.lax.Precision.HIGHEST  # k-means++ distances stay fp32
    # a whole fit: close to fp32 from the same k-means++ start
    x = np.concatenate([r.normal(size=(200, 6)) + 6.0 * c for c in range(3)]).astype(np.float32)
    g32, i32 = em.fit(x, 3, max_iter=5, tol=0.0, precision="highest")
    g16, i16 = em.fit(x, 3, max_iter=5, tol=0.0, precision="bf16x3_fused")
    assert i16["init_indices"] == i32["init_indices"]
    np.testing.assert_allclose([h["lower_bound"] for h in i16["history"]],
                               [h["lower_bound"] for h in i32["history"]], rtol=1e-4)
    np.testing.assert_allclose(np.asarray(g16.means), np.asarray(g32.means), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("d,offset,point", [(64, 1.5, 0.7), (16, 4.0, 7.5)])
def test_exact_top_fixes_the_lower_bound_of_collapsed_components(d, offset, point):
    """A component collapsed onto one point (variance reg_covar, precision 1e6): the expanded GEMM form loses its
    log-density at that point to rounding (~prec * x^2 * eps per feature); ``exact_top`` recomputes each row's
    likely winners directly; ``score`` is that E-step. The second case has features far from the data mean, where
    rounding ranks the collapsed component below another at its own point: the bound-shifted second candidate
    catches it."""
    from mmfm_jax.bench.gmm import exact_loglik

    r = np.random.default_rng(2)
    x = np.concatenate([r.normal(size=(100, d)) + offset * (c - 1) for c in range(3)] + [np.full((1, d), point)])
    x = x.astype(np.float32)
    means = np.stack([x[:100].mean(0), x[100:200].mean(0), x[200:300].mean(0), x[300]]).astype(np.float32)
    var = np.stack([x[:100].var(0), x[100:200].var(0), x[200:300].var(0), np.full(d, 1e-6)]).astype(np.float32)
    init = diag.DiagGMM(np.full(4, 0.25, np.float32), means, var)
    want = exact_loglik(x, init.weights, init.means, init.variances)  # float64
    lb = {}
    for prec in ("highest", "bf16x3_fused"):
        for top in (False, True):
            _, info = em.fit(x, 4, init=init, max_iter=1, tol=0.0, precision=prec, exact_top=top)
            lb[prec, top] = info["history"][0]["lower_bound"]
        assert em.score(x, init, precision=prec) == pytest.approx(lb[prec, True], abs=1e-5)
    assert abs(lb["bf16x3_fused", False] - want) > 1e-2  # the expanded form, 3-pass bf16: the collapsed row is off
    assert abs(lb["bf16x3_fused", True] - want) < 1e-5 * abs(want)
    assert abs(lb["highest", True] - want) < 1e-5 * abs(want)
    _, info = em.fit(x, 4, init=init, max_iter=1, tol=0.0, precision="bf16x3_fused")
    assert info["exact_top"] and info["history"][0]["lower_bound"] == lb["bf16x3_fused", True]  # the default


def test_rounding_bounds_per_algorithm():
    from mmfm_jax.gmm import precision as gp

    b = {p: gp.rounding_bound(gp.matmul_precision(p)) for p in
         ("highest", "high", "default", "bf16x3_fused", "tf32_tf32_f32", "bf16_bf16_f32", "bf16_bf16_f32_x6")}
    assert b["bf16_bf16_f32"] > b["default"] == b["tf32_tf32_f32"] > b["bf16x3_fused"] == b["high"] > b["highest"]
    assert b["highest"] == b["bf16_bf16_f32_x6"] == 2.0 ** -18  # the fp32 accumulation floor
