"""One module per CLI job. Each defines ``DEFAULT_CONFIG`` (a file in ``configs/``, optionally ``:variant``),
``validate(cfg)`` (raise ``ConfigError`` naming the key) and ``run(cfg, ctx) -> dict`` (the summary)."""

# job name -> module (imported lazily so `python -m mmfm_jax --help` stays fast)
JOBS: dict[str, str] = {
    "toy": "mmfm_jax.jobs.toy",
    "demo": "mmfm_jax.experiments.digits.demo",
    "train": "mmfm_jax.jobs.train",
    "encode": "mmfm_jax.jobs.encode",
    "fit-gmm": "mmfm_jax.jobs.fit_gmm",
    "sample": "mmfm_jax.jobs.sample",
    "evaluate": "mmfm_jax.jobs.evaluate",
    "plan": "mmfm_jax.jobs.plan",
}

