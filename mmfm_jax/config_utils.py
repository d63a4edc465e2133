"""Config helpers: validation that names the offending key, before any work starts."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A config value is missing or invalid; the message names the key (``config.a.b``)."""


def get_key(cfg: ml_collections.ConfigDict, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        try:
            node = node[part]
        except (KeyError, AttributeError, TypeError):
            raise ConfigError(f"config.{key}: missing") from None
    return node


def check(cfg: ml_collections.ConfigDict, key: str, ok: Callable[[Any], bool], what: str) -> Any:
    """Raise ``ConfigError('config.<key> = v: <what>')`` unless ``ok(value)``; return the value."""
    v = get_key(cfg, key)
    try:
        good = bool(ok(v))
    except Exception:  # noqa: BLE001  (a predicate that fails on this type means a bad value)
        good = False
    if not good:
        raise ConfigError(f"config.{key} = {v!r}: {what}")
    return v


def check_choice(cfg: ml_collections.ConfigDict, key: str, choices: Iterable[Any]) -> Any:
    choices = tuple(choices)
    return check(cfg, key, lambda v: v in choices, f"must be one of {choices}")


def check_positive(cfg: ml_collections.ConfigDict, key: str, allow_zero: bool = False) -> Any:
    return check(cfg, key, (lambda v: v >= 0) if allow_zero else (lambda v: v > 0),
                 "must be >= 0" if allow_zero else "must be > 0")


_FIELD = re.compile(r"(?:[A-Z]\w*\.)?([a-z_]\w*)(?=[ :]|$)")


@contextlib.contextmanager
def config_errors(cfg: ml_collections.ConfigDict, prefix: str, keys: Mapping[str, str] | None = None
                  ) -> Iterator[None]:
    """Map library errors to config keys: a ``ValueError``/``TypeError`` raised inside whose message starts with a
    field name (``x = value: why``, ``x: why`` or ``Owner.x ...``) becomes ``ConfigError('config.<key> ...')`` with
    key ``keys[x]`` or ``<prefix>.x`` (when ``cfg`` has it; `` = value`` then shows the config's value). Other
    messages get ``config.<prefix>: `` in front. A ``ConfigError`` passes unchanged."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        msg = str(e)
        m = _FIELD.match(msg)
        key = (keys or {}).get(m.group(1), f"{prefix}.{m.group(1)}") if m else None
        try:
            value = get_key(cfg, key) if key else None
        except ConfigError:
            key = None
        if key is None:
            raise ConfigError(f"config.{prefix}: {msg}") from None
        rest = msg[m.end():]
        if rest.startswith(" = ") and ": " in rest:
            rest = f" = {value!r}" + rest[rest.index(": "):]
        raise ConfigError(f"config.{key}{rest}") from None


def base_config() -> ml_collections.ConfigDict:
    """Fields every job config has: seed, mesh, sharding rules, distributed set-up, compilation cache, logging,
    ``overwrite``.

    ``mesh.dcn_data``: the number of TPU slices (multi-slice) or processes the batch is split across over the
    data-centre network (1 = one slice). ``distributed.*_timeout_s``: a process silent for ``heartbeat_timeout_s``
    is declared dead and its peers stop. ``compile_cache``: a folder or ``gs://`` URI for jax's persistent
    compilation cache ('' = jax's default: off unless ``JAX_COMPILATION_CACHE_DIR`` is set).
    """
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = ml_collections.ConfigDict(dict(dcn_data=1, data=-1, fsdp=1, num_devices=0))
    c.sharding = ml_collections.ConfigDict(dict(rules=()))
    c.distributed = ml_collections.ConfigDict(dict(num_processes=1, process_id=0, coordinator_address="",
                                                   heartbeat_timeout_s=20, shutdown_timeout_s=300,
                                                   init_timeout_s=300))
    c.compile_cache = ""
    c.compile_cache_min_compile_s = 1.0  # cache executables that took at least this long to compile
    c.log_every = 50
    c.overwrite = False  # True: delete this stage's outputs in the workdir and start it afresh (workdir.py)
    return c


_GS_URI = re.compile(r"gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/.*)?")


def validate_base(cfg: ml_collections.ConfigDict) -> None:
    for ax in ("data", "fsdp"):
        check(cfg, f"mesh.{ax}", lambda v: isinstance(v, int) and (v == -1 or v > 0), "must be a positive int or -1")
    check(cfg, "mesh.dcn_data", lambda v: isinstance(v, int) and v > 0,
          "must be a positive int (the number of slices; 1 = one slice)")
    check(cfg, "mesh.num_devices", lambda v: isinstance(v, int) and v >= 0, "must be >= 0 (0 = all devices)")
    check(cfg, "distributed.num_processes", lambda v: isinstance(v, int) and v >= 1, "must be >= 1")
    for key in ("heartbeat_timeout_s", "shutdown_timeout_s", "init_timeout_s"):
        check(cfg, f"distributed.{key}", lambda v: isinstance(v, int) and v >= 1, "must be an int >= 1 (seconds)")
    check(cfg, "compile_cache", lambda v: isinstance(v, str) and ("://" not in v or _GS_URI.fullmatch(v)),
          "must be '' (off), a folder, or gs://BUCKET/PATH")
    check(cfg, "compile_cache_min_compile_s", lambda v: isinstance(v, int | float) and v >= 0, "must be >= 0 seconds")

