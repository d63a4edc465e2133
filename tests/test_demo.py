"""A short digits-demo run: every output is written and the summary holds the speed-up figures."""

import json

from mmfm_jax.cli import run_job
from mmfm_jax.config_utils import load_config


def test_demo_short_run(tmp_path, repo_dir):
    cfg = load_config(f"{repo_dir}/configs/demo.py:test")
    s = run_job("demo", cfg, tmp_path)
    assert s["classifier_test_accuracy"] > 0.85
    assert set(s["final"]) == {"gaussian", "gmm_indep", "gmm_mode", "gmm_mode_cond"}  # all four settings run
    for curve in s["curves"].values():
        assert [r["step"] for r in curve] == [10, 20, 40]  # eval_extra adds step 10
        assert all(r["fd"] > 0 and 0 <= r["covered"] <= 1 for r in curve)
    assert s["speedup"]["gaussian"]["steps_to_baseline_final_fd"] in (10, 20, 40)  # reached by its own last step
    assert s["gmm"]["em_iterations"] >= 1
    for f in ("table.md", "report.md", "convergence.png", "samples_gaussian.png", "samples_gmm_indep.png",
              "samples_gmm_mode.png", "samples_gmm_mode_cond.png",
              "summary.json", "config.json", "curves.json"):
        assert (tmp_path / f).exists(), f
    assert "speed-up" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["job"] == "demo"
