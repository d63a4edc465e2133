"""Data placement for the GMM fits: ``x [N, D]`` split along N over every device of a mesh, and the small
replication / collective helpers that EM (:mod:`mmfm_jax.gmm.em`) and k-means++ (:mod:`mmfm_jax.gmm.kmeanspp`) share.

Layout: ``x`` split along N (logical axis ``samples``) over all devices, zero-padded to a multiple of the number of
shards; padding rows are masked by the consumers. Floating data are float32 (bf16/fp16 stay as they are and are
widened per chunk) or float64 when placed with ``dtype=float64`` (needs 64-bit types enabled, :func:`x64_scope`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmfm_jax import parallel

SHIFT_ROWS = 4096
DTYPES = ("float32", "float64")


def check_dtype(dtype: Any) -> np.dtype:
    """``'float32'`` | ``'float64'`` (or the numpy dtypes) -> the numpy dtype; anything else raises."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return np.dtype(name)


def x64_scope(dtype: Any) -> contextlib.AbstractContextManager:
    """A context with JAX's 64-bit types enabled for ``float64`` (``jax.enable_x64``), else a no-op: float64 fits
    enable them only while they run, so the rest of the program keeps JAX's 32-bit defaults."""
    return jax.enable_x64(True) if check_dtype(dtype) == np.float64 else contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class ShardedSamples:
    """Data prepared for EM: ``x [n_shards * local_len, D]`` split along N over ``axes`` of ``mesh``."""

    x: jax.Array
    n: int
    local_len: int
    shift: np.ndarray  # [D] reference point subtracted before accumulation (compute dtype)
    mesh: Mesh
    axes: tuple[str, ...]

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    @property
    def n_shards(self) -> int:
        return int(np.prod([self.mesh.shape[a] for a in self.axes])) if self.axes else 1

    @property
    def spec(self) -> PartitionSpec:
        return PartitionSpec(axes_entry(self.axes), None)

    @property
    def dtype(self) -> np.dtype:
        """The compute dtype: float64 for float64 data, else float32."""
        return np.dtype(np.float64) if self.x.dtype == np.float64 else np.dtype(np.float32)


def axes_entry(axes: tuple[str, ...]) -> Any:
    return None if not axes else axes[0] if len(axes) == 1 else axes


def shard_index(axes: tuple[str, ...]) -> jax.Array:
    """Linear index of this device along ``axes`` (inside ``shard_map``); 0 without axes."""
    return lax.axis_index(axes) if axes else jnp.int32(0)


def psum(x: Any, axes: tuple[str, ...]) -> Any:
    return lax.psum(x, axes) if axes else x


@functools.lru_cache(maxsize=64)
def jitted(fn: Callable, out_sharding: Any, static_argnums: tuple[int, ...] = ()) -> Callable:
    """``jax.jit(fn, out_shardings=out_sharding)``, cached so repeated calls hit the compilation cache."""
    return jax.jit(fn, out_shardings=out_sharding, static_argnums=static_argnums)


def _identity(a):
    return a


def _pad_rows(a, n_pad):
    return jnp.pad(a, ((0, n_pad - a.shape[0]), (0, 0)))


def _astype(a, dtype):
    return a.astype(dtype)


def take_rows(a, rows):
    """``a[rows]`` in the compute dtype (float64 for float64 data, else float32)."""
    out = a[rows]
    return out if out.dtype == jnp.float64 else out.astype(jnp.float32)


def shard_samples(x: Any, mesh: Mesh | None = None, dtype: Any = None) -> ShardedSamples:
    """Put ``x [N, D]`` (numpy: the full array, identical on every process; or a global ``jax.Array``) on ``mesh``
    split along N over all devices (logical axis ``samples``), zero-padded to a multiple of the shard count.
    ``dtype='float64'`` places float64 data (call inside :func:`x64_scope`); default float32 (bf16/fp16 kept)."""
    want64 = dtype is not None and check_dtype(dtype) == np.float64
    if want64 and not jax.config.jax_enable_x64:
        raise ValueError("shard_samples(dtype='float64') needs 64-bit types: call it inside gmm.samples.x64_scope")
    mesh = parallel.make_mesh() if mesh is None else mesh
    spec = parallel.logical_to_mesh_spec(("samples", None), mesh=mesh)
    entry = spec[0] if len(spec) else None
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    n_shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if len(x.shape) != 2 or x.shape[0] < 1:
        raise ValueError(f"x must be [N, D] with N >= 1, got shape {tuple(x.shape)}")
    n, d = int(x.shape[0]), int(x.shape[1])
    local_len = -(-n // n_shards)
    n_pad = local_len * n_shards
    sharding = NamedSharding(mesh, PartitionSpec(axes_entry(axes), None))
    if isinstance(x, jax.Array):
        if want64 and x.dtype != jnp.float64:
            x = jitted(_astype, x.sharding, (1,))(x, jnp.float64)
        elif not want64 and (not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == jnp.float64):
            x = x.astype(jnp.float32)
        if x.sharding.device_set != set(mesh.devices.flat):  # move onto the mesh first (sharded if it divides)
            x = jax.device_put(x, NamedSharding(mesh, parallel.fit_spec_to_shape(sharding.spec, x.shape, mesh)))
        if n_pad == n and x.sharding.is_equivalent_to(sharding, 2):
            xg = x
        else:
            xg = jitted(_pad_rows, sharding, (1,))(x, n_pad)
    else:
        xn = np.asarray(x)
        if want64:
            xn = xn.astype(np.float64, copy=False)
        elif xn.dtype not in (np.float32, np.float16) and xn.dtype.name != "bfloat16":
            xn = xn.astype(np.float32)

        def cb(idx):
            rows = idx[0]
            start, stop = rows.start or 0, n_pad if rows.stop is None else rows.stop
            block = xn[start:min(stop, n)][:, idx[1]]
            if stop > n:
                block = np.concatenate([block, np.zeros((stop - max(start, n),) + block.shape[1:], xn.dtype)])
            return block

        xg = jax.make_array_from_callback((n_pad, d), sharding, cb)
    rows = np.unique(np.round(np.linspace(0, n - 1, min(n, SHIFT_ROWS))).astype(np.int64))
    ref = jitted(take_rows, NamedSharding(mesh, PartitionSpec()))(xg, replicate(rows.astype(np.int32), mesh))
    cdt = np.float64 if xg.dtype == jnp.float64 else np.float32
    shift = np.asarray(ref, dtype=np.float64).mean(0).astype(cdt)
    return ShardedSamples(xg, n, local_len, shift, mesh, axes)


def replicate(tree: Any, mesh: Mesh, dtype: Any = np.float32) -> Any:
    """Host values or arrays -> fully replicated global arrays on ``mesh``; floating leaves in ``dtype`` (float32 by
    default; float64 needs :func:`x64_scope`)."""
    sh = NamedSharding(mesh, PartitionSpec())
    dt = np.dtype(dtype)

    def one(v):
        if isinstance(v, jax.Array):
            if jnp.issubdtype(v.dtype, jnp.floating) and v.dtype != dt:
                return jitted(_astype, sh, (1,))(v, dt)
            if v.sharding.is_equivalent_to(sh, v.ndim):
                return v
            return jitted(_identity, sh)(v)
        a = np.asarray(v)
        a = a.astype(dt) if np.issubdtype(a.dtype, np.floating) else a
        return jax.make_array_from_callback(a.shape, sh, lambda idx: a[idx])

    return jax.tree.map(one, tree)
