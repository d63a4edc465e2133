"""Linear-path flow matching: interpolation, target velocity and the per-sample loss.

Convention: ``x_t = (1 - t) x_data + t x_source`` (t = 0 data, t = 1 source); the network predicts the constant
velocity ``d x_t / d t = x_source - x_data``, so sampling integrates from t = 1 down to t ~ 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _bcast_t(t: jax.Array, x: jax.Array) -> jax.Array:
    """t [B] (or scalar) -> [B, 1, ..., 1] matching x's rank."""
    t = jnp.asarray(t)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def interpolate(x_data: jax.Array, x_source: jax.Array, t: jax.Array) -> jax.Array:
    """``x_t = (1 - t) x_data + t x_source``; x_* [B, ...], t [B] or scalar; computed in the inputs' dtype
    promoted with t's."""
    tb = _bcast_t(t, x_data)
    return (1 - tb) * x_data + tb * x_source


def target_velocity(x_data: jax.Array, x_source: jax.Array) -> jax.Array:
    """``x_source - x_data`` (d x_t / dt on the linear path)."""
    return x_source - x_data


def fm_loss_per_sample(v_pred: jax.Array, x_data: jax.Array, x_source: jax.Array,
                       weights: jax.Array | None = None) -> jax.Array:
    """Per-sample flow-matching loss ``w_b * mean_{non-batch dims} (v_pred - (x_source - x_data))^2`` -> [B] fp32.

    The reference's training loss is the batch mean of this (after adaptive per-sample weights, when used).
    """
    f32 = jnp.float32
    err = v_pred.astype(f32) - (x_source.astype(f32) - x_data.astype(f32))
    per = jnp.mean(jnp.square(err), axis=tuple(range(1, err.ndim)))
    if weights is not None:
        per = per * jnp.asarray(weights, f32)
    return per


def fm_loss(v_pred: jax.Array, x_data: jax.Array, x_source: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Scalar batch mean of :func:`fm_loss_per_sample` (fp32)."""
    return jnp.mean(fm_loss_per_sample(v_pred, x_data, x_source, weights))
