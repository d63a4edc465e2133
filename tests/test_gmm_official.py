import pickle

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from mmfm_jax.gmm import official


def _write(tmp_path, k=3, d=4, c=2, h=2, w=3):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, d)).astype(np.float32)
    gm = GaussianMixture(n_components=k, covariance_type="diag", init_params="k-means++", max_iter=5,
                         random_state=42).fit(x)
    cls = {"model": gm, "labels": gm.predict(x), "config": {"n_components": k, "covariance_type": "diag"},
           "metrics": {"converged": bool(gm.converged_)}, "metadata": {"n_samples": 60}}
    means_chw = rng.normal(size=(k, c, h, w))
    spatial = {"means": means_chw.reshape(k, -1), "variances": np.array([0.5, 1.0, 2.0]), "weights": gm.weights_,
               "cluster_counts": np.array([10, 20, 30]), "config": {"flip_augmentation": True}, "metadata": {}}
    p1, p2 = tmp_path / "cls.pkl", tmp_path / "spatial.pkl"
    p1.write_bytes(pickle.dumps(cls))
    p2.write_bytes(pickle.dumps(spatial))
    return gm, means_chw, p1, p2


def test_import_official_pickles(tmp_path):
    gm, means_chw, p1, p2 = _write(tmp_path)
    gmm, meta = official.import_cls_gmm(p1)
    np.testing.assert_allclose(np.asarray(gmm.means), gm.means_, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gmm.variances), gm.covariances_, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gmm.weights), gm.weights_, rtol=1e-6)
    assert meta["config"]["n_components"] == 3
    means, var, w, smeta = official.import_spatial_table(p2, channels=2, height=2, width=3)
    assert means.shape == (3, 6, 2)
    # token (h, w) channel c == official [c, h, w]
    assert means[1, 1 * 3 + 2, 1] == np.float32(means_chw[1, 1, 1, 2])
    np.testing.assert_allclose(var, [0.5, 1.0, 2.0])
    assert smeta["cluster_counts"] == [10, 20, 30]


def test_bad_pickles(tmp_path):
    _, _, _, p2 = _write(tmp_path)
    with pytest.raises(official.OfficialPickleError, match="expected"):
        official.import_spatial_table(p2, channels=3, height=2, width=3)
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"means": np.zeros((2, 4))}))
    with pytest.raises(official.OfficialPickleError, match="'variances'"):
        official.import_spatial_table(bad, channels=1, height=2, width=2)
    trunc = tmp_path / "trunc.pkl"
    trunc.write_bytes(p2.read_bytes()[:50])
    with pytest.raises(official.OfficialPickleError, match="cannot unpickle"):
        official.import_cls_gmm(trunc)


def test_spatial_table_blockwise_reorder(tmp_path):
    k, c, h, w = 300, 3, 2, 2  # more rows than one conversion block
    r = np.random.default_rng(0)
    means = r.normal(size=(k, c * h * w))
    with open(tmp_path / "s.pkl", "wb") as f:
        pickle.dump({"means": means, "variances": r.uniform(0.5, 1, k), "weights": np.full(k, 1.0 / k)}, f)
    tok, var, wts, _ = official.import_spatial_table(tmp_path / "s.pkl", c, h, w)
    want = means.reshape(k, c, h, w).transpose(0, 2, 3, 1).reshape(k, h * w, c).astype(np.float32)
    assert tok.dtype == np.float32
    np.testing.assert_array_equal(tok, want)
