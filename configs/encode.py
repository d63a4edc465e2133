"""encode: images -> an encoder (``encoder.name``: dinov2_b | siglip2_b | mae_b) -> latent shards.

Variants: ``imagenet`` (training latents: ADM crop 256 -> the encoder's input (DINOv2: bicubic 224; SigLIP2 / MAE:
the 256 crop itself), bf16 latents, both flips), ``imagenet_cls`` (the official GMM-fit path: ADM crop to the
encoder's input size, no flip views, fp32), ``tiny`` (tests: random tiny encoder on a local folder). Each takes an
encoder suffix: ``imagenet_siglip2_b``, ``imagenet_cls_mae_b``, ``tiny_mae_b``... (no suffix: ``dinov2_b``), which
sets ``encoder.name``, ``encoder.weights`` (the hub id), ``data.image_size`` and ``stats.keep_mean`` (MAE's
statistics carry a mean; DINOv2's and SigLIP2's are variance-only, as the official ones).
"""

import ml_collections

from mmfm_jax.config_utils import base_config
from mmfm_jax.models import encoders

VARIANTS = ("imagenet", "imagenet_cls", "tiny")


def _split(arg: str) -> tuple[str, str]:
    for name in encoders.NAMES:
        if arg.endswith("_" + name):
            return arg[: -len(name) - 1], name
    return arg, "dinov2_b"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base_config()
    c.data = ml_collections.ConfigDict(dict(source="tfds", root="", tfds_name="imagenet2012", tfds_dir="",
                                            split="train", path="train", crop_size=256, image_size=224,
                                            batch_size=256, num_threads=16, limit=0))
    c.encoder = ml_collections.ConfigDict(dict(name="dinov2_b", weights="facebook/dinov2-with-registers-base",
                                               local_files_only=False, dtype="float32", random_init=False,
                                               preset="base"))
    c.output = ml_collections.ConfigDict(dict(dir="", examples_per_shard=4096, latent_dtype="bfloat16",
                                              flip_views=True))
    c.stats = ml_collections.ConfigDict(dict(import_path="", keep_mean=True))
    variant, name = _split(arg or "imagenet")
    if name != "dinov2_b":
        spec = encoders.get(name)
        c.encoder.name = name
        c.encoder.weights = spec.hub_id
        c.data.image_size = spec.image_size
        c.stats.keep_mean = spec.stats_mean
    if variant == "imagenet":
        pass
    elif variant == "imagenet_cls":
        c.data.path = "cls"
        c.output.flip_views = False
        c.output.latent_dtype = "float32"
    elif variant == "tiny":
        c.data.source = "folder"
        c.data.crop_size = 32
        c.data.image_size = 28 if name == "dinov2_b" else 32  # 2 x 2 patches of 14 / 16 px
        c.data.batch_size = 8
        c.data.num_threads = 2
        c.encoder.weights = ""
        c.encoder.random_init = True
        c.encoder.preset = "fixture_small"
        c.output.examples_per_shard = 6
        c.output.latent_dtype = "float32"
    else:
        raise ValueError(f"configs/encode.py: unknown variant {arg!r} ({', '.join(VARIANTS)}, each optionally "
                         f"with an encoder suffix: _{', _'.join(encoders.NAMES)})")
    return c
