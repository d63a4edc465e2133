"""Multi-process set-up: ``jax.distributed`` initialisation (config, our launcher, SLURM, TPU pods), its dead-peer
timeouts, the persistent compilation cache, and the cross-process barrier."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

log = logging.getLogger(__name__)


def maybe_initialize_distributed(cfg: Any = None) -> bool:
    """Initialise ``jax.distributed`` when the config or the environment says the job spans several processes.

    Triggers, in order: ``cfg.distributed.num_processes > 1`` (with ``coordinator_address`` and ``process_id``);
    ``MMFM_COORDINATOR_ADDRESS``/``MMFM_NUM_PROCESSES``/``MMFM_PROCESS_ID`` (our local launcher);
    a SLURM allocation with several tasks, ``TPU_WORKER_HOSTNAMES`` of several hosts (GKE), or
    ``MMFM_DISTRIBUTED=auto`` (set by ``launch tpu``: GCE TPU VMs describe the pod only through their metadata
    server); ``jax.distributed.initialize()`` then auto-detects the rest. Returns True if it initialised. Safe to
    call twice.

    Dead peers: a process that stops sending heartbeats for ``cfg.distributed.heartbeat_timeout_s`` seconds is
    declared dead and the coordination service terminates every other process (instead of leaving them blocked in
    a collective); ``shutdown_timeout_s`` bounds the wait at the exit barrier, ``init_timeout_s`` the wait for all
    processes to connect.
    """
    if jax.distributed.is_initialized():
        return False
    dist = getattr(cfg, "distributed", None) if cfg is not None else None
    kwargs: dict[str, Any] = {}
    n_cfg = int(getattr(dist, "num_processes", 1) or 1) if dist is not None else 1
    env = os.environ
    if n_cfg > 1:
        kwargs = dict(
            coordinator_address=dist.coordinator_address,
            num_processes=n_cfg,
            process_id=int(dist.process_id),
        )
    elif int(env.get("MMFM_NUM_PROCESSES", "1")) > 1:
        kwargs = dict(
            coordinator_address=env["MMFM_COORDINATOR_ADDRESS"],
            num_processes=int(env["MMFM_NUM_PROCESSES"]),
            process_id=int(env["MMFM_PROCESS_ID"]),
        )
    elif (int(env.get("SLURM_NTASKS", "1")) > 1 or env.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1
          or env.get("MMFM_DISTRIBUTED") == "auto"):
        kwargs = {}
    else:
        return False
    local = env.get("MMFM_LOCAL_DEVICE_IDS")
    if local:
        kwargs["local_device_ids"] = [int(i) for i in local.split(",")]
    kwargs.update(distributed_timeouts(dist))
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


DISTRIBUTED_TIMEOUTS = dict(heartbeat_timeout_s=20, shutdown_timeout_s=300, init_timeout_s=300)


def distributed_timeouts(dist: Any = None) -> dict[str, int]:
    """``jax.distributed.initialize`` timeout arguments from ``cfg.distributed`` (defaults: DISTRIBUTED_TIMEOUTS)."""
    get = lambda k: int(getattr(dist, k, None) or DISTRIBUTED_TIMEOUTS[k])
    return dict(heartbeat_timeout_seconds=get("heartbeat_timeout_s"),
                shutdown_timeout_seconds=get("shutdown_timeout_s"),
                initialization_timeout=get("init_timeout_s"))


def configure_compile_cache(cfg: Any) -> str:
    """Point jax's persistent compilation cache at ``cfg.compile_cache`` (a folder or ``gs://`` URI) before the
    first compile; ``''`` leaves jax's own settings (e.g. ``JAX_COMPILATION_CACHE_DIR``) alone. Returns the path used.

    Executables that took at least ``cfg.compile_cache_min_compile_s`` seconds to compile are written (by process 0
    only; every process reads), whatever their size; a pod restart then loads them instead of recompiling. On
    ``gs://`` XLA's own file caches (GPU autotuning results) stay off: they only write to local paths.
    """
    path = str(getattr(cfg, "compile_cache", "") or "")
    if not path:
        return ""
    if "://" not in path:
        path = os.path.abspath(os.path.expanduser(path))
    from jax.experimental.compilation_cache import compilation_cache

    if jax.config.jax_compilation_cache_dir != path:
        compilation_cache.reset_cache()  # the cache object is built once per process from the first directory
        jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(getattr(cfg, "compile_cache_min_compile_s", 1.0)))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_persistent_cache_enable_xla_caches",
                      "none" if "://" in path else "xla_gpu_per_fusion_autotune_cache_dir")
    log.info("persistent compilation cache: %s", path)
    return path


def is_main_process() -> bool:
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Barrier across processes (no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
