"""Storage on any store: every data location is an ``etils.epath.Path`` (a local path or a ``gs://`` URI).

Atomic writers (readers never see half a file; a local file that marks work as finished survives a crash),
JSON/npz readers, local copies for libraries that only open local paths, recursive copies and listings, and a
fail-fast check that a bucket exists and can be reached.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

from mmfm_jax.config_utils import ConfigError


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


def as_path(path: str | os.PathLike) -> epath.Path:
    """``epath.Path`` of a local path (made absolute: Orbax needs that) or a URI (``gs://b/x``, left as is: never
    ``.absolute()`` a URI, which would turn it into a local ``gs:/b/x``)."""
    s = os.fspath(path)
    return epath.Path(s if "://" in s else os.path.abspath(s))


def is_local(path: str | os.PathLike) -> bool:
    """True for a path on a local (POSIX) file system, False for an object-store URI such as ``gs://``."""
    return "://" not in os.fspath(path)


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


FILE_MODE = 0o666 & ~_umask()  # what ``open(path, 'w')`` gives (0644 under the usual umask 022)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a finished (closed) local file's data to disk: call before renaming it into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist renames in a local folder (best effort: some file systems refuse to fsync a directory; a no-op on an
    object store, which has no folders)."""
    if not is_local(path):
        return
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


def _temp_beside(path: epath.Path, suffix: str) -> str:
    """A new hidden temp file ``.<name>.<random><suffix>`` in local ``path``'s folder (TEMP_GLOB matches it), with
    the mode a plain ``open`` would give (``mkstemp`` makes 0600 files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    return tmp


TEMP_GLOB = ".*.tmp*"  # what the atomic writers leave behind if killed before the rename (local disks only)


def publish_file(local_file: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move a finished local file to ``path`` atomically: on a local disk fsync + rename (``local_file`` must be on
    the same file system, e.g. from :func:`_temp_beside`); on an object store one upload to the final name (an
    object appears whole or not at all), then ``local_file`` is removed."""
    path = as_path(path)
    if is_local(path):
        fsync_file(local_file)
        os.replace(local_file, path)
        return
    try:
        epath.Path(os.fspath(local_file)).copy(path, overwrite=True)
    finally:
        os.unlink(local_file)


def local_temp_for(path: str | os.PathLike, suffix: str = ".tmp") -> str:
    """A local temp file to build ``path`` in before :func:`publish_file`: beside it on a local disk, in the system
    temp folder for an object store."""
    path = as_path(path)
    if is_local(path):
        return _temp_beside(path, suffix)
    fd, tmp = tempfile.mkstemp(prefix=f"mmfm-{path.name}.", suffix=suffix)
    os.close(fd)
    return tmp


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Readers never see half a file, and a file that marks work as finished survives a crash or power loss: on a
    local disk a temp file in the same folder, fsync, rename; on an object store one upload of the final name."""
    path = as_path(path)
    if not is_local(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return
    tmp = _temp_beside(path, ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """JSON (indent 2) written with :func:`write_bytes_atomic`."""
    write_bytes_atomic(path, (json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n").encode())


def save_npz_atomic(path: str | os.PathLike, **arrays: Any) -> None:
    """``np.savez`` to a local temp file, then :func:`publish_file`: ``path`` is either absent or complete."""
    tmp = local_temp_for(path, ".tmp.npz")
    try:
        np.savez(tmp, **arrays)
    except BaseException:
        os.unlink(tmp)
        raise
    publish_file(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(as_path(path).read_text())


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` (local or ``gs://``) as a dict (no pickles)."""
    with as_path(path).open("rb") as f, np.load(io.BytesIO(f.read()), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@contextlib.contextmanager
def local_copy(path: str | os.PathLike) -> Iterator[str]:
    """A local file or folder name for libraries that only open local paths (torch, safetensors, hub folders):
    ``path`` itself when local, else a copy in a temp folder removed on exit."""
    path = as_path(path)
    if is_local(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory(prefix="mmfm-copy-") as d:
        dst = os.path.join(d, path.name)
        copy_tree(path, dst)
        yield dst


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike, last: tuple[str, ...] = ()) -> None:
    """Copy a file or a folder tree between any two stores; files named in ``last`` (e.g. a ``metadata.json`` that
    marks a save complete) are copied after every other file of their folder."""
    src, dst = epath.Path(os.fspath(src)), epath.Path(os.fspath(dst))
    if not src.is_dir():
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.copy(dst, overwrite=True)
        return
    dst.mkdir(parents=True, exist_ok=True)
    for child in sorted(src.iterdir(), key=lambda p: (p.name in last, p.name)):
        copy_tree(child, dst / child.name, last)


def list_files(folder: str | os.PathLike) -> list[epath.Path]:
    """Every file under ``folder`` (recursive, sorted). On an object store one recursive listing (epath refuses
    ``rglob`` on ``gs://``)."""
    folder = as_path(folder)
    if is_local(folder):
        return sorted(epath.Path(os.path.join(d, f)) for d, _, names in os.walk(folder) for f in names)
    import fsspec

    fs, base = fsspec.core.url_to_fs(os.fspath(folder))
    base = base.rstrip("/")
    return sorted(folder / f[len(base) + 1:] for f in fs.find(base))


def check_store(path: str | os.PathLike, what: str) -> None:
    """Fail fast, in one line naming the URI, when ``path`` is on an object store whose bucket does not exist or
    cannot be reached (no credentials, access denied). Local paths pass."""
    s = os.fspath(path)
    if is_local(s):
        return
    scheme, _, rest = s.partition("://")
    bucket = f"{scheme}://{rest.split('/', 1)[0]}"
    try:
        ok = epath.Path(bucket).exists()
        err = "does not exist"
    except Exception as e:  # noqa: BLE001  (denied, no credentials, unreachable: all reported the same way)
        ok, err = False, f"cannot be reached ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
    if not ok:
        raise StorageError(f"{what} {s}: bucket {bucket} {err} (or access is denied)")


class StorageError(ConfigError):
    """A storage location given in the config or on the command line cannot be used (missing bucket, no access)."""
