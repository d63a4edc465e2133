"""A short digits-demo run: every output is written and the summary holds the speed-up figures."""

import json

from mmfm_jax.cli import run_job
from mmfm_jax.config_files import load_config


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
    report = (tmp_path / "report.md").read_text()
    assert "speed-up" in report and "![FD and class-histogram TV vs step](convergence.png)" in report
    assert "(samples.png)" in report and "GMM + mode coupling, mode-conditional" in report
    assert "steps, >= " in report or "not reached" in report  # the speed-up is written as a bound
    assert (tmp_path / "samples.png").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["job"] == "demo"
    assert 0 <= s["tv_test_vs_train"] < 1
    for name in s["final"]:  # one TensorBoard run per setting
        assert list((tmp_path / "tb" / name).glob("events.out.tfevents.*")), name
    # the EMA models, in the train job's layout: the sample job's loader restores them
    from mmfm_jax import parallel
    from mmfm_jax.train.sampling import restore_train_ema

    assert (tmp_path / "models" / "source" / "metadata.json").exists()
    cfg_saved = json.loads((tmp_path / "models" / "gmm_mode_cond" / "config.json").read_text())
    assert cfg_saved["source"]["path"] == str(tmp_path / "models" / "source")
    _, state, mcfg, step = restore_train_ema(s["models"]["gmm_mode_cond"], parallel.make_mesh())
    assert step == 40 and mcfg.use_y_conditioning and mcfg.hidden_size == (32, 64)
