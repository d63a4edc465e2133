"""The spatial pass of MM-FM's GMM: per-[CLS]-component mean patch latent and one scalar variance.

For every image: hard-assign its component with the [CLS] GMM (argmax posterior), add its normalised latent
``x [L, C]`` (tokens-last, L = H*W row-major) and, with flip augmentation, its horizontal flip in latent space to that
component. Then per component: ``mean_k = sum x / n_k`` and the scalar variance
``var_k = mean over the L*C dims of the per-dim population variance = (sum ||x||^2 / n_k - ||mean_k||^2) / (L*C)``.
Empty components get the mean of the non-empty means and of the non-empty variances (as the reference).
Pass ``shift`` (e.g. the dataset's mean latent, [L, C]) to accumulate ``x - shift``: the variance is shift-invariant
and ``E||x||^2 - ||mean||^2`` then cancels far less in fp32 when the latents have a large common offset.

The K x (L*C) sums stay sharded along K over every device (logical axis ``modes``); each batch is all-gathered
(small) and every device adds only the rows it owns, so no device ever holds the whole table. Sums are fp32 with
Kahan compensation (``compensated=True``), so a 1.28M-image pass loses no precision without float64.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmfm_jax import parallel


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SpatialStats:
    """Running sums. ``sums``/``sums_c`` [K_pad, D] sharded on K; ``sq``/``sq_c``/``counts`` [K_pad] (fp32)."""

    sums: jax.Array
    sums_c: jax.Array
    sq: jax.Array
    sq_c: jax.Array
    counts: jax.Array


def _modes_spec(mesh: Mesh) -> PartitionSpec:
    return parallel.logical_to_mesh_spec(("modes", None), mesh=mesh)


def _n_shards(mesh: Mesh) -> int:
    spec = _modes_spec(mesh)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return int(np.prod([mesh.shape[a] for a in axes]))


def init_stats(n_components: int, dim: int, mesh: Mesh) -> SpatialStats:
    """Zero sums for K components of dimension D = L*C, K padded to a multiple of the K-shards."""
    shards = _n_shards(mesh)
    k_pad = -(-n_components // shards) * shards
    table = NamedSharding(mesh, _modes_spec(mesh))
    vec = NamedSharding(mesh, PartitionSpec())
    # distinct buffers: the state is donated to ``accumulate``
    z2 = lambda: parallel.zeros_sharded((k_pad, dim), jnp.float32, table)  # noqa: E731
    z1 = lambda: parallel.zeros_sharded((k_pad,), jnp.float32, vec)  # noqa: E731
    return SpatialStats(sums=z2(), sums_c=z2(), sq=z1(), sq_c=z1(), counts=z1())


def _kahan_add(total, comp, value):
    y = value - comp
    t = total + y
    return t, (t - total) - y


def flip_tokens(x: jax.Array, height: int, width: int) -> jax.Array:
    """Horizontal flip of tokens-last latents [B, H*W, C] (the W axis of the official [C, H, W] layout)."""
    b, _, c = x.shape
    return x.reshape(b, height, width, c)[:, :, ::-1, :].reshape(b, height * width, c)


@partial(jax.jit, static_argnames=("mesh", "height", "width", "flip", "compensated"), donate_argnums=(0,))
def accumulate(stats: SpatialStats, latents: jax.Array, labels: jax.Array, valid: jax.Array, *, mesh: Mesh,
               height: int, width: int, flip: bool = True, compensated: bool = True,
               shift: jax.Array | None = None) -> SpatialStats:
    """Add a batch: ``latents`` [B, L, C] (batch-sharded), ``labels`` [B] int (component), ``valid`` [B] bool.

    ``shift`` [L, C] is subtracted before accumulating (pass the same one to :func:`finalize`); it must be
    flip-symmetric or None when ``flip`` (the flipped view is shifted by the same vector).
    """
    b = latents.shape[0]
    x = latents.astype(jnp.float32)
    if shift is not None:
        x = x - shift.astype(jnp.float32)[None]
    w = valid.astype(jnp.float32)
    if flip:
        x = jnp.concatenate([x, flip_tokens(x, height, width)], 0)
        labels = jnp.concatenate([labels, labels], 0)
        w = jnp.concatenate([w, w], 0)
        b = 2 * b
    x = x.reshape(b, -1) * w[:, None]
    sqn = jnp.sum(x * x, axis=1)
    k_pad = stats.sums.shape[0]
    counts = jnp.zeros((k_pad,), jnp.float32).at[labels].add(w)
    sq = jnp.zeros((k_pad,), jnp.float32).at[labels].add(sqn)
    spec = _modes_spec(mesh)
    axes = spec[0]

    def local_add(sums, sums_c, x_all, lab_all):
        # Each device owns rows [start, start + rows) of the table; rows of other devices are dropped.
        rows = sums.shape[0]
        idx = jax.lax.axis_index(axes) if axes is not None else 0
        local = lab_all - idx * rows
        mine = (local >= 0) & (local < rows)
        local = jnp.where(mine, local, rows)  # out of range -> dropped by mode='drop'
        upd = jnp.zeros_like(sums).at[local].add(x_all, mode="drop")
        if compensated:
            return _kahan_add(sums, sums_c, upd)
        return sums + upd, sums_c

    rep = PartitionSpec()
    x_rep = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, rep))
    lab_rep = jax.lax.with_sharding_constraint(labels, NamedSharding(mesh, rep))
    sums, sums_c = jax.shard_map(local_add, mesh=mesh, in_specs=(spec, spec, rep, rep), out_specs=(spec, spec),
                                 check_vma=False)(stats.sums, stats.sums_c, x_rep, lab_rep)
    if compensated:
        sq_t, sq_c = _kahan_add(stats.sq, stats.sq_c, sq)
    else:
        sq_t, sq_c = stats.sq + sq, stats.sq_c
    return SpatialStats(sums=sums, sums_c=sums_c, sq=sq_t, sq_c=sq_c, counts=stats.counts + counts)


@partial(jax.jit, static_argnames=("n_components",))
def _finalize(stats: SpatialStats, n_components: int):
    sums = stats.sums[:n_components] - stats.sums_c[:n_components]
    sq = (stats.sq - stats.sq_c)[:n_components]
    n = stats.counts[:n_components]
    dim = sums.shape[1]
    nonempty = n > 0
    safe = jnp.maximum(n, 1.0)
    means = sums / safe[:, None]
    var = jnp.maximum(sq / safe - jnp.sum(means * means, axis=1), 0.0) / dim
    n_ne = jnp.maximum(jnp.sum(nonempty), 1)
    fill_mean = jnp.sum(jnp.where(nonempty[:, None], means, 0.0), 0) / n_ne
    fill_var = jnp.sum(jnp.where(nonempty, var, 0.0)) / n_ne
    means = jnp.where(nonempty[:, None], means, fill_mean[None, :])
    var = jnp.where(nonempty, var, fill_var)
    return means, var, n


def finalize(stats: SpatialStats, n_components: int, tokens: int, channels: int, shift: jax.Array | None = None):
    """-> (means [K, L, C] sharded on K where possible, variances [K], counts [K] (incl. flips))."""
    means, var, counts = _finalize(stats, n_components)
    means = means.reshape(n_components, tokens, channels)
    if shift is not None:
        means = means + shift.astype(means.dtype)[None]
    return means, var, counts


def spatial_stats_numpy(latents: np.ndarray, labels: np.ndarray, n_components: int, height: int, width: int,
                        flip: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float64 reference of the whole pass (for tests and small data): latents [N, L, C] -> (means, var, counts)."""
    x = latents.astype(np.float64)
    lab = labels
    if flip:
        n, tok, c = x.shape
        xf = x.reshape(n, height, width, c)[:, :, ::-1, :].reshape(n, tok, c)
        x = np.concatenate([x, xf])
        lab = np.concatenate([labels, labels])
    n, tok, c = x.shape
    means = np.zeros((n_components, tok, c))
    var = np.zeros(n_components)
    counts = np.bincount(lab, minlength=n_components).astype(np.float64)
    for k in range(n_components):
        xs = x[lab == k]
        if len(xs):
            means[k] = xs.mean(0)
            var[k] = xs.var(0).mean()
    ne = counts > 0
    means[~ne] = means[ne].mean(0)
    var[~ne] = var[ne].mean()
    return means, var, counts
