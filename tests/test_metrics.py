"""FID / sFID / IS / precision-recall as the ADM evaluator defines them, and reference-batch npz reading."""

import warnings

import numpy as np
import pytest
from fid_fixture import inception_arrays

from mmfm_jax.eval import metrics as M


def _spd(rng, d, scale=1.0):
    a = rng.standard_normal((d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def test_fid_of_a_set_against_itself_is_zero():
    f = np.random.default_rng(0).standard_normal((400, 24)).astype(np.float32) * 3 + 1
    assert abs(M.fid_from_features(f, f)) < 1e-6
    mu, sigma = M.feature_stats(f)
    assert mu.dtype == np.float64 and sigma.shape == (24, 24)
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False))
    assert abs(M.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(1)
    d = 12
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    # diagonal covariances: sum (a + b - 2 sqrt(ab))
    a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)
    # commuting full covariances S and c S: tr(S) (1 + c - 2 sqrt(c))
    s, c = _spd(rng, d), 2.5
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s) * (1 + c - 2 * np.sqrt(c))
    assert M.frechet_distance(mu1, s, mu2, c * s) == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="shapes differ"):
        M.frechet_distance(mu1, s, mu2[:-1], s)


def test_fid_of_gaussian_samples_matches_closed_form():
    rng = np.random.default_rng(2)
    d, n = 6, 200_000
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    s1, s2 = _spd(rng, d), _spd(rng, d, 0.5)
    x1 = rng.multivariate_normal(mu1, s1, n)
    x2 = rng.multivariate_normal(mu2, s2, n)
    want = M.frechet_distance(mu1, s1, mu2, s2)
    assert M.fid_from_features(x1, x2) == pytest.approx(want, abs=0.02)


def test_singular_product_gets_eps_offset():
    # a zero product: scipy < 1.18 returns sqrtm(0) = 0 (FID 3), scipy 1.18 returns nan and ADM's retry with
    # eps = 1e-6 on both diagonals gives 3 - 2 * (sqrt(1e-6 * (1 + 1e-6)) + sqrt(1e-6 * (2 + 1e-6)) + 3e-6) + 5e-6
    d = 5
    s = np.zeros((d, d))
    s1 = np.diag([1.0, 2.0, 0.0, 0.0, 0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fid = M.frechet_distance(np.zeros(d), s1, np.zeros(d), s)
    assert np.isfinite(fid) and fid == pytest.approx(3.0, abs=1e-2)


def test_inception_score():
    assert M.inception_score(np.zeros((100, 1008))) == pytest.approx(1.0, abs=1e-12)
    assert M.inception_score(np.full((50, 1008), 3.7), splits=10) == pytest.approx(1.0, abs=1e-12)
    # 10 confident, distinct classes in each split -> IS = 10
    logits = np.full((40, 1008), -1e4)
    logits[np.arange(40), np.arange(40) % 10] = 0.0
    assert M.inception_score(logits, split_size=20) == pytest.approx(10.0, rel=1e-9)
    # ADM's formula on random probabilities, split by 5000-sized chunks
    rng = np.random.default_rng(3)
    z = rng.standard_normal((12000, 20)) * 2
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    want = np.mean([np.exp(np.mean(np.sum(q * (np.log(q) - np.log(q.mean(0, keepdims=True))), 1)))
                    for q in (p[:5000], p[5000:10000], p[10000:])])
    assert M.inception_score(z) == pytest.approx(want, rel=1e-10)
    assert M.inception_score(p, from_logits=False) == pytest.approx(want, rel=1e-10)


def test_softmax_of_bias_free_logits_matches_fixture():
    a = inception_arrays()
    np.testing.assert_allclose(M._softmax64(a["output/logits_nobias_299"]), a["output/softmax_nobias_299"],
                               rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_precision_recall_of_a_set_against_itself_is_one(dtype):
    f = np.random.default_rng(4).standard_normal((300, 64)).astype(np.float32)
    p, r = M.precision_recall(f, f, distance_dtype=dtype, row_batch=128, col_batch=100)
    assert p == 1.0 and r == 1.0


def _brute_force_pr(real, fake, k):
    def d2(a, b):
        return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)

    r_real = np.sort(d2(real, real), axis=1)[:, k]  # index 0 is the point itself
    r_fake = np.sort(d2(fake, fake), axis=1)[:, k]
    d = d2(real, fake)
    precision = np.mean(np.any(d <= r_real[:, None], axis=0))
    recall = np.mean(np.any(d <= r_fake[None, :], axis=1))
    return precision, recall, r_real


def test_precision_recall_matches_brute_force_knn():
    rng = np.random.default_rng(5)
    real = rng.standard_normal((97, 16)).astype(np.float32)
    fake = (np.random.default_rng(6).standard_normal((61, 16)) + 0.6).astype(np.float32)
    p_bf, r_bf, radii_bf = _brute_force_pr(real, fake, 3)
    assert 0.05 < p_bf < 0.95 and 0.05 < r_bf < 0.95  # a non-trivial case
    radii = M.manifold_radii(real, 3, row_batch=20, col_batch=33, distance_dtype="float32")
    np.testing.assert_allclose(radii, radii_bf, rtol=1e-4)
    for rb, cb in ((10000, 10000), (16, 7)):  # one block, and many ragged blocks
        p, r = M.precision_recall(real, fake, k=3, row_batch=rb, col_batch=cb, distance_dtype="float32")
        assert p == pytest.approx(p_bf) and r == pytest.approx(r_bf)
    # ADM's float16 distances give (nearly) the same answer here
    p16, r16 = M.precision_recall(real, fake, k=3)
    assert abs(p16 - p_bf) <= 2 / 61 and abs(r16 - r_bf) <= 2 / 97


def _write_ref(path, n=7, compressed=False, with_stats=True):
    rng = np.random.default_rng(6)
    arrs = {"arr_0": rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)}
    if with_stats:
        arrs.update(mu=rng.standard_normal(4).astype(np.float32), sigma=np.eye(4), mu_s=np.zeros(3),
                    sigma_s=2 * np.eye(3))
    (np.savez_compressed if compressed else np.savez)(path, **arrs)
    return arrs


@pytest.mark.parametrize("compressed", [False, True])
def test_load_reference_batch_and_stream_images(tmp_path, compressed):
    arrs = _write_ref(tmp_path / "ref.npz", compressed=compressed)
    ref = M.load_reference_batch(tmp_path / "ref.npz")
    assert ref.has_stats and ref.num_images == 7 and ref.mu.dtype == np.float64
    np.testing.assert_array_equal(ref.mu, arrs["mu"].astype(np.float64))
    np.testing.assert_array_equal(ref.sigma_s, arrs["sigma_s"])
    batches = list(ref.iter_images(3))
    assert [len(b) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), arrs["arr_0"])
    np.testing.assert_array_equal(np.concatenate(list(M.iter_npz_batches(tmp_path / "ref.npz", start=4))),
                                  arrs["arr_0"][4:])
    with pytest.raises(KeyError, match="labels"):
        next(M.iter_npz_batches(tmp_path / "ref.npz", "labels"))
    with pytest.raises(FileNotFoundError):
        M.load_reference_batch(tmp_path / "missing.npz")


