"""The ``mmfm-jax`` command (also ``python -m mmfm_jax``).

``mmfm-jax <job> [--config=FILE.py[:VARIANT]] [--config.KEY=VALUE ...] [--workdir=DIR] [--print_config]`` runs a
job; ``mmfm-jax <job> --help`` explains it (purpose, variants, top-level keys); ``mmfm-jax bench|launch|
prepare-imagenet ...`` run the tools. Config specs resolve to the shipped configs from any directory
(``config_files``). Every mistake the command line or the config can hold (unknown job, flag, key or variant, a
value of the wrong type, a bad value, a missing input file or checkpoint, a batch that does not divide over the
mesh) is one line on stderr and exit status 2, before the workdir is created.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import importlib.util
import json
import re
import sys
from pathlib import Path

from mmfm_jax.config_files import config_dir
from mmfm_jax.config_utils import ConfigError
from mmfm_jax.jobs import JOBS

PROG = "mmfm-jax"
# tools with their own flags: name -> (module, what it is)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("mmfm_jax.bench.__main__", "benchmarks (`mmfm-jax bench` lists them)"),
    "launch": ("mmfm_jax.launch", "run a job on TPU pod workers, SLURM or N local processes"),
    "prepare-imagenet": ("mmfm_jax.data.images", "ImageNet tars -> TFDS imagenet2012 ArrayRecord (no TensorFlow)"),
    "fetch-release": ("mmfm_jax.jobs.fetch_release", "download an official release variant from the hub (resumable)"),
    "convert": ("mmfm_jax.jobs.convert_release", "convert fetched release files once (no torch needed after)"),
}
JOB_FLAGS = ("--config", "--config.<key>", "--workdir", "--print_config", "--help")
CONFIG_DIR = config_dir()  # the shipped configs (a checkout's configs/ or the installed mmfm_jax/configs/)


def _docstring(module_name: str) -> str:
    """A module's docstring without importing it (fast ``--help``)."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        return ""
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""


def _summary_line(doc: str) -> str:
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    return re.sub(r"^(``[^`]*``|[\w-]+): ", "", first)


