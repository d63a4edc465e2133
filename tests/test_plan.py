"""The plan job: tiny configs compiled for small TPU topologies (libtpu on this CPU host, nothing runs)."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from flax import nnx

from mmfm_jax.config_files import load_config
from mmfm_jax.config_utils import ConfigError
from mmfm_jax.plan import plan
from mmfm_jax.plan.hlo import Module, collectives, step_bytes
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


STACKED_LOOP_HLO = """HloModule m, entry_computation_layout={()->f32[4,1024]}

%fused_read (p0: f32[4,1024], p1: s32[]) -> f32[1,1024] {
  %p0 = f32[4,1024]{1,0} parameter(0)
  %p1 = s32[]{:T(128)} parameter(1)
  %z = s32[] constant(0)
  %ds = f32[1,1024]{1,0} dynamic-slice(%p0, %p1, %z), dynamic_slice_sizes={1,1024}
  ROOT %neg = f32[1,1024]{1,0} negate(%ds)
}

%fused_update (q0: f32[4,1024], q1: f32[1,1024], q2: s32[]) -> f32[4,1024] {
  %q0 = f32[4,1024]{1,0} parameter(0)
  %q1 = f32[1,1024]{1,0} parameter(1)
  %q2 = s32[]{:T(128)} parameter(2)
  %z1 = s32[] constant(0)
  ROOT %dus = f32[4,1024]{1,0} dynamic-update-slice(%q0, %q1, %q2, %z1)
}

%fused_on_chip (r0: f32[1,1024]) -> f32[1,1024] {
  %r0 = f32[1,1024]{1,0:S(1)} parameter(0)
  ROOT %e = f32[1,1024]{1,0:S(1)} exponential(%r0)
}

%cond (c: (s32[], f32[4,1024], f32[4,1024], f32[1,1024])) -> pred[] {
  %c = (s32[], f32[4,1024]{1,0}, f32[4,1024]{1,0}, f32[1,1024]{1,0:S(1)}) parameter(0)
  %ci = s32[] get-tuple-element(%c), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%ci, %n), direction=LT
}

