"""Benchmarks: ``python -m mmfm_jax.bench <name> [flags]``. They print side-by-side figures; never run in tests."""

BENCHES: dict[str, str] = {
    "gmm": "mmfm_jax.bench.gmm",
    "gmm_emulate": "mmfm_jax.bench.gmm_emulate",
    "train": "mmfm_jax.bench.train",
    "encode": "mmfm_jax.bench.encode",
    "sample": "mmfm_jax.bench.sample",
    "trace_summary": "mmfm_jax.bench.trace_summary",
}