def usage() -> str:
    w = max(map(len, [*JOBS, *SUBCOMMANDS]))
    lines = [f"usage: {PROG} <job> [--config=FILE.py[:VARIANT]] [--config.KEY=VALUE ...] [--workdir=DIR] "
             "[--print_config]", f"       {PROG} <job> --help        (the job's purpose, variants and keys)",
             f"       {PROG} {{{'|'.join(SUBCOMMANDS)}}} ...", "", "jobs:"]
    for job, mod in JOBS.items():
        lines.append(f"  {job:<{w}}  {_summary_line(_docstring(mod))[:100]}")
    lines.append("tools:")
    lines += [f"  {name:<{w}}  {what}" for name, (_, what) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def default_config_spec(module) -> str | None:
    return getattr(module, "DEFAULT_CONFIG", None)


def default_config_path(module) -> str | None:
    """The job's default config as ``<path>[:variant]`` (shipped configs)."""
    spec = default_config_spec(module)
    if spec is None:
        return None
    from mmfm_jax.config_files import resolve_config_file

    path, variant = resolve_config_file(spec)
    return f"{path}:{variant}" if variant else str(path)


def _build_mesh(cfg):
    """Initialise multi-host and build the job's mesh (no side effects on disk); mesh errors name the key."""
    from mmfm_jax import distributed, parallel

    distributed.maybe_initialize_distributed(cfg)
    try:
        return parallel.mesh_from_config(cfg)
    except ValueError as e:
        if str(e).startswith("config."):
            raise ConfigError(str(e)) from None
        raise


def run_job(job: str, cfg, workdir: str | Path, **job_kwargs) -> dict:
    """Validate ``cfg`` (the job's ``validate``, then the mesh and input paths: ``preflight``; every error a
    ``ConfigError`` naming the key), then create the workdir, run the job (``run(cfg, ctx, **job_kwargs)``: e.g.
    the train job's ``callbacks=``), write and return its summary."""
    from mmfm_jax.jobs import preflight
    from mmfm_jax.jobs.common import start_job

    module = importlib.import_module(JOBS[job])
    validate = getattr(module, "validate", None)
    if validate is not None:
        validate(cfg)
    preflight.check(job, cfg, _build_mesh(cfg))
    ctx = start_job(job, cfg, workdir)
    try:
        summary = module.run(cfg, ctx, **job_kwargs) or {}
    finally:
        ctx.close()
    return ctx.write_summary(summary)


@dataclasses.dataclass
class JobArgs:
    config: str | None
    overrides: list[tuple[str, str]]
    workdir: str
    print_config: bool = False
    help: bool = False
    absl: list[str] = dataclasses.field(default_factory=list)


def parse_job_args(job: str, args: list[str], default_config: str | None) -> JobArgs:
    """``--config=SPEC`` (or ``--config SPEC``), ``--config.a.b=TEXT``, ``--workdir=DIR``, ``--print_config``,
    ``-h/--help``; other ``--name=value`` flags only if absl knows them (e.g. defined by a library)."""
    out = JobArgs(config=default_config, overrides=[], workdir=f"runs/{job}")
    i = 0
    while i < len(args):
        a = args[i]
        name, eq, value = a.partition("=")
        if a in ("-h", "--help", "-help", "--helpfull"):
            out.help = True
        elif a in ("--print_config", "--print-config"):
            out.print_config = True
        elif name in ("--config", "--workdir"):
            if not eq:
                if i + 1 >= len(args):
                    raise ConfigError(f"{name}: needs a value ({name}=...)")
                i += 1
                value = args[i]
            if name == "--config":
                out.config = value
            else:
                out.workdir = value
        elif name.startswith("--config."):
            if not eq:
                raise ConfigError(f"{a}: needs a value ({a}=...)")
            out.overrides.append((name[len("--config."):], value))
        elif a.startswith("-") and _absl_knows(name.lstrip("-")):
            out.absl.append(a)
        else:
            near = difflib.get_close_matches(name, [f.split("<")[0].rstrip(".") for f in JOB_FLAGS], n=1)
            raise ConfigError(f"unknown argument {a!r} (flags: {', '.join(JOB_FLAGS)})"
                              + (f"; did you mean {near[0]}?" if near else ""))
        i += 1
    return out


def _absl_knows(name: str) -> bool:
    from absl import flags

    return name.split("=")[0] in flags.FLAGS


def load_job_config(spec: str | None, overrides: list[tuple[str, str]]):
    """The job's config from a ``--config`` spec and textual overrides (``ConfigError`` on any mistake)."""
    from mmfm_jax import config_files

    if spec is None:
        raise ConfigError("--config is required for this job")
    path, variant = config_files.resolve_config_file(spec)
    cfg = config_files.build_config(config_files.import_config_module(path), variant, spec)
    for key, text in overrides:
        config_files.set_override(cfg, key, text, from_text=True)
    cfg.lock()
    return cfg


def job_help(job: str, spec: str | None) -> str:
    """What ``mmfm-jax <job> --help`` prints: purpose, config file and variants, top-level keys, usage."""
    from mmfm_jax import config_files

    doc = _docstring(JOBS[job]).strip()
    lines = [f"{PROG} {job}: {_summary_line(doc)}", ""]
    rest = doc.split("\n\n", 1)[1].strip() if "\n\n" in doc else ""
    if rest:
        lines += [rest.split("\n\n")[0], ""]
    lines.append(f"usage: {PROG} {job} [--config=FILE.py[:VARIANT]] [--config.KEY=VALUE ...] [--workdir=DIR] "
                 "[--print_config]")
    if spec:
        path, variant = config_files.resolve_config_file(spec)
        module = config_files.import_config_module(path)
        names = config_files.variants(module)
        cfg = config_files.build_config(module, variant, spec)
        lines += ["", f"config: {path.name} (default --config={spec}; shipped with the package, or give a path)",
                  f"variants: {', '.join(names) if names else '(none)'}"]
        cdoc = (module.__doc__ or "").strip()
        if "\n\n" in cdoc:
            lines += ["", cdoc.split("\n\n", 1)[1].strip()]
        lines += ["", f"top-level keys ({path.name}{':' + variant if variant else ''}; set any leaf with "
                  "--config.a.b=value, see all with --print_config):", *config_files.describe(cfg)]
    lines += ["", f"writes <workdir>/config.json, summary.json and TensorBoard events in <workdir>/tb "
                  f"(default workdir runs/{job})"]
    return "\n".join(lines)


def _fail(where: str, e: Exception) -> None:
    print(f"{PROG} {where}: error: {e}", file=sys.stderr)
    raise SystemExit(2)


def run_subcommand(name: str, args: list[str]) -> None:
    module = importlib.import_module(SUBCOMMANDS[name][0])
    if name == "bench":
        module.run([f"{PROG} bench", *args])
    elif name in ("launch", "fetch-release", "convert"):
        raise SystemExit(module.main(args))
    else:
        module.main(["prepare-imagenet", *args])


def run(argv: list[str] | None = None, **job_kwargs) -> None:
    """The command line; ``job_kwargs`` go to the job's ``run`` (a program embedding the CLI, e.g. with the train
    job's ``callbacks=``)."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        if len(argv) >= 3 and argv[1] == "help" and argv[2] in JOBS:
            argv = [argv[0], argv[2], "--help"]
        else:
            print(usage(), file=sys.stdout if len(argv) >= 2 else sys.stderr)
            raise SystemExit(0 if len(argv) >= 2 else 2)
    job, args = argv[1], argv[2:]
    if job in SUBCOMMANDS:
        return run_subcommand(job, args)
    if job not in JOBS:
        near = difflib.get_close_matches(job, [*JOBS, *SUBCOMMANDS], n=1, cutoff=0.5)
        print(f"{PROG}: error: unknown job {job!r}" + (f"; did you mean {near[0]!r}?" if near else "")
              + f"\njobs: {', '.join(JOBS)}; tools: {', '.join(SUBCOMMANDS)} ({PROG} --help)", file=sys.stderr)
        raise SystemExit(2)
    from mmfm_jax.jobs.common import setup_logging

    setup_logging()  # before the job's imports: a library logging at import would install a second handler
    module = importlib.import_module(JOBS[job])
    if hasattr(module, "main"):  # a job with its own flags
        raise SystemExit(module.main(args) or 0)
    if hasattr(module, "define_flags"):  # job-specific absl flags (plan: --topology, ...)
        module.define_flags()
    try:
        parsed = parse_job_args(job, args, default_config_spec(module))
        if parsed.help:
            print(job_help(job, parsed.config))
            raise SystemExit(0)
        cfg = load_job_config(parsed.config, parsed.overrides)
    except ConfigError as e:
        _fail(job, e)
    if parsed.print_config:
        print(cfg)
        raise SystemExit(0)

    import jax
    from absl import flags

    flags.FLAGS([PROG, *parsed.absl])  # library flags (and marks absl parsed: grain's worker processes need it)
    setup_logging()
    try:
        runner = getattr(module, "run_cli", None)  # a job that builds no local mesh / workdir context (plan)
        summary = runner(cfg, parsed.workdir) if runner else run_job(job, cfg, parsed.workdir, **job_kwargs)
    except ConfigError as e:
        _fail(job, e)
    if summary is not None and jax.process_index() == 0:
        print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    run()