%body (t: (s32[], f32[4,1024], f32[4,1024], f32[1,1024])) -> (s32[], f32[4,1024], f32[4,1024], f32[1,1024]) {
  %t = (s32[], f32[4,1024]{1,0}, f32[4,1024]{1,0}, f32[1,1024]{1,0:S(1)}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %w = f32[4,1024]{1,0} get-tuple-element(%t), index=1
  %acc = f32[4,1024]{1,0} get-tuple-element(%t), index=2
  %x = f32[1,1024]{1,0:S(1)} get-tuple-element(%t), index=3
  %one = s32[] constant(1)
  %i1 = s32[] add(%i, %one)
  %r = f32[1,1024]{1,0} fusion(%w, %i), kind=kLoop, calls=%fused_read
  %u = f32[4,1024]{1,0} fusion(%acc, %r, %i), kind=kLoop, calls=%fused_update
  %v = f32[1,1024]{1,0:S(1)} fusion(%x), kind=kLoop, calls=%fused_on_chip
  %cs = (f32[1,1024]{1,0}, f32[1,1024]{1,0:S(1)}, u32[]) copy-start(%r)
  %cd = f32[1,1024]{1,0:S(1)} copy-done(%cs)
  ROOT %out = (s32[], f32[4,1024]{1,0}, f32[4,1024]{1,0}, f32[1,1024]{1,0:S(1)}) tuple(%i1, %w, %u, %cd)
}

ENTRY %main (a: f32[4,1024], b: f32[4,1024]) -> f32[4,1024] {
  %a = f32[4,1024]{1,0} parameter(0)
  %b = f32[4,1024]{1,0} parameter(1)
  %c0 = s32[] constant(0)
  %x0 = f32[1,1024]{1,0:S(1)} constant({...})
  %init = (s32[], f32[4,1024]{1,0}, f32[4,1024]{1,0}, f32[1,1024]{1,0:S(1)}) tuple(%c0, %a, %b, %x0)
  %loop = (s32[], f32[4,1024]{1,0}, f32[4,1024]{1,0}, f32[1,1024]{1,0:S(1)}) while(%init), condition=%cond, body=%body
  ROOT %res = f32[4,1024]{1,0} get-tuple-element(%loop), index=2
}
"""


def test_step_bytes_charge_slices_of_stacked_operands():
    """A scanned layer's kernels move one layer's slice per pass, not the stacked [layers, ...] operand: per pass
    the sliced read (4 KiB in, 4 KiB out), the in-place update (4 KiB in, 4 KiB written), the copy to on-chip memory
    (4 KiB read); on-chip values cost nothing. 4 passes (the condition's ``i < 4``)."""
    mod = Module(STACKED_LOOP_HLO)
    per_pass = 2 * 4096 + 2 * 4096 + 4096 + 2 * 4 + 12 + 9  # + the layer index read by both fusions, the
    assert step_bytes(mod) == 4 * per_pass  # counter's add and the condition's compare (the stacked operand: 16 KiB)


def test_scanned_and_unrolled_layers_agree():
    """The gradient of an 8-layer, 1024-wide tanh MLP on one v5e chip, its layers scanned (the stacked weights
    sliced per pass) and unrolled: the same FLOPs, and HBM bytes within 1.5x (charging the scan's kernels for the
    whole stacked weights gave 4.5x)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from mmfm_jax.plan.analyze import Program, analyze
    from mmfm_jax.plan.topology import topology_devices

    def scanned(w, x):
        h, _ = jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)
        return jnp.sum(h * h)

    def unrolled(w, x):
        for i in range(len(w)):
            x = jnp.tanh(x @ w[i])
        return jnp.sum(x * x)

    topo = parse_topology("v5e-1")
    rep = NamedSharding(Mesh(topology_devices(topo)[:1], ("data",)), PartitionSpec())
    args = (jax.ShapeDtypeStruct((8, 1024, 1024), jnp.float32, sharding=rep),
            jax.ShapeDtypeStruct((16, 1024), jnp.float32, sharding=rep))
    s, u = (analyze(Program(f.__name__, jax.jit(jax.grad(f)), args), topo.chip) for f in (scanned, unrolled))
    assert s["loop_trip_counts"] == [8, 8] and u["loop_trip_counts"] == []  # forward and backward scans
    assert s["flops_per_step"] == pytest.approx(u["flops_per_step"], rel=0.05)
    weights = 8 * 1024 * 1024 * 4
    assert s["bytes_accessed_per_step"] > weights and u["bytes_accessed_per_step"] > weights  # read at least once
    assert 1 / 1.5 < s["bytes_accessed_per_step"] / u["bytes_accessed_per_step"] < 1.5


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


def test_plan_train_full_fsdp_splits_the_batch(tmp_path):
    """Full FSDP (fsdp 4, data 1): every chip computes a quarter of the examples (activations batch-sharded,
    weights gathered), so its FLOPs are ~1/4 of the model's and attention runs on [micro / 4, heads, L, L]."""
    cfg = load_config(str(REPO / "configs/train.py:tiny"), {"mesh.fsdp": 4, "mesh.data": 1})
    (r,) = plan(cfg, "v5e-4", tmp_path, log=QUIET)["programs"]
    assert r["per_chip_batch"] == 2 and r["info"]["global_batch"] == 16
    assert 0.9 < r["flops_per_step"] / (r["info"]["model_flops_per_step"] / 4) < 1.2
    hlo = (tmp_path / "train_step.hlo.txt").read_text()
    assert "f32[2,2,16,16]" in hlo and "f32[8,2,16,16]" not in hlo  # per-chip q k^T: 2 of 8 images, 2 heads


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


class _OneConvInception(nnx.Module):
    """Stands in for ``InceptionV3`` in the evaluate plan (same call and outputs, one convolution): the real network
    takes minutes to compile for a TPU on a CPU host."""

    def __init__(self, *, rngs: nnx.Rngs, **kw):
        self.conv = nnx.Conv(3, 16, (8, 8), strides=(8, 8), padding="VALID", rngs=rngs)
        self.fc = nnx.Linear(16, 1008, rngs=rngs)

    def __call__(self, x):
        y = self.conv(x)  # [N, 37, 37, 16] from the 299 px network input
        pool = y.mean(axis=(1, 2))
        return {"pool": pool, "logits_nobias": self.fc(pool), "spatial": y[:, :7, :7].reshape(len(x), -1)}


def test_plan_evaluate_tiny(monkeypatch):
    """The evaluate job's feature program (uint8 256 px -> the ADM resize to 299 -> the network) for 2 images per
    chip on 4 v6e chips, with a one-convolution network in place of Inception."""
    import mmfm_jax.models.inception

    monkeypatch.setattr(mmfm_jax.models.inception, "InceptionV3", _OneConvInception)
    cfg = load_config(str(REPO / "configs/evaluate.py:tiny"))
    s = plan(cfg, "v6e-4", log=QUIET)
    assert s["planned_job"] == "evaluate" and s["mesh"]["data"] == 4 and s["fits"]
    (r,) = s["programs"]
    assert r["program"] == "inception_features" and r["per_chip_batch"] == 2 and r["items_per_step"] == 8
    assert r["notes"] == "Inception features of 8 256px images"
    m = r["memory_per_chip"]
    assert m["arguments"] >= 2 * 256 * 256 * 3 + 4 * 16 * 1008  # the chip's images and the replicated weights
    conv = 2 * 2 * 37 * 37 * 16 * 8 * 8 * 3  # FLOPs of the convolution on the chip's 2 images
    assert conv < r["flops_per_step"] < 3 * conv  # + the resize and the head


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
