"""train: DiTDH flow matching on latents, from a Gaussian or GMM source with independent or mode coupling.

Variants (official numbers from the MM-FM configs, spec 2d/2h; global batch 1024, 1251 steps per epoch):

- ``xl_mode``: DiTDH-XL mode-conditional (model sees k), GMM source + mode coupling, grad accumulation 32,
  lr 4e-4 for 20 epochs then 2e-4, linear decay to 2e-5 at epoch 800 from epoch 40, EMA 0.999 then 0.9995,
  focal weighting, 100k steps (80 epochs).
- ``xl_uncond_gmm``: the same, model unconditional (8192-row table kept, unused), accumulation 8.
- ``xl_mode_siglip2_b`` / ``xl_uncond_gmm_siglip2_b`` / ``xl_mode_mae_b`` / ``xl_uncond_gmm_mae_b``: the same on
  SigLIP2-B / MAE-B latents (also 768 x 16 x 16) with the official accumulation: SigLIP2 mode 8, MAE mode 16, both
  unconditional-GMM 4; 25k steps (20 epochs, the released ``checkpoints/<encoder>/*-gmm-25k.pt``).
- ``xl_gaussian``: Gaussian source + independent coupling (the baseline): accumulation 8, lr 2e-4 throughout the
  initial phase, EMA 0.995 then 0.9995, no weighting.
- ``s_guide_mode`` / ``s_guide_uncond``: the DiT-S AutoGuidance guides: 20 epochs (25k steps), accumulation 2,
  lr 2e-4 constant, EMA 0.9995, checkpoint every 12,500 steps.
- ``tiny`` (default, tests): tiny DiTDH on synthetic latents, a few steps; ``tiny_gm``: the same with GMFlow's
  Gaussian-mixture head (``model.head='gm'``, K = 4).

GMFlow (``docs/gmflow.md``): ``model.head='gm'`` (+ ``model.gm_components`` K, ``model.gm_logstd_inner``,
``model.gm_constant_logstd``) trains with the transition NLL, lambda = ``train.gm_trans_ratio`` (GMFlow's ImageNet
default 0.5; 1 = the plain u-NLL, the only value on a GMM source the model does not see the mode of) and
``train.gm_weight_scale`` (2.0).

``source.path`` (a ``save_source`` folder, from ``fit-gmm``) and ``data.path`` (a latent dataset folder, from
``encode``) must be set for the real variants. Steps, not epochs: use ``optim.epochs_to_steps``.
"""

import dataclasses

import ml_collections

from mmfm_jax.config_utils import base_config
from mmfm_jax.models.ditdh import DiTDHConfig
from mmfm_jax.train.optim import epochs_to_steps

STEPS_PER_EPOCH = 1251  # 1,281,167 images at global batch 1024 (reference sampler, drop_last)
# the official DiTDH-XL_{SigLIP2-B,MAE-B}-* configs: gradient accumulation at global batch 1024
ENCODER_VARIANTS = {"xl_mode_siglip2_b": ("siglip2_b", 8), "xl_uncond_gmm_siglip2_b": ("siglip2_b", 4),
                    "xl_mode_mae_b": ("mae_b", 16), "xl_uncond_gmm_mae_b": ("mae_b", 4)}


