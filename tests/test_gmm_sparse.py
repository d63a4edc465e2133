"""Sparse M-step (``em.fit(m_step_top=m)``): the kept-top-m statistics against numpy, the per-chunk dense fallback,
and whole fits that match the dense M-step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfm_jax import parallel
from mmfm_jax.gmm import em, sparse


def _resp(rng, c, k, sharp):
    logits = sharp * rng.normal(size=(c, k))
    r = np.exp(logits - logits.max(1, keepdims=True))
    return (r / r.sum(1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("m", [1, 2, 3])
def test_top_m_stats_equal_the_masked_dense_sums(m):
    rng = np.random.default_rng(m)
    r = _resp(rng, 40, 7, sharp=2.0)
    r[5] = 0.0  # a padding row contributes nothing
    r[6] = [0.25, 0.25, 0.25, 0.25, 0, 0, 0]  # ties: the lower index first
    a = rng.normal(size=(40, 5)).astype(np.float32)
    nk, s, left, rest = (np.asarray(v, np.float64) for v in jax.jit(sparse.top_m_stats, static_argnums=2)(r, a, m))
    keep = np.zeros_like(r, bool)
    order = np.argsort(-r, axis=1, kind="stable")[:, :m]
    np.put_along_axis(keep, order, True, axis=1)
    kept = np.where(keep, r, 0.0).astype(np.float64)
    np.testing.assert_allclose(nk, kept.sum(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s, kept.T @ a.astype(np.float64), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(left, np.where(keep, 0.0, r).sum(1), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(rest, np.where(keep, 0.0, r))
    assert left[5] == 0.0 and left[6] == pytest.approx(max(0.0, 1.0 - 0.25 * m))
    with pytest.raises(ValueError, match="m_step_top"):
        sparse.top_m_stats(r, a, 7)


def test_chunk_stats_record_fuzzy_rows_for_completion_or_fall_back_to_the_dense_gemm():
    """No fuzzy row: top-m only; up to C/16 fuzzy rows: recorded, then completed by small GEMMs after the chunk
    (exact); more: the chunk runs dense."""
    rng = np.random.default_rng(0)
    c, k = 64, 8
    a = rng.normal(size=(c, 6)).astype(np.float32)

    def dense(r, x):
        return r.T @ x

    def stats(r):
        logits = jnp.log(r)
        acc0, rec0 = sparse.zeros(k, 6, jnp.float32, centred=False), sparse.pending(sparse.capacity(1, c), 2,
                                                                                   jnp.float32)
        _, acc, rec, worst, n_dense, n_rec = sparse.chunk_stats(logits, jnp.ones(c, bool), a, 2, 1e-6, dense, acc0,
                                                                rec=rec0, rows=jnp.arange(c))
        done = sparse.complete(rec, acc, lambda rows: (logits[rows], jnp.asarray(a)[rows]), sparse.completion_rows(c),
                               dense)
        return sparse.finish(acc, None), sparse.finish(done, None), worst, n_dense, n_rec

    fn = jax.jit(stats)
    hot = np.eye(k, dtype=np.float32)[rng.integers(0, k, c)]
    sharp = (0.999999999 * hot + 1e-10 * (1 - hot)).astype(np.float32)
    fuzzy = _resp(rng, c, k, sharp=0.5)  # the top 2 hold far less than 1 - 1e-6 of each row
    for n_fuzzy, want_dense in ((0, 0), (3, 0), (4, 0), (5, 1), (c, 1)):
        r = sharp.copy()
        r[:n_fuzzy] = fuzzy[:n_fuzzy]
        (nk0, s0), (nk, s), worst, n_dense, n_rec = jax.tree.map(np.asarray, fn(r))
        assert int(n_dense) == want_dense and int(n_rec) == (n_fuzzy if 0 < n_fuzzy <= c // 16 else 0)
        assert 0 <= float(worst) <= 1e-6
        np.testing.assert_allclose(s, r.T @ a, atol=1e-5)  # exact up to the sharp rows' 6e-10 left out
        np.testing.assert_allclose(nk, r.sum(0), rtol=1e-6)
        if n_fuzzy and not want_dense:  # the completion did matter
            assert np.abs(s0 - r.T @ a).max() > 1e-2


def test_sparse_fit_matches_the_dense_fit_on_8_devices():
    """Overlapping blobs and a k-means++ start: early iterations leave out more than the tolerance in some chunks
    (those run dense), settled ones run sparse; the trajectory is the dense one."""
    rng = np.random.default_rng(4)
    centers = rng.normal(size=(5, 10)) * 2.0
    x = (centers[rng.integers(0, 5, 1203)] + rng.normal(size=(1203, 10))).astype(np.float32)
    mesh = parallel.make_mesh(None, jax.devices()[:8])
    g0, i0 = em.fit(x, 5, mesh=mesh, seed=3, max_iter=12, tol=0.0, chunk_size=24)
    g1, i1 = em.fit(x, 5, mesh=mesh, seed=3, max_iter=12, tol=0.0, chunk_size=24, m_step_top=2)
    dense_chunks = [h["m_step_dense_chunks"] for h in i1["history"]]
    assert i1["n_chunks"] == 8 * 7 and i1["m_step_top"] == 2
    assert max(dense_chunks) > 0, dense_chunks  # the fallback was exercised ...
    assert dense_chunks[-1] < i1["n_chunks"] and min(dense_chunks) < max(dense_chunks)  # ... and so was the sparse path
    assert sum(h["m_step_completed_rows"] for h in i1["history"]) > 0  # ... and the per-row completion
    assert i1["m_step_dropped"] <= 1e-7
    np.testing.assert_allclose([h["lower_bound"] for h in i1["history"]], [h["lower_bound"] for h in i0["history"]],
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g1.means), np.asarray(g0.means), atol=1e-4)
    np.testing.assert_allclose(np.asarray(g1.variances), np.asarray(g0.variances), rtol=1e-4)
    assert "m_step_dense_chunks" not in i0["history"][0] and i0["m_step_top"] == 0


def test_sparse_fit_arguments():
    x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="m_step_top"):
        em.fit(x, 4, m_step_top=-1)
    with pytest.raises(ValueError, match="m_step_tol"):
        em.fit(x, 4, m_step_top=1, m_step_tol=1.5)
    _, info = em.fit(x, 4, m_step_top=4, max_iter=2)  # keeping every component is the dense M-step
    assert info["m_step_top"] == 0


def test_recorded_rows_are_completed_across_chunks_and_blocks_in_float64():
    """Rows recorded in many chunks, completed after the loop in several blocks (recomputed log-densities with
    exact_top): in float64 with a tiny tolerance the sparse fit is the dense one to rounding."""
    rng = np.random.default_rng(7)
    centers = rng.normal(size=(6, 8)) * 10.0
    x = centers[rng.integers(0, 6, 1500)] + rng.normal(size=(1500, 8))
    x[::30] = (centers[rng.integers(0, 6, 50)] + centers[rng.integers(0, 6, 50)]) / 2  # 50 rows between two blobs
    mesh = parallel.make_mesh(None, jax.devices()[:1])
    kw = dict(mesh=mesh, seed=5, max_iter=15, tol=0.0, chunk_size=64, dtype="float64", exact_top=True)
    g0, i0 = em.fit(x, 6, **kw)
    g1, i1 = em.fit(x, 6, m_step_top=1, m_step_tol=1e-14, **kw)
    recorded = [h["m_step_completed_rows"] for h in i1["history"]]
    assert max(recorded) > sparse.completion_rows(64), recorded  # more than one completion block (16 rows)
    assert sum(h["m_step_dense_chunks"] for h in i1["history"][1:]) == 0  # the rest ran sparse
    assert i1["m_step_dropped"] <= 1e-14
    np.testing.assert_allclose([h["lower_bound"] for h in i1["history"]], [h["lower_bound"] for h in i0["history"]],
                               rtol=1e-13)
    np.testing.assert_allclose(np.asarray(g1.means), np.asarray(g0.means), rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(np.asarray(g1.variances), np.asarray(g0.variances), rtol=1e-11)


def test_default_chunk_per_backend():
    """chunk_size=None: 1024 rows on CPUs (cache-resident temporaries), 4096 on accelerators."""
    import types

    mesh = parallel.make_mesh(None, jax.devices()[:1])
    assert em.default_chunk(mesh) == em.CPU_CHUNK == 1024
    tpu = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform="tpu")]))
    assert em.default_chunk(tpu) == em.ACCELERATOR_CHUNK == 4096
    x = np.random.default_rng(1).normal(size=(2100, 3)).astype(np.float32)
    _, info = em.fit(x, 2, mesh=mesh, max_iter=1)
    assert info["chunk_size"] == 1024 and info["n_chunks"] == 3
