"""Small shared utilities: atomic JSON files, a console + TensorBoard metric writer, progress bars, dtypes."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("mmfm_jax")

DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
          "float16": jnp.float16, "float64": jnp.float64}


def dtype_from_name(name: str, key: str = "dtype") -> Any:
    """``'bf16' | 'bfloat16' | 'fp32' | 'float32' | ...`` -> jnp dtype; errors name the config ``key``."""
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"config.{key}: unknown dtype {name!r} (choose from {sorted(DTYPES)})") from None


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic, jax.Array)) and np.ndim(x) == 0:
        x = np.asarray(x).item()
    if isinstance(x, np.ndarray | jax.Array):
        return np.asarray(x).tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a finished (closed) file's data to disk: call before renaming it into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist renames in a folder (best effort: some file systems refuse to fsync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_beside(path: Path, suffix: str) -> str:
    """A new hidden temp file ``.<name>.<random><suffix>`` in ``path``'s folder (TEMP_GLOB matches it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    return tmp


TEMP_GLOB = ".*.tmp*"  # what the atomic writers leave behind if killed before the rename


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to a temp file in the same folder, flush it to disk, then rename: readers never see half a file,
    and a file that marks work as finished survives a crash or power loss."""
    path = Path(path)
    tmp = _temp_beside(path, ".tmp")
    with open(tmp, "w") as f:
        json.dump(_jsonable(obj), f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_npz_atomic(path: str | os.PathLike, **arrays: Any) -> None:
    """``np.savez`` to a temp file in the same folder, fsync, rename: ``path`` is either absent or complete."""
    path = Path(path)
    tmp = _temp_beside(path, ".tmp.npz")
    np.savez(tmp, **arrays)
    fsync_file(tmp)
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


class MetricWriter:
    """Scalars to the console (``logging``) and TensorBoard event files (tensorboardX), on process 0 only."""

    def __init__(self, logdir: str | os.PathLike | None, enabled: bool | None = None):
        self.enabled = (jax.process_index() == 0) if enabled is None else enabled
        self._tb = None
        if self.enabled and logdir is not None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(logdir))

    def scalars(self, step: int, values: Mapping[str, Any], console: bool = True) -> None:
        if not self.enabled:
            return
        vals = {k: float(np.asarray(v)) for k, v in values.items()}
        if self._tb is not None:
            for k, v in vals.items():
                self._tb.add_scalar(k, v, int(step))
        if console:
            log.info("step %d: %s", step, ", ".join(f"{k}={v:.5g}" for k, v in vals.items()))

    def image(self, tag: str, step: int, image_hwc_uint8: np.ndarray) -> None:
        if self._tb is not None:
            self._tb.add_image(tag, np.asarray(image_hwc_uint8), int(step), dataformats="HWC")

    def text(self, tag: str, step: int, text: str) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, text, int(step))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", initial: int = 0,
             disable: bool | None = None, every_s: float | None = None):
    """Progress of a loop on process 0 (nothing elsewhere, nor when ``MMFM_NO_PROGRESS=1``).

    On a terminal: a tqdm bar, with log lines printed above it (``logging_redirect_tqdm``) instead of through it.
    Otherwise (stderr piped to a file, a cluster log): one plain log line every ``every_s`` seconds (default
    ``MMFM_PROGRESS_EVERY_S`` or 60) and one at the end, with the rate and the ETA (:class:`LogProgress`).
    Either way: use as an iterable wrapper, or call ``update(n)`` / ``set_postfix(...)`` / ``close()``."""
    if disable is None:
        disable = jax.process_index() != 0 or os.environ.get("MMFM_NO_PROGRESS") == "1"
    if not disable and not _stderr_is_tty():
        every = float(os.environ.get("MMFM_PROGRESS_EVERY_S", 60)) if every_s is None else every_s
        return LogProgress(iterable, total=total, desc=desc, initial=initial, every_s=every)
    from tqdm.auto import tqdm

    class _Bar(tqdm):  # log lines go through tqdm.write while the bar is open
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self._redirect = None
            if not self.disable:
                from tqdm.contrib.logging import logging_redirect_tqdm

                self._redirect = logging_redirect_tqdm(tqdm_class=tqdm)
                self._redirect.__enter__()

        def close(self):
            super().close()
            if getattr(self, "_redirect", None) is not None:
                self._redirect.__exit__(None, None, None)
                self._redirect = None

    return _Bar(iterable, total=total, desc=desc, initial=initial, disable=disable, dynamic_ncols=True, leave=False)


def _stderr_is_tty() -> bool:
    try:
        return os.isatty(2)
    except (OSError, ValueError):
        return False


class LogProgress:
    """A progress "bar" for logs: ``desc: n/total (p%), r it/s, ETA h:mm:ss [postfix]`` every ``every_s``
    seconds and when closed. Hand-rolled because tqdm's file output rewrites a line per update (a log piped to a
    file grows by thousands of bar updates), and clu's ReportProgress needs TensorFlow."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", initial: int = 0,
                 every_s: float = 60.0):
        import time

        self._time = time.perf_counter
        self.iterable, self.desc, self.every_s = iterable, desc or "progress", float(every_s)
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.n, self._n0 = total, initial, initial
        self._t0 = self._last = self._time()
        self._postfix = ""
        self._closed = False
        self._logged_n = initial

    def __iter__(self):
        for x in self.iterable or ():
            yield x
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, **kw: Any) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def line(self) -> str:
        dt = max(self._time() - self._t0, 1e-9)
        rate = (self.n - self._n0) / dt
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total} ({100 * self.n / max(self.total, 1):.0f}%)"
                                             if self.total else ""), f"{rate:.3g} it/s"]
        if self.total and rate > 0 and self.n < self.total:
            eta = int((self.total - self.n) / rate)
            parts.append(f"ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")
        elif self.n >= (self.total or float("inf")) or self._closed:
            parts.append(f"{int(dt) // 60}:{int(dt) % 60:02d} elapsed")
        return ", ".join(parts) + (f" [{self._postfix}]" if self._postfix else "")

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self._time()
        if now - self._last >= self.every_s:
            self._last, self._logged_n = now, self.n
            log.info("%s", self.line())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n > self._logged_n:
                log.info("%s", self.line())


