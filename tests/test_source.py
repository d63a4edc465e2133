"""Mode-coupling source: posterior/prior statistics, z0 statistics, the K-sharded gather on 8 devices, save/load."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from mmfm_jax import parallel
from mmfm_jax.gmm import source as S
from mmfm_jax.gmm.diag import DiagGMM

K, D, L, C = 5, 3, 4, 2


def _source(k=K, per_dim=False, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.5, 2.0, k)
    w = (w / w.sum()).astype(np.float32)
    gmm = DiagGMM(jnp.asarray(w), jnp.asarray(rng.normal(0, 1.0, (k, D)), jnp.float32),
                  jnp.asarray(rng.uniform(0.5, 1.5, (k, D)), jnp.float32))
    means = (10.0 * np.arange(k)[:, None, None] + rng.normal(size=(k, L, C))).astype(np.float32)
    var = rng.uniform(0.2, 2.0, (k, L, C) if per_dim else (k,)).astype(np.float32)
    return S.ModeSource(gmm=gmm, means=jnp.asarray(means), variances=jnp.asarray(var))


def _np_resp(gmm, x):
    """sklearn-style posterior (predict_proba) in float64 numpy."""
    w, mu, var = (np.asarray(a, np.float64) for a in (gmm.weights, gmm.means, gmm.variances))
    x = np.asarray(x, np.float64)
    lg = -0.5 * (np.log(2 * np.pi * var).sum(-1)[None] + (((x[:, None] - mu[None]) ** 2) / var[None]).sum(-1))
    lj = lg + np.log(w)[None]
    return np.exp(lj - logsumexp(lj, axis=1, keepdims=True))


def _keys(n, seed=0):
    return S.example_keys(jax.random.key(seed), jnp.arange(n))


def test_posterior_draws_match_responsibilities():
    src = _source()
    cls = np.array([[0.3, -0.2, 0.1], [1.0, 0.5, -1.0]], np.float32)
    resp = _np_resp(src.gmm, cls)
    n = 20000
    for row in range(2):
        x = jnp.asarray(np.repeat(cls[row:row + 1], n, 0))
        k = np.asarray(jax.jit(lambda x, kk: S.posterior_modes(src.gmm, x, kk))(x, _keys(n, row)))
        freq = np.bincount(k, minlength=K) / n
        se = np.sqrt(resp[row] * (1 - resp[row]) / n)
        assert np.all(np.abs(freq - resp[row]) < 5 * se + 1e-4), (freq, resp[row])
    hard = np.asarray(S.posterior_modes(src.gmm, jnp.asarray(cls), _keys(2), "hard"))
    np.testing.assert_array_equal(hard, resp.argmax(1))
    # temperature -> 0 concentrates on the argmax
    cold = np.asarray(S.posterior_modes(src.gmm, jnp.asarray(np.repeat(cls, 200, 0)), _keys(400), temperature=1e-3))
    np.testing.assert_array_equal(cold, np.repeat(resp.argmax(1), 200))
    with pytest.raises(ValueError):
        S.posterior_modes(src.gmm, jnp.asarray(cls), _keys(2), "medium")


def test_prior_draws_match_weights_and_are_per_example():
    src = _source()
    n = 40000
    keys = _keys(n, 7)
    k = np.asarray(jax.jit(S.prior_modes)(src.gmm.weights, keys))
    w = np.asarray(src.gmm.weights)
    freq = np.bincount(k, minlength=K) / n
    assert np.all(np.abs(freq - w) < 5 * np.sqrt(w * (1 - w) / n))
    # results depend only on each example's key
    z_all, k_all = S.sample_prior(src, keys[:64])
    z_sub, k_sub = S.sample_prior(src, keys[32:64])
    np.testing.assert_array_equal(np.asarray(k_all[32:]), np.asarray(k_sub))
    np.testing.assert_allclose(np.asarray(z_all[32:]), np.asarray(z_sub), rtol=1e-6)


@pytest.mark.parametrize("per_dim", [False, True])
def test_z0_statistics_per_mode(per_dim):
    src = _source(per_dim=per_dim)
    n = 6000
    k = jnp.asarray(np.repeat(np.arange(K), n // K).astype(np.int32))
    z = np.asarray(jax.jit(S.draw_from_modes)(src, k, _keys(n, 3)))
    assert z.shape == (n, L, C) and z.dtype == np.float32
    kk = np.asarray(k)
    means, var = np.asarray(src.means), np.asarray(src.variances)
    for m in range(K):
        zm = z[kk == m]
        v = var[m] if per_dim else np.full((L, C), var[m])
        se = np.sqrt(v / len(zm))
        assert np.all(np.abs(zm.mean(0) - means[m]) < 5 * se)
        assert np.all(np.abs(zm.var(0) / v - 1) < 0.2)
    zb = S.draw_from_modes(src, k[:4], _keys(4, 3), dtype=jnp.bfloat16)
    assert zb.dtype == jnp.bfloat16


def test_sample_source_kinds():
    src = _source()
    b = 8
    keys = _keys(b, 11)
    cls = jnp.asarray(np.random.default_rng(1).normal(size=(b, D)).astype(np.float32))
    zg, kg = S.sample_source("gaussian", None, None, keys, (b, L, C))
    assert zg.shape == (b, L, C) and np.all(np.asarray(kg) == -1)
    zi, ki = jax.jit(lambda s, kk: S.sample_source("gmm_indep", s, None, kk, (b, L, C)))(src, keys)
    np.testing.assert_array_equal(np.asarray(ki), np.asarray(S.prior_modes(src.gmm.weights, S._stream(keys, 0))))
    zm, km = jax.jit(lambda s, c, kk: S.sample_source("gmm_mode", s, c, kk, (b, L, C)))(src, cls, keys)
    np.testing.assert_array_equal(np.asarray(km), np.asarray(S.posterior_modes(src.gmm, cls, S._stream(keys, 0))))
    # common random numbers: every kind uses the same eps for the same keys
    var = np.asarray(src.variances)
    for z, k in ((zi, ki), (zm, km)):
        k = np.asarray(k)
        eps = (np.asarray(z) - np.asarray(src.means)[k]) / np.sqrt(var[k])[:, None, None]
        np.testing.assert_allclose(eps, np.asarray(zg), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        S.sample_source("gmm_mode", src, None, keys, (b, L, C))
    with pytest.raises(ValueError):
        S.sample_source("gmm_mode", src, cls, keys, (b, L, C + 1))
    with pytest.raises(ValueError):
        S.sample_source("vae", src, cls, keys, (b, L, C))


@pytest.mark.parametrize("n_modes,per_dim", [(16, False), (13, True)])
def test_sharded_gather_8_devices(n_modes, per_dim):
    mesh = parallel.make_mesh((4, 2))
    assert mesh.devices.size == 8
    src = _source(n_modes, per_dim=per_dim, seed=5)
    host = S.ModeSource(gmm=src.gmm, means=np.asarray(src.means), variances=np.asarray(src.variances))
    sharded = S.shard_source(host, mesh)
    kpad = -(-n_modes // 8) * 8
    assert sharded.means.shape == (kpad, L, C)
    shard_shapes = {s.data.shape for s in sharded.means.addressable_shards}
    assert shard_shapes == {(kpad // 8, L, C)}  # each device holds 1/8 of the table
    assert len({s.index[0].start for s in sharded.means.addressable_shards}) == 8
    assert {s.data.shape[0] for s in sharded.variances.addressable_shards} == {kpad // 8}
    b = 32
    k = jax.device_put(jnp.asarray(np.random.default_rng(0).integers(0, n_modes, b).astype(np.int32)),
                       parallel.batch_sharding(mesh))
    keys = _keys(b, 2)
    z = jax.jit(lambda s, kk, ky: S.draw_from_modes_sharded(s, kk, ky, mesh))(sharded, k, keys)
    assert z.shape == (b, L, C)
    assert {s.data.shape for s in z.addressable_shards} == {(b // 8, L, C)}  # batch-sharded result
    np.testing.assert_allclose(np.asarray(z), np.asarray(S.draw_from_modes(src, k, keys)), rtol=1e-6, atol=1e-6)
    # with zero variance the draw is exactly the numpy gather
    zero = S.ModeSource(gmm=sharded.gmm, means=sharded.means, variances=jnp.zeros_like(sharded.variances))
    z0 = S.draw_from_modes_sharded(zero, k, keys, mesh)
    np.testing.assert_array_equal(np.asarray(z0), np.asarray(src.means)[np.asarray(k)])
    # the full sampling path through the mesh
    zp, kp = jax.jit(lambda s, ky: S.sample_prior(s, ky, mesh=mesh))(sharded, keys)
    np.testing.assert_allclose(np.asarray(zp), np.asarray(S.sample_prior(src, keys)[0]), rtol=1e-6, atol=1e-6)
    assert int(np.asarray(kp).max()) < n_modes
    # the table is never gathered whole: the compiled program only holds per-device rows
    hlo = jax.jit(lambda s, kk, ky: S.draw_from_modes_sharded(s, kk, ky, mesh)).lower(sharded, k, keys).compile()
    text = hlo.as_text()
    assert f"f32[{kpad // 8},{L},{C}]" in text and f"f32[{kpad},{L},{C}]" not in text


def test_save_load_roundtrip(tmp_path):
    mesh = parallel.make_mesh((8, 1))
    src = _source(13, seed=9)
    sharded = S.shard_source(src, mesh)
    S.save_source(tmp_path / "src", sharded, {"origin": "test"})
    plain, meta = S.load_source(tmp_path / "src")
    assert meta["n_modes"] == 13 and meta["table_rows"] == 16 and meta["user"] == {"origin": "test"}
    np.testing.assert_array_equal(np.asarray(plain.means)[:13], np.asarray(src.means))
    np.testing.assert_array_equal(np.asarray(plain.gmm.variances), np.asarray(src.gmm.variances))
    back, _ = S.load_source(tmp_path / "src", mesh=mesh)
    assert {s.data.shape[0] for s in back.means.addressable_shards} == {2}
    np.testing.assert_array_equal(np.asarray(back.means), np.asarray(sharded.means))
    # a mesh whose shard count does not divide the stored rows: re-placed from the host
    mesh3 = parallel.make_mesh((3, 1), devices=jax.devices()[:3])
    back3, _ = S.load_source(tmp_path / "src", mesh=mesh3)
    assert back3.means.shape[0] == 15 and {s.data.shape[0] for s in back3.means.addressable_shards} == {5}
    np.testing.assert_array_equal(np.asarray(back3.means)[:13], np.asarray(src.means))
    with pytest.raises(FileNotFoundError):
        S.load_source(tmp_path / "nothing")


@pytest.mark.parametrize("damage", ["nan_weight", "zero_table_variance", "negative_cls_variance"])
def test_load_refuses_a_broken_source(tmp_path, damage):
    """Non-finite weights or non-positive variances are refused at load (not two training steps later)."""
    import dataclasses

    src = _source(8, seed=3)
    gmm = src.gmm
    if damage == "nan_weight":
        gmm = dataclasses.replace(gmm, weights=np.asarray(gmm.weights).copy())
        gmm.weights[2] = np.nan
        want = r"gmm\.weights \(non-finite or < 0\): 1 values"
    elif damage == "negative_cls_variance":
        gmm = dataclasses.replace(gmm, variances=np.asarray(gmm.variances).copy())
        gmm.variances[1, 0] = -1.0
        want = r"gmm\.variances \(non-finite or <= 0\): 1 values"
    src = S.ModeSource(gmm, src.means, np.asarray(src.variances).copy())
    if damage == "zero_table_variance":
        src.variances[0] = 0.0
        want = r"variances \(non-finite or <= 0\): 1 values"
    S.save_source(tmp_path / "src", src)
    with pytest.raises(ValueError, match=rf"src: the source is unusable \({want}"):
        S.load_source(tmp_path / "src", mesh=parallel.make_mesh((8, 1)))


def test_cast_table_bf16_keeps_sharding_and_draws():
    mesh = parallel.make_mesh((8, 1))
    src = _source(16, seed=3)
    sharded = S.shard_source(S.ModeSource(gmm=src.gmm, means=np.asarray(src.means),
                                          variances=np.asarray(src.variances)), mesh)
    half = S.cast_table(sharded, "bfloat16")
    assert half.means.dtype == jnp.bfloat16 and half.variances.dtype == jnp.float32
    assert half.means.sharding.is_equivalent_to(sharded.means.sharding, 3)
    assert S.cast_table(sharded, "float32") is sharded  # already fp32: unchanged
    np.testing.assert_array_equal(np.asarray(half.means.astype(jnp.float32)),
                                  np.asarray(sharded.means).astype(jnp.bfloat16).astype(np.float32))
    b = 16
    k = jax.device_put(jnp.arange(b, dtype=jnp.int32) % 16, parallel.batch_sharding(mesh))
    keys = _keys(b, 4)
    z32 = np.asarray(S.draw_from_modes_sharded(sharded, k, keys, mesh))
    z16 = jax.jit(lambda s, kk, ky: S.draw_from_modes_sharded(s, kk, ky, mesh))(half, k, keys)
    assert z16.dtype == jnp.float32  # the draw is combined in fp32
    # same eps; the means differ only by their bf16 rounding (<= 2^-9 relative)
    bound = np.abs(np.asarray(src.means))[np.asarray(k)] * 2.0 ** -8 + 1e-6
    assert np.all(np.abs(np.asarray(z16) - z32) <= bound)
    host = S.cast_table(S.ModeSource(gmm=src.gmm, means=np.asarray(src.means), variances=np.asarray(src.variances)),
                        jnp.bfloat16)
    assert isinstance(host.means, np.ndarray) and host.means.dtype == jnp.bfloat16
