"""``python -m mmfm_jax.bench sample [--preset=XL] [--guide-preset=S] [--batch=256] [--dtype=bfloat16]
[--points=50] [--no-guide] [--no-decode] [--inception]``

Times sampling with random weights of the real shapes, over every device: the jitted Euler ODE (``points - 1``
model evaluations, each 2 forward passes with AutoGuidance), from a K-sharded GMM source, plus the RAE decoder;
prints model evaluations per second and images per second. ``--inception`` also times Inception feature extraction
(ADM input path, fp32 at ``highest`` precision as the evaluator) on 256x256 uint8 images.
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
    from mmfm_jax.flow.samplers import euler_grid, euler_sample, guided_velocity_fn
    from mmfm_jax.gmm.diag import DiagGMM
    from mmfm_jax.gmm.source import ModeSource, sample_prior, shard_source
    from mmfm_jax.models.decoder import DecoderConfig, RAEDecoder, decode_latents, to_uint8
    from mmfm_jax.models.ditdh import DiTDH, DiTDHConfig, ditdh_flops_per_example
    from mmfm_jax.utils import parse_compiler_options

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
    g = -(-args.batch // n_dev) * n_dev
    rep = parallel.replicated(mesh)
    mcfg = DiTDHConfig.preset(args.preset, num_modes=args.modes, use_y_conditioning=True, dtype=args.dtype)
    main_m = DiTDH(mcfg, nnx.Rngs(0))
    gd, gstate = nnx.split(main_m)
    gstate = jax.device_put(gstate, rep)
    guide = None
    if not args.no_guide:
        gcfg = DiTDHConfig.preset(args.guide_preset, num_modes=args.modes, use_y_conditioning=True, dtype=args.dtype)
        gg, gs = nnx.split(DiTDH(gcfg, nnx.Rngs(1)))
        guide = (gg, jax.device_put(gs, rep), gcfg)
    tokens, ch = mcfg.input_size ** 2, mcfg.in_channels
    r = np.random.default_rng(0)
    k = args.modes
    gmm = DiagGMM(np.full(k, 1 / k, np.float32), r.normal(size=(k, 768)).astype(np.float32),
                  np.ones((k, 768), np.float32))
    src = ModeSource(gmm, np.zeros((k, tokens, ch), np.float32), np.ones(k, np.float32))
    src = shard_source(src, mesh)
    dec = None if args.no_decode else RAEDecoder(DecoderConfig.preset("XL", dtype=args.dtype), rngs=nnx.Rngs(2))
    dd, ds = (None, None) if dec is None else nnx.split(dec)
    ds = None if ds is None else jax.device_put(ds, rep)
    var = jnp.ones((tokens, ch))
    grid = euler_grid(args.points)
    base = jax.random.PRNGKey(0)

    def sample(ms, gs, source, dstate, idx):
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(idx)
        z0, k = sample_prior(source, keys, mesh=mesh)
        model = nnx.merge(gd, ms)
        vfn = lambda x, t: model(x, t, k)  # noqa: E731
        if guide is not None:
            gm = nnx.merge(guide[0], gs)
            vfn = guided_velocity_fn(vfn, lambda x, t: gm(x, t, k), 1.5)
        x = euler_sample(vfn, z0.astype(jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32), grid)
        if dstate is None:
            return x
        return to_uint8(decode_latents(nnx.merge(dd, dstate), x, var))

    fn = jax.jit(sample, out_shardings=parallel.batch_sharding(mesh, 4 if dec is not None else 3),
                 compiler_options=parse_compiler_options("auto") or None)
    idx = parallel.host_to_global(np.arange(g, dtype=np.int32), mesh)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(gstate, guide[1] if guide else None, src, ds, idx))
    compile_s = time.perf_counter() - t0
    sec = _timeit(fn, gstate, guide[1] if guide else None, src, ds, idx, repeats=args.repeats)
    nfe = len(grid) - 1
    flops = nfe * ditdh_flops_per_example(mcfg) + (nfe * ditdh_flops_per_example(guide[2]) if guide else 0)
    print(f"devices: {n_dev} x {jax.devices()[0].device_kind}; {args.preset} mode-conditional"
          f"{' + ' + args.guide_preset + ' guide (AutoGuidance 1.5)' if guide else ''}, {args.dtype}, "
          f"{len(grid)}-point grid ({nfe} NFE per model), decode {dec is not None}, batch {g}")
    print(f"compile+first {compile_s:.1f} s; {sec:.3f} s per batch -> {g / sec:.1f} images/s, "
          f"{g * nfe / sec:.0f} model evaluations/s (main), {flops * g / sec / n_dev / 1e12:.1f} TFLOP/s/device")
    if args.inception:
        from mmfm_jax.eval.features import feature_function
        from mmfm_jax.models.inception import InceptionV3

        inc = InceptionV3(rngs=nnx.Rngs(0))
        gb = -(-args.inception_batch // n_dev) * n_dev
        ffn = feature_function(inc, mesh, "adm")
        st = parallel.put_replicated(nnx.state(inc), mesh)
        imgs = parallel.host_to_global(r.integers(0, 255, size=(gb, 256, 256, 3), dtype=np.uint8), mesh)
        sec = _timeit(ffn, st, imgs, repeats=args.repeats)
        print(f"inception (ADM path, fp32 highest): batch {gb}: {gb / sec:.1f} images/s")
