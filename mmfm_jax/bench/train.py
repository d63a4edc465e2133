"""``python -m mmfm_jax.bench train [--config=configs/train.py:xl_mode] [--batch=N] [--accum=A] [--dtype=bfloat16]
[--steps=10] [--peak=989] [--remat=none] [--scan] [--fsdp=1] [--set model.residual_dtype=bfloat16 ...]``

Times the train job's program (``train.trainer.Trainer.from_config``: the same jitted step, in-step mode coupling
from a synthetic K-mode source, AdamW, EMA) on synthetic latents over every device, and prints images/s, model
TFLOP/s per device (3 x forward matmul FLOPs) and MFU against
``--peak`` (dense bf16 TFLOP/s per device: H100 SXM 989, TPU v5p 459, v6e 918). ``--batch=0`` searches the largest
global batch (powers of two per device) that compiles and runs. ``--set a.b=v`` overrides any config key (values
parsed as Python literals, else strings), e.g. ``--set model.depth='(8, 2)'`` for a quicker compile.

``--checkpoint=DIR`` times checkpointing instead of the step: save and restore of the train state with and without
the per-array checksums (``train/checkpoint.py``), and the checksum reduction alone; prints the overhead of the
checksums as a fraction of a save / restore.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from mmfm_jax.models.ditdh import ditdh_flops_per_example
from mmfm_jax.utils import parse_compiler_options


def _setup(args):
    """The config, and the train job's program on it (``Trainer.from_config``) with a synthetic K-mode source."""
    from pathlib import Path

    from mmfm_jax import parallel
    from mmfm_jax.config_files import load_config
    from mmfm_jax.gmm.diag import DiagGMM
    from mmfm_jax.gmm.source import ModeSource
    from mmfm_jax.train.config import model_config
    from mmfm_jax.train.trainer import Trainer

    cfg_path = args.config
    if not cfg_path.startswith("/"):
        cfg_path = str(Path(__file__).resolve().parents[2] / cfg_path)
    overrides = {"train.compute_dtype": args.dtype, "train.grad_accum_steps": args.accum, "mesh.fsdp": args.fsdp,
                 "model.remat": args.remat, "model.scan_layers": args.scan}
    overrides.update(_parse_sets(args.set))
    cfg = load_config(cfg_path, overrides)
    mesh = parallel.mesh_from_config(cfg)
    # the step traces per batch shape; the config's batch only has to divide over this mesh
    cfg.train.global_batch_size = parallel.batch_size_multiple(mesh) * args.accum
    mcfg = model_config(cfg)
    source = None
    if cfg.source.kind != "gaussian":
        r = np.random.default_rng(0)
        k, d = mcfg.num_modes, 768
        gmm = DiagGMM(np.full(k, 1.0 / k, np.float32), r.normal(size=(k, d)).astype(np.float32),
                      np.ones((k, d), np.float32))
        source = ModeSource(gmm, np.zeros((k, mcfg.input_size ** 2, mcfg.in_channels), np.float32),
                            np.ones(k, np.float32))
    trainer = Trainer.from_config(cfg, mesh, source=source)
    return cfg, trainer, trainer.init_state()


def _parse_sets(items: list[str]) -> dict:
    """``['a.b=v', ...]`` -> ``{'a.b': literal_eval(v) or v}``."""
    import ast

    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--set needs KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _batch(trainer, g: int, tokens: int, ch: int):
    r = np.random.default_rng(1)
    local = g // jax.process_count()
    b = {"latent": r.normal(size=(local, tokens, ch)).astype(np.float32),
         "cls": r.normal(size=(local, 768)).astype(np.float32), "label": np.zeros(local, np.int32)}
    return trainer.put_batch(b)


