"""ODE sampling on the official shifted time grid, and AutoGuidance.

Convention: ``x_t = (1 - t) x_data + t x_source`` (t = 0 data, t = 1 source); a velocity field
``v(x, t) ~ x_source - x_data``. Sampling starts from a source sample at t = 1 and integrates *down* the grid:
``x <- x + (t_{i+1} - t_i) v(x, t_i)`` with t decreasing, so N grid points cost N - 1 model evaluations
(the official "50-step Euler" is 49 evaluations, ending at t ~ 0.006887 for the 768x16x16 latent; the last state
is used as the sample, without a final correction).

A velocity function has the signature ``velocity_fn(x [B, ...], t [B] fp32) -> v [B, ...]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmfm_jax.flow.time import shift_time

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


def euler_grid(num_points: int = 50, shift: float = math.sqrt(48.0), t_end: float = 0.999) -> np.ndarray:
    """``shift_time(1 - linspace(0, t_end, N), shift)`` in float64 on the host: [N], from 1.0 down to
    ``shift_time(1 - t_end)`` (0.006887 for N = 50, shift sqrt(48))."""
    if num_points < 2:
        raise ValueError(f"euler_grid: num_points must be >= 2, got {num_points}")
    t = 1.0 - np.linspace(0.0, t_end, num_points, dtype=np.float64)
    return shift_time(t, float(shift))


def _steps(grid) -> tuple[jax.Array, jax.Array]:
    g = jnp.asarray(grid, jnp.float32)
    if g.ndim != 1 or g.shape[0] < 2:
        raise ValueError(f"euler: the grid must be 1-D with >= 2 points, got shape {g.shape}")
    return g[:-1], g[1:] - g[:-1]


def euler_sample(velocity_fn: VelocityFn, x: jax.Array, grid, *, return_trajectory: bool = False):
    """Explicit Euler down ``grid`` ([N] times, t_0 = 1 first): N - 1 calls ``velocity_fn(x, t_i [B])``.

    ``x`` [B, ...] is the source sample at ``grid[0]``; the state is carried in fp32 (the velocity may be computed
    in bf16 by the model). Jittable (``lax.scan``); ``grid`` may be numpy (static) or a traced array.
    Returns the final state [B, ...] fp32, or ``(x_final, trajectory [N, B, ...])`` with the start state first.
    """
    x = jnp.asarray(x, jnp.float32)
    ts, dts = _steps(grid)
    b = x.shape[0]

    def body(xc, tdt):
        t, dt = tdt
        v = velocity_fn(xc, jnp.full((b,), t, jnp.float32)).astype(jnp.float32)
        xn = xc + dt * v
        return xn, (xn if return_trajectory else None)

    xf, traj = jax.lax.scan(body, x, (ts, dts))
    if return_trajectory:
        return xf, jnp.concatenate([x[None], traj], axis=0)
    return xf


def euler_sample_with_length(velocity_fn: VelocityFn, x: jax.Array, grid) -> tuple[jax.Array, jax.Array]:
    """Like :func:`euler_sample`, also accumulating the path length of each trajectory (no trajectory stored).

    Length_b = sum_i |t_{i+1} - t_i| * ||v(x_i, t_i)||_2 (the exact length of the Euler polyline; it converges to
    ``int ||v(x_t, t)|| dt`` on a fine grid). Returns ``(x_final [B, ...], length [B])`` in fp32.
    """
    x = jnp.asarray(x, jnp.float32)
    ts, dts = _steps(grid)
    b = x.shape[0]

    def body(carry, tdt):
        xc, length = carry
        t, dt = tdt
        v = velocity_fn(xc, jnp.full((b,), t, jnp.float32)).astype(jnp.float32)
        speed = jnp.sqrt(jnp.sum(jnp.square(v).reshape(b, -1), axis=-1))
        return (xc + dt * v, length + jnp.abs(dt) * speed), None

    (xf, length), _ = jax.lax.scan(body, (x, jnp.zeros((b,), jnp.float32)), (ts, dts))
    return xf, length


def trajectory_length(trajectory: jax.Array) -> jax.Array:
    """Polyline length of each trajectory: [N, B, ...] -> [B] (sum of segment norms)."""
    seg = jnp.diff(jnp.asarray(trajectory, jnp.float32), axis=0)
    n, b = seg.shape[:2]
    return jnp.sum(jnp.sqrt(jnp.sum(jnp.square(seg).reshape(n, b, -1), axis=-1)), axis=0)


def autoguidance(v_main: jax.Array, v_guide: jax.Array, scale: float, t: jax.Array, t_min: float = 0.0,
                 t_max: float = 1.0) -> jax.Array:
    """AutoGuidance: ``v_guide + scale (v_main - v_guide)`` for examples with ``t_min <= t <= t_max``, else
    ``v_main``. v_* [B, ...], t [B] (or scalar). The official setting is scale 1.5 on [0, 1] (always on)."""
    v_main32 = v_main.astype(jnp.float32)
    v_guide32 = v_guide.astype(jnp.float32)
    guided = v_guide32 + scale * (v_main32 - v_guide32)
    t = jnp.asarray(t, jnp.float32)
    inside = (t >= t_min) & (t <= t_max)
    inside = inside.reshape(inside.shape + (1,) * (v_main.ndim - inside.ndim))
    return jnp.where(inside, guided, v_main32).astype(v_main.dtype)


def guided_velocity_fn(main_fn: VelocityFn, guide_fn: VelocityFn, scale: float, t_min: float = 0.0,
                       t_max: float = 1.0) -> VelocityFn:
    """A velocity function evaluating ``main_fn`` and ``guide_fn`` on the same (x, t) and combining them with
    :func:`autoguidance`. With scale == 1 the guide is not evaluated."""
    if scale == 1.0:
        return main_fn

    def fn(x: jax.Array, t: jax.Array) -> jax.Array:
        return autoguidance(main_fn(x, t), guide_fn(x, t), scale, t, t_min, t_max)

    return fn
