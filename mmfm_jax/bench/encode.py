"""``python -m mmfm_jax.bench encode [--encoder=all] [--preset=base] [--batch=8] [--dtype=float32] [--repeats=5]
[--devices=0] [--no-torch]``

Images/s of our encoders on the MM-FM path (affine-stripped final LayerNorm -> latent tokens + the global
descriptor), jitted over every device, at each encoder's MM-FM input size: ``dinov2_b`` (DINOv2 with registers,
224 x 224), ``siglip2_b`` (SigLIP2 vision tower + MAP head, 256 x 256), ``mae_b`` (ViT-MAE encoder, 256 x 256,
position table resized 14 -> 16); ``--encoder=all`` runs the three. For comparison, transformers' PyTorch model with
the same config and batch on the same machine (``Dinov2WithRegistersModel``, ``SiglipVisionModel``, ``ViTMAEModel``
with mask ratio 0; needs ``pip install torch==2.13.0 transformers==5.23.0``, the ``torch`` extra; random weights,
eval mode, ``torch.inference_mode``), with their ratio. ``--devices=N`` (CPU only) splits the host into N XLA CPU
devices and shards the batch over them (XLA:CPU runs a fusion on one thread; PyTorch keeps its own thread count).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx

ENCODERS = ("dinov2_b", "siglip2_b", "mae_b")


def _ours(name: str, preset: str, batch: int, dtype: str, repeats: int) -> float:
    from mmfm_jax import parallel
    from mmfm_jax.models import encoders

    spec = encoders.get(name, "--encoder")
    mesh = parallel.make_mesh(None)
    model = spec.random(preset, dtype, spec.image_size)
    g, st = nnx.split(model)
    st = jax.device_put(st, parallel.replicated(mesh))
    fn = jax.jit(lambda s, x: spec.encode(nnx.merge(g, s), x), out_shardings=(parallel.batch_sharding(mesh, 3),
                                                                             parallel.batch_sharding(mesh, 2)))
    b = -(-batch // jax.device_count()) * jax.device_count()
    size = spec.image_size
    x = parallel.host_to_global(np.random.default_rng(0).normal(size=(b, size, size, 3)).astype(np.float32), mesh)
    jax.block_until_ready(fn(st, x))
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn(st, x)
    jax.block_until_ready(out)
    return b * repeats / (time.perf_counter() - t0)


def _torch_model(name: str, preset: str):
    import transformers as tf

    if name == "dinov2_b":
        from mmfm_jax.models.dinov2 import Dinov2Config

        c = Dinov2Config.preset(preset)
        cfg = tf.Dinov2WithRegistersConfig(hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                                           num_attention_heads=c.num_attention_heads, mlp_ratio=c.mlp_ratio,
                                           use_swiglu_ffn=c.use_swiglu_ffn, image_size=c.image_size,
                                           num_register_tokens=c.num_register_tokens)
        return tf.Dinov2WithRegistersModel(cfg).eval(), {}, 224
    if name == "siglip2_b":
        from mmfm_jax.models.siglip import SiglipVisionConfig

        c = SiglipVisionConfig.preset(preset)
        cfg = tf.SiglipVisionConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                                    num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                                    image_size=c.image_size, patch_size=c.patch_size)
        return tf.SiglipVisionModel(cfg).eval(), {"interpolate_pos_encoding": True}, 256
    from mmfm_jax.models.mae import MAEConfig

    c = MAEConfig.preset(preset)
    cfg = tf.ViTMAEConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                          num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                          image_size=c.image_size, patch_size=c.patch_size, mask_ratio=0.0)
    return tf.ViTMAEModel(cfg).eval(), {"interpolate_pos_encoding": True}, 256


def _torch(name: str, preset: str, batch: int, repeats: int) -> float | None:
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError:
        return None
    model, kw, size = _torch_model(name, preset)
    x = torch.randn(batch, 3, size, size)
    if name == "mae_b":
        kw["noise"] = torch.arange((size // 16) ** 2, dtype=torch.float32).expand(batch, -1)
    with torch.inference_mode():
        model(pixel_values=x, **kw)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(pixel_values=x, **kw)
    return batch * repeats / (time.perf_counter() - t0)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m mmfm_jax.bench encode")
    p.add_argument("--encoder", default="all", choices=ENCODERS + ("all",))
    p.add_argument("--preset", default="base")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--devices", type=int, default=0, help="CPU only: number of XLA CPU devices (0: jax default)")
    p.add_argument("--no-torch", action="store_true")
    a = p.parse_args(argv[1:])
    if a.devices:
        jax.config.update("jax_num_cpu_devices", a.devices)
    names = ENCODERS if a.encoder == "all" else (a.encoder,)
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; preset {a.preset}, batch {a.batch}, "
          f"{a.dtype}")
    for name in names:
        from mmfm_jax.models import encoders

        size = encoders.get(name).image_size
        ours = _ours(name, a.preset, a.batch, a.dtype, a.repeats)
        print(f"{name} ({size}x{size}) mmfm_jax (jax {jax.__version__}): {ours:8.2f} images/s")
        theirs = None if a.no_torch else _torch(name, a.preset, a.batch, a.repeats)
        if theirs is None:
            print(f"{name} transformers (PyTorch): not measured (torch / transformers not installed, or --no-torch)")
            continue
        import torch

        print(f"{name} transformers (PyTorch {torch.__version__}, {torch.get_num_threads()} threads): "
              f"{theirs:8.2f} images/s; ratio ours / PyTorch: {ours / theirs:.2f}")