def _time(trainer, state, batch, steps: int):
    step = trainer.train_step
    state, m = step(state, batch)  # compile + warm-up
    jax.block_until_ready(m)
    state, m = step(state, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    return state, (time.perf_counter() - t0) / steps, float(m["loss"])


def _trace(trainer, state, batch, log_dir: str, steps: int = 3) -> None:
    from mmfm_jax.bench import trace_summary

    with jax.profiler.trace(log_dir):
        for _ in range(steps):
            state, m = trainer.train_step(state, batch)
        jax.block_until_ready(m)
    trace_summary.main(["trace_summary", log_dir, f"--steps={steps}"])


def _peak_memory() -> str:
    """``'  peak X GiB of Y GiB'`` from the first local device's allocator statistics ('' where there are none)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" not in stats:
        return ""
    limit = stats.get("bytes_limit", 0)
    return f"  peak {stats['peak_bytes_in_use'] / 2**30:.1f} GiB" + (f" of {limit / 2**30:.1f}" if limit else "")


def _checkpoint_bench(state, directory: str, repeats: int = 2) -> dict:
    """Seconds to save (and wait) / restore ``state`` with and without checksums, and to checksum it (best of
    ``repeats``)."""
    import shutil
    from pathlib import Path

    from mmfm_jax.train.checkpoint import Checkpointer, state_checksums

    state_checksums(state)  # compile
    t_sum = min(_seconds(lambda: state_checksums(state)) for _ in range(repeats))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    out = dict(gb=sum(x.nbytes for x in jax.tree.leaves(state)) / 1e9, checksum_s=t_sum)
    for on in (False, True):
        saves, restores = [], []
        for r in range(repeats):
            d = Path(directory) / f"ck_{int(on)}_{r}"
            shutil.rmtree(d, ignore_errors=True)
            ck = Checkpointer(d, async_save=False, checksums=on)
            saves.append(_seconds(lambda c=ck: (c.save(1, state), c.wait())))
            restores.append(_seconds(lambda c=ck: c.restore(target, with_config=False)))
            ck.close()
            shutil.rmtree(d, ignore_errors=True)
        out[f"save_s_{'on' if on else 'off'}"], out[f"restore_s_{'on' if on else 'off'}"] = min(saves), min(restores)
    return out


def _seconds(fn) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m mmfm_jax.bench train")
    p.add_argument("--config", default="configs/train.py:xl_mode")
    p.add_argument("--batch", type=int, default=0, help="global batch; 0 = search the largest that fits")
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--peak", type=float, default=989.0, help="dense bf16 TFLOP/s per device (H100 SXM: 989)")
    p.add_argument("--remat", default="none")
    p.add_argument("--scan", action="store_true")
    p.add_argument("--fsdp", type=int, default=1)
    p.add_argument("--max-per-device", type=int, default=256)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--checkpoint", default="", metavar="DIR",
                   help="time checkpoint save/restore with and without checksums in DIR (no step timing)")
    p.add_argument("--checkpoint-repeats", type=int, default=3)
    p.add_argument("--trace", default="", metavar="DIR",
                   help="after timing, profile 3 steps of the last batch into DIR and print where the device time "
                        "goes (bench trace_summary)")
    args = p.parse_args(argv[1:])
    cfg, trainer, state = _setup(args)
    mcfg, scfg = trainer.model_config, trainer.step_config
    fwd_flops = ditdh_flops_per_example(mcfg)
    tokens, ch = mcfg.input_size ** 2, mcfg.in_channels
    n_dev = jax.device_count()
    print(f"devices: {n_dev} x {jax.devices()[0].device_kind}; model {cfg.model.preset} "
          f"({sum(x.size for x in jax.tree.leaves(state.params)):,} params), dtype {args.dtype}, remat {args.remat}, "
          f"scan {args.scan}, source {scfg.source_kind}, y {scfg.y_from}, accum {args.accum}, "
          f"residual {mcfg.residual_dtype}, depth {mcfg.depth}, compiler options "
          f"{parse_compiler_options(cfg.train.compiler_options)}, overrides {args.set}")
    if args.checkpoint:
        r = _checkpoint_bench(state, args.checkpoint, args.checkpoint_repeats)
        print(f"checkpoint: state {r['gb']:.2f} GB; checksums {r['checksum_s']:.3f} s "
              f"({r['gb'] / max(r['checksum_s'], 1e-9):.1f} GB/s); save {r['save_s_off']:.2f} s without, "
              f"{r['save_s_on']:.2f} s with checksums ({100 * r['checksum_s'] / r['save_s_off']:.1f}% of a save); "
              f"restore {r['restore_s_off']:.2f} s without, {r['restore_s_on']:.2f} s with verification "
              f"({100 * r['checksum_s'] / r['restore_s_off']:.1f}% of a restore)")
        return
    candidates = [args.batch] if args.batch else [n_dev * 2 ** i for i in range(0, 12)
                                                   if 2 ** i <= args.max_per_device]
    best = None
    for g in candidates:
        if g % args.accum or (g // args.accum) % n_dev:
            continue
        try:
            batch = _batch(trainer, g, tokens, ch)
            state, sec, loss = _time(trainer, state, batch, args.steps)
        except Exception as e:  # noqa: BLE001  (out of memory: stop the search)
            msg = str(e).splitlines()[0][:160]
            print(f"batch {g}: failed ({type(e).__name__}: {msg})")
            if args.batch:
                raise
            break
        ips = g / sec
        tflops = 3 * fwd_flops * ips / n_dev / 1e12
        row = dict(batch=g, sec_per_step=sec, images_per_s=ips, tflops_per_device=tflops, mfu=tflops / args.peak)
        print(f"batch {g:5d}: {sec * 1e3:9.1f} ms/step  {ips:9.1f} img/s  {tflops:7.1f} TFLOP/s/device  "
              f"MFU {100 * row['mfu']:5.1f}%  (loss {loss:.4f}){_peak_memory()}")
        best = (row, batch)
    if best and args.trace:
        _trace(trainer, state, best[1], args.trace)
    best = best[0] if best else None
    if best:
        print(f"\nbest: batch {best['batch']}, {best['images_per_s']:.1f} img/s, "
              f"{best['tflops_per_device']:.1f} TFLOP/s/device = {100 * best['mfu']:.1f}% of {args.peak} peak; "
              f"forward {fwd_flops / 1e9:.1f} GFLOP/image")
