"""``mmfm-jax fetch-release --variant=dinov2-b/mode-gmm-100k --dir=artifacts``: download exactly the files a release
variant needs from the hub repository with huggingface_hub (resumable; sizes and sha256 checked and recorded in
``<dir>/mmfm_release.lock.json``). See ``docs/release.md`` and ``mmfm_jax/release/fetch.py``."""

from __future__ import annotations

import argparse
import json
import sys

from mmfm_jax.release import manifest


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmfm-jax fetch-release", description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="dinov2-b/mode-gmm-100k", help="a release variant (--list shows them)")
    p.add_argument("--dir", default="artifacts", help="download folder (files keep their repository paths)")
    p.add_argument("--repo", default=manifest.REPO_ID, help="hub repository id")
    p.add_argument("--revision", default=manifest.REVISION, help="branch, tag or commit")
    p.add_argument("--endpoint", default=None, help="hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    p.add_argument("--no-guide", action="store_true", help="skip the AutoGuidance guide")
    p.add_argument("--no-eval", action="store_true", help="skip the FID reference batch and the Inception weights")
    p.add_argument("--verify", action="store_true", help="re-hash files already present against the lock file")
    p.add_argument("--dry-run", action="store_true", help="print what would be downloaded, with sizes")
    p.add_argument("--list", action="store_true", help="list the variants and their files, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.list:
        for name, v in manifest.VARIANTS.items():
            files = {r: manifest.FILES[k]["path"] if k in manifest.FILES else k for r, k in v["roles"].items() if k}
            print(json.dumps({name: files}))
        return 0
    from mmfm_jax.jobs.common import setup_logging
    from mmfm_jax.release.fetch import ReleaseError, fetch_release

    setup_logging()
    try:
        out = fetch_release(args.variant, args.dir, guide=not args.no_guide, evaluation=not args.no_eval,
                            repo_id=args.repo, revision=args.revision, endpoint=args.endpoint, verify=args.verify,
                            dry_run=args.dry_run)
    except manifest.ManifestError as e:
        print(f"fetch-release: {e}", file=sys.stderr)
        return 2
    except (ReleaseError, OSError) as e:
        print(f"fetch-release: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=1))
    return 0
