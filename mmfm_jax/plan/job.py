"""``python -m mmfm_jax plan --config=<any job's config>[:variant] --topology=v5p-64 [--search_batch] --workdir=DIR``:
compile the job's hot programs for a TPU topology on this host and report per-chip memory, FLOPs, a roofline time
and the collectives (``mmfm_jax.plan``; ``docs/planning.md``). Exits 1 when a program does not fit the chip's HBM.
"""

from __future__ import annotations

import sys
from pathlib import Path

import ml_collections

DEFAULT_CONFIG = "train.py:tiny"


def define_flags() -> None:
    """The plan job's flags beyond --config / --workdir (called by the CLI before parsing)."""
    from absl import flags

    flags.DEFINE_string("topology", None, "TPU topology: v4-8 | v5e-16 | v5p-64 | v6e-256 | ... or 'v5p:4x4x4'; "
                                          "'2xv5e-16' for two slices")
    flags.DEFINE_bool("search_batch", False, "also find the largest per-chip (micro-)batch that fits")
    flags.DEFINE_integer("n_samples", 0, "fit-gmm: N of the EM iteration (0: the dataset's, else 1,281,167)")
    flags.DEFINE_integer("max_batch", 1024, "largest per-chip batch --search_batch tries")
    flags.DEFINE_alias("search-batch", "search_batch")


def run_cli(cfg: ml_collections.ConfigDict, workdir: str | Path) -> None:
    """Plan and write ``workdir/summary.json``; ``SystemExit(1)`` (after the report) when something does not fit."""
    from absl import flags

    from mmfm_jax.config_utils import ConfigError
    from mmfm_jax.plan import plan

    f = flags.FLAGS
    if not f.topology:
        raise ConfigError("--topology: required (e.g. --topology=v5p-64 or --topology=v5p:4x4x4)")
    summary = plan(cfg, f.topology, workdir, search=f.search_batch, n_samples=f.n_samples, max_batch=f.max_batch)
    if not summary["fits"]:
        bad = [r for r in summary["programs"] if not r["fits"]]
        print("plan: " + "; ".join(f"{r['program']} needs {'at least ' if r['memory_per_chip'].get('at_least') else ''}"
                                   f"{r['memory_per_chip']['total_gib']:.2f} GiB per chip, the "
                                   f"chip has {r['memory_per_chip']['hbm_gib']:.0f} GiB" for r in bad),
              file=sys.stderr)
        raise SystemExit(1)
