"""GMM EM benchmark: ours (sharded, chunked) vs scikit-learn from the same start, and the matmul floor.

``python -m mmfm_jax.bench gmm [--n=100000 --d=768 --k=512 --iters=5 --chunk=1024 --devices=1]``
  Same float32 data, same initial parameters (random distinct points as means, the global per-feature variance,
  uniform weights) for both. Prints seconds per EM iteration (median of iterations 2..iters for ours: the first
  one compiles; every iteration for sklearn, timed around its own ``_e_step``/``_m_step``/lower bound, which is
  exactly its ``fit`` loop body), the ratio, the lower bounds after ``iters`` iterations and their difference, and
  our share of the matmul floor. Floor: one EM iteration needs at least two fused GEMMs, ``[x^2, x] @ [prec;
  -2 mu prec]`` and ``r^T @ [x^2, x]`` = 4 N D K multiply-adds = 8 N D K FLOP; the fp32 rate is measured on the same
  devices with a jitted (sharded) matmul of the E-step's chunk shape; floor seconds = 8 N D K / rate. Then E-step
  and M-step seconds separately and the ratio of an iteration to the E-step GEMMs alone (``4 N D K``), from rounds
  that alternate the three (:func:`split_seconds`). ``--dtype=float64``: our fits in float64.
``--scale=imagenet``: K = 8192, D = 768; times ``iters`` iterations at a sampled N (``--n``, default 8192 on CPU,
  131072 on an accelerator) and extrapolates linearly to N = 1,281,167 (sklearn skipped unless ``--sklearn``).
Runs on the default backend's devices (``--devices`` only sets the number of CPU devices).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import numpy as np

IMAGENET_N = 1_281_167


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mmfm_jax.bench gmm", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=None, help="samples (default 100000; imagenet: 8192 CPU / 131072 GPU)")
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--k", type=int, default=None, help="components (default 512; imagenet: 8192)")
    p.add_argument("--iters", type=int, default=5, help="EM iterations timed (>= 2)")
    p.add_argument("--chunk", type=int, default=0,
                   help="rows per chunk per device (0: em.default_chunk, 1024 on CPUs, 4096 on accelerators)")
    p.add_argument("--devices", type=int, default=0, help="CPU only: number of CPU devices (0: jax default)")
    p.add_argument("--precision", default="highest",
                   help="highest | high | default | bf16x3_fused | a lax.DotAlgorithmPreset name (e.g. "
                        "tf32_tf32_f32_x3 on GPUs); 'E,M' for the E-step and M-step GEMMs separately")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                   help="em.fit's dtype (float64: EM in float64; needs --precision=highest; the GEMM floor stays fp32)")
    p.add_argument("--scale", default="small", choices=("small", "imagenet"))
    p.add_argument("--sklearn", dest="sklearn", action="store_true", default=None)
    p.add_argument("--no-sklearn", dest="sklearn", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kmeanspp", action="store_true", help="also time our sharded k-means++ init at this N and K")
    p.add_argument("--sklearn64", action="store_true",
                   help="also run sklearn in float64 from the same start (reference trajectory; slow)")
    p.add_argument("--no-exact", dest="exact", action="store_false",
                   help="skip the float64 host evaluation of both final models")
    p.add_argument("--compare", default="",
                   help="also fit with this precision (and the dense M-step) from the same start (e.g. highest) and "
                        "print the differences")
    p.add_argument("--m-step-top", type=int, default=0,
                   help="sparse M-step: each row's m largest responsibilities only (em.fit's m_step_top; 0: dense)")
    p.add_argument("--exact-top", choices=("auto", "on", "off"), default="auto",
                   help="recompute each row's largest log-density directly (em.fit's exact_top; auto: unless the "
                        "E-step is highest)")
    a = p.parse_args(argv[1:])
    if a.iters < 2:
        p.error("--iters must be >= 2 (the first iteration compiles)")
    return a


def make_data(n: int, d: int, seed: int, n_clusters: int = 1000, stream: int = 0) -> np.ndarray:
    """CLS-token-like float32 data: a mixture of ``n_clusters`` blobs, each row standardised (non-affine LN).
    The blobs depend on ``seed`` only; ``stream > 0`` draws other rows from the same blobs (held-out data)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, d)).astype(np.float32)
    if stream:
        rng = np.random.default_rng((seed, stream))
    x = np.empty((n, d), np.float32)
    for s in range(0, n, 65536):
        e = min(n, s + 65536)
        blk = centers[rng.integers(0, n_clusters, e - s)] + 0.6 * rng.standard_normal((e - s, d), np.float32)
        blk -= blk.mean(1, keepdims=True)
        blk /= np.sqrt((blk * blk).mean(1, keepdims=True) + 1e-6)
        x[s:e] = blk
    return x


