"""encode: images -> DINOv2-B (with registers) -> latent shards.

Variants: ``imagenet`` (training latents: ADM crop 256 -> bicubic 224, bf16 latents, both flips),
``imagenet_cls`` (the official GMM-fit path: ADM crop 224, no flip views, fp32), ``tiny`` (tests: random tiny
encoder on a local folder).
"""

import ml_collections

from mmfm_jax.config_utils import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base_config()
    c.data = ml_collections.ConfigDict(dict(source="tfds", root="", tfds_name="imagenet2012", tfds_dir="",
                                            split="train", path="train", crop_size=256, image_size=224,
                                            batch_size=256, num_threads=16, limit=0))
    c.encoder = ml_collections.ConfigDict(dict(weights="facebook/dinov2-with-registers-base", local_files_only=False,
                                               dtype="float32", random_init=False, preset="base"))
    c.output = ml_collections.ConfigDict(dict(dir="", examples_per_shard=4096, latent_dtype="bfloat16",
                                              flip_views=True))
    c.stats = ml_collections.ConfigDict(dict(import_path="", keep_mean=True))
    variant = arg or "imagenet"
    if variant == "imagenet":
        pass
    elif variant == "imagenet_cls":
        c.data.path = "cls"
        c.output.flip_views = False
        c.output.latent_dtype = "float32"
    elif variant == "tiny":
        c.data.source = "folder"
        c.data.crop_size = 32
        c.data.image_size = 28
        c.data.batch_size = 8
        c.data.num_threads = 2
        c.encoder.weights = ""
        c.encoder.random_init = True
        c.encoder.preset = "fixture_small"
        c.output.examples_per_shard = 6
        c.output.latent_dtype = "float32"
    else:
        raise ValueError(f"configs/encode.py: unknown variant {variant!r} (imagenet, imagenet_cls, tiny)")
    return c
