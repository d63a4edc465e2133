"""Every benchmark runs end to end on a tiny configuration and prints its summary lines (no timing is asserted:
speed targets live in the benchmarks themselves; this only keeps their code from rotting)."""

import pytest

from mmfm_jax.bench import BENCHES

CASES = {
    "gmm": (["--n=2048", "--k=8", "--d=16", "--iters=2", "--chunk=256", "--no-sklearn", "--compare=highest",
             "--m-step-top=2"],
            ["seconds / EM iteration (median)", "held-out mean log-lik (final)", "sparse M-step: left-out mass",
             "compare: highest, m_step_top=2 vs highest", "matmul floor", "ratio to the E-step GEMMs alone"]),
    "gmm_emulate": (["--n=1024", "--k=8", "--d=16", "--iters=2", "--e=bf16x3", "--m=f32"],
                    ["E=bf16x3 M=f32", "|difference| after 2 iterations"]),
    "train": (["--config=configs/train.py:tiny", "--batch=8", "--steps=1", "--dtype=float32",
               "--set", "source.table_dtype=bfloat16", "--trace=TMP"],
              ["batch     8:", "best: batch 8", "no accelerator kernels in this trace"]),
    "train_checkpoint": (["--config=configs/train.py:tiny", "--dtype=float32", "--checkpoint=TMP",
                          "--checkpoint-repeats=1"],
                         ["checkpoint: state", "% of a save", "% of a restore"]),
    "encode": (["--preset=fixture_small", "--batch=8", "--repeats=1", "--no-torch"],
               ["mmfm_jax (jax", "not measured"]),
    "sample": (["--preset=tiny", "--guide-preset=tiny", "--modes=16", "--batch=8", "--points=3", "--no-decode",
                "--dtype=float32", "--repeats=1"], ["images/s", "program: train.sampling.make_sample_fn"]),
}


def test_every_bench_has_a_smoke_case():
    # trace_summary: tests/test_trace_summary.py; train_checkpoint: bench train --checkpoint
    assert {c.split("_checkpoint")[0] for c in CASES} | {"trace_summary"} == set(BENCHES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bench_runs(name, capsys, repo_dir, monkeypatch, tmp_path):
    import importlib

    monkeypatch.chdir(repo_dir)
    argv, expect = CASES[name]
    argv = [a.replace("TMP", str(tmp_path / "trace")) for a in argv]
    importlib.import_module(BENCHES[name.split("_checkpoint")[0]]).main([name, *argv])
    out = capsys.readouterr().out
    for line in expect:
        assert line in out, (line, out[-2000:])
