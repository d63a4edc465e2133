"""The MM-FM source: a [CLS] GMM plus a spatial table, with mode coupling (training) and prior draws (sampling).

``ModeSource(gmm, means [K', L, C], variances [K'] | [K', L, C])``: ``gmm`` is the diagonal [CLS] GMM (K components,
its ``weights`` are the mixture weights); row k of the table is the mean latent of mode k (tokens-last) and its
variance: one scalar per mode as in the official spherical patch-space GMM, or (toy) one per dimension.
``K' >= K``: the table may carry padding rows (so it splits evenly over devices); modes are only ever drawn among
the first K, so padded rows are never read.

A source draw is ``z0 = mean_k + sqrt(var_k) * eps``, eps ~ N(0, I), computed in fp32 (cast to ``dtype`` at the end).
Flow convention: ``x_t = (1 - t) x_data + t z0`` (t = 1 source), target ``z0 - x_data``.

Randomness is per example: every function takes ``keys`` [B] (one PRNG key per example, e.g.
``fold_in(step_key, global_index)``); the mode uses ``fold_in(key, 0)`` and eps ``fold_in(key, 1)``, so the result
never depends on the batch split or device count, and the three source kinds share eps for the same keys.

When the table is sharded along K over the mesh (logical axis ``modes``, see :func:`shard_source`),
:func:`draw_from_modes_sharded` gathers rows with a ``shard_map`` (all-gather the indices, local masked gather,
``psum_scatter`` onto the batch shards) so the full table never sits on one device.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmfm_jax import distributed, parallel
from mmfm_jax.gmm.diag import DiagGMM, log_joint

log = logging.getLogger(__name__)

SOURCE_KINDS = ("gaussian", "gmm_indep", "gmm_mode")
ASSIGNMENTS = ("soft", "hard")
_MODE_STREAM, _EPS_STREAM = 0, 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModeSource:
    gmm: DiagGMM  # [CLS] GMM: weights [K], means [K, D], variances [K, D]
    means: jax.Array  # [K', L, C] spatial table (K' >= K: padding rows are never drawn)
    variances: jax.Array  # [K'] (scalar per mode, official) or [K', L, C] (per dimension, toy)

    @property
    def n_modes(self) -> int:
        return int(self.gmm.weights.shape[0])

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.means.shape[1:])


def example_keys(step_key: jax.Array, indices: jax.Array) -> jax.Array:
    """Per-example keys ``fold_in(step_key, global_index)``: indices [B] int -> keys [B]."""
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.asarray(indices, jnp.uint32))


def _stream(keys: jax.Array, s: int) -> jax.Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, s))(keys)


def _normal(keys: jax.Array, event_shape: tuple[int, ...]) -> jax.Array:
    """eps [B, *event] fp32, one stream per example key (already on the eps stream)."""
    return jax.vmap(lambda k: jax.random.normal(k, event_shape, jnp.float32))(keys)


def _categorical(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """k [B] int32 from logits [B, K] (or [K] shared), one draw per key."""
    if logits.ndim == 1:
        return jax.vmap(lambda k: jax.random.categorical(k, logits))(keys).astype(jnp.int32)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------------------
# Modes


def posterior_modes(gmm: DiagGMM, cls: jax.Array, keys: jax.Array, assignment: str = "soft",
                    temperature: float = 1.0) -> jax.Array:
    """Mode coupling: k ~ p(k | cls) (``'soft'``) or argmax (``'hard'``), exact diagonal-GMM posterior in fp32.

    cls [B, D], keys [B] (used as given: the caller picks the stream) -> k [B] int32. ``temperature`` divides the
    log joint before the softmax (1 = the exact posterior, the reference's setting).
    """
    logits = log_joint(gmm, cls)
    if assignment == "hard":
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if assignment != "soft":
        raise ValueError(f"posterior_modes: assignment must be one of {ASSIGNMENTS}, got {assignment!r}")
    return _categorical(keys, logits / temperature)


def prior_modes(weights: jax.Array, keys: jax.Array) -> jax.Array:
    """k ~ Categorical(weights), one per key: weights [K], keys [B] -> [B] int32 (independent coupling/sampling)."""
    return _categorical(keys, jnp.log(jnp.asarray(weights, jnp.float32)))


# ----------------------------------------------------------------------------------------------------------------
# Draws


def _combine(mean: jax.Array, var: jax.Array, eps: jax.Array, dtype: Any) -> jax.Array:
    var = var.astype(jnp.float32)
    var = var.reshape(var.shape + (1,) * (eps.ndim - var.ndim))
    return (mean.astype(jnp.float32) + jnp.sqrt(var) * eps).astype(dtype)


def draw_from_modes(source: ModeSource, k: jax.Array, keys: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """``z0 = mean_k + sqrt(var_k) * eps`` -> [B, L, C]; k [B] int, keys [B] (eps uses ``fold_in(key, 1)``).

    Plain gather: with a K-sharded table use :func:`draw_from_modes_sharded` instead.
    """
    eps = _normal(_stream(keys, _EPS_STREAM), source.event_shape)
    return _combine(jnp.take(source.means, k, axis=0), jnp.take(source.variances, k, axis=0), eps, dtype)


def _mode_axes(mesh: Mesh) -> tuple[str, ...]:
    spec = parallel.logical_to_mesh_spec(("modes",), mesh=mesh)[0]
    return () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
    spec = parallel.logical_to_mesh_spec(("batch",), mesh=mesh)[0]
    return () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)


def _n_shards(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in _mode_axes(mesh)]))


def draw_from_modes_sharded(source: ModeSource, k: jax.Array, keys: jax.Array, mesh: Mesh,
                            dtype: Any = jnp.float32) -> jax.Array:
    """:func:`draw_from_modes` for a table sharded along K (``modes``) over the mesh; same values.

    In a ``shard_map``: all-gather k (B ints), each device gathers the rows it owns (others zero), then
    ``psum_scatter`` over the batch axes so each device receives only its batch shard of [B, L, C]; eps is drawn
    locally from the example keys. Needs the ``modes`` and ``batch`` rules to map to the same mesh axes and B to be
    a multiple of the number of batch shards. Peak extra memory per device: one [B, L, C] buffer.
    """
    maxes, baxes = _mode_axes(mesh), _batch_axes(mesh)
    if not maxes:
        return draw_from_modes(source, k, keys, dtype)
    if maxes != baxes:
        raise ValueError(f"draw_from_modes_sharded: 'modes' -> {maxes} and 'batch' -> {baxes} must be the same mesh "
                         "axes")
    n = _n_shards(mesh)
    kpad, b = source.means.shape[0], k.shape[0]
    if kpad % n or b % n:
        raise ValueError(f"draw_from_modes_sharded: table rows {kpad} and batch {b} must be multiples of {n} "
                         "(use shard_source to pad the table)")
    ax = maxes if len(maxes) > 1 else maxes[0]
    event = source.event_shape
    var_spec = PartitionSpec(ax, *([None] * (source.variances.ndim - 1)))

    def local(means, variances, kk, kk_keys):
        rows = means.shape[0]
        k_all = jax.lax.all_gather(kk, ax, tiled=True)  # [B]
        idx = k_all - jax.lax.axis_index(ax) * rows
        mask = (idx >= 0) & (idx < rows)
        idx = jnp.clip(idx, 0, rows - 1)
        m = jnp.where(mask[:, None, None], jnp.take(means, idx, axis=0).astype(jnp.float32), 0.0)
        v = jnp.take(variances, idx, axis=0).astype(jnp.float32)
        v = jnp.where(mask.reshape(mask.shape + (1,) * (v.ndim - 1)), v, 0.0)
        m = jax.lax.psum_scatter(m, ax, scatter_dimension=0, tiled=True)  # [B / n, L, C]
        v = jax.lax.psum_scatter(v, ax, scatter_dimension=0, tiled=True)
        eps = _normal(_stream(kk_keys, _EPS_STREAM), event)
        return _combine(m, v, eps, dtype)

    fn = jax.shard_map(local, mesh=mesh,
                       in_specs=(PartitionSpec(ax, None, None), var_spec, PartitionSpec(ax), PartitionSpec(ax)),
                       out_specs=PartitionSpec(ax, None, None), check_vma=False)
    return fn(source.means, source.variances, k.astype(jnp.int32), keys)


def draw_modes(source: ModeSource, k: jax.Array, keys: jax.Array, mesh: Mesh | None = None,
               dtype: Any = jnp.float32) -> jax.Array:
    """``z0 = mean_k + sqrt(var_k) eps`` [B, *event] for modes ``k`` [B]: the K-sharded gather when ``mesh`` spans
    more than one table shard, else the plain gather."""
    if mesh is not None and _n_shards(mesh) > 1:
        return draw_from_modes_sharded(source, k, keys, mesh, dtype)
    return draw_from_modes(source, k, keys, dtype)


# ----------------------------------------------------------------------------------------------------------------
# Training-time coupling and sampling-time prior


def sample_source(kind: str, source: ModeSource | None, cls: jax.Array | None, keys: jax.Array,
                  shape: tuple[int, ...], *, assignment: str = "soft", temperature: float = 1.0,
                  mesh: Mesh | None = None, dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
    """The source sample paired with a data batch (training). Returns ``(z0 [B, *event], k [B] int32)``.

    - ``'gaussian'``: independent coupling, z0 ~ N(0, I) of ``shape`` = [B, *event]; k = -1 (no mode).
    - ``'gmm_indep'``: GMM source, independent coupling: k ~ weights (the image is ignored).
    - ``'gmm_mode'``: GMM source, mode coupling: k ~ p(k | cls) (``assignment``/``temperature``), cls [B, D].
    ``mesh``: when given (and the ``modes`` axis spans > 1 device), the K-sharded gather is used.
    """
    b = keys.shape[0]
    if tuple(shape)[0] != b:
        raise ValueError(f"sample_source: shape {tuple(shape)} does not start with the batch size {b}")
    if kind == "gaussian":
        eps = _normal(_stream(keys, _EPS_STREAM), tuple(shape[1:]))
        return eps.astype(dtype), jnp.full((b,), -1, jnp.int32)
    if kind not in SOURCE_KINDS:
        raise ValueError(f"sample_source: kind must be one of {SOURCE_KINDS}, got {kind!r}")
    if source is None:
        raise ValueError(f"sample_source: kind {kind!r} needs a ModeSource")
    if tuple(shape[1:]) != source.event_shape:
        raise ValueError(f"sample_source: shape {tuple(shape)} does not match the table's {source.event_shape}")
    mkeys = _stream(keys, _MODE_STREAM)
    if kind == "gmm_indep":
        k = prior_modes(source.gmm.weights, mkeys)
    else:
        if cls is None:
            raise ValueError("sample_source: 'gmm_mode' needs the [CLS] vectors")
        k = posterior_modes(source.gmm, cls, mkeys, assignment, temperature)
    return draw_modes(source, k, keys, mesh, dtype), k


def sample_prior(source: ModeSource, keys: jax.Array, *, mesh: Mesh | None = None,
                 dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
    """Sampling time: k ~ weights, then ``z0 = mean_k + sqrt(var_k) eps``. Returns ``(z0 [B, L, C], k [B])``."""
    k = prior_modes(source.gmm.weights, _stream(keys, _MODE_STREAM))
    return draw_modes(source, k, keys, mesh, dtype), k


# ----------------------------------------------------------------------------------------------------------------
# Placement and storage


def _table_shardings(source_shapes: ModeSource, mesh: Mesh) -> ModeSource:
    ax = _mode_axes(mesh)
    ax = None if not ax else ax[0] if len(ax) == 1 else ax
    rep = NamedSharding(mesh, PartitionSpec())
    return ModeSource(gmm=DiagGMM(rep, rep, rep),
                      means=NamedSharding(mesh, PartitionSpec(ax, None, None)),
                      variances=NamedSharding(mesh, PartitionSpec(ax, *([None] * (source_shapes.variances.ndim - 1)))))


def shard_source(source: ModeSource, mesh: Mesh) -> ModeSource:
    """Place the table sharded along K over the ``modes`` mesh axes (the [CLS] GMM replicated).

    K is padded with zero-mean, unit-variance rows to a multiple of the number of K shards; the padding is never
    drawn (modes come from the K-component GMM). Host (numpy) tables are placed shard by shard, so no device ever
    holds more than its rows; device tables are padded and resharded under ``jit``.
    """
    n = _n_shards(mesh)
    k = source.means.shape[0]
    kpad = -(-k // n) * n
    sh = _table_shardings(source, mesh)

    def pad(x, fill):
        if kpad == x.shape[0]:
            return x
        widths = [(0, kpad - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
        return np.pad(x, widths, constant_values=fill) if isinstance(x, np.ndarray) else jnp.pad(
            x, widths, constant_values=fill)

    def place(x, s, fill):
        if isinstance(x, np.ndarray):
            x = pad(x, fill)
            return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
        return jax.jit(lambda a: pad(a, fill), out_shardings=s)(x)

    gmm = jax.tree.map(lambda x: parallel.put_replicated(np.asarray(x), mesh), source.gmm)
    return ModeSource(gmm=gmm, means=place(source.means, sh.means, 0.0),
                      variances=place(source.variances, sh.variances, 1.0))


def cast_table(source: ModeSource, dtype: Any) -> ModeSource:
    """``source`` with the spatial table's means stored as ``dtype`` (sharding kept; variances and the [CLS] GMM
    unchanged). ``bfloat16`` halves the table (XL: 8192 x 256 x 768 = 6.4 GB fp32 -> 3.2 GB) at a relative rounding
    of <= 2^-9 of each mean; draws still combine ``mean + sigma * eps`` in fp32."""
    dtype = jnp.dtype(dtype)
    means = source.means
    if means.dtype == dtype:
        return source
    if isinstance(means, np.ndarray):
        new = means.astype(dtype)
    else:
        new = jax.jit(lambda a: a.astype(dtype), out_shardings=means.sharding)(means)
    return dataclasses.replace(source, means=new)


def save_source(path: str | os.PathLike, source: ModeSource, metadata: dict[str, Any] | None = None) -> None:
    """Write ``path/arrays`` (Orbax, sharded arrays written by their owners) and then ``path/metadata.json``
    (n_modes, shapes, dtypes, the caller's ``metadata``); the JSON marks the save as complete."""
    import orbax.checkpoint as ocp

    from mmfm_jax.storage import as_path, write_json_atomic

    path = as_path(path)  # local or gs://
    tree = {"gmm": {"weights": source.gmm.weights, "means": source.gmm.means, "variances": source.gmm.variances},
            "means": source.means, "variances": source.variances}
    if jax.process_index() == 0 and (path / "metadata.json").exists():
        (path / "metadata.json").unlink()  # incomplete until it is written again
    distributed.sync("save_source_start")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / "arrays", tree, force=True)
        ckptr.wait_until_finished()
    distributed.sync("save_source")
    if jax.process_index() == 0:
        meta = {"format": "mmfm_jax.ModeSource/1", "n_modes": source.n_modes, "table_rows": int(source.means.shape[0]),
                "event_shape": list(source.event_shape), "cls_dim": int(source.gmm.means.shape[1]),
                "variance": "scalar" if source.variances.ndim == 1 else "per_dim",
                "dtypes": {k: str(np.dtype(v.dtype)) for k, v in (("means", source.means),
                                                                    ("variances", source.variances))},
                "user": dict(metadata or {})}
        write_json_atomic(path / "metadata.json", meta)


