import jax
import numpy as np

from mmfm_jax import parallel
from mmfm_jax.gmm import spatial


def _data(n=37, h=2, w=3, c=4, k=5, seed=0):
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, k - 1, n)  # component k-1 stays empty
    x = rng.normal(size=(n, h * w, c)).astype(np.float32) * 3 + lab[:, None, None]
    return x, lab


def _run(mesh, x, lab, k, h, w, batch=8, flip=True, shift=None):
    st = spatial.init_stats(k, x.shape[1] * x.shape[2], mesh)
    n = len(x)
    for s in range(0, n, batch):
        xb, lb = x[s:s + batch], lab[s:s + batch]
        valid = np.ones(len(xb), bool)
        pad = batch - len(xb)
        if pad:
            xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
            lb = np.concatenate([lb, np.zeros(pad, lb.dtype)])
            valid = np.concatenate([valid, np.zeros(pad, bool)])
        g = parallel.host_to_global({"x": xb, "l": lb.astype(np.int32), "v": valid}, mesh)
        st = spatial.accumulate(st, g["x"], g["l"], g["v"], mesh=mesh, height=h, width=w, flip=flip, shift=shift)
    return st


def test_spatial_matches_float64_reference_sharded():
    h, w, c, k = 2, 3, 4, 5
    x, lab = _data(h=h, w=w, c=c, k=k)
    mesh = parallel.make_mesh({"data": 4, "fsdp": 2})
    st = _run(mesh, x, lab, k, h, w)
    # the table is sharded along K: 8 shards of K_pad=8 rows -> 1 row per device
    assert st.sums.shape == (8, h * w * c)
    assert {s.data.shape for s in st.sums.addressable_shards} == {(1, h * w * c)}
    means, var, counts = spatial.finalize(st, k, h * w, c)
    rm, rv, rc = spatial.spatial_stats_numpy(x, lab, k, h, w)
    np.testing.assert_array_equal(np.asarray(counts), rc)
    np.testing.assert_allclose(np.asarray(means), rm, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(var), rv, rtol=1e-5)
    # empty component: mean of non-empty
    assert rc[k - 1] == 0 and np.allclose(np.asarray(var)[k - 1], rv[:k - 1].mean(), rtol=1e-5)


def test_spatial_single_device_equals_sharded_and_no_flip():
    h, w, c, k = 2, 2, 3, 4
    x, lab = _data(n=20, h=h, w=w, c=c, k=k, seed=1)
    m8 = parallel.make_mesh({"data": 8, "fsdp": 1})
    m1 = parallel.make_mesh(None, jax.devices()[:1])
    a = spatial.finalize(_run(m8, x, lab, k, h, w, batch=8, flip=False), k, h * w, c)
    b = spatial.finalize(_run(m1, x, lab, k, h, w, batch=4, flip=False), k, h * w, c)
    for u, v in zip(a, b):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-6)
    rm, rv, _ = spatial.spatial_stats_numpy(x, lab, k, h, w, flip=False)
    np.testing.assert_allclose(np.asarray(a[1]), rv, rtol=1e-5)


def test_shift_keeps_precision_with_large_offset():
    # latents with a large common offset: E||x||^2 - ||mu||^2 cancels in fp32 unless a shift is subtracted first
    h, w, c, k = 1, 2, 2, 2
    rng = np.random.default_rng(0)
    n = 4000
    x = (1000.0 + rng.normal(size=(n, h * w, c))).astype(np.float32)
    lab = np.zeros(n, np.int64)
    mesh = parallel.make_mesh(None, jax.devices()[:2])
    rm, rv, _ = spatial.spatial_stats_numpy(x, lab, k, h, w, flip=False)
    _, var_plain, _ = spatial.finalize(_run(mesh, x, lab, k, h, w, batch=50, flip=False), k, h * w, c)
    assert abs(float(var_plain[0]) - rv[0]) / rv[0] > 1e-3  # the naive fp32 formula is visibly off here
    shift = np.full((h * w, c), 1000.0, np.float32)
    st = _run(mesh, x, lab, k, h, w, batch=50, flip=False, shift=shift)
    means, var, _ = spatial.finalize(st, k, h * w, c, shift=shift)
    assert abs(float(var[0]) - rv[0]) / rv[0] < 1e-5
    np.testing.assert_allclose(np.asarray(means[0]), rm[0], rtol=1e-6)
