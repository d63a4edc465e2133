"""Flow core: time samplers, loss, the official Euler grid, N-1 evaluations, AutoGuidance."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mmfm_jax.flow import loss as L
from mmfm_jax.flow import samplers as S
from mmfm_jax.flow import time as T


def test_resolution_shift_and_shift_time():
    assert T.resolution_shift(768 * 16 * 16) == pytest.approx(math.sqrt(48))
    assert T.resolution_shift(4096) == 1.0
    t = np.linspace(0, 1, 11)
    s = T.shift_time(t, 3.0)
    assert s[0] == 0 and s[-1] == 1 and np.all(np.diff(s) > 0) and np.all(s >= t)
    np.testing.assert_allclose(T.shift_time(t, 1.0), t)


def test_logit_normal_shifted_statistics():
    t = np.asarray(T.sample_time(jax.random.key(0), (400_000,), "logit_normal", shift=math.sqrt(48)), np.float64)
    assert t.dtype == np.float64 and t.min() >= 0 and t.max() <= 1
    assert abs(t.mean() - 0.836) < 3e-3
    assert abs(np.median(t) - 0.874) < 3e-3
    # unshifted: truncated logit-normal(0, 1) on [0, 0.999]; the truncation removes P(z > logit(0.999)) ~ 2.5e-12
    u = np.asarray(T.sample_time(jax.random.key(1), (200_000,), "logit_normal"), np.float64)
    assert u.max() <= 0.999
    z = np.log(u / (1 - u))
    assert stats.kstest(z, "norm").pvalue > 1e-3
    # truncation really bites with a tight upper bound: the tail above logit(0.6) is empty, below matches
    v = np.asarray(T.sample_time(jax.random.key(2), (100_000,), "logit_normal", t_max=0.6), np.float64)
    assert v.max() <= 0.6
    zv = np.log(v / (1 - v))
    cdf = lambda x: stats.norm.cdf(x) / stats.norm.cdf(math.log(0.6 / 0.4))  # noqa: E731
    assert stats.kstest(zv, cdf).pvalue > 1e-3


def test_uniform_time_and_per_example():
    t = np.asarray(T.sample_time(jax.random.key(0), (100_000,), "uniform"))
    assert t.min() >= 0 and t.max() < 0.999 and abs(t.mean() - 0.4995) < 5e-3
    keys = jax.random.split(jax.random.key(3), 16)
    a = np.asarray(T.sample_time_per_example(keys, shift=2.0))
    b = np.asarray(T.sample_time_per_example(keys[8:], shift=2.0))
    np.testing.assert_array_equal(a[8:], b)  # depends only on each example's key
    assert a.shape == (16,) and len(set(a.tolist())) == 16
    with pytest.raises(ValueError):
        T.sample_time(jax.random.key(0), (2,), "beta")


def test_interpolate_target_and_loss():
    rng = np.random.default_rng(0)
    xd = rng.normal(size=(4, 3, 5)).astype(np.float32)
    xs = rng.normal(size=(4, 3, 5)).astype(np.float32)
    t = np.array([0.0, 1.0, 0.25, 0.5], np.float32)
    xt = np.asarray(L.interpolate(xd, xs, t))
    np.testing.assert_allclose(xt[0], xd[0])
    np.testing.assert_allclose(xt[1], xs[1])
    np.testing.assert_allclose(xt[2], 0.75 * xd[2] + 0.25 * xs[2], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(L.target_velocity(xd, xs)), xs - xd)
    v = rng.normal(size=(4, 3, 5)).astype(np.float32)
    per = np.asarray(L.fm_loss_per_sample(jnp.asarray(v, jnp.bfloat16), xd, xs))
    ref = ((np.asarray(jnp.asarray(v, jnp.bfloat16), np.float32) - (xs - xd)) ** 2).mean(axis=(1, 2))
    assert per.dtype == np.float32 and per.shape == (4,)
    np.testing.assert_allclose(per, ref, rtol=1e-6)
    w = np.array([1.0, 0.0, 2.0, 0.5], np.float32)
    ref = ((v - (xs - xd)) ** 2).mean(axis=(1, 2))
    np.testing.assert_allclose(np.asarray(L.fm_loss_per_sample(v, xd, xs, w)), ref * w, rtol=1e-6)
    assert float(L.fm_loss_per_sample(xs - xd, xd, xs).max()) == 0.0
    np.testing.assert_allclose(float(L.fm_loss(v, xd, xs, w)), (ref * w).mean(), rtol=1e-6)


def test_grid_matches_official(fixtures_dir):
    ref = json.loads((fixtures_dir / "sampler_grid.json").read_text())
    g = S.euler_grid(50, shift=ref["shift"])
    assert g.dtype == np.float64 and g.shape == (50,)
    np.testing.assert_allclose(g, ref["grid_50_points"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(S.euler_grid(50), ref["grid_50_points"], atol=1e-6, rtol=0)  # default shift sqrt(48)
    np.testing.assert_allclose(S.euler_grid(50, shift=T.resolution_shift(768 * 256)), g, atol=1e-12)


def test_euler_n_points_n_minus_1_evaluations(fixtures_dir):
    ref = json.loads((fixtures_dir / "sampler_grid.json").read_text())
    seen = []

    def vel(x, t):
        jax.debug.callback(lambda tt: seen.append(np.asarray(tt).copy()), t, ordered=True)
        return -x  # exact solution x(t) = x(1) exp(-(t - 1))

    x0 = jnp.ones((3, 2, 4), jnp.bfloat16)
    grid = S.euler_grid(50)
    out = jax.jit(lambda x: S.euler_sample(vel, x, grid))(x0)
    jax.effects_barrier()
    assert len(seen) == ref["num_function_evals"] == 49
    times = np.array([s[0] for s in seen])
    assert all(s.shape == (3,) and np.all(s == s[0]) for s in seen)
    np.testing.assert_allclose(times, ref["model_eval_times_49"], atol=1e-6)
    assert out.dtype == jnp.float32 and out.shape == (3, 2, 4)
    expect = np.prod(1 - np.diff(grid))  # Euler on x' = -x: x *= (1 - dt) each step
    np.testing.assert_allclose(np.asarray(out), expect, rtol=1e-5)
    # a 2-point grid is exactly one evaluation, starting at t = 1
    seen.clear()
    S.euler_sample(vel, x0, np.array([1.0, 0.0]))
    jax.effects_barrier()
    assert len(seen) == 1 and seen[0][0] == 1.0


def test_euler_trajectory_and_length():
    # constant velocity -> straight path: length = ||v|| * (t_0 - t_end) for any grid
    v = jnp.array([[3.0, 4.0], [0.0, 1.0]])
    vel = lambda x, t: jnp.broadcast_to(v, x.shape)  # noqa: E731
    grid = S.euler_grid(20, shift=3.0)
    x0 = jnp.zeros((2, 2))
    xf, traj = S.euler_sample(vel, x0, grid, return_trajectory=True)
    assert traj.shape == (20, 2, 2)
    np.testing.assert_allclose(np.asarray(traj[0]), 0.0)
    np.testing.assert_allclose(np.asarray(traj[-1]), np.asarray(xf))
    span = grid[0] - grid[-1]
    np.testing.assert_allclose(np.asarray(xf), -span * np.asarray(v), rtol=1e-5)
    xf2, length = S.euler_sample_with_length(vel, x0, grid)
    np.testing.assert_allclose(np.asarray(length), [5 * span, span], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(S.trajectory_length(traj)), np.asarray(length), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(xf2), np.asarray(xf), rtol=1e-6)


def test_autoguidance():
    vm = jnp.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]])
    vg = jnp.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    t = jnp.array([0.05, 0.5, 0.95])
    out = np.asarray(S.autoguidance(vm, vg, 1.5, t))
    np.testing.assert_allclose(out, [[1.5, 2.5]] * 3)
    out = np.asarray(S.autoguidance(vm, vg, 1.5, t, t_min=0.1, t_max=0.9))
    np.testing.assert_allclose(out, [[1.0, 2.0], [1.5, 2.5], [1.0, 2.0]])
    assert np.allclose(np.asarray(S.autoguidance(vm, vg, 1.0, t)), np.asarray(vm))
    calls = []
    main = lambda x, t: (calls.append("m"), 2 * x)[1]  # noqa: E731
    guide = lambda x, t: (calls.append("g"), x)[1]  # noqa: E731
    fn = S.guided_velocity_fn(main, guide, 1.5)
    x = jnp.ones((3, 2))
    np.testing.assert_allclose(np.asarray(fn(x, t)), 2.5)
    assert calls == ["m", "g"]
    assert S.guided_velocity_fn(main, guide, 1.0) is main