def load_source(path: str | os.PathLike, mesh: Mesh | None = None) -> tuple[ModeSource, dict[str, Any]]:
    """Read a :func:`save_source` folder -> ``(ModeSource, metadata)``.

    With ``mesh``: the table is restored sharded along K (each process reads only its rows) when the stored rows
    divide over the K shards; otherwise it is read on the host, trimmed to K rows and placed by :func:`shard_source`.
    Without: plain arrays on the default device.
    """
    import orbax.checkpoint as ocp

    from mmfm_jax.storage import as_path

    path = as_path(path)  # local or gs://
    meta_file = path / "metadata.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"load_source: {meta_file} missing (not a ModeSource folder, or an unfinished save)")
    meta = json.loads(meta_file.read_text())
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(path / "arrays")
        stored = getattr(stored, "item_metadata", stored)
        shapes = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), dict(stored))
        src_shapes = ModeSource(gmm=DiagGMM(**shapes["gmm"]), means=shapes["means"], variances=shapes["variances"])
        if mesh is not None and shapes["means"].shape[0] % _n_shards(mesh) == 0:
            sh = _table_shardings(src_shapes, mesh)
            target = {"gmm": {f: jax.ShapeDtypeStruct(getattr(src_shapes.gmm, f).shape,
                                                      getattr(src_shapes.gmm, f).dtype, sharding=sh.gmm.weights)
                              for f in ("weights", "means", "variances")},
                      "means": jax.ShapeDtypeStruct(shapes["means"].shape, shapes["means"].dtype, sharding=sh.means),
                      "variances": jax.ShapeDtypeStruct(shapes["variances"].shape, shapes["variances"].dtype,
                                                        sharding=sh.variances)}
            tree = ckptr.restore(path / "arrays", target)
            mesh_done = True
        else:
            dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), shapes)
            tree = ckptr.restore(path / "arrays", target)
            mesh_done = False
    src = ModeSource(gmm=DiagGMM(**tree["gmm"]), means=tree["means"], variances=tree["variances"])
    if mesh is not None and not mesh_done:
        log.warning("load_source: %d table rows do not divide over %d K shards: re-placing from the host",
                    src.means.shape[0], _n_shards(mesh))
        k = src.n_modes
        src = shard_source(ModeSource(gmm=jax.tree.map(np.asarray, src.gmm), means=np.asarray(src.means)[:k],
                                      variances=np.asarray(src.variances)[:k]), mesh)
    check_source(src, str(path))
    return src, meta


