"""Benchmarks: ``python -m mmfm_jax.bench <name> [flags]``. They print side-by-side figures; tests only smoke-run them
on tiny configurations (tests/test_bench_smoke.py) and never assert a time.

One module per benchmark, each with ``main(argv)`` (``BENCHES`` maps names to modules): ``train``, ``sample``,
``encode``, ``gmm``, ``gmm_emulate``, ``trace_summary`` (where a profile's device time goes). Results:
docs/benchmarks.md."""

BENCHES: dict[str, str] = {
    "gmm": "mmfm_jax.bench.gmm",
    "gmm_emulate": "mmfm_jax.bench.gmm_emulate",
    "train": "mmfm_jax.bench.train",
    "encode": "mmfm_jax.bench.encode",
    "sample": "mmfm_jax.bench.sample",
    "trace_summary": "mmfm_jax.bench.trace_summary",
}
