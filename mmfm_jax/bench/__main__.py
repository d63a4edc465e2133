"""``mmfm-jax bench <name> [--flag=value ...]`` (or ``python -m mmfm_jax.bench``); each bench module defines
``main(argv)``."""

import importlib
import sys

from mmfm_jax.bench import BENCHES


def run(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] not in BENCHES:
        print("usage: mmfm-jax bench <name> [flags]\nbenches: " + ", ".join(BENCHES), file=sys.stderr)
        raise SystemExit(0 if len(argv) >= 2 and argv[1] in ("-h", "--help") else 2)
    importlib.import_module(BENCHES[argv[1]]).main([argv[0]] + argv[2:])


if __name__ == "__main__":
    run()
