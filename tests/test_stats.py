import numpy as np

from mmfm_jax import parallel
from mmfm_jax.data import stats


def test_streaming_stats_match_numpy_and_merge(tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(40, 6, 3)) * 2 + 5).astype(np.float32)
    mesh = parallel.make_mesh({"data": 4, "fsdp": 2})
    st = stats.init((6, 3))
    for s in range(0, 40, 16):
        xb = x[s:s + 16]
        valid = np.ones(16, bool)
        if len(xb) < 16:
            valid[len(xb):] = False
            xb = np.concatenate([xb, np.full((16 - len(xb), 6, 3), 1e3, np.float32)])  # padding must not count
        g = parallel.host_to_global({"x": xb, "v": valid}, mesh)
        st = stats.update(st, g["x"], g["v"])
    assert float(st.count) == 40
    np.testing.assert_allclose(np.asarray(st.mean), x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats.variance(st), x.var(0), rtol=1e-4)
    # merging two halves == all at once
    a = stats.update(stats.init((6, 3)), x[:17], np.ones(17, bool))
    b = stats.update(stats.init((6, 3)), x[17:], np.ones(23, bool))
    np.testing.assert_allclose(stats.variance(stats.merge(a, b)), x.var(0), rtol=1e-4)
    p = tmp_path / "stats.npz"
    stats.save_stats(p, stats.variance(st), np.asarray(st.mean), 40)
    var, mean = stats.load_stats(p, 6, 3)
    np.testing.assert_allclose(var, x.var(0), rtol=1e-4)
    z = stats.normalize(x, var, mean)
    np.testing.assert_allclose(np.asarray(stats.denormalize(z, var, mean)), x, rtol=1e-5, atol=1e-5)


def test_chw_to_tokens():
    a = np.arange(2 * 3 * 4).reshape(2, 3, 4)  # C=2, H=3, W=4
    t = stats.chw_to_tokens(a)
    assert t.shape == (12, 2) and t[1 * 4 + 2, 1] == a[1, 1, 2]
