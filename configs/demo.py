"""demo: MM-FM vs the Gaussian baseline on scikit-learn's digits (8x8), a tiny DiTDH, same budget per setting.

Fixed choices (README, docs): latent = 64 pixel tokens x 1 channel in [-1, 1]; [CLS] = flattened image; a
16-mode diagonal GMM fitted with our EM; no time shift (the ImageNet shift sqrt(dim/4096) would be 1/8 here);
training budget 1000 steps at batch 64 (about 45 epochs of the 1,438 training digits); evaluation every 100 steps
with 500 samples from the EMA model and a 10-point Euler grid (9 model evaluations).

Variant ``gm_steps`` (``mode='gm_steps'``, ``mmfm_jax/experiments/digits/gm.py``): GMFlow's claim in miniature: FD
vs number of steps (2..32) for Euler on a velocity DiTDH vs GM-ODE / GM-SDE on a GM DiTDH (``model.head='gm'``,
K = 8) trained for the same budget, with the Gaussian source and the GMM source + mode coupling (mode-conditional
model).
``gm_steps_test``: its seconds-long version.
"""

import dataclasses

import ml_collections

from mmfm_jax.config_utils import base_config
from mmfm_jax.models.ditdh import DiTDHConfig


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base_config()
    m = dataclasses.asdict(DiTDHConfig.preset("tiny", in_channels=1, input_size=8, hidden_size=(32, 64),
                                              depth=(2, 1), num_heads=(2, 4), num_modes=16))
    m.pop("dtype")
    c.model = ml_collections.ConfigDict(dict(preset="tiny", **m))
    c.settings = ("gaussian", "gmm_indep", "gmm_mode", "gmm_mode_cond")
    c.test_fraction = 0.2
    c.classifier_steps = 600
    c.gmm = ml_collections.ConfigDict(dict(n_components=16, max_iter=100, tol=1e-3, reg_covar=1e-3, chunk_size=512))
    c.source = ml_collections.ConfigDict(dict(kind="gaussian", path="", assignment="soft", temperature=1.0,
                                              y_from="none", shard_table=True))
    c.train = ml_collections.ConfigDict(dict(
        num_steps=1000, global_batch_size=64, grad_accum_steps=1, steps_per_epoch=22,
        initial_phase_steps=1000, decay_start_steps=1000, decay_end_steps=2000,
        initial_lr=2e-3, base_lr=2e-3, final_lr=2e-3, schedule="linear",
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip_grad=1.0,
        initial_ema_decay=0.99, ema_decay=0.99, compute_dtype="float32",
        time_kind="logit_normal", time_mean=0.0, time_std=1.0, t_max=0.999, time_shift=1.0, time_shift_base=4096,
        gm_trans_ratio=0.5, gm_weight_scale=2.0))  # GMFlow head only
    c.adaptive = ml_collections.ConfigDict(dict(
        enabled=False, num_modes=0, strategy="focal", gamma=2.0, normalize=True, min_weight=0.3, max_weight=3.0,
        ema_decay=0.99, warmup_steps=100, weight_by="mode"))
    c.sampler = ml_collections.ConfigDict(dict(num_points=10, shift=1.0, t_end=0.999))
    c.eval_every = 100
    c.eval_extra = (25, 50)  # extra early evaluations, so the GMM settings' speed-up is measured below step 100
    c.eval_samples = 500
    c.mode = "convergence"  # 'convergence': MM-FM vs the baseline; 'gm_steps': Euler vs GMFlow solvers vs steps
    c.gm = ml_collections.ConfigDict(dict(
        steps=(2, 4, 8, 16, 32), ref_steps=0, methods=("euler", "gm_ode2", "gm_sde"),
        components=8, logstd_inner=64, substeps=0))
    variant = arg or "default"
    if variant == "default":
        pass
    elif variant in ("gm_steps", "gm_steps_test"):
        c.mode = "gm_steps"
        c.eval_extra = ()
        c.settings = ("gaussian", "gmm_mode_cond")
        c.train.num_steps = 300
        c.eval_samples = 250
        if variant == "gm_steps_test":
            c.classifier_steps = 200
            c.train.num_steps = 8
            c.eval_samples = 64
            c.gmm.n_components = 8
            c.gmm.max_iter = 10
            c.model.depth = (1, 1)
            c.gm.steps = (2,)
            c.gm.ref_steps = 4
            c.gm.methods = ("euler", "gm_ode2", "gm_sde")
            c.gm.components = 4
    elif variant == "test":
        c.eval_extra = (10,)
        c.classifier_steps = 200
        c.train.num_steps = 40
        c.train.global_batch_size = 64
        c.eval_every = 20
        c.eval_samples = 64
        c.sampler.num_points = 5
        c.gmm.n_components = 8
        c.gmm.max_iter = 10
        c.model.depth = (1, 1)
    else:
        raise ValueError(f"configs/demo.py: unknown variant {variant!r} (default, test, gm_steps, gm_steps_test)")
    return c
