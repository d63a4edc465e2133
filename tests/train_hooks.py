"""Test callbacks for the train job, and ``python -m tests.train_hooks [--hang-at=N] [--sigterm-at=N] <job> ...``:
the ``mmfm-jax`` command with those callbacks installed (``launch local --module=tests.train_hooks``).

- ``hang_at(n)``: after step n, wait for the pending checkpoint, print ``DEBUG: hanging at step n`` and wait for a
  signal (SIGKILL ends the process; SIGTERM lets the loop save at this step and return);
- ``sigterm_at(n)``: a real SIGTERM to this process after step n, through the job's preemption handler.
"""

import os
import signal
import sys


def hang_at(n: int):
    def callback(event) -> None:
        if event.step == n:
            event.checkpointer.wait()
            print(f"DEBUG: hanging at step {n}", flush=True)
            while not event.guard.requested:
                signal.pause()

    return callback


def sigterm_at(n: int):
    def callback(event) -> None:
        if event.step == n:
            os.kill(os.getpid(), signal.SIGTERM)

    return callback


HOOKS = {"--hang-at": hang_at, "--sigterm-at": sigterm_at}


def main(argv: list[str]) -> None:
    callbacks, rest = [], []
    for a in argv[1:]:
        name, eq, value = a.partition("=")
        if eq and name in HOOKS:
            callbacks.append(HOOKS[name](int(value)))
        else:
            rest.append(a)
    from mmfm_jax import cli

    cli.run(["mmfm-jax", *rest], **({"callbacks": callbacks} if callbacks else {}))


if __name__ == "__main__":
    main(sys.argv)
