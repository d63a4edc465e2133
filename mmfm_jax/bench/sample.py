"""``python -m mmfm_jax.bench sample [--preset=XL] [--guide-preset=S] [--batch=256] [--dtype=bfloat16]
[--points=50] [--no-guide] [--no-decode] [--inception]``

Times the sample job's program (``train.sampling.make_sample_fn``, the one ``mmfm-jax sample`` and the Python API
run) with random weights of the real shapes, over every device: the mode-conditional model's Euler ODE
(``points - 1`` model evaluations, each 2 forward passes with AutoGuidance at 1.5), from a K-sharded GMM source,
plus the RAE decoder to uint8; prints model evaluations per second and images per second. ``--inception`` also
times Inception feature extraction (ADM input path, fp32 at ``highest`` precision as the evaluator) on 256x256
uint8 images.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _timeit(fn, *args, repeats: int = 3) -> float:
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / repeats


def main(argv: list[str]) -> None:
    from mmfm_jax import parallel
    from mmfm_jax.config_files import load_config
    from mmfm_jax.gmm.diag import DiagGMM
    from mmfm_jax.gmm.source import ModeSource, shard_source
    from mmfm_jax.models.decoder import DecoderConfig, RAEDecoder
    from mmfm_jax.models.ditdh import DiTDH, DiTDHConfig, ditdh_flops_per_example
    from mmfm_jax.train.sampling import LoadedModel, make_sample_fn

    p = argparse.ArgumentParser(prog="python -m mmfm_jax.bench sample")
    p.add_argument("--preset", default="XL")
    p.add_argument("--guide-preset", default="S")
    p.add_argument("--modes", type=int, default=8192)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--points", type=int, default=50)
    p.add_argument("--no-guide", action="store_true")
    p.add_argument("--no-decode", action="store_true")
    p.add_argument("--inception", action="store_true")
    p.add_argument("--inception-batch", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv[1:])
    mesh = parallel.make_mesh(None)
    n_dev = jax.device_count()
    g = parallel.round_up_batch(args.batch, mesh)
    rep = parallel.replicated(mesh)

    def model(preset: str, seed: int) -> LoadedModel:
        mcfg = DiTDHConfig.preset(preset, num_modes=args.modes, use_y_conditioning=True, dtype=args.dtype)
        gd, st = nnx.split(DiTDH(mcfg, nnx.Rngs(seed)))
        return LoadedModel(gd, jax.device_put(st, rep), mcfg, f"random {preset}")

    main_m = model(args.preset, 0)
    guide = None if args.no_guide else model(args.guide_preset, 1)
    mcfg = main_m.config
    tokens, ch = mcfg.input_size ** 2, mcfg.in_channels
    r = np.random.default_rng(0)
    k = args.modes
    gmm = DiagGMM(np.full(k, 1 / k, np.float32), r.normal(size=(k, 768)).astype(np.float32),
                  np.ones((k, 768), np.float32))
    src = shard_source(ModeSource(gmm, np.zeros((k, tokens, ch), np.float32), np.ones(k, np.float32)), mesh)
    dec = None if args.no_decode else RAEDecoder(DecoderConfig.preset("XL", dtype=args.dtype), rngs=nnx.Rngs(2))
    ds = None if dec is None else jax.device_put(nnx.state(dec), rep)
    # the sample job's config (configs/sample.py), sampler settings from the flags: Euler, AutoGuidance 1.5 on [0, 1]
    cfg = load_config("sample.py", {"seed": 0, "source.shard_table": True, "sampler.num_points": args.points,
                                    "sampler.shift": 0.0, "sampler.dtype": args.dtype, "sampler.solver": "euler",
                                    "guide.scale": 1.5, "guide.scales": (), "guide.t_min": 0.0, "guide.t_max": 1.0})
    fn, grid = make_sample_fn(cfg, mesh, main_m, guide, src, dec, jnp.ones((tokens, ch)), None)
    run = lambda idx: fn(main_m.state, guide.state if guide else None, src, ds, idx)  # noqa: E731
    idx = parallel.host_to_global(np.arange(g, dtype=np.int32), mesh)
    t0 = time.perf_counter()
    jax.block_until_ready(run(idx))
    compile_s = time.perf_counter() - t0
    sec = _timeit(run, idx, repeats=args.repeats)
    nfe = len(grid) - 1
    flops = nfe * ditdh_flops_per_example(mcfg) + (nfe * ditdh_flops_per_example(guide.config) if guide else 0)
    print(f"devices: {n_dev} x {jax.devices()[0].device_kind}; {args.preset} mode-conditional"
          f"{' + ' + args.guide_preset + ' guide (AutoGuidance 1.5)' if guide else ''}, {args.dtype}, "
          f"{len(grid)}-point grid ({nfe} NFE per model), decode {dec is not None}, batch {g}; "
          "program: train.sampling.make_sample_fn (the sample job's)")
    print(f"compile+first {compile_s:.1f} s; {sec:.3f} s per batch -> {g / sec:.1f} images/s, "
          f"{g * nfe / sec:.0f} model evaluations/s (main), {flops * g / sec / n_dev / 1e12:.1f} TFLOP/s/device")
    if args.inception:
        from mmfm_jax.eval.features import feature_function
        from mmfm_jax.models.inception import InceptionV3

        inc = InceptionV3(rngs=nnx.Rngs(0))
        gb = parallel.round_up_batch(args.inception_batch, mesh)
        ffn = feature_function(inc, mesh, "adm")
        st = parallel.put_replicated(nnx.state(inc), mesh)
        imgs = parallel.host_to_global(r.integers(0, 255, size=(gb, 256, 256, 3), dtype=np.uint8), mesh)
        sec = _timeit(ffn, st, imgs, repeats=args.repeats)
        print(f"inception (ADM path, fp32 highest): batch {gb}: {gb / sec:.1f} images/s")