# XLA options that ``'auto'`` adds per backend. GPU: cuBLAS for every GEMM instead of XLA's Triton GEMM fusions,
# measured on an H100 (DiTDH-XL bf16 train step: +7% to +14% throughput; README "Benchmarks").
AUTO_COMPILER_OPTIONS: dict[str, dict[str, Any]] = {"gpu": {"xla_gpu_enable_triton_gemm": False}}


def parse_compiler_options(spec: str, backend: str | None = None) -> dict[str, Any]:
    """``'auto,xla_backend_optimization_level=0,xla_foo=true'`` -> dict for ``jax.jit(compiler_options=...)``.

    The item ``auto`` expands to ``AUTO_COMPILER_OPTIONS[backend]`` (``backend``: default ``jax.default_backend()``;
    nothing on CPU/TPU); explicit ``name=value`` items override it."""
    out: dict[str, Any] = {}
    items = [x.strip() for x in (spec or "").split(",") if x.strip()]
    explicit = {x.partition("=")[0].strip() for x in items if x != "auto"}
    for item in items:
        if item == "auto":
            auto = AUTO_COMPILER_OPTIONS.get(backend or jax.default_backend(), {})
            out.update({k: v for k, v in auto.items() if k not in explicit})
            continue
        k, sep, v = item.partition("=")
        if not sep:
            raise ValueError(f"compiler option {item!r}: expected name=value or 'auto'")
        low = v.strip().lower()
        out[k.strip()] = True if low == "true" else False if low == "false" else int(v) if v.strip().lstrip(
            "-").isdigit() else v.strip()
    return out
