"""Save / load a fitted diagonal GMM and resumable EM states (Orbax arrays + a JSON beside them).

Format of a fitted GMM (``save_gmm(path, gmm, metadata)``), a directory::

    path/
      arrays/          Orbax StandardCheckpointer (OCDBT) of {"weights": [K] f32, "means": [K, D] f32,
                       "variances": [K, D] f32}   (sklearn: weights_, means_, covariances_; precisions = 1 / variances)
      metadata.json    {"format": "mmfm_jax.gmm.diag", "version": 1, "covariance_type": "diag",
                        "n_components": K, "dim": D, "dtype": "float32", "metadata": {...caller's dict...}}

``metadata.json`` is written last (by process 0, after every process finished its part of the Orbax save), so
its presence marks a complete save. An EM state (``save_em_state``) has the same layout with ``state/`` holding
{"params": {weights, means, variances}, "iteration": int32 [], "lower_bound": float64 [], "converged": bool []}
and ``"format": "mmfm_jax.gmm.em_state"`` (plus iteration / lower_bound / converged in the JSON, for reading).
``save_em_state`` replaces an existing state safely: it writes ``path.tmp`` completely, then renames it over
``path``, so a crash mid-save leaves the previous state intact (``load_em_state`` also looks at ``path.old``,
which exists only for an instant during the swap). On an object store (``gs://``), where a folder rename is a
copy, ``path.tmp`` is copied onto ``path`` with ``metadata.json`` last (after ``path``'s own was removed); until
that copy ends, ``load_em_state`` reads the complete ``path.tmp``. Paths are ``etils.epath`` (local or ``gs://``).
Multi-process: every process calls the save functions (Orbax is
collective); arrays may be sharded or replicated global arrays. Loading needs no knowledge of the saving
topology: targets are built from the stored shapes (replicated on ``mesh``, or ``sharding``, or device 0).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

from mmfm_jax import distributed
from mmfm_jax.gmm.diag import DiagGMM
from mmfm_jax.gmm.em import EMState, make_state
from mmfm_jax.storage import as_path, copy_tree, is_local, read_json, write_json_atomic

GMM_FORMAT = "mmfm_jax.gmm.diag"
STATE_FORMAT = "mmfm_jax.gmm.em_state"
VERSION = 1
_FIELDS = ("weights", "means", "variances")


def _gmm_dict(gmm: DiagGMM) -> dict:
    return {f: getattr(gmm, f) for f in _FIELDS}


def _save(path: str | os.PathLike, sub: str, tree: Any, meta: dict, overwrite: bool) -> None:
    path = as_path(path)
    if overwrite and distributed.is_main_process() and path.exists() and not path.is_dir():
        raise NotADirectoryError(path)
    arrays = path / sub
    meta_path = path / "metadata.json"
    if arrays.exists() and not overwrite:
        raise FileExistsError(f"{arrays} exists (pass overwrite=True to replace it)")
    if distributed.is_main_process() and meta_path.exists():
        meta_path.unlink()  # the save is incomplete until metadata.json is written again
    distributed.sync("gmm_io_pre_save")
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(arrays, tree, force=overwrite)
    ckptr.wait_until_finished()
    ckptr.close()
    distributed.sync("gmm_io_saved")
    if distributed.is_main_process():
        write_json_atomic(meta_path, meta)
    distributed.sync("gmm_io_meta")


def _targets(path: Any, sharding: Any, mesh: Mesh | None) -> Any:
    ckptr = ocp.StandardCheckpointer()
    tree = ckptr.metadata(path).item_metadata.tree
    ckptr.close()
    if mesh is not None and sharding is None:
        sharding = NamedSharding(mesh, PartitionSpec())
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return tree, sharding


def _leaf_target(m: Any, sh: Sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype), sharding=sh)


def _read_meta(path: Any, fmt: str) -> dict:
    meta_path = path / "metadata.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} missing: not a complete {fmt} save")
    meta = read_json(meta_path)
    if meta.get("format") != fmt or int(meta.get("version", -1)) > VERSION:
        raise ValueError(f"{path}: format {meta.get('format')!r} v{meta.get('version')}, expected {fmt!r} "
                         f"v<={VERSION}")
    return meta


def _gmm_shardings(sharding: Any) -> dict:
    if isinstance(sharding, DiagGMM):
        return _gmm_dict(sharding)
    if isinstance(sharding, dict):
        return {f: sharding[f] for f in _FIELDS}
    return {f: sharding for f in _FIELDS}


def save_gmm(path: str | os.PathLike, gmm: DiagGMM, metadata: dict | None = None, *, overwrite: bool = False) -> None:
    """Write ``gmm`` (arrays: numpy or global jax arrays) and ``metadata`` (JSON-able) to the directory ``path``."""
    meta = dict(format=GMM_FORMAT, version=VERSION, covariance_type="diag", n_components=gmm.n_components,
                dim=gmm.dim, dtype=str(np.dtype(gmm.means.dtype)), metadata=dict(metadata or {}))
    _save(path, "arrays", _gmm_dict(gmm), meta, overwrite)


def load_gmm(path: str | os.PathLike, mesh: Mesh | None = None, sharding: Any = None) -> tuple[DiagGMM, dict]:
    """Read a GMM written by :func:`save_gmm`: ``(DiagGMM, metadata)`` (the caller's metadata dict).

    Placement: ``sharding`` (one ``Sharding`` or a DiagGMM / dict of them per field), else replicated on ``mesh``,
    else the first local device.
    """
    path = as_path(path)
    meta = _read_meta(path, GMM_FORMAT)
    arrays = path / "arrays"
    tree, sh = _targets(arrays, sharding, mesh)
    shs = _gmm_shardings(sh)
    target = {f: _leaf_target(tree[f], shs[f]) for f in _FIELDS}
    ckptr = ocp.StandardCheckpointer()
    out = ckptr.restore(arrays, target)
    ckptr.close()
    return DiagGMM(**{f: out[f] for f in _FIELDS}), meta.get("metadata", {})


def save_em_state(path: str | os.PathLike, state: EMState, metadata: dict | None = None) -> None:
    """Write (or safely replace) a resumable EM state (from ``fit(..., on_iteration=...)``) at directory ``path``."""
    tree = {"params": _gmm_dict(state.params), "iteration": np.asarray(state.iteration, np.int32),
            "lower_bound": np.asarray(state.lower_bound, np.float64), "converged": np.asarray(state.converged, bool)}
    meta = dict(format=STATE_FORMAT, version=VERSION, iteration=int(state.iteration),
                lower_bound=float(state.lower_bound), converged=bool(state.converged),
                n_components=state.params.n_components, dim=state.params.dim, metadata=dict(metadata or {}))
    path = as_path(path)
    tmp, old = _beside(path, ".tmp"), _beside(path, ".old")
    if distributed.is_main_process() and tmp.exists():
        if not is_local(path) and _complete(tmp) and not _complete(path):
            _publish_remote(tmp, path)  # a copy that was interrupted: finish it before reusing tmp
        tmp.rmtree()  # left over from an interrupted save
    distributed.sync("gmm_io_em_state_tmp")
    _save(tmp, "state", tree, meta, overwrite=False)
    if distributed.is_main_process():
        if not is_local(path):
            _publish_remote(tmp, path)
            tmp.rmtree()
        else:
            if path.exists():
                if old.exists():
                    shutil.rmtree(old)
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    distributed.sync("gmm_io_em_state_swap")


def _beside(path: Any, suffix: str) -> Any:
    return path.parent / f"{path.name}{suffix}"


def _complete(path: Any) -> bool:
    return (path / "metadata.json").exists()


def _publish_remote(src: Any, dst: Any) -> None:
    """``dst`` := a copy of the complete save ``src`` on an object store: ``dst`` stops being complete first (its
    metadata.json goes), then every object is copied, metadata.json last."""
    if _complete(dst):
        (dst / "metadata.json").unlink()
    if dst.exists():
        dst.rmtree()
    copy_tree(src, dst, last=("metadata.json",))


def _em_state_dirs(path: Any) -> list:
    """Where a complete EM state may be, in order: ``path``, then (``gs://``: an interrupted copy) ``path.tmp``,
    then (local: an interrupted swap) ``path.old``."""
    return [path] + ([_beside(path, ".tmp")] if not is_local(path) else []) + [_beside(path, ".old")]


def has_em_state(path: str | os.PathLike) -> bool:
    """Whether :func:`load_em_state` finds a complete EM state at ``path`` (or a swap's leftover beside it)."""
    return any(_complete(p) for p in _em_state_dirs(as_path(path)))


def read_metadata(path: str | os.PathLike) -> dict:
    """The full ``metadata.json`` of a saved GMM or EM state (format fields + the caller's ``metadata``)."""
    return read_json(as_path(path) / "metadata.json")


def load_em_state(path: str | os.PathLike, mesh: Mesh | None = None, sharding: Any = None) -> EMState:
    """Read an EM state written by :func:`save_em_state`; placement as :func:`load_gmm`. The caller's metadata:
    ``read_metadata(path)["metadata"]``."""
    path = as_path(path)
    path = next((p for p in _em_state_dirs(path) if _complete(p)), path)
    _read_meta(path, STATE_FORMAT)
    sdir = path / "state"
    tree, sh = _targets(sdir, sharding, mesh)
    shs = _gmm_shardings(sh)
    target = {"params": {f: _leaf_target(tree["params"][f], shs[f]) for f in _FIELDS},
              "iteration": np.zeros((), np.int32), "lower_bound": np.zeros((), np.float64),
              "converged": np.zeros((), bool)}
    ckptr = ocp.StandardCheckpointer()
    out = ckptr.restore(sdir, target)
    ckptr.close()
    params = DiagGMM(**{f: out["params"][f] for f in _FIELDS})
    return make_state(params, int(out["iteration"]), float(out["lower_bound"]), bool(out["converged"]))
