"""fit-gmm: the MM-FM source (CLS GMM + spatial table) from a latent dataset, or from the official pickles.

Variants: ``imagenet`` (the official settings: K = 8192, diag, k-means++, max_iter 100, reg_covar 1e-6, tol 1e-3,
flip augmentation; the same for every encoder: 16 x 16 x 768 latents, 768-d global descriptors), ``official``
(convert the released DINOv2-B pickles, ``artifacts/gmm/dinov2-b/``), ``official_siglip2_b`` / ``official_mae_b``
(the same for ``artifacts/gmm/siglip2-b/`` / ``mae-b/``), ``tiny`` (tests).
"""

import ml_collections

from mmfm_jax.config_utils import base_config
from mmfm_jax.models import encoders


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base_config()
    c.data = ml_collections.ConfigDict(dict(latents_dir="", batch_size=256))
    c.latent = ml_collections.ConfigDict(dict(grid=(16, 16), channels=768))
    c.gmm = ml_collections.ConfigDict(dict(n_components=8192, max_iter=100, tol=1e-3, reg_covar=1e-6,
                                           init="k-means++", seed=42, checkpoint_every=1,
                                           # rows per chunk per device; 0: 1024 on CPUs, 4096 on accelerators
                                           chunk_size=0,
                                           # GEMM precision: fp32 (default); on GPUs 'bf16x3_fused' (3-pass bf16
                                           # split, fits as well as fp32) or 'tf32_tf32_f32,highest' (README, "GMM EM")
                                           precision="highest",
                                           # 0: dense M-step (sklearn); m > 0: each row's m largest
                                           # responsibilities, rows leaving out > 1e-7 completed (em.fit)
                                           m_step_top=0,
                                           # float64: EM in float64 (sklearn's float64 fit; CPU ~2x slower),
                                           # the saved GMM is float32
                                           dtype="float32"))
    c.spatial = ml_collections.ConfigDict(dict(enabled=True, flip=True, compensated=True, shift="none"))
    c.import_official = ml_collections.ConfigDict(dict(cls_pkl="", spatial_pkl=""))
    c.encoder = ml_collections.ConfigDict(dict(name=""))  # '' = any; else the latents must come from it
    variant = arg or "imagenet"
    if variant == "imagenet":
        pass
    elif variant == "official" or variant.startswith("official_"):
        name = "dinov2_b" if variant == "official" else variant[len("official_"):]
        rel = encoders.get(name, "variant").release
        c.encoder.name = name
        c.import_official.cls_pkl = f"artifacts/gmm/{rel}/gmm_n8192_diag_k-means++.pkl"
        c.import_official.spatial_pkl = f"artifacts/gmm/{rel}/spatial_gmm_from_cls_n8192_diag_k-means++_flip.pkl"
    elif variant == "tiny":
        c.latent.grid = (2, 2)
        c.latent.channels = 8
        c.gmm.n_components = 4
        c.gmm.max_iter = 20
        c.gmm.chunk_size = 16
        c.data.batch_size = 16
        c.log_every = 5
    else:
        raise ValueError(f"configs/fit_gmm.py: unknown variant {variant!r} "
                         "(imagenet, official, official_siglip2_b, official_mae_b, tiny)")
    return c
