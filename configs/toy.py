"""toy: the paper's R^10 experiment (Len and W2^2 for Compact / Spread targets), in the spirit of Thm 3.1.

Target (fixed design, see docs/toy.md): a uniform mixture of ``n_modes`` translates of ONE unimodal density in
R^``dim``: ``x = c_i + A z``, i ~ U{1..m}, z ~ N(0, I), ``A = R diag(s)`` with R a fixed random rotation
(``geometry_seed``) and per-axis scales s = linspace(*within_scales) (so every mode has the same full,
non-diagonal covariance ``A A^T``: the diagonal GMM is an approximation, as on real latents). Centres:
``c_i = radius * (e_i - mean_j e_j)``: m orthogonal directions, all pairwise distances ``radius * sqrt(2)``;
Compact = small radius (modes close together), Spread = large radius (far apart).

Runs per setting: Gaussian source + independent coupling, GMM source + independent coupling, GMM source + mode
coupling; the GMM (K = n_modes, diagonal, k-means++) is fitted with our EM on the training samples; an MLP velocity
field per run, trained with the flow-matching core (x_t = (1 - t) x + t z0, target z0 - x). ``seeds`` repeats
everything (data, GMM fit, network init, training noise); the table reports mean +- std over seeds.

Variant ``test``: a seconds-long version for the test suite.

Variant ``gm_steps`` (``mode='gm_steps'``, ``mmfm_jax/experiments/toy/gm.py``): GMFlow's claim in miniature on the
Spread target: W2^2 vs number of steps (2..32) for Euler on a velocity MLP vs GM-ODE / GM-SDE on a GM MLP trained for
the same budget, Gaussian and GMM (mode-coupled, mode-conditional) sources. ``gm_steps_test``: its seconds-long
version.
"""

import ml_collections

from mmfm_jax.config_utils import base_config


def _shrink_for_tests(c: ml_collections.ConfigDict) -> None:
    """The seconds-long sizes shared by the ``test`` and ``gm_steps_test`` variants."""
    c.data.n_train = 2000
    c.gmm.max_iter = 30
    c.model.width = 32
    c.model.depth = 2
    c.train.steps = 40
    c.train.batch_size = 64
    c.train.chunk = 20
    c.eval.n_samples = 128


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base_config()
    c.mesh.num_devices = 1  # small problem: one device (vmap over the 9 models of a setting)
    c.dim = 10
    c.n_modes = 8
    c.within_scales = (0.15, 0.45)  # per-axis std of the base density, before the fixed rotation
    c.geometry_seed = 1234
    c.standardize = True  # scale the target to zero mean, total variance dim (the N(0, I) source's scale)
    c.settings = ml_collections.ConfigDict(dict(
        compact=ml_collections.ConfigDict(dict(radius=1.0)),
        spread=ml_collections.ConfigDict(dict(radius=4.0)),
    ))
    c.runs = ("gaussian", "gmm_indep", "gmm_mode")
    c.seeds = 3
    c.data = ml_collections.ConfigDict(dict(n_train=20000))
    c.gmm = ml_collections.ConfigDict(dict(max_iter=100, tol=1e-3, reg_covar=1e-6, init="k-means++"))
    c.model = ml_collections.ConfigDict(dict(width=128, depth=3, n_freq=8))
    c.train = ml_collections.ConfigDict(dict(
        steps=3000, batch_size=256, lr=2e-3, final_lr_frac=0.05, time_kind="uniform", time_shift=1.0, t_max=1.0,
        assignment="soft", chunk=250,
    ))
    c.eval = ml_collections.ConfigDict(dict(n_samples=2000, len_points=201, plot_paths=48, plot_points=41))
    c.mode = "paper"  # 'paper': the Len / W2^2 table; 'gm_steps': Euler vs GMFlow solvers vs number of steps
    c.gm = ml_collections.ConfigDict(dict(
        setting="spread", steps=(2, 4, 8, 16, 32), ref_steps=128,
        methods=("euler", "euler_gm_mean", "gm_ode", "gm_ode2", "gm_sde", "gm_sde2"),
        components=16, logstd_inner=64, trans_ratio=0.9, weight_scale=2.0, substeps=0))
    variant = arg or "default"
    if variant == "default":
        pass
    elif variant in ("gm_steps", "gm_steps_test"):
        c.mode = "gm_steps"
        c.seeds = 2
        c.eval.n_samples = 1000
        if variant == "gm_steps_test":
            _shrink_for_tests(c)
            c.seeds = 1
            c.gm.steps = (2,)
            c.gm.ref_steps = 0
            c.gm.methods = ("euler", "gm_ode2")
            c.gm.components = 4
    elif variant == "test":
        _shrink_for_tests(c)
        c.seeds = 2
        c.eval.len_points = 21
        c.eval.plot_paths = 8
        c.eval.plot_points = 11
    else:
        raise ValueError(f"configs/toy.py: unknown variant {variant!r} (default, test, gm_steps, gm_steps_test)")
    return c
