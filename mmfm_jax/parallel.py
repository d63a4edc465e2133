"""Meshes, logical-to-mesh axis rules and shardings, and host <-> global arrays (process set-up:
:mod:`mmfm_jax.distributed`).

This is the only module that knows the mesh axis names (``data``, ``fsdp``). Everything else speaks in
*logical* axis names (``batch``, ``embed``, ``mlp``, ``heads``, ``modes``, ...) and asks this module for a
``PartitionSpec`` / ``NamedSharding``.

Conventions:
- The mesh is ``('dcn_data', 'data', 'fsdp')``: ``dcn_data`` spans TPU slices (or hosts) connected by the data-centre
  network (size 1 on one slice), ``data`` and ``fsdp`` the devices of one slice. The batch is split over all three
  axes, large parameters over ``fsdp`` only (their all-gathers stay on the fast inter-chip links).
- A mesh size of ``-1`` means "all remaining devices".
- Meshes use ``AxisType.Auto`` (jax >= 0.7 defaults ``jax.make_mesh`` to Explicit axes, which breaks the classic
  ``jit(in_shardings=...)`` flow), so code works on both our pinned jax and newer ones.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Logical names are metadata only; we apply the rules ourselves (see ``state_shardings``).
flax.config.update("flax_always_shard_variable", False)

MESH_AXES: tuple[str, ...] = ("dcn_data", "data", "fsdp")
BATCH_AXES: tuple[str, ...] = ("dcn_data", "data", "fsdp")

# logical axis name -> mesh axis (str), tuple of mesh axes, or None (replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("samples", BATCH_AXES),  # data points of a GMM fit
    ("modes", BATCH_AXES),  # GMM components (K), e.g. the 8192 x 196,608 spatial table
    ("embed", "fsdp"),
    ("mlp", None),
    ("heads", None),
    ("kv", None),
    ("vocab", None),
    ("features", None),
    ("length", None),
    ("layers", None),
    ("channels", None),
)


def _rules_dict(rules: Sequence[tuple[str, Any]] | Mapping[str, Any] | None) -> dict[str, Any]:
    if rules is None:
        return dict(DEFAULT_RULES)
    if isinstance(rules, Mapping):
        items = rules.items()
    else:
        items = rules
    out = {}
    for name, axes in items:
        if isinstance(axes, list):
            axes = tuple(axes)
        out[name] = axes
    return out


def rules_from_config(cfg: Any) -> dict[str, Any]:
    """Rules from an optional ``cfg.sharding.rules`` (a tuple of ``(logical, mesh_axes)``) over the defaults."""
    rules = dict(DEFAULT_RULES)
    sharding = getattr(cfg, "sharding", None) if cfg is not None else None
    extra = getattr(sharding, "rules", None) if sharding is not None else None
    if extra:
        for item in extra:
            if len(item) != 2:
                raise ValueError(f"config.sharding.rules: each rule is (logical_name, mesh_axes); got {item!r}")
            name, axes = item
            axes = tuple(axes) if isinstance(axes, list) else axes
            for a in (axes if isinstance(axes, tuple) else (axes,)):
                if a is not None and a not in MESH_AXES:
                    raise ValueError(f"config.sharding.rules: unknown mesh axis {a!r} for {name!r} (have {MESH_AXES})")
            rules[name] = axes
    return rules


# ----------------------------------------------------------------------------------------------------------------
# Meshes


def resolve_mesh_shape(sizes: Sequence[int], n_devices: int, names: Sequence[str] = MESH_AXES) -> tuple[int, ...]:
    """Replace one ``-1`` by the remaining devices; check that the product equals ``n_devices``."""
    sizes = [int(s) for s in sizes]
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(names, sizes))}")
    for n, s in zip(names, sizes):
        if s == 0 or s < -1:
            raise ValueError(f"config.mesh.{n}: must be positive or -1, got {s}")
    known = int(np.prod([s for s in sizes if s != -1])) if sizes else 1
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(f"config.mesh: {dict(zip(names, sizes))} does not divide {n_devices} devices")
        sizes[sizes.index(-1)] = n_devices // known
    if int(np.prod(sizes)) != n_devices:
        raise ValueError(f"config.mesh: {dict(zip(names, sizes))} uses {int(np.prod(sizes))} devices, have {n_devices}")
    return tuple(sizes)


def _mesh_sizes(shape: Mapping[str, int] | Sequence[int] | Any) -> list[int]:
    """``[dcn_data, data, fsdp]`` from a mapping / config node (missing axes: 1, ``None``: -1) or a sequence."""
    if shape is None:
        return [1, -1, 1]
    if isinstance(shape, Sequence):
        sizes = [int(s) for s in shape]
        if len(sizes) not in (2, 3):
            raise ValueError(f"config.mesh: give (data, fsdp) or (dcn_data, data, fsdp), got {tuple(shape)}")
        return [1, *sizes] if len(sizes) == 2 else sizes
    get = shape.get if hasattr(shape, "get") else lambda k, d=None: getattr(shape, k, d)
    return [-1 if s is None else s for s in (get(a, 1) for a in MESH_AXES)]


def device_granules(devices: Sequence[Any]) -> tuple[str, list[list[Any]]]:
    """The devices grouped by what the data-centre network connects: TPU slices (``slice_index``) when they span
    several, else processes. Returns ``(kind, groups)`` with kind ``'slices'`` or ``'processes'``, ordered by key."""
    slices = {getattr(d, "slice_index", None) for d in devices}
    attr, kind = ("slice_index", "slices") if len(slices) > 1 and None not in slices else ("process_index", "processes")
    groups: dict[int, list[Any]] = {}
    for d in devices:
        groups.setdefault(int(getattr(d, attr)), []).append(d)
    return kind, [groups[k] for k in sorted(groups)]


def device_grid(dims: Sequence[int], devices: Sequence[Any]) -> np.ndarray | None:
    """The device array of a ``(dcn_data, data, fsdp)`` mesh; None when ``dcn_data == 1`` (any layout will do).

    ``dcn_data > 1`` needs exactly that many granules (:func:`device_granules`) of ``data * fsdp`` devices each;
    :func:`jax.experimental.mesh_utils.create_hybrid_device_mesh` lays out each one (its ICI topology on TPU) and
    stacks them along ``dcn_data``. Devices that span several TPU slices require ``dcn_data`` = the slice count.
    """
    from jax.experimental import mesh_utils

    dcn, data, fsdp = (int(x) for x in dims)
    kind, groups = device_granules(devices)
    if dcn == 1:
        if kind == "slices":
            raise ValueError(f"config.mesh.dcn_data = 1: the devices span {len(groups)} TPU slices; set "
                             f"--config.mesh.dcn_data={len(groups)} (the batch is split across slices, parameters "
                             "within a slice)")
        return None
    sizes = sorted({len(g) for g in groups})
    if len(groups) != dcn or sizes != [data * fsdp]:
        raise ValueError(f"config.mesh.dcn_data = {dcn}: the devices form {len(groups)} {kind} of {sizes} devices; "
                         f"dcn_data must equal the number of {kind} (and data * fsdp = {data * fsdp} their size)")
    return mesh_utils.create_hybrid_device_mesh((1, data, fsdp), (dcn, 1, 1), list(devices),
                                                process_is_granule=kind == "processes")


def make_mesh(
    shape: Mapping[str, int] | Sequence[int] | Any = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A ``Mesh`` with axes ``('dcn_data', 'data', 'fsdp')`` over ``devices`` (default: all global devices).

    ``shape`` is a mapping (or config node) ``{'dcn_data': s, 'data': d, 'fsdp': f}`` (a missing axis is 1) or a
    sequence ``(d, f)`` / ``(s, d, f)``; ``-1`` = the rest. Default: everything on ``data``. ``dcn_data > 1``: see
    :func:`device_grid` (one block of ``data x fsdp`` devices per slice or process).
    """
    devices = list(jax.devices() if devices is None else devices)
    dims = resolve_mesh_shape(_mesh_sizes(shape), len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    grid = device_grid(dims, devices)
    if grid is not None:
        return Mesh(grid, MESH_AXES, axis_types=axis_types)
    if len(devices) == jax.device_count() and devices == list(jax.devices()):
        try:
            return jax.make_mesh(dims, MESH_AXES, axis_types=axis_types)
        except Exception:  # noqa: BLE001  (device-topology helpers can refuse odd shapes on CPU)
            pass
    arr = np.asarray(devices, dtype=object).reshape(dims)
    return Mesh(arr, MESH_AXES, axis_types=axis_types)


def mesh_from_config(cfg: Any) -> Mesh:
    """``make_mesh(cfg.mesh)``; ``cfg.mesh.num_devices`` (if > 0) restricts to the first N devices (single process)."""
    mesh_cfg = getattr(cfg, "mesh", None)
    n = int(getattr(mesh_cfg, "num_devices", 0) or 0) if mesh_cfg is not None else 0
    devices = None
    if n > 0:
        if jax.process_count() > 1:
            raise ValueError("config.mesh.num_devices: only supported in a single process")
        if n > jax.device_count():
            raise ValueError(f"config.mesh.num_devices={n} but only {jax.device_count()} devices are available")
        devices = jax.devices()[:n]
    return make_mesh(mesh_cfg, devices)


def batch_size_multiple(mesh: Mesh) -> int:
    """The global batch must be a multiple of this (the number of batch shards)."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def round_up_batch(n: int, mesh: Mesh) -> int:
    """``n`` rounded up to a multiple of :func:`batch_size_multiple` (a global batch every batch shard can split)."""
    mult = batch_size_multiple(mesh)
    return -(-int(n) // mult) * mult


# ----------------------------------------------------------------------------------------------------------------
# Logical axes -> shardings


def logical_to_mesh_spec(
    logical: Sequence[str | None] | None, rules: Any = None, mesh: Mesh | None = None
) -> PartitionSpec:
    """Map logical axis names to a ``PartitionSpec``. A mesh axis is used at most once (later uses replicate).

    With ``mesh`` given, mesh axes of size 1 are dropped (cleaner specs, identical placement).
    """
    if logical is None:
        return PartitionSpec()
    r = _rules_dict(rules) if not isinstance(rules, dict) else rules
    used: set[str] = set()
    out: list[Any] = []
    for name in logical:
        if name is None:
            out.append(None)
            continue
        if name not in r:
            raise KeyError(f"logical axis {name!r} has no sharding rule (known: {sorted(r)})")
        axes = r[name]
        if axes is None:
            out.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def logical_sharding(mesh: Mesh, logical: Sequence[str | None] | None, rules: Any = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_mesh_spec(logical, rules, mesh))


def fit_spec_to_shape(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes from dimensions they do not divide (e.g. a 1000-row table on 16 devices): replicate instead."""
    out = []
    for i, entry in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        if entry is None:
            out.append(None)
            continue
        axes = (entry,) if isinstance(entry, str) else tuple(entry)
        size = int(np.prod([mesh.shape[a] for a in axes]))
        out.append(entry if shape[i] % size == 0 else None)
    return PartitionSpec(*out)


def state_shardings(mesh: Mesh, abstract_state: Any, rules: Any = None) -> Any:
    """``NamedSharding`` per leaf of an ``nnx.State`` (or any pytree of Variables/arrays) from logical metadata.

    Leaves without logical names are replicated. Axes that do not divide the dimension are replicated.
    """
    from flax import nnx

    r = rules if isinstance(rules, dict) else _rules_dict(rules)

    def one(x):
        names = None
        if isinstance(x, nnx.Variable):
            meta = x.get_metadata()
            names = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
            shape = x.get_value().shape if hasattr(x, "get_value") else x.value.shape
        else:
            shape = x.shape
        spec = logical_to_mesh_spec(names, r, mesh) if names else PartitionSpec()
        return NamedSharding(mesh, fit_spec_to_shape(spec, shape, mesh))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# (mesh, rules) of the activation_sharding context being traced, or None (constrain is then a no-op)
_ACTIVATIONS: contextvars.ContextVar[tuple[Mesh, dict[str, Any]] | None] = contextvars.ContextVar(
    "mmfm_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Any = None) -> Iterator[None]:
    """Make :func:`constrain` pin activations to ``mesh`` with ``rules`` (default ``DEFAULT_RULES``) while the
    body runs. Enter it inside the jitted function, around the model call, so it is active while jax traces it."""
    token = _ACTIVATIONS.set((mesh, rules if isinstance(rules, dict) else _rules_dict(rules)))
    try:
        yield
    finally:
        _ACTIVATIONS.reset(token)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """``x`` with a sharding constraint from logical axis names, e.g. ``constrain(h, ("batch", None, None))``.

    Inside :func:`activation_sharding` only; elsewhere (a model run on its own, parity tests) it returns ``x``
    unchanged. Without it, XLA's propagation may follow the FSDP-sharded weights instead of the batch-sharded
    inputs (every chip then computes all the examples of a micro-batch). Constraints change placement, not values.
    Mesh axes that do not divide a dimension are dropped (that dimension is replicated).
    """
    ctx = _ACTIVATIONS.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    spec = fit_spec_to_shape(logical_to_mesh_spec(logical, rules, mesh), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading dimension split over ``BATCH_AXES``, the rest replicated."""
    axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1) or None
    if axes is not None and len(axes) == 1:
        axes = axes[0]
    return NamedSharding(mesh, PartitionSpec(axes, *([None] * (ndim - 1))))


# ----------------------------------------------------------------------------------------------------------------
# Host <-> global arrays


def host_to_global(tree: Any, mesh: Mesh, sharding: Any = None) -> Any:
    """Turn host-local batches (leading dim = this process's share) into global ``jax.Array``s split on the batch.

    The global leading size is ``local * process_count``. ``sharding``: one ``NamedSharding`` (or a pytree of
    them) to use instead of :func:`batch_sharding`.
    """

    def one(x, sh=None):
        x = np.asarray(x)
        sh = sh if sh is not None else batch_sharding(mesh, x.ndim)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        return jax.make_array_from_process_local_data(sh, x, global_shape)

    if sharding is None or isinstance(sharding, NamedSharding):
        return jax.tree.map(lambda x: one(x, sharding), tree)
    return jax.tree.map(one, tree, sharding)


def global_to_host(tree: Any) -> Any:
    """Gather global arrays to numpy on every process (fully replicated copy)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def local_batch_slice(global_batch: int) -> slice:
    """The slice of a global batch (ordered by global example index) that this process feeds."""
    n = jax.process_count()
    if global_batch % n:
        raise ValueError(f"global batch {global_batch} is not divisible by {n} processes")
    per = global_batch // n
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Place host values as replicated global arrays (identical on every process)."""
    sh = replicated(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sh, lambda idx: np.asarray(x)[idx]), tree)


def zeros_sharded(shape: Sequence[int], dtype: Any, sharding: NamedSharding) -> jax.Array:
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()
