"""Resumable output shards: which shards of a job's output are still to write.

A job that writes its output as numbered shards (the encode job's latent shards, the sample job's image shards)
marks each one finished on disk only once it is complete, so a restarted job redoes exactly the shards that are
not. Process 0 alone looks at the files (after an optional cleanup of an interrupted run's leftovers) and the
answer is broadcast, so every process takes the same list, and no process writes before the cleanup is done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np


def pending_shards(n_shards: int, finished: Callable[[], Iterable[int]],
                   cleanup: Callable[[], Any] | None = None) -> list[int]:
    """The ids in ``[0, n_shards)`` not among ``finished()`` (the ids finished on disk; others are ignored), in
    order, as decided by process 0 (which first calls ``cleanup()``, if given) and agreed by every process. Call it
    on every process."""
    todo = np.ones(int(n_shards), np.int32)
    if jax.process_index() == 0:
        if cleanup is not None:
            cleanup()
        for s in finished():
            if 0 <= int(s) < n_shards:
                todo[int(s)] = 0
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        todo = np.asarray(multihost_utils.broadcast_one_to_all(todo))
    return [int(s) for s in np.flatnonzero(todo)]
