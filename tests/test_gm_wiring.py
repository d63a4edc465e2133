"""GMFlow wired through the model, train step, train job and sample job (tiny configs, 8 fake devices)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmfm_jax.cli import run_job
from mmfm_jax.config_files import load_config
from mmfm_jax.config_utils import ConfigError
from mmfm_jax.models.ditdh import DiTDH, DiTDHConfig, ditdh_flops_per_example, ditdh_param_count
from mmfm_jax.models.mlp import MLPVelocity
from mmfm_jax.ops.gm import GM

K = 4  # source modes of the tiny GMM table


def _make_source(path):
    from mmfm_jax.gmm.diag import DiagGMM
    from mmfm_jax.gmm.source import ModeSource, save_source

    r = np.random.default_rng(0)
    gmm = DiagGMM(jnp.full((K,), 1.0 / K, jnp.float32), jnp.asarray(r.normal(size=(K, 4)), jnp.float32),
                  jnp.ones((K, 4), jnp.float32))
    save_source(path, ModeSource(gmm, jnp.asarray(r.normal(size=(K, 16, 4)), jnp.float32),
                                 jnp.asarray([0.3, 0.5, 0.7, 0.9], jnp.float32)))


def _train_overrides(src, **kw):
    o = {"model.use_y_conditioning": True, "model.num_modes": K, "source.kind": "gmm_mode", "source.path": str(src),
         "source.y_from": "mode", "adaptive.enabled": True, "adaptive.weight_by": "mode", "mesh.fsdp": 2,
         "train.num_steps": 4, "log_every": 1, "data.synthetic_size": 16, "checkpoint.every_steps": 4}
    o.update(kw)
    return o


@pytest.fixture(scope="module")
def gm_run(tmp_path_factory, repo_dir):
    """A tiny GM DiTDH trained 4 steps by the train job: mode-conditional, GMM source + mode coupling (so the
    transition loss uses the per-mode Gaussian bridge), FSDP 2, adaptive weights."""
    from mmfm_jax import utils

    root = tmp_path_factory.mktemp("gm")
    _make_source(root / "src")
    cfg = load_config(f"{repo_dir}/configs/train.py:tiny_gm", _train_overrides(root / "src"))
    losses = []
    orig = utils.MetricWriter.scalars

    def record(self, step, values, console=True):
        if "train/loss" in values:
            losses.append(values["train/loss"])
        return orig(self, step, values, console)

    utils.MetricWriter.scalars = record
    try:
        summary = run_job("train", cfg, root / "train")
    finally:
        utils.MetricWriter.scalars = orig
    return dict(root=root, cfg=cfg, summary=summary, losses=losses)


def test_ditdh_gm_head_layout_and_flops():
    small = dict(patch_size=2, hidden_size=(32, 48), depth=(1, 1), num_heads=(2, 2))
    cfg = DiTDHConfig.preset("tiny", head="gm", gm_components=3, gm_logstd_inner=16, **small)
    model = DiTDH(cfg, nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 16)), jnp.float32)
    gm = nnx.jit(lambda m, *a: m(*a))(model, x, jnp.asarray([0.3, 0.8]), jnp.asarray([1, 2]))
    assert isinstance(gm, GM)
    assert gm.means.shape == (2, 64, 3, 16) and gm.logweights.shape == (2, 64, 3) and gm.logstds.shape == (2, 1, 1, 1)
    assert all(a.dtype == jnp.float32 for a in gm)
    np.testing.assert_allclose(jax.nn.logsumexp(gm.logweights, -1), 0.0, atol=1e-5)
    np.testing.assert_array_equal(gm.logstds, 0.0)  # zero-initialised log-std MLP: s = 1
    assert float(jnp.std(gm.means)) > 0.1  # xavier final linear: the K components differ at init
    assert float(jnp.max(jnp.abs(gm.means[:, :, 0] - gm.means[:, :, 1]))) > 1e-2
    # the wider final linear (p^2 K (C + 1) outputs) and the log-std MLP, in the FLOPs and the parameter count
    vel = DiTDHConfig.preset("tiny", **small)
    n, dh, ds = vel.num_tokens, vel.hidden_size[1], vel.hidden_size[0]
    extra = n * dh * (4 * 3 * 17 - 64) + ds * 16 + 16
    assert ditdh_flops_per_example(cfg) - ditdh_flops_per_example(vel) == 2 * extra
    assert ditdh_param_count(cfg) - ditdh_param_count(vel) == (dh + 1) * (4 * 3 * 17 - 64) + (ds + 1) * 16 + 17
    with pytest.raises(ValueError, match="DiTDHConfig.head"):
        DiTDHConfig.preset("tiny", head="flow")


def test_mlp_gm_head_and_modes():
    m = MLPVelocity(5, 16, 2, 3, rngs=nnx.Rngs(0), head="gm", num_modes=4, gm_components=3, gm_logstd_inner=8)
    x = jnp.ones((6, 5))
    t = jnp.linspace(0.1, 0.9, 6)
    gm = m(x, t, jnp.asarray([0, 1, 2, 3, -1, 0]))
    assert gm.means.shape == (6, 1, 3, 5) and gm.logweights.shape == (6, 1, 3) and gm.logstds.shape == (6, 1, 1, 1)
    g0, g1 = m(x, t, jnp.zeros(6, jnp.int32)), m(x, t, jnp.ones(6, jnp.int32))
    assert float(jnp.max(jnp.abs(g0.means - g1.means))) > 1e-4  # the mode matters
    v = MLPVelocity(5, 16, 2, 3, rngs=nnx.Rngs(0))  # the velocity model is unchanged: zero output at init
    np.testing.assert_array_equal(v(x, t), 0.0)


def test_train_job_gm_head(gm_run):
    s, losses = gm_run["summary"], gm_run["losses"]
    assert s["final_step"] == 4 and s["skipped_steps"] == 0 and s["checkpoints"] == [4]
    assert len(losses) == 4 and np.isfinite(losses).all()
    assert np.isfinite([s["grad_norm"], s["loss_unweighted"]]).all()
    cfg = gm_run["cfg"]
    from mmfm_jax.train.config import model_config

    vel = dataclasses.replace(model_config(cfg), head="velocity")
    assert s["flops_per_step"] > 3 * ditdh_flops_per_example(vel) * cfg.train.global_batch_size


def test_train_step_gm_loss_decreases_on_a_fixed_batch(gm_run):
    """The job's program (the Trainer of its config: the same compiled step), applied repeatedly to one batch with
    the step counter reset (so every random draw repeats): the transition NLL falls."""
    from mmfm_jax import parallel
    from mmfm_jax.jobs import train as train_job
    from mmfm_jax.train.trainer import Trainer

    cfg = gm_run["cfg"]
    trainer = Trainer.from_config(cfg, parallel.mesh_from_config(cfg))
    mcfg, scfg = trainer.model_config, trainer.step_config
    assert mcfg.head == "gm" and scfg.head == "gm" and scfg.y_from == "mode"
    ds = train_job.build_dataset(cfg, mcfg)
    batch = trainer.put_batch({k: ds.arrays[k][:16] for k in ("latent", "cls", "label")})
    state = trainer.init_state()
    losses = []
    for _ in range(6):
        state, m = trainer.train_step(dataclasses.replace(state, step=jnp.zeros_like(state.step)), batch)
        losses.append(float(m["loss"]))
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 0.05, losses


def test_train_validate_gm(repo_dir, tmp_path):
    from mmfm_jax.jobs import train as train_job

    o = _train_overrides(tmp_path / "src", **{"source.kind": "gmm_indep", "source.y_from": "none",
                                               "model.use_y_conditioning": False, "adaptive.enabled": False})
    cfg = load_config(f"{repo_dir}/configs/train.py:tiny_gm", o)
    with pytest.raises(ConfigError, match=r"config\.train\.gm_trans_ratio = 0\.5"):
        train_job.validate(cfg)
    train_job.validate(load_config(f"{repo_dir}/configs/train.py:tiny_gm", {**o, "train.gm_trans_ratio": 1.0}))
    with pytest.raises(ConfigError, match=r"config\.train\.gm_weight_scale"):
        train_job.validate(load_config(f"{repo_dir}/configs/train.py:tiny_gm", {"train.gm_weight_scale": 0.0}))


def _sample(repo_dir, gm_run, name, **kw):
    root = gm_run["root"]
    o = {"model.workdir": str(root / "train"), "source.kind": "gmm", "source.path": str(root / "src"),
         "decoder.enabled": False, "num_samples": 8, "batch_size": 8, "output.images_per_shard": 8,
         "sampler.num_points": 4, "sampler.solver": "gm_ode", "sampler.gm_substeps": 2, "sampler.gm_order": 2}
    o.update(kw)
    cfg = load_config(f"{repo_dir}/configs/sample.py:tiny", o)
    return run_job("sample", cfg, root / name), root / name / "samples"


def test_sample_gm_sweep_equals_separate_runs(repo_dir, gm_run):
    guide = {"guide.enabled": True, "guide.workdir": str(gm_run["root"] / "train")}
    s, out = _sample(repo_dir, gm_run, "sweep", **guide, **{"guide.scales": (0.0, 0.3)})
    assert s["solver"] == "gm_ode" and s["model_head"] == "gm" and s["nfe_per_model"] == 3
    assert s["guide_scales"] == [0.0, 0.3] and s["gm_substeps"] == 2 and s["gm_order"] == 2
    a0, a3 = (np.load(out / f"scale_{w}" / "images-00000.npz") for w in ("0", "0.3"))
    assert a0["arr_0"].shape == (8, 16, 4) and np.isfinite(a0["arr_0"]).all()
    np.testing.assert_array_equal(a0["mode"], a3["mode"])
    assert float(np.max(np.abs(a0["arr_0"] - a3["arr_0"]))) > 1e-3  # guidance changes the samples
    s1, out1 = _sample(repo_dir, gm_run, "single", **guide, **{"guide.scale": 0.3})
    assert s1["guide_scale"] == 0.3 and s1["guide_scales"] is None
    np.testing.assert_allclose(np.load(out1 / "images-00000.npz")["arr_0"], a3["arr_0"], atol=1e-5)


def test_sample_gm_sde(repo_dir, gm_run):
    s, out = _sample(repo_dir, gm_run, "sde", **{"sampler.solver": "gm_sde", "sampler.gm_order": 1,
                                                 "sampler.gm_substeps": 0})
    x = np.load(out / "images-00000.npz")["arr_0"]
    assert s["gm_substeps"] == 1 and x.shape == (8, 16, 4) and np.isfinite(x).all() and x.std() > 0.1


def test_sample_validate_gm(repo_dir, gm_run, tmp_path):
    from mmfm_jax.jobs import sample

    root = gm_run["root"]
    base = {"model.workdir": str(root / "train"), "source.kind": "gmm", "source.path": "x", "sampler.solver": "gm_ode",
            "decoder.enabled": False}

    def cfg(**kw):
        return load_config(f"{repo_dir}/configs/sample.py:tiny", {**base, **kw})

    sample.validate(cfg())
    with pytest.raises(ConfigError, match=r"config\.guide\.scale\b"):
        sample.validate(cfg(**{"guide.enabled": True, "guide.workdir": "g", "guide.scale": 1.5}))
    with pytest.raises(ConfigError, match=r"config\.guide\.scales"):
        sample.validate(cfg(**{"guide.scales": (0.1, 0.2)}))  # a sweep needs a guide
    # an unconditional GM model on the GMM source: no GM-SDE, no substeps, no second order
    tc = json.loads((root / "train" / "config.json").read_text())
    tc["model"]["use_y_conditioning"] = False
    (tmp_path / "config.json").write_text(json.dumps(tc))
    unc = {"model.workdir": str(tmp_path)}
    with pytest.raises(ConfigError, match=r"config\.sampler\.solver = 'gm_sde'"):
        sample.validate(cfg(**unc, **{"sampler.solver": "gm_sde"}))
    with pytest.raises(ConfigError, match=r"config\.sampler\.gm_substeps"):
        sample.validate(cfg(**unc, **{"sampler.gm_substeps": 4}))
    sample.validate(cfg(**unc, **{"sampler.gm_substeps": 1, "sampler.gm_order": 1}))
    # a velocity model cannot use the GM solvers
    tc["model"]["head"] = "velocity"
    (tmp_path / "config.json").write_text(json.dumps(tc))
    with pytest.raises(ConfigError, match=r"config\.sampler\.solver = 'gm_ode'"):
        sample.validate(cfg(**unc))


def test_toy_gm_steps(repo_dir, tmp_path):
    cfg = load_config(f"{repo_dir}/configs/toy.py:gm_steps_test")
    s = run_job("toy", cfg, tmp_path)
    assert s["steps"] == [2] and s["methods"] == ["euler", "gm_ode2"] and s["setting"] == "spread"
    for src in ("gaussian", "gmm_mode"):
        for m in ("euler", "gm_ode2"):
            v = s["w2"][src][m]["2"]
            assert len(v) == cfg.seeds and np.isfinite(v).all() and min(v) > 0
        assert "euler_ref" not in s["w2"][src]  # gm.ref_steps = 0
    assert np.isfinite(list(s["final_losses"].values())).all() and set(s["gm_beats_euler_le8"]) == {"gaussian",
                                                                                                   "gmm_mode"}
    assert s["table"].count("\n") == 2 + 4 and "GM-ODE 2" in (tmp_path / "report.md").read_text()


def test_demo_gm_steps_validation_and_table(repo_dir):
    from mmfm_jax.experiments.digits import demo
    from mmfm_jax.experiments.digits import gm as demo_gm

    cfg = load_config(f"{repo_dir}/configs/demo.py:gm_steps")
    demo.validate(cfg)
    assert cfg.mode == "gm_steps" and tuple(cfg.settings) == ("gaussian", "gmm_mode_cond")
    bad = load_config(f"{repo_dir}/configs/demo.py:gm_steps", {"settings": ("gaussian", "gmm_mode")})
    with pytest.raises(ConfigError, match=r"config\.train\.gm_trans_ratio"):  # GMM source, model blind to the mode
        demo.validate(bad)
    with pytest.raises(ConfigError, match=r"config\.gm\.methods"):
        demo.validate(load_config(f"{repo_dir}/configs/demo.py:gm_steps", {"gm.methods": ("euler", "dpm")}))
    fd = lambda v: {"fd": v}  # noqa: E731
    res = dict(steps=[2, 16], methods=["euler", "gm_ode2"], ref_steps=0, fd_test_vs_train=5.0,
               fd={"gaussian": {"euler": {"2": fd(100.0), "16": fd(50.0)}, "gm_ode2": {"2": fd(60.0), "16": fd(55.0)}}})
    assert demo_gm.beats(res) == {"gaussian": True}
    rows = demo_gm.table(res).splitlines()
    assert rows[2] == "| Gaussian | Euler (velocity model) | 100.00 | 50.00 |" and rows[3].endswith("| 60.00 | 55.00 |")


def test_sample_velocity_autoguidance_sweep(repo_dir, tmp_path):
    """A velocity model's AutoGuidance sweep (vmapped scales) equals separate runs (guide: the step-1 EMA)."""
    cfg = load_config(f"{repo_dir}/configs/train.py:tiny", {"train.num_steps": 2, "checkpoint.every_steps": 1})
    run_job("train", cfg, tmp_path / "train")
    o = {"model.workdir": str(tmp_path / "train"), "guide.enabled": True, "guide.workdir": str(tmp_path / "train"),
         "guide.step": 1, "decoder.enabled": False, "num_samples": 8, "batch_size": 8, "output.images_per_shard": 8}
    s = run_job("sample", load_config(f"{repo_dir}/configs/sample.py:tiny", {**o, "guide.scales": (1.0, 1.5)}),
                tmp_path / "sweep")
    assert s["solver"] == "euler" and s["model_head"] == "velocity" and s["guide_scales"] == [1.0, 1.5]
    run_job("sample", load_config(f"{repo_dir}/configs/sample.py:tiny", {**o, "guide.scale": 1.5}), tmp_path / "one")
    a = np.load(tmp_path / "sweep" / "samples" / "scale_1.5" / "images-00000.npz")["arr_0"]
    b = np.load(tmp_path / "one" / "samples" / "images-00000.npz")["arr_0"]
    np.testing.assert_allclose(a, b, atol=1e-5)
    c = np.load(tmp_path / "sweep" / "samples" / "scale_1" / "images-00000.npz")["arr_0"]
    assert float(np.max(np.abs(a - c))) > 0  # the scale matters
