"""``bench trace_summary``: device time by kernel kind from a jax.profiler trace (a small GPU-like trace file)."""

import gzip
import json

import pytest

from mmfm_jax.bench import trace_summary as ts


def _write(path, events):
    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}}]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + events}, f)


def _x(pid, name, dur_us, hlo=""):
    return {"ph": "X", "pid": pid, "tid": 1, "ts": 0, "dur": dur_us, "name": name, "args": {"hlo_op": hlo}}


def test_summary_by_kind_per_step(tmp_path, capsys):
    run = tmp_path / "plugins" / "profile" / "run1"
    run.mkdir(parents=True)
    _write(run / "vm.trace.json.gz", [
        _x(1, "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", 6000, "custom-call.12"),  # cuBLAS GEMM
        _x(1, "sm90_xmma_gemm_bf16bf16_bf16f32", 3000, "dot.7"),
        _x(1, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 1500, "custom-call.3"),
        _x(1, "loop_multiply_fusion", 900, "multiply_fusion.2"),
        _x(1, "input_reduce_fusion_1", 600, "reduce_fusion.1"),
        _x(1, "ncclDevKernel_AllReduce_Sum_f32_RING_LL", 300, "all-reduce.1"),
        _x(1, "copy_transpose", 150, "copy.4"),
        _x(1, "loop_multiply_fusion", 900, "multiply_fusion.2"),  # the same kernel again: summed
        _x(2, "$python frame", 99999),  # host events are ignored
    ])
    s = ts.summarize(ts.find_trace(tmp_path), steps=3)
    assert s["devices"] == ["/device:GPU:0"]
    want = {"gemm": 9.0, "attention": 1.5, "other": 2.4, "collective": 0.3, "copy": 0.15}
    assert s["kinds"] == pytest.approx({k: v / 3 for k, v in want.items()})
    assert s["total_ms"] == pytest.approx(sum(want.values()) / 3)
    assert s["ops"][0][1:3] == ("gemm", "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN")
    assert s["ops"][2][0] == pytest.approx(1.8 / 3) and s["ops"][2][2] == "loop_multiply_fusion"
    ts.main(["trace_summary", str(tmp_path), "--steps=3", "--top=2"])
    out = capsys.readouterr().out
    assert "device time per step: 4.45 ms" in out and "67.4%" in out  # gemm: 9 of 13.35 ms


def test_classify_and_missing_trace(tmp_path):
    assert ts.classify("fusion.3", {"hlo_op": "dot.1"}) == "gemm"
    assert ts.classify("loop_add_fusion") == "other"
    assert ts.classify("ncclKernel_AllGather") == "collective"
    with pytest.raises(FileNotFoundError, match="trace.json.gz"):
        ts.find_trace(tmp_path)


def test_a_device_plane_without_kernels_is_no_device(tmp_path, capsys):
    """A loaded accelerator plugin can add an empty device plane to a CPU run's trace: no kernels, no device."""
    _write(tmp_path / "cpu.trace.json.gz", [_x(2, "$python frame", 500)])
    assert ts.summarize(tmp_path / "cpu.trace.json.gz")["devices"] == []
    ts.main(["trace_summary", str(tmp_path / "cpu.trace.json.gz")])
    assert "no accelerator kernels in this trace" in capsys.readouterr().out
