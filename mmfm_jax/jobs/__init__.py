"""One module per CLI job. Each defines ``DEFAULT_CONFIG`` (a file in ``configs/``, optionally ``:variant``),
``validate(cfg)`` (raise ``ConfigError`` naming the key) and ``run(cfg, ctx) -> dict`` (the summary).

``JOBS`` maps each ``mmfm-jax`` job name to its module (the studies' jobs live in ``mmfm_jax.experiments``);
``common`` holds the job context (``start_job``) and ``preflight`` the checks run before a job starts."""

# job name -> module (imported lazily so `python -m mmfm_jax --help` stays fast)
JOBS: dict[str, str] = {
    "toy": "mmfm_jax.experiments.toy.job",
    "demo": "mmfm_jax.experiments.digits.demo",
    "train": "mmfm_jax.jobs.train",
    "encode": "mmfm_jax.jobs.encode",
    "fit-gmm": "mmfm_jax.jobs.fit_gmm",
    "sample": "mmfm_jax.jobs.sample",
    "evaluate": "mmfm_jax.jobs.evaluate",
    "plan": "mmfm_jax.plan.job",  # the planner compiles the other jobs' programs, so it lives above jobs/
}