def check_source(source: ModeSource, where: str = "source") -> None:
    """Refuse a source that would train on garbage: non-finite or negative weights (or all zero), non-finite means,
    non-finite or non-positive variances ([CLS] GMM and the table's first K rows). One jitted count per field,
    computed where the (sharded) arrays live. Raises ``ValueError`` naming the fields."""
    k = source.n_modes

    def counts(s: ModeSource) -> dict[str, jax.Array]:
        w, tv = s.gmm.weights.astype(jnp.float32), s.variances[:k].astype(jnp.float32)
        bad = lambda m: jnp.sum(~m, dtype=jnp.int32)  # noqa: E731
        return {"gmm.weights (non-finite or < 0)": bad(jnp.isfinite(w) & (w >= 0)),
                "gmm.weights (sum <= 0)": (jnp.sum(jnp.where(jnp.isfinite(w), w, 0.0)) <= 0).astype(jnp.int32),
                "gmm.means (non-finite)": bad(jnp.isfinite(s.gmm.means)),
                "gmm.variances (non-finite or <= 0)": bad(jnp.isfinite(s.gmm.variances) & (s.gmm.variances > 0)),
                "means (non-finite)": bad(jnp.isfinite(s.means[:k].astype(jnp.float32))),
                "variances (non-finite or <= 0)": bad(jnp.isfinite(tv) & (tv > 0))}

    out = jax.jit(counts)(source)
    got = {name: int(np.asarray(v.addressable_data(0) if hasattr(v, "addressable_data") else v))
           for name, v in out.items()}
    bad = [f"{name}: {n} values" for name, n in got.items() if n]
    if bad:
        raise ValueError(f"{where}: the source is unusable ({'; '.join(bad)}); refit it (fit-gmm) or check the file")
