"""The plan job: tiny configs compiled for small TPU topologies (libtpu on this CPU host, nothing runs)."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mmfm_jax.config_files import load_config
from mmfm_jax.config_utils import ConfigError
from mmfm_jax.plan import plan
from mmfm_jax.plan.analyze import collectives
from mmfm_jax.plan.topology import CHIPS, parse_topology

REPO = Path(__file__).parent.parent
QUIET = lambda s: None  # noqa: E731


def test_topology_names():
    t = parse_topology("v5p-64")  # v5p names count TensorCores: 32 chips
    assert (t.libtpu_name, t.num_chips) == ("v5p:2x4x4", 32)
    assert parse_topology("v5e-16").libtpu_name == "v5e:4x4"
    assert parse_topology("v5litepod-16").libtpu_name == "v5e:4x4"
    assert parse_topology("v6e-256").num_chips == 256
    assert parse_topology("v4-8").num_chips == 4
    assert parse_topology("v5p:4x4x4").num_chips == 64
    two = parse_topology("2xv5e-16")
    assert (two.num_slices, two.num_chips) == (2, 32)
    with pytest.raises(ValueError, match="known: .*v5e-16.*v6e-256"):
        parse_topology("v9-8")
    with pytest.raises(ValueError, match="unknown TPU topology"):
        parse_topology("v5e-12")


def test_collectives_count_loop_trips():
    hlo = """HloModule m, entry_computation_layout={()->f32[]}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ar = f32[8]{0} all-reduce(f32[8]{0} %x), replica_groups={}, to_apply=%add
  %ags = (f32[2]{0}, f32[8]{0}) all-gather-start(f32[2]{0} %y), dimensions={0}
  %agd = f32[8]{0} all-gather-done((f32[2]{0}, f32[8]{0}) %ags)
}

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(f32[] %a, f32[] %b)
}

