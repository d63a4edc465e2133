"""Latent datasets: the sharded ArrayRecord format (writer + reader) and an in-memory source, read with grain.

On-disk layout of a dataset folder::

    manifest.json                 shapes, dtypes, record size, shards (file, count), stats file, complete flag
    stats.npz                     optional normalisation statistics (``var`` [L, C] or [C], optional ``mean``, ``eps``)
    shard-00000.array_record      one record per example (see below)
    shard-00000.json              per-shard sidecar written after the shard is renamed into place (count)

A record is a fixed-size little-endian blob (``record_bytes`` in the manifest)::

    b"MMLR" | uint32 version | int64 image index | int32 label | int32 flip | float32 cls [D] | latent [L, C]

The latent is tokens-last ``[L, C]`` (L = H*W row-major) in the manifest's ``latent_dtype`` (bfloat16 or float32).
Shards are written to a temporary name and renamed when complete; the manifest only lists finished shards and
says ``complete: true`` only after :meth:`LatentShardWriter.finalize`.

Readers (:class:`LatentShards`, :class:`InMemoryLatents`) share one interface: ``len(ds)``, ``ds.fetch(indices)``
-> dict of numpy arrays. :func:`make_iterator` builds the grain pipeline: seeded shuffle (reshuffled every epoch),
repeat, batch, per-process slice of the batch stream, fetch/decode; its iterator is resumable (``get_state`` /
``set_state``, or Orbax via ``grain.checkpoint``). Global batch ``j`` is stream elements ``[j*G, (j+1)*G)`` in order
whatever the number of processes (process ``p`` feeds rows ``[p*G/P, (p+1)*G/P)``), so training never depends on
the process count.

Storage: the folder may be local or ``gs://`` (``etils.epath``). On ``gs://`` each shard is built in a local temp
file and uploaded once under its final name (an object appears whole), then its sidecar; ArrayRecord's reader
opens only local files, so :class:`LatentShards` copies a ``gs://`` dataset's shards into a local cache first
(``MMFM_CACHE_DIR``, default ``<tmp>/mmfm-cache``; a shard is fetched again when its size or time stamp changes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import ml_dtypes
import numpy as np

from mmfm_jax.storage import (
    TEMP_GLOB,
    as_path,
    fsync_dir,
    is_local,
    load_npz,
    local_temp_for,
    publish_file,
    read_json,
    save_npz_atomic,
    write_json_atomic,
)

log = logging.getLogger(__name__)

FORMAT = "mmfm-latents"
VERSION = 1
MAGIC = b"MMLR"
HEADER_BYTES = 24
MANIFEST = "manifest.json"
STATS = "stats.npz"
LATENT_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "bf16": np.dtype(ml_dtypes.bfloat16),
                 "float32": np.dtype(np.float32), "fp32": np.dtype(np.float32)}
FIELDS = ("latent", "cls", "label", "index", "flip")


WRITE_BLOCK = 256  # records encoded at a time by LatentShardWriter.write_shard


def _latent_dtype(name: str) -> np.dtype:
    try:
        return LATENT_DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"latent dtype {name!r}: choose from {sorted(LATENT_DTYPES)}") from None


def _canonical(name: str) -> str:
    return "bfloat16" if _latent_dtype(name) == LATENT_DTYPES["bfloat16"] else "float32"


def record_bytes(latent_shape: Sequence[int], latent_dtype: str, cls_dim: int) -> int:
    return HEADER_BYTES + 4 * int(cls_dim) + int(np.prod(latent_shape)) * _latent_dtype(latent_dtype).itemsize


def shard_name(shard_id: int) -> str:
    return f"shard-{int(shard_id):05d}.array_record"


def encode_records(examples: Mapping[str, np.ndarray], latent_shape: Sequence[int], latent_dtype: str,
                   cls_dim: int) -> list[bytes]:
    """Examples (dict of arrays with leading dim n: latent [n, L, C], cls [n, D], label [n], index [n], flip [n])
    -> n fixed-size records. ``label``/``index``/``flip`` default to -1 / arange / 0."""
    lat = np.asarray(examples["latent"])
    n = lat.shape[0]
    if tuple(lat.shape[1:]) != tuple(latent_shape):
        raise ValueError(f"latent shape {lat.shape[1:]} != dataset latent_shape {tuple(latent_shape)}")
    lat = np.ascontiguousarray(lat.astype(_latent_dtype(latent_dtype))).reshape(n, -1).view(np.uint8)
    cls = np.asarray(examples.get("cls", np.zeros((n, cls_dim), np.float32)), np.float32).reshape(n, -1)
    if cls.shape[1] != cls_dim:
        raise ValueError(f"cls dim {cls.shape[1]} != dataset cls_dim {cls_dim}")
    label = np.asarray(examples.get("label", np.full((n,), -1)), np.int64)
    index = np.asarray(examples.get("index", np.arange(n)), np.int64)
    flip = np.asarray(examples.get("flip", np.zeros((n,))), np.int64)
    for k, v in (("label", label), ("index", index), ("flip", flip)):
        if v.shape != (n,):
            raise ValueError(f"examples[{k!r}] has shape {v.shape}, expected ({n},)")
    head = np.zeros((n, HEADER_BYTES), np.uint8)
    head[:, 0:4] = np.frombuffer(MAGIC, np.uint8)
    head[:, 4:8] = np.array([VERSION], "<u4").view(np.uint8)
    head[:, 8:16] = index.astype("<i8")[:, None].view(np.uint8)
    head[:, 16:20] = label.astype("<i4")[:, None].view(np.uint8)
    head[:, 20:24] = flip.astype("<i4")[:, None].view(np.uint8)
    rec = np.concatenate([head, np.ascontiguousarray(cls.astype("<f4")).view(np.uint8), lat], axis=1)
    return [r.tobytes() for r in rec]


def decode_records(records: Sequence[bytes], latent_shape: Sequence[int], latent_dtype: str,
                   cls_dim: int) -> dict[str, np.ndarray]:
    """Records -> dict of numpy arrays (latent [n, L, C] storage dtype, cls [n, D] fp32, label int32,
    index int64, flip int32)."""
    size = record_bytes(latent_shape, latent_dtype, cls_dim)
    n = len(records)
    buf = np.frombuffer(b"".join(records), np.uint8)
    if buf.size != n * size:
        raise ValueError(f"corrupt latent records: expected {n} x {size} bytes, got {buf.size}")
    buf = buf.reshape(n, size)
    if n and not (buf[:, 0:4] == np.frombuffer(MAGIC, np.uint8)).all():
        raise ValueError("corrupt latent records: bad magic")
    lat_dt = _latent_dtype(latent_dtype)
    c0 = HEADER_BYTES
    c1 = c0 + 4 * cls_dim
    return dict(
        latent=buf[:, c1:].copy().view(lat_dt).reshape((n, *latent_shape)),
        cls=buf[:, c0:c1].copy().view("<f4").astype(np.float32),
        label=buf[:, 16:20].copy().view("<i4").reshape(n).astype(np.int32),
        index=buf[:, 8:16].copy().view("<i8").reshape(n).astype(np.int64),
        flip=buf[:, 20:24].copy().view("<i4").reshape(n).astype(np.int32),
    )


class LatentShardWriter:
    """Writes a latent dataset folder shard by shard (several processes may write disjoint shard ids).

    ``write_shard(shard_id, examples)`` writes one ArrayRecord shard atomically (temp name, then rename, then a
    sidecar with its count) and refreshes the manifest (finished shards only, ``complete: false``).
    ``finished_shards()`` lists shard ids already on disk (resume: skip them). ``finalize(stats)`` writes
    ``stats.npz`` and the manifest with ``complete: true``; call it once, after every shard is written.
    ``cleanup_stale()`` removes temp files a killed run left behind (call it on one process, before any writes).
    Data files are fsynced before they are renamed into place, so a finished shard survives a power loss too.
    """

    def __init__(self, directory: str | os.PathLike, latent_shape: Sequence[int], latent_dtype: str = "bfloat16",
                 cls_dim: int = 0, grid: Sequence[int] | None = None, normalized: bool = True,
                 num_shards: int | None = None, extra: Mapping[str, Any] | None = None,
                 update_manifest: bool = True):
        self.dir = as_path(directory)
        self.latent_shape = tuple(int(s) for s in latent_shape)
        if len(self.latent_shape) != 2:
            raise ValueError(f"latent_shape must be (L, C), got {self.latent_shape}")
        self.latent_dtype = _canonical(latent_dtype)
        self.cls_dim = int(cls_dim)
        self.grid = None if grid is None else [int(g) for g in grid]
        self.normalized = bool(normalized)
        self.num_shards = num_shards
        self.extra = dict(extra or {})
        self.update_manifest = update_manifest
        self.dir.mkdir(parents=True, exist_ok=True)

    def cleanup_stale(self) -> list[str]:
        """Delete leftover temp files of a killed run (``storage.TEMP_GLOB``: the hidden temps of ``write_shard`` and
        of the atomic JSON/npz writers, also those a job writes beside the shards). Returns the removed names. Call
        it on one process only and before any process writes (another process's in-flight temp looks the same)."""
        removed = []
        if not is_local(self.dir):
            return removed  # nothing is written to an object store under a temporary name
        for p in self.dir.glob(TEMP_GLOB):
            if p.is_file() or p.is_symlink():
                p.unlink(missing_ok=True)
                removed.append(p.name)
        return sorted(removed)

    def finished_shards(self) -> list[int]:
        """Shard ids whose data file and sidecar are both in place."""
        out = []
        for p in self.dir.glob("shard-*.json"):
            sid = int(p.stem.split("-")[1])
            if (self.dir / shard_name(sid)).exists():
                out.append(sid)
        return sorted(out)

    def write_shard(self, shard_id: int, examples: Mapping[str, np.ndarray],
                    info: Mapping[str, Any] | None = None) -> int:
        """Write ``examples`` (dict of arrays, leading dim n; see :func:`encode_records`) as shard ``shard_id``;
        ``info`` (JSON-able, e.g. the shard's bad-image counts) goes into its sidecar.

        Returns n. Rewriting an existing shard id replaces it atomically.
        """
        from array_record.python.array_record_module import ArrayRecordWriter

        n = len(np.asarray(examples["latent"]))
        final = self.dir / shard_name(shard_id)
        tmp = local_temp_for(final, f".tmp-{os.getpid()}")
        w = ArrayRecordWriter(tmp, "group_size:1")
        for s in range(0, max(n, 1), WRITE_BLOCK):  # encoded block by block: bounded extra host memory
            block = {k: np.asarray(v)[s:s + WRITE_BLOCK] for k, v in examples.items()}
            for r in encode_records(block, self.latent_shape, self.latent_dtype, self.cls_dim):
                w.write(r)
        w.close()
        publish_file(tmp, final)
        fsync_dir(self.dir)
        idx = np.asarray(examples.get("index", np.arange(n)))
        meta = dict(id=int(shard_id), file=final.name, count=n,
                    index_min=int(idx.min()) if n else None, index_max=int(idx.max()) if n else None,
                    **dict(info or {}))
        write_json_atomic(self.dir / f"shard-{int(shard_id):05d}.json", meta)
        if self.update_manifest:
            self._write_manifest(complete=False)
        return n

    def _shards(self) -> list[dict[str, Any]]:
        return [read_json(self.dir / f"shard-{sid:05d}.json") for sid in self.finished_shards()]

    def _write_manifest(self, complete: bool, stats_keys: Mapping[str, Any] | None = None) -> dict[str, Any]:
        shards = self._shards()
        has_stats = (self.dir / STATS).exists()
        m = dict(format=FORMAT, version=VERSION, latent_shape=list(self.latent_shape), latent_dtype=self.latent_dtype,
                 grid=self.grid, cls_dim=self.cls_dim,
                 record_bytes=record_bytes(self.latent_shape, self.latent_dtype, self.cls_dim),
                 normalized=self.normalized, stats_file=STATS if has_stats else None, stats=dict(stats_keys or {}),
                 num_shards=self.num_shards, shards=shards, num_examples=int(sum(s["count"] for s in shards)),
                 complete=bool(complete), extra=self.extra)
        write_json_atomic(self.dir / MANIFEST, m)
        return m

    def finalize(self, stats: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
        """Write ``stats.npz`` (e.g. ``var`` [L, C], optional ``mean``, ``eps``) and the final manifest."""
        keys = {}
        if stats:
            save_npz_atomic(self.dir / STATS, **{k: np.asarray(v) for k, v in stats.items()})
            fsync_dir(self.dir)
            keys = {k: dict(shape=list(np.shape(v)), dtype=str(np.asarray(v).dtype)) for k, v in stats.items()}
        if self.num_shards is not None and len(self.finished_shards()) != self.num_shards:
            raise RuntimeError(f"finalize: {len(self.finished_shards())} of {self.num_shards} shards are written")
        return self._write_manifest(complete=True, stats_keys=keys)


def load_stats(directory: str | os.PathLike) -> dict[str, np.ndarray] | None:
    p = as_path(directory) / STATS
    if not p.exists():
        return None
    return load_npz(p)


def _cached_shards(directory: Any, files: Sequence[str]) -> list[str]:
    """Local copies of the shards ``files`` of the remote dataset ``directory`` (see the module docstring)."""
    root = os.path.join(os.environ.get("MMFM_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "mmfm-cache"),
                        hashlib.sha1(os.fspath(directory).encode()).hexdigest()[:16])
    os.makedirs(root, exist_ok=True)
    out, fetched = [], 0
    for name in files:
        src = directory / name
        st = src.stat()
        local = os.path.join(root, f"{name}.{int(st.length)}.{int(st.mtime)}")
        if not os.path.exists(local):
            fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{name}.", suffix=".tmp")
            os.close(fd)
            try:
                src.copy(tmp, overwrite=True)
                os.replace(tmp, local)  # several processes of one host may fetch the same shard
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            fetched += 1
        out.append(local)
    if fetched:
        log.info("latent dataset %s: copied %d of %d shards to the local cache %s", directory, fetched, len(files),
                 root)
    return out


def normalize_latents(latent: np.ndarray, stats: Mapping[str, np.ndarray]) -> np.ndarray:
    """``(x - mean) / sqrt(var + eps)`` in fp32 (mean optional, eps default 1e-5 as in RAE)."""
    x = np.asarray(latent, np.float32)
    if "mean" in stats:
        x = x - np.asarray(stats["mean"], np.float32)
    eps = float(stats["eps"]) if "eps" in stats else 1e-5
    return x / np.sqrt(np.asarray(stats["var"], np.float32) + eps)


class LatentShards:
    """Reader of a latent dataset folder: ``len``, ``fetch(indices) -> dict`` (batched ArrayRecord reads)."""

    def __init__(self, directory: str | os.PathLike, allow_incomplete: bool = False, normalize: bool = False):
        self.dir = as_path(directory)
        mpath = self.dir / MANIFEST
        if not mpath.exists():
            raise FileNotFoundError(f"latent dataset {self.dir}: no {MANIFEST}")
        self.manifest = read_json(mpath)
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"latent dataset {self.dir}: format {self.manifest.get('format')!r} != {FORMAT!r}")
        if not self.manifest["complete"] and not allow_incomplete:
            raise ValueError(f"latent dataset {self.dir}: manifest is not complete (writer not finalized)")
        if not self.manifest["shards"]:
            raise ValueError(f"latent dataset {self.dir}: no finished shards")
        self.latent_shape = tuple(self.manifest["latent_shape"])
        self.latent_dtype = self.manifest["latent_dtype"]
        self.cls_dim = int(self.manifest["cls_dim"])
        paths = []
        for s in self.manifest["shards"]:
            p = self.dir / s["file"]
            if not p.exists():
                raise FileNotFoundError(f"latent dataset {self.dir}: shard {s['file']} listed but missing")
            paths.append(os.fspath(p))
        if not is_local(self.dir):
            paths = _cached_shards(self.dir, [s["file"] for s in self.manifest["shards"]])
        self.source = grain.sources.ArrayRecordDataSource(paths)
        if len(self.source) != self.manifest["num_examples"]:
            raise ValueError(f"latent dataset {self.dir}: {len(self.source)} records on disk, manifest says "
                             f"{self.manifest['num_examples']}")
        self.stats = load_stats(self.dir)
        self.normalize = bool(normalize) and not self.manifest.get("normalized", True)
        if self.normalize and (self.stats is None or "var" not in self.stats):
            raise ValueError(f"latent dataset {self.dir}: normalize requested but stats.npz has no 'var'")

    def __len__(self) -> int:
        return len(self.source)

    def fetch(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        idx = [int(i) for i in np.asarray(indices).reshape(-1)]
        out = decode_records(self.source.__getitems__(idx), self.latent_shape, self.latent_dtype, self.cls_dim)
        if self.normalize:
            out["latent"] = normalize_latents(out["latent"], self.stats)
        return out


class InMemoryLatents:
    """The same interface over in-memory arrays: ``latent`` [N, L, C] (required), ``cls`` [N, D], ``label`` [N],
    ``index`` [N] (default arange), ``flip`` [N] (default 0)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        if "latent" not in arrays:
            raise ValueError("InMemoryLatents: 'latent' is required")
        lat = np.asarray(arrays["latent"])
        n = lat.shape[0]
        self.arrays = {"latent": lat}
        self.arrays["cls"] = np.asarray(arrays.get("cls", np.zeros((n, 0), np.float32)), np.float32)
        self.arrays["label"] = np.asarray(arrays.get("label", np.full((n,), -1)), np.int32)
        self.arrays["index"] = np.asarray(arrays.get("index", np.arange(n)), np.int64)
        self.arrays["flip"] = np.asarray(arrays.get("flip", np.zeros((n,))), np.int32)
        for k, v in self.arrays.items():
            if v.shape[0] != n:
                raise ValueError(f"InMemoryLatents: {k!r} has {v.shape[0]} rows, latent has {n}")
        self.latent_shape = tuple(lat.shape[1:])
        self.cls_dim = int(self.arrays["cls"].shape[1])
        self.latent_dtype = str(lat.dtype)

    def __len__(self) -> int:
        return int(self.arrays["latent"].shape[0])

    def fetch(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        idx = np.asarray(indices, np.int64).reshape(-1)
        return {k: v[idx] for k, v in self.arrays.items()}


def _index_batch(xs: Sequence[Any]) -> np.ndarray:
    return np.asarray(xs, np.int64)


def make_dataset(ds: LatentShards | InMemoryLatents, global_batch_size: int, seed: int, shuffle: bool = True,
                 num_epochs: int | None = None, process_index: int | None = None,
                 process_count: int | None = None) -> grain.MapDataset:
    """The grain ``MapDataset`` of this process's local batches (dicts of numpy arrays).

    Stream: ``range(N)`` -> seeded shuffle -> repeat (reshuffled each epoch; ``None`` = forever) -> batches of
    ``global_batch_size / process_count`` indices -> every ``process_count``-th batch from ``process_index`` ->
    ``ds.fetch``. With a finite ``num_epochs`` the stream is cut to whole global batches.
    """
    import jax

    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    if global_batch_size % pc:
        raise ValueError(f"global batch {global_batch_size} is not divisible by {pc} processes")
    local = global_batch_size // pc
    if len(ds) < global_batch_size:
        raise ValueError(f"dataset has {len(ds)} examples, fewer than one global batch ({global_batch_size})")
    m = grain.MapDataset.range(len(ds))
    if shuffle:
        m = m.seed(int(seed)).shuffle()
    m = m.repeat(num_epochs)
    m = m.batch(local, drop_remainder=True, batch_fn=_index_batch)
    if num_epochs is not None:
        m = m[: len(m) // pc * pc]
    m = m[pi::pc]
    return m.map(ds.fetch)


def make_iterator(ds: LatentShards | InMemoryLatents, global_batch_size: int, seed: int, shuffle: bool = True,
                  num_epochs: int | None = None, num_threads: int = 2, prefetch: int = 2,
                  process_index: int | None = None, process_count: int | None = None) -> grain.DatasetIterator:
    """A resumable iterator of local batches (see :func:`make_dataset`); ``get_state()`` / ``set_state()``."""
    m = make_dataset(ds, global_batch_size, seed, shuffle, num_epochs, process_index, process_count)
    opts = grain.ReadOptions(num_threads=int(num_threads), prefetch_buffer_size=int(prefetch))
    return iter(m.to_iter_dataset(opts))


def iterator_state_bytes(it: grain.DatasetIterator) -> bytes:
    """The iterator's state as JSON bytes (a snapshot safe to hand to an async checkpoint)."""
    return json.dumps(it.get_state(), indent=4).encode()
