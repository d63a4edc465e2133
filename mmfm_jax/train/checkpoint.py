"""Orbax checkpoints of the train state, the grain iterator state and the config, with fallback and preemption.

Each step directory is an Orbax ``Composite`` of ``state`` (``StandardSave`` of the :class:`TrainState`: params,
EMA, optimizer, step, RNG, adaptive weighting, counters), ``data`` (``grain.checkpoint.CheckpointSave``: one JSON
per process) and ``config`` (``JsonSave``). Saves are asynchronous (the arrays are copied to host before
``save`` returns; files are written in the background and the step directory appears atomically when complete),
``max_to_keep`` prunes old steps.

Restore takes a target of ``ShapeDtypeStruct``s carrying the *current* shardings, so a checkpoint written on one
mesh restores onto any other (8 devices -> 1 or 2, other FSDP splits); a checkpoint written by another number of
processes positions the data iterator at the restored step (one local batch per step on every process).
If the latest step fails to restore (files truncated, deleted or corrupt) a warning is logged and the previous
step is tried; the bad step directories are moved to ``<dir>_corrupt/`` so training can write those steps again.
Bit rot: every save also writes ``checksums`` (``JsonSave``): two 32-bit sums per array (``train/checksums.py``),
computed where the shards live (each process sums its own); a restore recomputes them on the restored arrays and a
mismatch is treated like structural damage (the step is quarantined and the previous one tried; the warning names
the array). Steps saved without checksums restore unverified.
Two cases never lose progress silently: a checkpoint whose state has other leaves or shapes than the target (another
model or optimizer config, read from its metadata before any array) raises
:class:`CheckpointMismatchError`, and when no step at all can be restored the run stops instead of starting fresh.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import sys
import threading
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from mmfm_jax import distributed, parallel
from mmfm_jax.config_utils import ConfigError
from mmfm_jax.storage import as_path, copy_tree, is_local
from mmfm_jax.train.checksums import CHECKSUM_FORMAT, leaf_shapes, state_checksums, verify_checksums

log = logging.getLogger(__name__)


class CheckpointMismatchError(ConfigError):
    """The checkpoint was written for another model or optimizer (its state tree has other leaves or shapes)."""


class _FailedReadNoise(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" records for the array reads Orbax left running when a
    restore failed (the failure itself is reported in one line by :meth:`Checkpointer.restore`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Task exception was never retrieved") and ("orbax" in msg or "tensorstore" in msg))


def quiet_failed_restores() -> None:
    """When one array of a restore fails, Orbax's event loop closes with the other reads still in flight: their
    completions later raise "Event loop is closed" in tensorstore threads (printed as tracebacks through
    ``sys.unraisablehook``) and asyncio logs each unretrieved task with its whole tensorstore spec. Drop exactly
    those (once per process); everything else passes to the previous hook."""
    if getattr(sys.unraisablehook, "_mmfm_quiet", False):
        return
    previous = sys.unraisablehook

    def hook(u) -> None:
        if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
            return
        previous(u)

    hook._mmfm_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_FailedReadNoise())


class _FrozenIteratorState:
    """A snapshot of a grain iterator's state for ``grain.checkpoint.CheckpointSave`` (safe with async saves:
    the JSON is taken when ``save`` is called, not when the background writer runs)."""

    def __init__(self, state_json: bytes):
        self._state = state_json

    def get_state(self) -> bytes:
        return self._state


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    config: dict | None
    fallback_from: int | None  # the latest step, if it was unusable


_HANDLER_MIN_BYTES: list[int] = []


def set_replica_parallel_min_bytes(min_bytes: int) -> None:
    """Orbax saves replicated shards cooperatively ("replica-parallel") by slicing them across replicas; every
    distinct slice is a small compiled program. Only slice arrays whose per-replica piece is at least
    ``min_bytes`` (process-wide: Orbax's ``jax.Array`` handler is global)."""
    if _HANDLER_MIN_BYTES and _HANDLER_MIN_BYTES[0] == min_bytes:
        return
    handler = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=int(min_bytes))
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # "Type handler registry ... overriding jax.Array": intended
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_log.setLevel(level)
    _HANDLER_MIN_BYTES[:] = [min_bytes]