def test_adm_metrics_end_to_end(tmp_path):
    rng = np.random.default_rng(7)
    feats = {"pool": rng.standard_normal((60, 8)).astype(np.float32),
             "spatial": rng.standard_normal((60, 5)).astype(np.float32),
             "logits": np.zeros((60, 1008), np.float32)}
    out = M.adm_metrics(feats, ref_feats=feats)
    assert set(out) == {"inception_score", "fid", "sfid", "precision", "recall"}
    assert abs(out["fid"]) < 1e-6 and abs(out["sfid"]) < 1e-6
    assert out["precision"] == 1.0 and out["recall"] == 1.0 and out["inception_score"] == pytest.approx(1.0)
    # stored statistics take precedence for FID / sFID; no reference features -> no precision/recall
    _write_ref(tmp_path / "ref.npz", with_stats=False)
    ref = M.load_reference_batch(tmp_path / "ref.npz")
    assert not ref.has_stats
    mu, sigma = M.feature_stats(feats["pool"])
    mu_s, sigma_s = M.feature_stats(feats["spatial"])
    ref = M.ReferenceBatch(str(tmp_path / "ref.npz"), mu + 1.0, sigma, mu_s, sigma_s, 0)
    out = M.adm_metrics(feats, ref=ref)
    assert out["fid"] == pytest.approx(8.0, abs=1e-6) and abs(out["sfid"]) < 1e-6 and "precision" not in out


def test_float16_distances_fall_back_to_float32_on_overflow():
    rng = np.random.default_rng(8)
    real = (rng.standard_normal((40, 32)) * 100).astype(np.float32)  # squared norms ~ 3e5 > float16 max
    fake = (real[:30] * 1.05 + rng.standard_normal((30, 32)) * 20).astype(np.float32)
    assert np.sum(real[0] ** 2) > np.finfo(np.float16).max
    np.testing.assert_array_equal(M.manifold_radii(real, distance_dtype="float16"),
                                  M.manifold_radii(real, distance_dtype="float32"))
    assert M.precision_recall(real, fake) == M.precision_recall(real, fake, distance_dtype="float32")


def test_eigh_trace_sqrt_matches_scipy_sqrtm():
    from mmfm_jax.eval.metrics import frechet_distance

    r = np.random.default_rng(3)
    a = r.normal(size=(400, 64))
    b = r.normal(size=(300, 64)) * 1.3 + 0.2
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    f_scipy = frechet_distance(mu1, s1, mu2, s2)
    f_eigh = frechet_distance(mu1, s1, mu2, s2, method="eigh")
    assert abs(f_scipy - f_eigh) < 1e-8 * max(1.0, abs(f_scipy))
    # singular product (fewer samples than dims): the eigh form stays exact, FID of a set against itself is 0
    c = r.normal(size=(10, 64))
    mu, s = c.mean(0), np.cov(c, rowvar=False)
    assert abs(frechet_distance(mu, s, mu, s, method="eigh")) < 1e-6 * np.trace(s) * 10
