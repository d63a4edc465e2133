"""sample: draw images from a trained (or official) DiTDH with the 50-point Euler grid, AutoGuidance and the RAE
decoder.

Variants:
- one per release-card row, from the official artifacts (``artifacts/`` as downloaded from the release, layout
  ``checkpoints/<encoder>/``, ``decoders/<encoder>/ViTXL_n08/model.pt``, ``normalization_stats/<encoder>/stat.pt``;
  the GMM source from ``fit-gmm`` with ``fit_gmm.py:official[_<encoder>]`` in ``runs/fit_gmm_official[_<encoder>]``):
  ``<encoder>_<uncond|mode>_<25k|100k>[_ag]``, e.g. ``dinov2_b_mode_100k_ag`` (the paper's best: mode-conditional
  XL + DiT-S guide at 1.5), ``siglip2_b_mode_25k``, ``mae_b_uncond_25k`` (``RELEASE_CARD`` lists them with their
  FIDs); ``imagenet_mode_ag`` / ``imagenet_mode`` are ``dinov2_b_mode_100k_ag`` / ``dinov2_b_mode_100k``;
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
from mmfm_jax.models import encoders

# (encoder, setting, checkpoint steps, autoguidance) -> the release card's FID-50K (50-step Euler, bf16)
RELEASE_CARD: dict[tuple[str, str, str, bool], float] = {
    ("dinov2_b", "uncond", "25k", False): 4.84, ("dinov2_b", "uncond", "25k", True): 4.03,
    ("dinov2_b", "uncond", "100k", False): 3.84, ("dinov2_b", "uncond", "100k", True): 3.17,
    ("dinov2_b", "mode", "25k", False): 4.77, ("dinov2_b", "mode", "25k", True): 4.07,
    ("dinov2_b", "mode", "100k", False): 3.20, ("dinov2_b", "mode", "100k", True): 2.78,
    ("siglip2_b", "uncond", "25k", False): 8.23, ("siglip2_b", "mode", "25k", False): 7.25,
    ("mae_b", "uncond", "25k", False): 17.03, ("mae_b", "mode", "25k", False): 16.24,
}
ALIASES = {"imagenet_mode_ag": "dinov2_b_mode_100k_ag", "imagenet_mode": "dinov2_b_mode_100k"}


def release_variant(name: str) -> tuple[str, str, str, bool] | None:
    """``'siglip2_b_mode_25k'`` -> ``('siglip2_b', 'mode', '25k', False)`` if it is a release-card row."""
    name = ALIASES.get(name, name)
    for row in RELEASE_CARD:
        enc, setting, steps, ag = row
        if name == f"{enc}_{setting}_{steps}" + ("_ag" if ag else ""):
            return row
    return None


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
    # the decoder's output mean/std follow it; '' = the training run's latents' encoder (else dinov2_b)
    c.encoder = ml_collections.ConfigDict(dict(name=""))
    variant = arg or "imagenet_mode_ag"
    row = release_variant(variant)
    if row is not None:
        name, setting, steps, ag = row
        rel = encoders.get(name).release
        c.encoder.name = name
        c.model.kind = "official"
        c.model.path = f"artifacts/checkpoints/{rel}/{setting}-gmm-{steps}.pt"
        c.source.path = "runs/fit_gmm_official/source" if name == "dinov2_b" else f"runs/fit_gmm_official_{name}/source"
        c.decoder.weights = f"artifacts/decoders/{rel}/ViTXL_n08/model.pt"
        c.decoder.stats = f"artifacts/normalization_stats/{rel}/stat.pt"
        c.output.merge_npz = True
        if ag:
            c.guide.enabled = True
            c.guide.kind = "official"
            c.guide.path = f"artifacts/checkpoints/autoguidance/dit-s-{setting}-gmm-25k.pt"
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
        rows = ", ".join(f"{e}_{s}_{k}" + ("_ag" if a else "") for e, s, k, a in RELEASE_CARD)
        raise ValueError(f"configs/sample.py: unknown variant {variant!r} (tiny, {', '.join(ALIASES)}, {rows})")
    return c
