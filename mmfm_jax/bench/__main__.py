"""``python -m mmfm_jax.bench <name> [--flag=value ...]``; each bench module defines ``main(argv)``."""

import importlib
import sys

from mmfm_jax.bench import BENCHES


def run() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHES:
        print("usage: python -m mmfm_jax.bench <name> [flags]\nbenches: " + ", ".join(BENCHES), file=sys.stderr)
        raise SystemExit(2)
    importlib.import_module(BENCHES[sys.argv[1]]).main([sys.argv[0]] + sys.argv[2:])


if __name__ == "__main__":
    run()
