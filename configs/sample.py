"""sample: draw images from a trained (or official) DiTDH with the 50-point Euler grid, AutoGuidance and the RAE
decoder.

Variants:
- ``imagenet_mode_ag`` (the paper's best: mode-conditional XL + DiT-S guide at 1.5, GMM source, bf16, 50k samples)
  from converted official artifacts (``artifacts/`` as downloaded from the release), and
  ``imagenet_mode`` without guidance;
- ``tiny`` (tests): a training workdir's tiny model, a tiny random decoder.

GMFlow (a model trained with ``model.head='gm'``): ``sampler.solver`` 'gm_ode' | 'gm_sde' ('euler' uses the GM's
mean velocity), ``sampler.gm_substeps`` (GM-ODE substeps per evaluation; 0 = max(2, ceil(128 / NFE))),
``sampler.gm_order`` (1 | 2); with a guide the guidance is probabilistic AutoGuidance, ``guide.scale`` in [0, 1).
``guide.scales = (w1, w2, ...)``: a guidance sweep in one compiled program, one output folder per scale.
``sampler.shift = 0``: the shift the model was trained with (``model.kind='train'``: its ``config.json``), else the
resolution shift ``sqrt(L * C / 4096)``.
"""

import ml_collections

from mmfm_jax.config_utils import base_config


def _model(kind: str = "train") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(kind=kind, workdir="", step=-1, path="", prefix="",
                                          use_y_conditioning="auto"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base_config()
    c.model = _model()
    c.guide = _model()
    c.guide.update(dict(enabled=False, scale=1.5, scales=(), t_min=0.0, t_max=1.0))
    c.source = ml_collections.ConfigDict(dict(kind="gmm", path="", shard_table=True))
    c.sampler = ml_collections.ConfigDict(dict(num_points=50, shift=0.0, t_end=0.999, dtype="bfloat16",
                                               solver="euler", gm_substeps=0, gm_order=2))
    c.decoder = ml_collections.ConfigDict(dict(enabled=True, preset="XL", weights="", prefix="", random_init=False,
                                               stats="", use_mean=True, overrides=ml_collections.ConfigDict({})))
    c.num_samples = 50_000
    c.batch_size = 256
    c.output = ml_collections.ConfigDict(dict(images_per_shard=2500, png_grid=True, merge_npz=False))
    variant = arg or "imagenet_mode_ag"
    if variant in ("imagenet_mode_ag", "imagenet_mode"):
        c.model.kind = "official"
        c.model.path = "artifacts/checkpoints/dinov2-b/mode-gmm-100k.pt"
        c.source.path = "runs/fit_gmm_official/source"
        c.decoder.weights = "artifacts/decoders/dinov2-b/ViTXL_n08/model.pt"
        c.decoder.stats = "artifacts/normalization_stats/dinov2-b/stat.pt"
        c.output.merge_npz = True
        if variant == "imagenet_mode_ag":
            c.guide.enabled = True
            c.guide.kind = "official"
            c.guide.path = "artifacts/checkpoints/autoguidance/dit-s-mode-gmm-25k.pt"
    elif variant == "tiny":
        c.source.kind = "gaussian"
        c.sampler.num_points = 5
        c.sampler.dtype = "float32"
        c.decoder.random_init = True
        c.decoder.overrides = ml_collections.ConfigDict(dict(latent_dim=4, hidden=16, layers=1, heads=2, mlp=32,
                                                             patch=4, image_size=16))
        c.num_samples = 20
        c.batch_size = 8
        c.output.images_per_shard = 12
    else:
        raise ValueError(f"configs/sample.py: unknown variant {variant!r} (imagenet_mode_ag, imagenet_mode, tiny)")
    return c