def _model(preset: str, **overrides) -> ml_collections.ConfigDict:
    d = dataclasses.asdict(DiTDHConfig.preset(preset, **overrides))
    d.pop("dtype")  # set by train.compute_dtype
    return ml_collections.ConfigDict(dict(preset=preset, **d))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "tiny"
    c = base_config()
    c.model = _model("XL", num_modes=8192, use_y_conditioning=True)
    c.data = ml_collections.ConfigDict(dict(
        kind="latents", path="", normalize=False, shuffle=True, num_threads=2, prefetch=2,
        synthetic_size=256, synthetic_cls_dim=8))
    c.source = ml_collections.ConfigDict(dict(
        kind="gmm_mode", path="", assignment="soft", temperature=1.0, y_from="mode", shard_table=True,
        table_dtype="float32"))  # 'bfloat16' halves the spatial table's memory (XL: 6.4 -> 3.2 GB)
    c.train = ml_collections.ConfigDict(dict(
        num_steps=100_000, global_batch_size=1024, grad_accum_steps=32, steps_per_epoch=STEPS_PER_EPOCH,
        initial_phase_steps=epochs_to_steps(20, STEPS_PER_EPOCH),
        decay_start_steps=epochs_to_steps(40, STEPS_PER_EPOCH),
        decay_end_steps=epochs_to_steps(800, STEPS_PER_EPOCH),
        initial_lr=4e-4, base_lr=2e-4, final_lr=2e-5, schedule="linear",
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip_grad=1.0,
        initial_ema_decay=0.999, ema_decay=0.9995,
        compute_dtype="bfloat16",
        adam_mu_dtype="float32",  # 'bfloat16': Adam's first moment in bf16 (XL: saves 1.7 GB)
        time_kind="logit_normal", time_mean=0.0, time_std=1.0, t_max=0.999,
        time_shift=0.0, time_shift_base=4096,  # 0 = sqrt(L * C / base) (sqrt(48) for 256 x 768)
        max_consecutive_nonfinite=20, peak_tflops_per_device=989.0,
        compiler_options="auto",  # XLA options for the jitted init/step: 'auto' and/or 'name=value,...'
        gm_trans_ratio=0.5, gm_weight_scale=2.0))  # GMFlow head only (model.head='gm')
    c.adaptive = ml_collections.ConfigDict(dict(
        enabled=True, num_modes=0, strategy="focal", gamma=2.0, normalize=True, min_weight=0.3, max_weight=3.0,
        ema_decay=0.9995, warmup_steps=2500, weight_by="mode"))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=5000, keep=3, async_save=True,
                                                  preemption_check_every=10))
    # a TensorBoard grid of EMA samples (latents as images: PCA of the tokens) every `every_steps` (0 = off)
    c.preview = ml_collections.ConfigDict(dict(every_steps=5000, num_samples=16, num_points=25))
    c.log_every = 100
    c.encoder = ml_collections.ConfigDict(dict(name="dinov2_b"))  # the latents must come from it ('' = any)

    if variant == "xl_mode":
        pass
    elif variant == "xl_uncond_gmm":
        c.model.use_y_conditioning = False
        c.source.y_from = "none"
        c.train.grad_accum_steps = 8
    elif variant in ENCODER_VARIANTS:
        if variant.startswith("xl_uncond_gmm"):
            c.model.use_y_conditioning = False
            c.source.y_from = "none"
        c.encoder.name, c.train.grad_accum_steps = ENCODER_VARIANTS[variant]
        c.train.num_steps = 25_000
    elif variant == "xl_gaussian":
        c.model = _model("XL", num_modes=1000, use_y_conditioning=False)
        c.source.kind = "gaussian"
        c.source.y_from = "none"
        c.train.grad_accum_steps = 8
        c.train.initial_lr = 2e-4
        c.train.initial_ema_decay = 0.995
        c.adaptive.enabled = False
    elif variant in ("s_guide_mode", "s_guide_uncond"):
        mode = variant == "s_guide_mode"
        c.model = _model("S", num_modes=8192, use_y_conditioning=mode)
        c.source.y_from = "mode" if mode else "none"
        c.train.grad_accum_steps = 2
        c.train.num_steps = 25_000
        c.train.initial_lr = c.train.base_lr = c.train.final_lr = 2e-4
        c.train.initial_ema_decay = 0.9995
        c.checkpoint.every_steps = 12_500
    elif variant in ("tiny", "tiny_gm"):
        gm = dict(head="gm", gm_components=4, gm_logstd_inner=32) if variant == "tiny_gm" else {}
        c.encoder.name = ""
        c.model = _model("tiny", in_channels=4, input_size=4, hidden_size=(32, 48), depth=(1, 1), num_heads=(2, 2),
                         num_modes=8, use_y_conditioning=False, **gm)
        c.data.kind = "synthetic"
        c.data.synthetic_size = 64
        c.data.synthetic_cls_dim = 4
        c.source.kind = "gaussian"
        c.source.y_from = "none"
        c.train.num_steps = 6
        c.train.global_batch_size = 16
        c.train.grad_accum_steps = 2
        c.train.initial_phase_steps, c.train.decay_start_steps, c.train.decay_end_steps = 2, 3, 8
        c.train.initial_lr, c.train.base_lr, c.train.final_lr = 1e-3, 5e-4, 1e-4
        c.train.compute_dtype = "float32"
        c.train.compiler_options = "xla_backend_optimization_level=0"  # halves CPU compile time of the tests
        c.train.max_consecutive_nonfinite = 3
        c.train.peak_tflops_per_device = 1.0
        c.adaptive.enabled = False
        c.adaptive.warmup_steps = 2
        c.adaptive.ema_decay = 0.9
        c.checkpoint.every_steps = 2
        c.checkpoint.keep = 2
        c.preview.every_steps = 0
        c.log_every = 2
    else:
        raise ValueError(f"configs/train.py: unknown variant {variant!r} "
                         "(tiny, tiny_gm, xl_mode, xl_uncond_gmm, xl_gaussian, s_guide_mode, s_guide_uncond, "
                         f"{', '.join(ENCODER_VARIANTS)})")
    return c
