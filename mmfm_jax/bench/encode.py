"""``python -m mmfm_jax.bench encode [--preset=base] [--batch=8] [--dtype=float32] [--repeats=5] [--devices=0]
[--no-torch]``

Images/s of our DINOv2 (with registers) encoder at 224x224 (the MM-FM path: patch tokens + [CLS] after the
non-affine final LayerNorm), jitted over every device, and of transformers' PyTorch ``Dinov2WithRegistersModel``
with the same config and batch on the same machine (needs ``pip install torch==2.13.0 transformers==5.23.0``, the
``torch`` extra; random weights, eval mode, ``torch.inference_mode``), with their ratio. ``--devices=N`` (CPU
only) splits the host into N XLA CPU devices and shards the batch over them (XLA:CPU runs a fusion on one thread;
PyTorch keeps its own thread count).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx


def _ours(preset: str, batch: int, dtype: str, repeats: int) -> float:
    from mmfm_jax import parallel
    from mmfm_jax.models.dinov2 import Dinov2, Dinov2Config, encode_mmfm

    mesh = parallel.make_mesh(None)
    model = Dinov2(Dinov2Config.preset(preset, dtype=dtype), rngs=nnx.Rngs(0))
    model.precompute_pos_embed(224)
    g, st = nnx.split(model)
    st = jax.device_put(st, parallel.replicated(mesh))
    fn = jax.jit(lambda s, x: encode_mmfm(nnx.merge(g, s), x), out_shardings=(parallel.batch_sharding(mesh, 3),
                                                                        parallel.batch_sharding(mesh, 2)))
    b = -(-batch // jax.device_count()) * jax.device_count()
    x = parallel.host_to_global(np.random.default_rng(0).normal(size=(b, 224, 224, 3)).astype(np.float32), mesh)
    jax.block_until_ready(fn(st, x))
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn(st, x)
    jax.block_until_ready(out)
    return b * repeats / (time.perf_counter() - t0)


def _torch(preset: str, batch: int, repeats: int) -> float | None:
    try:
        import torch
        from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    except ImportError:
        return None
    from mmfm_jax.models.dinov2 import _PRESETS

    p = _PRESETS[preset]
    cfg = Dinov2WithRegistersConfig(hidden_size=p["hidden_size"], num_hidden_layers=p["num_hidden_layers"],
                                    num_attention_heads=p["num_attention_heads"],
                                    intermediate_size=4 * p["hidden_size"], image_size=518, num_register_tokens=4)
    model = Dinov2WithRegistersModel(cfg).eval()
    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        model(pixel_values=x)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(pixel_values=x)
    return batch * repeats / (time.perf_counter() - t0)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m mmfm_jax.bench encode")
    p.add_argument("--preset", default="base")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--devices", type=int, default=0, help="CPU only: number of XLA CPU devices (0: jax default)")
    p.add_argument("--no-torch", action="store_true")
    a = p.parse_args(argv[1:])
    if a.devices:
        jax.config.update("jax_num_cpu_devices", a.devices)
    ours = _ours(a.preset, a.batch, a.dtype, a.repeats)
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; DINOv2-{a.preset} with registers, "
          f"224x224, batch {a.batch}, {a.dtype}")
    print(f"mmfm_jax (jax {jax.__version__}): {ours:8.2f} images/s")
    theirs = None if a.no_torch else _torch(a.preset, a.batch, a.repeats)
    if theirs is None:
        print("transformers (PyTorch): not measured (torch / transformers not installed, or --no-torch)")
        return
    import torch

    print(f"transformers (PyTorch {torch.__version__}, {torch.get_num_threads()} threads): {theirs:8.2f} images/s")
    print(f"ratio ours / PyTorch: {ours / theirs:.2f}")

