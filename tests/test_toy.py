"""The toy job end to end on its tiny variant, its target design, W2 and config validation."""

import json

import numpy as np
import pytest

from mmfm_jax.cli import run_job
from mmfm_jax.config_files import load_config
from mmfm_jax.config_utils import ConfigError
from mmfm_jax.experiments.toy import job, target
from mmfm_jax.experiments.toy.report import PAPER


def test_toy_job_tiny(repo_dir, tmp_path):
    cfg = load_config(str(repo_dir / "configs/toy.py") + ":test")
    summary = run_job("toy", cfg, tmp_path)
    for f in ("summary.json", "config.json", "report.md", "trajectories.png"):
        assert (tmp_path / f).is_file() and (tmp_path / f).stat().st_size > 0, f
    assert list((tmp_path / "tb").iterdir())
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["job"] == "toy" and set(on_disk["settings"]) == {"compact", "spread"}
    assert summary["files"] == ["report.md", "trajectories.png"]
    for name, res in summary["settings"].items():
        assert set(res["runs"]) == {"gaussian", "gmm_indep", "gmm_mode"}
        assert len(res["gmm"]) == cfg.seeds and all(g["n_iter"] >= 1 for g in res["gmm"])
        assert res["w2_floor_mean"] > 0 and isinstance(res["shape_ok"], bool)
        for kind, r in res["runs"].items():
            assert len(r["len_per_seed"]) == len(r["w2_per_seed"]) == cfg.seeds
            assert np.isfinite([r["len_mean"], r["w2_mean"], r["coupling_cost"], r["final_loss"]]).all()
            assert r["len_mean"] >= 0 and r["w2_mean"] > 0
            assert tuple(r["paper"]) == PAPER[name][kind]
        # the coupling itself (no training involved): mode coupling pairs each point with its own mode
        cost = {k: r["coupling_cost"] for k, r in res["runs"].items()}
        assert cost["gmm_mode"] < cost["gmm_indep"]
    report = (tmp_path / "report.md").read_text()
    assert "| Spread | GMM | Mode |" in report and "1.556" in report and "trajectories.png" in report
    assert isinstance(summary["shape_ok"], bool)
    assert summary["table"].count("\n") == 1 + 2 * 4


def test_target_geometry_and_w2(repo_dir):
    cfg = load_config(str(repo_dir / "configs/toy.py") + ":test")
    for radius in (1.0, 4.0):
        c, a = target.target_geometry(cfg, radius)
        assert c.shape == (cfg.n_modes, cfg.dim) and a.shape == (cfg.dim, cfg.dim)
        d = np.linalg.norm(c[:, None] - c[None], axis=-1)[np.triu_indices(cfg.n_modes, 1)]
        np.testing.assert_allclose(d, d[0])  # equidistant modes
        x = target.sample_target(np.random.default_rng(0), c, a, 40000)
        assert abs(x.var(0).sum() - cfg.dim) < 0.25  # standardised: total variance = dim
        np.testing.assert_allclose(x.mean(0), 0, atol=0.05)
    rng = np.random.default_rng(1)
    p = rng.normal(size=(50, 3))
    assert target.w2_squared(p, p[::-1]) == pytest.approx(0.0, abs=1e-9)
    assert target.w2_squared(p, p + np.array([1.0, 2.0, 0.0])) == pytest.approx(5.0, rel=1e-9)


@pytest.mark.parametrize("key,value", [("runs", ("gaussian", "ot")), ("seeds", 0), ("train.time_kind", "beta"),
                                       ("n_modes", 11), ("eval.plot_paths", 10_000)])
def test_bad_config_fails_before_work(repo_dir, key, value, tmp_path):
    cfg = load_config(str(repo_dir / "configs/toy.py") + ":test", {key: value})
    with pytest.raises(ConfigError, match=f"config.{key}"):
        job.validate(cfg)
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(str(repo_dir / "configs/toy.py") + ":test", {"train.stepz": 3})