def initial_params(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    means = x[np.sort(rng.choice(len(x), k, replace=False))].copy()
    var = np.broadcast_to(x.var(0, dtype=np.float64).astype(np.float32), means.shape).copy()
    return np.full(k, 1.0 / k, np.float32), means, var


def matmul_rate(mesh, chunk: int, d: int, k: int, precision: object, reps: int = 5) -> float:
    """FLOP/s of the E-step chunk GEMM [chunk, 2D] @ [2D, K] as EM runs it with ``precision`` (a name or a parsed
    value; a multi-pass algorithm counts the FLOPs of one fp32 GEMM), on every device of ``mesh`` at once."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from mmfm_jax.gmm import precision as gp

    axes = tuple(mesh.axis_names)
    sh = NamedSharding(mesh, PartitionSpec(axes, None))
    n_dev = int(mesh.devices.size)
    a = jax.jit(lambda: jax.random.normal(jax.random.PRNGKey(0), (n_dev * chunk, 2 * d)), out_shardings=sh)()
    prec = gp.matmul_precision(precision)
    w = jax.jit(lambda: gp.prepare_e_weights(jax.random.normal(jax.random.PRNGKey(1), (k, 2 * d)), prec),
                out_shardings=NamedSharding(mesh, PartitionSpec()))()
    f = jax.jit(jax.shard_map(lambda a, w: gp.e_step_gemm(a, w, prec), mesh=mesh,
                              in_specs=(PartitionSpec(axes, None), PartitionSpec()),
                              out_specs=PartitionSpec(axes, None)))
    f(a, w).block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, w).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2.0 * n_dev * chunk * 2 * d * k / min(ts)


def e_gemm_seconds(data, k: int, chunk: int, precision: object, reps: int = 1) -> tuple[float, float]:
    """(wall, CPU) seconds (best of ``reps``) of one iteration's E-step GEMMs alone: the chunk loop over all N rows,
    as EM runs it, with nothing else in it (its outputs are only summed)."""
    import jax.numpy as jnp

    from mmfm_jax.gmm import em
    from mmfm_jax.gmm import precision as gp

    prec = gp.step_precisions(precision)[0]
    w = em.replicate(gp.prepare_e_weights(jnp.ones((k, 2 * data.dim), jnp.float32) / data.dim, prec), data.mesh)
    f = _gemm_loop(data.mesh, data.spec, data.local_len, chunk, prec)
    f(data.x, w).block_until_ready()
    best, best_cpu = float("inf"), float("inf")
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        f(data.x, w).block_until_ready()
        best, best_cpu = min(best, time.perf_counter() - t), min(best_cpu, time.process_time() - c)
    return best, best_cpu


@functools.lru_cache(maxsize=8)
def _gemm_loop(mesh, spec, local_len: int, chunk: int, prec):
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.sharding import PartitionSpec

    from mmfm_jax.gmm import precision as gp

    def local(xl, w):
        def body(acc, i):
            rows = jnp.minimum(i * chunk, local_len - chunk) + jnp.arange(chunk)
            xc = xl.at[rows].get(mode="promise_in_bounds").astype(jnp.float32)  # sliced as EM slices
            return acc + jnp.sum(gp.e_step_gemm(jnp.concatenate([xc * xc, xc], axis=1), w, prec)), None

        return lax.scan(body, jnp.zeros((), jnp.float32), jnp.arange(-(-local_len // chunk)))[0][None]

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec, PartitionSpec()), out_specs=PartitionSpec(spec[0]),
                                 check_vma=False))


def split_seconds(data, g, k: int, a, exact_top: bool, pairs: int = 5) -> dict:
    """One EM iteration, the E-step alone (``em.score``: GEMM, exp pass, log-likelihood) and the E-step GEMMs alone,
    alternated ``pairs`` times from the fitted ``g`` (so a changing machine load hits all three alike): medians of
    each (wall seconds), medians of the per-round ratios to the E-step GEMMs, in wall and in CPU time
    (``time.process_time``: less sensitive to other jobs on a shared machine), and the ratios of the best rounds
    (``*_best_ratio``, wall: the least disturbed run of each)."""
    from mmfm_jax.gmm import em

    wall: dict[str, list[float]] = {"iteration": [], "e_step": [], "e_gemm": []}
    cpu: dict[str, list[float]] = {"iteration": [], "e_step": [], "e_gemm": []}
    data64 = None
    if a.dtype == "float64":
        with em.x64_scope("float64"):
            data64 = em.as_dtype(data, "float64")
    chunk = min(a.chunk, data.local_len)
    for _ in range(pairs):
        t, c = time.perf_counter(), time.process_time()
        em.fit(data, k, init=g, max_iter=1, tol=0.0, chunk_size=a.chunk, precision=a.precision,
               exact_top=exact_top, m_step_top=a.m_step_top, dtype=a.dtype)
        wall["iteration"].append(time.perf_counter() - t)
        cpu["iteration"].append(time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        em.score(data if a.dtype == "float32" else data64, g, chunk_size=a.chunk, precision=a.precision,
                 exact_top=exact_top)
        wall["e_step"].append(time.perf_counter() - t)
        cpu["e_step"].append(time.process_time() - c)
        w_, c_ = e_gemm_seconds(data, k, chunk, a.precision)
        wall["e_gemm"].append(w_)
        cpu["e_gemm"].append(c_)
    med = statistics.median
    m_wall = [x - y for x, y in zip(wall["iteration"], wall["e_step"])]
    m_cpu = [x - y for x, y in zip(cpu["iteration"], cpu["e_step"])]
    out = dict(iteration=med(wall["iteration"]), e_step=med(wall["e_step"]), m_step=med(m_wall),
               e_gemm=med(wall["e_gemm"]))
    for name, (series_w, series_c) in (("iteration", (wall["iteration"], cpu["iteration"])),
                                       ("e_step", (wall["e_step"], cpu["e_step"])), ("m_step", (m_wall, m_cpu))):
        out[f"{name}_ratio"] = med([x / y for x, y in zip(series_w, wall["e_gemm"])])
        out[f"{name}_cpu_ratio"] = med([x / y for x, y in zip(series_c, cpu["e_gemm"])])
    for name in ("iteration", "e_step"):
        out[f"{name}_best_ratio"] = min(wall[name]) / min(wall["e_gemm"])
    out["ratio"] = out["iteration_ratio"]
    return out


def exact_loglik(x: np.ndarray, w: np.ndarray, m: np.ndarray, v: np.ndarray, block: int = 8192) -> float:
    """Mean log-likelihood of ``x`` under the diagonal GMM (w, m, v), evaluated in float64 on the host."""
    w, m, v = (np.asarray(a, np.float64) for a in (w, m, v))
    p = 1.0 / v
    mp = (m * p).T
    const = np.log(w) - 0.5 * (x.shape[1] * np.log(2 * np.pi) + np.log(v).sum(1) + (m * m * p).sum(1))
    total = 0.0
    for s in range(0, len(x), block):
        xb = x[s:s + block].astype(np.float64)
        lj = const[None, :] - 0.5 * ((xb * xb) @ p.T - 2.0 * (xb @ mp))
        mx = lj.max(1, keepdims=True)
        total += float((mx[:, 0] + np.log(np.exp(lj - mx).sum(1))).sum())
    return total / len(x)


def run_sklearn(x: np.ndarray, init, iters: int, reg_covar: float = 1e-6) -> tuple[list[float], list[float], tuple]:
    """sklearn ``GaussianMixture(covariance_type='diag')`` EM from ``init``: (seconds per iteration, lower bounds,
    final (weights, means, variances))."""
    from sklearn.mixture import GaussianMixture

    w, m, v = init
    gm = GaussianMixture(len(w), covariance_type="diag", reg_covar=reg_covar)
    gm.weights_, gm.means_, gm.covariances_ = w.copy(), m.copy(), v.copy()
    gm.precisions_cholesky_ = 1.0 / np.sqrt(v)
    secs, lbs = [], []
    for _ in range(iters):
        t = time.perf_counter()
        log_prob_norm, log_resp = gm._e_step(x)
        gm._m_step(x, log_resp)
        lbs.append(float(gm._compute_lower_bound(log_resp, log_prob_norm)))
        secs.append(time.perf_counter() - t)
    return secs, lbs, (gm.weights_, gm.means_, gm.covariances_)


def _exact_top(a) -> bool | None:
    return {"auto": None, "on": True, "off": False}[a.exact_top]


def _compare(a, data, held, k: int, init, info: dict, held_ll: float) -> None:
    """Fit again with ``--compare`` precision from the same start; print both fits' per-iteration lower bounds, held-out
    log-likelihoods and speeds (each fit's lower bound is its own E-step's, so both carry their rounding)."""
    from mmfm_jax.gmm import diag, em

    g2, info2 = em.fit(data, k, init=diag.DiagGMM(*init), max_iter=a.iters, tol=0.0, chunk_size=a.chunk,
                       precision=a.compare, exact_top=_exact_top(a))  # dense M-step: the reference
    lb1 = [h["lower_bound"] for h in info["history"]]
    lb2 = [h["lower_bound"] for h in info2["history"]]
    t1 = statistics.median([h["seconds"] for h in info["history"]][1:])
    t2 = statistics.median([h["seconds"] for h in info2["history"]][1:])
    held2 = em.score(held, g2, chunk_size=a.chunk)
    sparse = f", m_step_top={a.m_step_top}" if a.m_step_top else ""
    print(f"compare: {a.precision}{sparse} vs {a.compare} from the same start")
    print("  lower bounds    " + " ".join(f"{x:.4f}" for x in lb1))
    print("  vs              " + " ".join(f"{x:.4f}" for x in lb2))
    print(f"  max |lower bound difference| {max(abs(x - y) for x, y in zip(lb1, lb2)):.4f}; held-out "
          f"{held_ll:.4f} vs {held2:.4f} (difference {held_ll - held2:+.4f}); s/iter {t1:.4f} vs {t2:.4f} "
          f"(speed-up {t2 / t1:.2f}x)")
    print()


def main(argv: list[str]) -> None:
    a = _parse(argv)
    if a.devices:
        import jax

        jax.config.update("jax_num_cpu_devices", a.devices)
    import jax

    from mmfm_jax import parallel
    from mmfm_jax.gmm import diag, em
    from mmfm_jax.gmm.precision import step_precisions

    backend = jax.default_backend()
    imagenet = a.scale == "imagenet"
    n = a.n or (100_000 if not imagenet else (8192 if backend == "cpu" else 131_072))
    k = a.k or (8192 if imagenet else 512)
    d = a.d
    use_sk = (not imagenet) if a.sklearn is None else a.sklearn
    mesh = parallel.make_mesh()
    a.chunk = a.chunk or em.default_chunk(mesh)
    n_dev = int(mesh.devices.size)
    dev = jax.devices()[0]
    print(f"# GMM EM bench: backend={backend} ({dev.device_kind}) devices={n_dev} cpu_count={os.cpu_count()} "
          f"N={n} D={d} K={k} iters={a.iters} chunk={a.chunk} precision={a.precision} m_step_top={a.m_step_top} "
          f"dtype={a.dtype}",
          flush=True)
    t = time.perf_counter()
    x = make_data(n, d, a.seed)
    init = initial_params(x, k, a.seed)
    print(f"data + init generated in {time.perf_counter() - t:.1f} s", flush=True)

    t = time.perf_counter()
    data = em.shard_samples(x, mesh)
    jax.block_until_ready(data.x)
    t_put = time.perf_counter() - t
    g, info = em.fit(data, k, init=diag.DiagGMM(*init), max_iter=a.iters, tol=0.0, chunk_size=a.chunk,
                     precision=a.precision, exact_top=_exact_top(a), m_step_top=a.m_step_top, dtype=a.dtype)
    ours_secs = [h["seconds"] for h in info["history"]]
    ours = statistics.median(ours_secs[1:])
    ours_lbs = [h["lower_bound"] for h in info["history"]]
    held = em.shard_samples(make_data(max(1024, min(n // 4, 65536)), d, a.seed, stream=1), mesh)
    g32 = g if a.dtype == "float32" else diag.DiagGMM(*(np.asarray(t, np.float32) for t in (g.weights, g.means,
                                                                                              g.variances)))
    held_ll = em.score(held, g32, chunk_size=a.chunk)

    steps = step_precisions(a.precision)
    rates = {q: matmul_rate(mesh, min(a.chunk, data.local_len), d, k, q) for q in dict.fromkeys(steps)}
    flop = 8.0 * n * d * k
    gemm_steps = steps[:1] if info["m_step_top"] else steps  # a sparse M-step has no GEMM
    floor = sum(flop / 2 / rates[q] for q in gemm_steps)  # half the FLOPs in each step's GEMM
    rate = flop / floor

    sk_secs, sk_lbs, sk_params = (run_sklearn(x, init, a.iters) if use_sk else ([], [], None))
    sk = statistics.median(sk_secs) if sk_secs else float("nan")

    ours_best = min(ours_secs[1:])
    sk_best = min(sk_secs) if sk_secs else float("nan")
    nan = float("nan")
    print()
    print(f"{'':36s}{'ours (jax)':>16s}{'sklearn':>16s}")
    print(f"{'seconds / EM iteration (median)':36s}{ours:16.4f}{sk:16.4f}")
    print(f"{'seconds / EM iteration (best)':36s}{ours_best:16.4f}{sk_best:16.4f}")
    print(f"{'first iteration (ours: + compile)':36s}{ours_secs[0]:16.4f}{(sk_secs or [nan])[0]:16.4f}")
    print(f"{'GFLOP/s (8 N D K / median time)':36s}{flop / ours / 1e9:16.1f}{flop / sk / 1e9:16.1f}")
    print(f"{f'lower bound after {a.iters} iterations':36s}{ours_lbs[-1]:16.6f}{(sk_lbs or [nan])[-1]:16.6f}")
    print(f"{'held-out mean log-lik (final)':36s}{held_ll:16.6f}   ({held.n} new rows, fp32 + exact top term; "
          f"exact_top={info['exact_top']})")
    if info["m_step_top"]:
        dense = "/".join(str(h["m_step_dense_chunks"]) for h in info["history"])
        fixed = "/".join(str(h["m_step_completed_rows"]) for h in info["history"])
        print(f"{'sparse M-step: left-out mass / row':36s}{info['history'][-1]['m_step_dropped']:16.3e}   (last "
              f"iteration; max {info['m_step_dropped']:.3e}; m_step_top={info['m_step_top']}; dense chunks per "
              f"iteration {dense} of {info['n_chunks']}; rows completed densely {fixed})")
        print(f"{'  seconds per iteration':36s}" + " ".join(f"{h['seconds']:.4f}" for h in info["history"]))
    print()
    if a.compare:
        _compare(a, data, held, k, init, info, held_ll)
    if use_sk:
        diffs = [abs(p - q) for p, q in zip(ours_lbs, sk_lbs)]
        print(f"speed-up (sklearn / ours):          {sk / ours:.2f}x median, {sk_best / ours_best:.2f}x best "
              f"(target >= 5x)")
        print(f"|lower bound difference|:           {diffs[-1]:.2e} per sample (max over iterations "
              f"{max(diffs):.2e}; target < 1e-4; each side's own fp32 evaluation)")
        if a.exact:
            e_ours = exact_loglik(x, *(np.asarray(t) for t in (g.weights, g.means, g.variances)))
            e_sk = exact_loglik(x, *sk_params)
            print(f"exact (float64) mean log-lik of the final parameters: ours {e_ours:.6f}, sklearn {e_sk:.6f}, "
                  f"|difference| {abs(e_ours - e_sk):.2e}")
    sp = split_seconds(data, g, k, a, info["exact_top"])
    e_floor = flop / 2 / rates[steps[0]]
    print(f"E-step / M-step seconds:            {sp['e_step']:.4f} / {sp['m_step']:.4f}   (iteration "
          f"{sp['iteration']:.4f}; medians of 5 rounds alternating an iteration, the E-step alone and its GEMMs "
          "alone)")
    print(f"E-step GEMMs alone (4 N D K):       {sp['e_gemm']:.4f} s (same rounds); at the measured rate "
          f"{e_floor:.4f} s")
    print("ratio to the E-step GEMMs alone:    " + "  ".join(
        f"{name} {sp[key + '_ratio']:.3f} wall / {sp[key + '_cpu_ratio']:.3f} CPU"
        for name, key in (("E-step", "e_step"), ("M-step", "m_step"), ("iteration", "iteration"))))
    print(f"iteration / E-step GEMMs:           {sp['ratio']:.3f} (same rounds, wall), {sp['iteration_cpu_ratio']:.3f} "
          f"(CPU time), {sp['iteration_best_ratio']:.3f} (best rounds, wall; E-step {sp['e_step_best_ratio']:.3f}), "
          f"{ours / e_floor:.3f} (median iteration / 4 N D K at the measured rate)   (target <= 1.2)")
    print(f"matmul rate ({a.precision}, measured): {rate / 1e9:.1f} GFLOP/s over {n_dev} device(s)")
    print(f"matmul floor 8NDK/rate:             {floor:.4f} s   share of floor (floor / ours) = {floor / ours:.1%} "
          f"median, {floor / ours_best:.1%} best   (target: within 15%, i.e. >= 87%)")
    if a.sklearn64:
        sk64_secs, sk64_lbs, sk64_params = run_sklearn(x.astype(np.float64), tuple(t.astype(np.float64) for t in init),
                                                       a.iters)
        print(f"sklearn float64 reference: {statistics.median(sk64_secs):.4f} s/iter; lower bound after {a.iters} "
              f"iterations {sk64_lbs[-1]:.6f}: |ours - it| {abs(ours_lbs[-1] - sk64_lbs[-1]):.2e}, |sklearn fp32 - it| "
              f"{abs(sk_lbs[-1] - sk64_lbs[-1]) if sk_lbs else nan:.2e}")
        for name, prm in (("ours", (g.weights, g.means, g.variances)), ("sklearn fp32", sk_params)):
            if prm is not None:
                dm = np.abs(np.asarray(prm[1], np.float64) - sk64_params[1]).max()
                dv = np.abs(np.asarray(prm[2], np.float64) / sk64_params[2] - 1).max()
                print(f"  {name:13s} final params vs float64 sklearn: max |d mean| {dm:.2e}, max rel d var {dv:.2e}")
    print(f"data placement (host -> devices):   {t_put:.2f} s")
    if a.kmeanspp:
        from mmfm_jax.gmm import kmeanspp

        for _ in range(2):  # the first call compiles
            t = time.perf_counter()
            kmeanspp.kmeans_plusplus_indices(data, k, seed=a.seed, precision=steps[0])
            t_kpp = time.perf_counter() - t
        print(f"k-means++ init (K={k}, {kmeanspp.n_local_trials_default(k)} trials/center): {t_kpp:.2f} s at N={n}"
              + (f"; linear extrapolation to N={IMAGENET_N}: {t_kpp * IMAGENET_N / n:.1f} s" if imagenet else ""))
    if imagenet:
        scale = IMAGENET_N / n
        print()
        print(f"ImageNet scale (K={k}, D={d}): measured {ours:.4f} s/iter at N={n}; linear extrapolation to "
              f"N={IMAGENET_N}: {ours * scale:.2f} s/iter ({ours * scale * 100 / 60:.1f} min for 100 iterations); "
              f"floor at full N: {floor * scale:.2f} s/iter")
        if use_sk:
            print(f"  sklearn extrapolated: {sk * scale:.1f} s/iter")
    print(f"# machine: {os.uname().nodename}, load average {os.getloadavg()[0]:.2f} (shared machines: noisy)")
