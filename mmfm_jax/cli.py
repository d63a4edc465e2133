"""``python -m mmfm_jax <job> --config=configs/<file>.py[:variant] [--config.a.b=v ...] --workdir=DIR``.

Unknown jobs print the list of jobs; unknown config keys and values of the wrong type fail in flag parsing
(ml_collections names the key); bad values fail in the job's ``validate`` before any work starts.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from mmfm_jax.jobs import JOBS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def usage() -> str:
    return ("usage: python -m mmfm_jax <job> [--config=configs/<file>.py[:variant]] [--config.key=value ...] "
            "[--workdir=DIR]\njobs: " + ", ".join(JOBS))


def default_config_path(module) -> str:
    spec = getattr(module, "DEFAULT_CONFIG", None)
    if spec is None:
        return None
    file, _, variant = spec.partition(":")
    path = CONFIG_DIR / file
    return f"{path}:{variant}" if variant else str(path)


def run_job(job: str, cfg, workdir: str | Path) -> dict:
    """Validate ``cfg`` (raises ``ConfigError`` naming the key), run the job, write and return its summary."""
    from mmfm_jax.jobs.common import start_job

    module = importlib.import_module(JOBS[job])
    validate = getattr(module, "validate", None)
    if validate is not None:
        validate(cfg)
    ctx = start_job(job, cfg, workdir)
    try:
        summary = module.run(cfg, ctx) or {}
    finally:
        ctx.writer.close()
    return ctx.write_summary(summary)


def run(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        raise SystemExit(0 if len(argv) >= 2 else 2)
    job = argv[1]
    if job not in JOBS:
        print(f"unknown job {job!r}\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(JOBS[job])

    import jax
    from absl import app, flags
    from ml_collections import config_flags

    from mmfm_jax.config_utils import ConfigError
    from mmfm_jax.jobs.common import setup_logging

    config_flag = config_flags.DEFINE_config_file("config", default_config_path(module),
                                                  f"config file for the {job} job", lock_config=True)
    workdir_flag = flags.DEFINE_string("workdir", f"runs/{job}", "output folder of the job")
    if hasattr(module, "define_flags"):  # job-specific flags (plan: --topology, ...)
        module.define_flags()

    def main(_):
        setup_logging()
        cfg = config_flag.value
        if cfg is None:
            raise app.UsageError(f"{job}: --config is required")
        try:
            runner = getattr(module, "run_cli", None)  # a job that builds no local mesh / workdir context (plan)
            summary = runner(cfg, workdir_flag.value) if runner else run_job(job, cfg, workdir_flag.value)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        if summary is not None and jax.process_index() == 0:
            print(json.dumps(summary, indent=1, default=str))

    app.run(main, argv=[argv[0]] + argv[2:])


if __name__ == "__main__":
    run()
