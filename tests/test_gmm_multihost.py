"""2 processes x 4 CPU devices (jax.distributed on 127.0.0.1) fit the same GMM as one process with 8 devices."""


import jax
import mp_gmm_worker as w
import numpy as np
import pytest
from mp_launch import run_workers

from mmfm_jax import parallel
from mmfm_jax.gmm import em, io


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=2e-5, atol=2e-6)


def test_two_processes_equal_one_process(tmp_path):
    run_workers("mp_gmm_worker.py", [tmp_path])
    r = dict(np.load(tmp_path / "results.npz"))
    mesh = parallel.make_mesh()
    assert jax.process_count() == 1 and mesh.devices.size == 8
    x = w.make_data()
    g, info = em.fit(x, w.K, mesh=mesh, seed=w.SEED, max_iter=w.MAX_ITER, chunk_size=w.CHUNK)
    np.testing.assert_array_equal(r["full_idx"], info["init_indices"])
    assert int(r["full_n_iter"]) == info["n_iter"] > 3
    assert abs(float(r["full_lb"]) - info["lower_bound"]) < 1e-5
    for k, a in (("full_w", g.weights), ("full_m", g.means), ("full_v", g.variances)):
        _close(r[k], a)
    # process-local halves assembled into one global array == the first 1000 rows in one process
    g2, info2 = em.fit(x[:1000], w.K, mesh=mesh, seed=w.SEED, max_iter=w.MAX_ITER, chunk_size=w.CHUNK)
    np.testing.assert_array_equal(r["half_idx"], info2["init_indices"])
    assert int(r["half_n_iter"]) == info2["n_iter"]
    for k, a in (("half_w", g2.weights), ("half_m", g2.means), ("half_v", g2.variances)):
        _close(r[k], a)
    # resumed multi-process from a multi-process Orbax EM state == uninterrupted fit
    assert int(r["resumed_n_iter"]) == info["n_iter"]
    _close(r["resumed_m"], g.means)
    # sparse M-step: the same per-chunk choices, left-out mass and result as one process
    g4, info4 = em.fit(x, w.K, mesh=mesh, seed=w.SEED, max_iter=w.MAX_ITER, chunk_size=w.CHUNK,
                        m_step_top=w.SPARSE_TOP)
    counts = [(h["m_step_dense_chunks"], h["m_step_completed_rows"]) for h in info4["history"]]
    np.testing.assert_array_equal(r["sparse_counts"], counts)
    assert sum(c for _, c in counts) > 0 and float(r["sparse_dropped"]) == pytest.approx(info4["m_step_dropped"])
    _close(r["sparse_m"], g4.means)
    # the 2-process Orbax save loads in one process
    g3, meta = io.load_gmm(tmp_path / "gmm", mesh=mesh)
    assert meta == {"processes": 2}
    np.testing.assert_array_equal(np.asarray(g3.means), r["full_m"])
    st = io.load_em_state(tmp_path / "em_state")
    assert int(st.iteration) == 2