class Checkpointer:
    """``save(step, state, data_state, config)`` / ``restore(target, iterator)`` over an Orbax manager."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3, async_save: bool = True,
                 replica_parallel_min_bytes: int = 1 << 20, checksums: bool = True):
        set_replica_parallel_min_bytes(replica_parallel_min_bytes)
        self.checksums = checksums
        self.dir = as_path(directory)  # a local folder or a gs:// URI
        opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                            create=True)
        self.mngr = ocp.CheckpointManager(self.dir, options=opts)

    # -- save ----------------------------------------------------------------------------------------------

    def save(self, step: int, state: Any, data_state: bytes | None = None, config: dict | None = None,
             force: bool = True) -> bool:
        """Start saving ``state`` at ``step`` (``data_state``: ``latents.iterator_state_bytes(it)``)."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_FrozenIteratorState(data_state))
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        if self.checksums:
            items["checksums"] = ocp.args.JsonSave({"format": CHECKSUM_FORMAT, "arrays": state_checksums(state)})
        return self.mngr.save(int(step), args=ocp.args.Composite(**items), force=force)

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()

    def all_steps(self) -> list[int]:
        return sorted(int(s) for s in self.mngr.all_steps())

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    # -- restore -------------------------------------------------------------------------------------------

    def _restore_step(self, step: int, target: Any, iterator: Any, with_config: bool, partial: bool = False
                      ) -> tuple[Any, Any]:
        items = {"state": ocp.args.StandardRestore(target)}
        if partial:  # only the target's leaves are read (e.g. the EMA weights without the optimizer state)
            items["state"] = ocp.args.PyTreeRestore(item=target, partial_restore=True, restore_args=jax.tree.map(
                lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target))
        reposition = False
        if iterator is not None:
            data_dir = self.dir / str(step) / "data"
            mine = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
            if not mine.exists() and any(data_dir.glob("process_*-of-*.json")):
                reposition = True  # written by another number of processes
            else:
                items["data"] = grain.checkpoint.CheckpointRestore(iterator)
        if with_config:
            items["config"] = ocp.args.JsonRestore()
        verify = self.checksums and (self.dir / str(step) / "checksums").exists()
        if verify:
            items["checksums"] = ocp.args.JsonRestore()
        r = self.mngr.restore(step, args=ocp.args.Composite(**items))
        state = r["state"]
        bad = [i for i, x in enumerate(jax.tree.leaves(state)) if not hasattr(x, "shape")]
        if bad:
            raise ValueError(f"checkpoint step {step}: {len(bad)} leaves did not restore as arrays")
        if verify:
            verify_checksums(state, r["checksums"], f"checkpoint step {step}", partial=partial)
        if reposition:
            _reposition(iterator, step)
        return state, (r["config"] if with_config else None)

    def restore(self, target: Any, iterator: Any = None, with_config: bool = True, *, partial: bool = False,
                step: int | None = None) -> Restored | None:
        """Restore the newest usable step (or only ``step``) onto ``target``'s shardings (and ``iterator``'s position).

        Returns None if there is no checkpoint. Unusable newer steps are logged, moved aside, and skipped; raises if no
        step can be restored (:class:`CheckpointMismatchError` for a state of another config). ``partial=True``
        (readers such as sampling): ``target`` is a dict of some of the state's fields (``{'ema': ..., 'buffers':
        ...}``), only those are read, and unusable steps are skipped but left in place.
        """
        steps = sorted((s for s in self.all_steps() if step is None or s == step), reverse=True)
        if not steps:
            return None
        quiet_failed_restores()
        bad: list[int] = []
        for s in steps:
            self.check_compatible(s, target, partial)
            try:
                state, config = self._restore_step(s, target, iterator, with_config, partial)
                ok = True
            except Exception as e:  # noqa: BLE001  (any failure means: this step is unusable)
                log.warning("checkpoint step %d in %s cannot be restored (%s: %s); trying the previous one",
                            s, self.dir, type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
                ok = False
            if _all_processes_agree(ok):
                if bad:
                    if not partial:
                        self._quarantine(bad)
                    log.warning("restored checkpoint step %d instead of the latest %d", s, bad[0])
                return Restored(step=s, state=state, config=config, fallback_from=bad[0] if bad else None)
            bad.append(s)
        raise RuntimeError(f"no checkpoint step in {self.dir} can be restored (tried {bad}; see the warnings). They "
                           "are left in place: fix the files (or the filesystem), or move them aside to start fresh.")

    def check_compatible(self, step: int, target: Any, partial: bool = False) -> None:
        """Raise :class:`CheckpointMismatchError` if ``step``'s saved state has other leaves or shapes than
        ``target`` (read from the Orbax metadata, no arrays; ``partial``: only ``target``'s leaves are compared).
        Unreadable metadata passes: the restore decides."""
        absl_log = logging.getLogger("absl")
        level = absl_log.level
        absl_log.setLevel(logging.ERROR)  # "Metadata file does not exist" for every step: this reads a sub-item
        try:
            with ocp.StandardCheckpointer() as c:
                md = c.metadata(self.dir / str(step) / "state")
            saved = leaf_shapes(getattr(md, "item_metadata", md))
        except Exception:  # noqa: BLE001  (damaged metadata: the restore that follows reports and falls back)
            return
        finally:
            absl_log.setLevel(level)
        want = leaf_shapes(target)
        if partial:
            saved = {k: v for k, v in saved.items() if k.split("/")[0] in target}
        if not saved or saved == want:
            return
        diffs = [f"{k}: saved {saved.get(k, 'absent')}, now {want.get(k, 'absent')}"
                 for k in sorted(set(saved) | set(want)) if saved.get(k) != want.get(k)]
        raise CheckpointMismatchError(
            f"checkpoint step {step} in {self.dir} was written for another model or optimizer config "
            f"({len(diffs)} leaves differ; {'; '.join(diffs[:3])}). Resume with the config it was written with "
            f"({self.dir / str(step) / 'config'}) or use a new workdir; nothing was changed on disk.")

    def _quarantine(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            dest = self.dir.parent / f"{self.dir.name}_corrupt"
            dest.mkdir(parents=True, exist_ok=True)
            for s in steps:
                src = self.dir / str(s)
                if src.exists():
                    dst = dest / f"{s}-{int(time.time())}"
                    if is_local(src):
                        shutil.move(str(src), str(dst))
                    else:  # an object store has no folders to rename: copy the objects, then delete them
                        copy_tree(src, dst)
                        src.rmtree()
        distributed.sync("checkpoint_quarantine")
        self.mngr.reload()


def restore_for_inference(workdir: str | os.PathLike, abstract_model: Any, mesh: Any, rules: Any = None,
                          step: int = -1) -> tuple[Any, Any, int]:
    """The EMA parameters (+ buffers) of a training run's checkpoints (``workdir/checkpoints``) as a model for
    inference, restored onto ``mesh`` with the logical shardings of ``abstract_model`` (an ``nnx.eval_shape``'d
    module of the run's architecture; ``rules``: the logical-axis rules).

    A partial restore through :meth:`Checkpointer.restore`: the optimizer state is never read, nothing on disk is
    moved, and ``step=-1`` takes the newest step that restores on every process (an unreadable or bit-rotten newest
    step falls back to the previous one with a warning; the processes agree on the step). ``step >= 0``: exactly that
    step. Returns ``(graphdef, state, step)``; ``nnx.merge(graphdef, state)`` is the model.
    """
    from flax import nnx

    g, p, r = nnx.split(abstract_model, nnx.Param, ...)
    sds = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
    shard = lambda a: nnx.to_pure_dict(parallel.state_shardings(mesh, a, rules))  # noqa: E731
    target = {"ema": jax.tree.map(sds, nnx.to_pure_dict(p), shard(p)),
              "buffers": jax.tree.map(sds, nnx.to_pure_dict(r), shard(r))}
    ckdir = as_path(workdir) / "checkpoints"
    if not ckdir.is_dir():
        raise FileNotFoundError(f"no checkpoints in {ckdir}")
    restored = Checkpointer(ckdir, async_save=False).restore(target, with_config=False, partial=True,
                                                             step=None if step < 0 else int(step))
    if restored is None:
        raise FileNotFoundError(f"no checkpoint{f' at step {step}' if step >= 0 else ''} in {ckdir}")
    pstate, rstate = nnx.State(p), nnx.State(r)
    nnx.replace_by_pure_dict(pstate, restored.state["ema"])
    nnx.replace_by_pure_dict(rstate, restored.state["buffers"])
    return g, nnx.state(nnx.merge(g, pstate, rstate)), restored.step


def _reposition(iterator: Any, step: int) -> None:
    """The data pipelines of ``data/latents.py`` consume one local batch per step on every process, and their
    iterator state is ``{'next_index': batches consumed}`` whatever the process count: position it at ``step``."""
    st = iterator.get_state()
    if not isinstance(st, dict) or set(st) != {"next_index"}:
        raise ValueError(f"data iterator state {st!r} cannot be repositioned (saved by another process count)")
    iterator.set_state({"next_index": int(step)})
    log.warning("checkpoint step %d: data state written by another number of processes; iterator positioned at "
                "batch %d", step, step)


def _all_processes_agree(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.asarray([int(ok)], np.int32))))


class PreemptionGuard:
    """SIGTERM sets ``requested``; the train loop saves at the next step boundary and exits cleanly.

    With several processes, :meth:`should_stop` agrees across processes (call it at the same steps everywhere).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.requested = False
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if not self.requested:
            log.warning("signal %d received: checkpointing at the next step boundary, then exiting", signum)
        self.requested = True

    def should_stop(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray([int(self.requested)], np.int32))
        return bool(np.max(flags))

    def close(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
