"""evaluate: FID / sFID / IS / precision / recall of a set of images, as the ADM (guided-diffusion) evaluator.

Variants: ``imagenet256`` (50k samples vs ``VIRTUAL_imagenet256_labeled.npz``), ``tiny`` (tests).
"""

import ml_collections

from mmfm_jax.config_utils import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base_config()
    c.input = ml_collections.ConfigDict(dict(path=""))
    c.ref = ml_collections.ConfigDict(dict(path="artifacts/fid_reference/VIRTUAL_imagenet256_labeled.npz",
                                           precision_recall=True, allow_none=False))
    c.inception = ml_collections.ConfigDict(dict(weights="pt_inception-2015-12-05-6726825d.pth", input_path="adm",
                                                 random_init=False))
    c.batch_size = 256
    c.limit = 0
    c.nearest_k = 3
    c.is_split_size = 5000  # ADM: 50,000 samples -> 10 splits
    c.save_features = False
    c.sqrtm = "scipy"  # ADM's scipy.linalg.sqrtm; "eigh": a faster trace-sqrt (tests, quick looks)
    variant = arg or "imagenet256"
    if variant == "imagenet256":
        pass
    elif variant == "tiny":
        c.inception.weights = ""
        c.inception.random_init = True
        c.batch_size = 8
        c.is_split_size = 4
        c.sqrtm = "eigh"
    else:
        raise ValueError(f"configs/evaluate.py: unknown variant {variant!r} (imagenet256, tiny)")
    return c
