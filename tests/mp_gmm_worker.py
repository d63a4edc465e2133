"""One process of the 2-process x 4-CPU-device GMM EM test (tests/test_gmm_multihost.py).

Usage: ``python tests/mp_gmm_worker.py <process_id> <port> <out_dir>``. Fits the shared problem on the global
8-device mesh twice (full numpy array on every process; process-local halves turned into a global array), saves a
GMM and an EM state with Orbax (collectively), resumes, fits with the sparse M-step, and process 0 writes
``out_dir/results.npz``.
"""

import numpy as np

N, D, K, SEED, MAX_ITER, CHUNK = 1003, 8, 6, 3, 20, 37
SPARSE_TOP = 2  # m_step_top: with it this problem has dense chunks, completed rows and sparse-only chunks


def make_data() -> np.ndarray:
    rng = np.random.default_rng(123)
    centers = rng.normal(size=(K, D)) * 3.0
    return (centers[rng.integers(0, K, N)] + rng.normal(size=(N, D)) * 1.2 + 4.0).astype(np.float32)


def main(argv: list[str]) -> None:
    import os

    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_num_cpu_devices", 4)
    pid, port, out_dir = int(argv[1]), argv[2], argv[3]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4

    from mmfm_jax import distributed, parallel
    from mmfm_jax.gmm import em, io

    mesh = parallel.make_mesh()
    x = make_data()
    res = {}
    states = {}
    g, info = em.fit(x, K, mesh=mesh, seed=SEED, max_iter=MAX_ITER, chunk_size=CHUNK,
                     on_iteration=lambda it, lb, s: states.__setitem__(it, s))
    res.update(full_w=g.weights, full_m=g.means, full_v=g.variances, full_n_iter=info["n_iter"],
               full_lb=info["lower_bound"], full_idx=np.asarray(info["init_indices"]))
    # each process feeds only its half of the first 1000 rows
    half = 500
    xl = parallel.host_to_global(x[pid * half:(pid + 1) * half], mesh)
    g2, info2 = em.fit(xl, K, mesh=mesh, seed=SEED, max_iter=MAX_ITER, chunk_size=CHUNK)
    res.update(half_w=g2.weights, half_m=g2.means, half_v=g2.variances, half_n_iter=info2["n_iter"],
               half_idx=np.asarray(info2["init_indices"]))
    io.save_gmm(os.path.join(out_dir, "gmm"), g, {"processes": 2})
    io.save_em_state(os.path.join(out_dir, "em_state"), states[2])
    # resume from the saved mid-fit state, multi-process
    st = io.load_em_state(os.path.join(out_dir, "em_state"), mesh=mesh)
    g3, info3 = em.fit(x, K, mesh=mesh, max_iter=MAX_ITER, chunk_size=CHUNK, state=st)
    res.update(resumed_m=g3.means, resumed_n_iter=info3["n_iter"])
    # the sparse M-step: its per-chunk choices and collectives across processes
    g4, info4 = em.fit(x, K, mesh=mesh, seed=SEED, max_iter=MAX_ITER, chunk_size=CHUNK, m_step_top=SPARSE_TOP)
    res.update(sparse_m=g4.means, sparse_dropped=info4["m_step_dropped"],
               sparse_counts=[(h["m_step_dense_chunks"], h["m_step_completed_rows"]) for h in info4["history"]])
    res = {k: np.asarray(v) for k, v in res.items()}
    if pid == 0:
        np.savez(os.path.join(out_dir, "results.npz"), **res)
    distributed.sync("mp_gmm_worker_done")
    jax.distributed.shutdown()


if __name__ == "__main__":
    import sys

    main(sys.argv)