ENTRY %main () -> f32[] {
  %w = (s32[], f32[8]) while((s32[], f32[8]) %t), condition=%cond, body=%body, backend_config=@TRIP@
  ROOT %r = bf16[4,2]{1,0} all-reduce(bf16[4,2]{1,0} %z), to_apply=%add
}
"""
    out, trips = collectives(hlo.replace("@TRIP@", '{"known_trip_count":{"n":"5"}}'))
    assert trips == [5]
    assert out["all-reduce"] == dict(count=2, bytes=32 + 16, executed=6, executed_bytes=5 * 32 + 16)
    assert out["all-gather"] == dict(count=1, bytes=32, executed=5, executed_bytes=160)


def test_plan_train_tiny_and_search(tmp_path):
    """Tiny DiTDH, 2 micro-batches, on 4 v5e chips; the batch search stops at ``max_batch``."""
    cfg = load_config(str(REPO / "configs/train.py:tiny"))
    s = plan(cfg, "v5e-4", tmp_path, search=True, max_batch=4, log=QUIET)
    assert json.loads((tmp_path / "summary.json").read_text())["fits"] is True
    assert s["num_chips"] == 4 and s["mesh"] == {"dcn_data": 1, "data": 4, "fsdp": 1}
    assert s["versions"]["libtpu"] != "none"
    (r,) = s["programs"]
    m = r["memory_per_chip"]
    assert r["program"] == "train_step" and r["per_chip_batch"] == 2  # 16 / 2 micro-batches / 4 chips
    assert m["arguments"] > 0 and m["total"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"] + m[
        "code"]
    assert m["aliased"] > 0  # the state is donated
    assert m["hbm"] == CHIPS["v5e"].hbm_bytes and r["fits"]
    assert 2 in r["loop_trip_counts"]  # the micro-batch scan: its second pass is added to XLA's once-counted body
    assert 1.6 * r["flops_counted"] < r["flops_per_step"] < 2.0 * r["flops_counted"]
    rl = r["roofline"]
    assert rl["seconds_per_step"] == max(r["flops_per_step"] / CHIPS["v5e"].peak_bf16_flops,
                                         r["bytes_accessed_per_step"] / CHIPS["v5e"].hbm_bandwidth)
    assert r["collectives"]["all-reduce"]["count"] >= 1  # the data-parallel gradient reduction
    sb = s["search_batch"]
    assert sb["largest_per_chip_batch"] == 4 and sb["report"]["info"]["global_batch"] == 4 * 4 * 2


def test_plan_mesh_errors_name_both_sizes():
    cfg = load_config(str(REPO / "configs/train.py:tiny"), {"mesh.fsdp": 3})
    with pytest.raises(ConfigError, match=r"v5e-4 \(4 chips\).*3"):
        plan(cfg, "v5e-4", log=QUIET)
    with pytest.raises(ConfigError, match="known: "):
        plan(cfg, "v5e-5", log=QUIET)


def test_plan_fit_gmm_and_encode_tiny():
    cfg = load_config(str(REPO / "configs/fit_gmm.py:tiny"))
    s = plan(cfg, "2xv5e-4", search=False, n_samples=1000, log=QUIET)  # two slices: the dcn_data axis spans them
    assert s["num_chips"] == 8 and s["num_slices"] == 2 and s["mesh"]["dcn_data"] == 2
    em, sp = s["programs"]
    assert em["program"] == "em_iteration" and em["info"]["n"] == 1000 and em["info"]["chunks_per_chip"] == 8
    i = em["info"]  # the chunk loop's body is counted once by XLA: the plan multiplies it out to the GEMM floor
    floor = 8 * i["chunk"] * i["chunks_per_chip"] * i["d"] * i["k"]  # 8 N D K per chip (N padded to whole chunks)
    assert 8 in em["loop_trip_counts"] and em["flops_per_step"] >= floor > em["flops_counted"] > 0
    assert "all-reduce" in em["collectives"]
    assert sp["program"] == "spatial_batch" and sp["info"]["table_bytes_per_chip"] == 2 * 8 * 4 * 8 * 4 // 8
    enc = load_config(str(REPO / "configs/encode.py:tiny"))
    (r,) = plan(enc, "v6e-4", log=QUIET)["programs"]
    assert r["program"] == "encode_step" and r["fits"] and r["flops_per_step"] > 0


def test_plan_sample_tiny_with_guide(tmp_path):
    tcfg = load_config(str(REPO / "configs/train.py:tiny"))
    (tmp_path / "config.json").write_text(json.dumps(tcfg.to_dict()))
    cfg = load_config(str(REPO / "configs/sample.py:tiny"), {"model.workdir": str(tmp_path), "guide.enabled": True,
                                                              "guide.workdir": str(tmp_path), "decoder.enabled": False})
    (step,) = plan(cfg, "v5e-4", log=QUIET)["programs"]
    assert step["program"] == "sample_step" and step["info"] == dict(nfe=4, guide=True, solver="euler")
    assert step["flops_per_step"] > 0 and step["per_chip_batch"] == 2


def test_cli_exits_nonzero_when_it_does_not_fit():
    """The real spatial table (K = 8192, 256 x 2048 here) on one v5e chip: 16 GiB of sums alone."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    with tempfile.TemporaryDirectory() as wd:
        p = subprocess.run([sys.executable, "-m", "mmfm_jax", "plan", f"--config={REPO}/configs/fit_gmm.py:tiny",
                            "--config.gmm.n_components=8192", "--config.latent.grid=(16, 16)",
                            "--config.latent.channels=2048", "--topology=v5e-1", "--n_samples=8192",
                            f"--workdir={wd}"], capture_output=True, text=True, env=env, timeout=600)
        assert p.returncode == 1, p.stderr[-2000:]
        assert "spatial_batch needs" in p.stderr and "the chip has 16 GiB" in p.stderr
        s = json.loads((Path(wd) / "summary.json").read_text())
        assert s["fits"] is False and s["programs"][1]["memory_per_chip"]["total"] > 2 * 8192 * 256 * 2048 * 4
