"""``mmfm-jax convert --variant=dinov2-b/mode-gmm-100k --dir=artifacts``: turn a fetched release variant once into
torch-free files under ``<dir>/converted/`` (safetensors checkpoints and decoder, stats.npz, our ModeSource folder,
``<variant>/pipeline.json``). Needs torch (``pip install -e ".[torch]"``) and scikit-learn for the pickles; nothing
after it does. See ``docs/release.md`` and ``mmfm_jax/release/convert.py``."""

from __future__ import annotations

import argparse
import json
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmfm-jax convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="dinov2-b/mode-gmm-100k", help="a release variant (fetch-release --list)")
    p.add_argument("--dir", default="artifacts", help="the fetch-release folder; output in DIR/converted/")
    p.add_argument("--no-guide", action="store_true", help="skip the AutoGuidance guide")
    p.add_argument("--no-eval", action="store_true", help="skip the Inception weights")
    p.add_argument("--trust-pickle", action="store_true",
                   help="read .pt files with weights_only=False (runs code from the file: only for files you trust)")
    p.add_argument("--force", action="store_true", help="convert again even if the outputs exist")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from mmfm_jax.jobs.common import setup_logging
    from mmfm_jax.release.convert import convert_release

    setup_logging()
    try:
        out = convert_release(args.variant, args.dir, guide=not args.no_guide, evaluation=not args.no_eval,
                              trust_pickle=args.trust_pickle, force=args.force)
    except (ValueError, FileNotFoundError) as e:  # ManifestError, CheckpointError, OfficialPickleError: ValueErrors
        print(f"convert: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1, default=str))
    return 0
