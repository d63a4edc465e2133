"""GMFlow solvers (GM-ODE / GM-SDE), probabilistic guidance, guided sweeps, the sampling grid and config
validation (closed forms and the loss: test_gmflow.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gm_fixture import DIAG, LW, S0, SOURCES, A, rand_gm

from mmfm_jax.config_utils import ConfigError
from mmfm_jax.flow import gmflow as gf
from mmfm_jax.flow.samplers import euler_grid, euler_sample
from mmfm_jax.ops import gm as ops

# ------------------------------------------------------------------------------------------------------------
# Solvers


@pytest.mark.parametrize("src_name", ["gaussian", "mode_gmm"])
def test_gm_ode_with_exact_model_is_euler_on_the_exact_velocity(src_name):
    """Transport is exact for the exact posterior, so S steps x n substeps == S n Euler steps on the exact
    velocity; the second-order correction then vanishes (its mean difference is 0)."""
    src = SOURCES[src_name]
    fn = gf.oracle_gm_fn(A, LW, S0, src)
    mu, sd = ops._src(src)
    x1 = mu + sd * jax.random.normal(jax.random.key(15), (64, 2, 2))
    grid = gf.gm_grid(2, 8, shift=2.0)
    ode = jax.jit(lambda x: jnp.stack([gf.gm_sample(fn, x, grid, num_substeps=8, source=src),
                                       gf.gm_sample(fn, x, grid, num_substeps=8, order=2, source=src)]))(x1)
    eul = jax.jit(lambda x: euler_sample(gf.gm_velocity_fn(fn), x, euler_grid(17, 2.0, t_end=1.0)))(x1)
    np.testing.assert_allclose(ode[0], eul, atol=3e-5)
    np.testing.assert_allclose(ode[1], eul, atol=3e-5)


def _target(n, key):
    k1, k2 = jax.random.split(key)
    return A[np.asarray(jax.random.categorical(k1, LW, shape=(n,)))] + S0 * np.asarray(jax.random.normal(k2, (n, 2)))


def _w2(x, y):
    """Mean over 4 projections of the 1-D squared W2 between equal-size sample sets."""
    x, y = np.asarray(x).reshape(-1, 2), np.asarray(y).reshape(-1, 2)
    dirs = np.array([[1, 0], [0, 1], [0.7071, 0.7071], [0.7071, -0.7071]])
    return float(np.mean([np.mean((np.sort(x @ d) - np.sort(y @ d)) ** 2) for d in dirs]))


@pytest.mark.parametrize("src_name", ["gaussian", "mode_gmm"])
def test_few_step_gm_solvers_land_on_the_target_where_euler_does_not(src_name):
    src = SOURCES[src_name]
    fn = gf.oracle_gm_fn(A, LW, S0, src)
    mu, sd = ops._src(src)
    n = 2000
    x1 = mu + sd * jax.random.normal(jax.random.key(16), (n, 1, 2))
    keys = jax.random.split(jax.random.key(17), n)

    @jax.jit
    def run(x):
        return (gf.gm_sample(fn, x, gf.gm_grid(2, 32), num_substeps=32, source=src),
                gf.gm_sample(fn, x, gf.gm_grid(2), solver="sde", keys=keys, source=src),
                euler_sample(gf.gm_velocity_fn(fn), x, gf.gm_grid(2)),
                euler_sample(gf.gm_velocity_fn(fn), x, gf.gm_grid(4)))

    ode, sde, e2, e4 = run(x1)
    ref = _target(n, jax.random.key(18))
    floor = _w2(ref, _target(n, jax.random.key(19)))  # two exact sample sets: ~0.02
    w_ode, w_sde, w_e2, w_e4 = (_w2(s, ref) for s in (ode, sde, e2, e4))
    assert w_ode < 2.5 * floor and w_sde < 3.5 * floor, (w_ode, w_sde, floor)
    assert w_e2 > 10 * floor and w_e4 > 3 * floor, (w_e2, w_e4, floor)
    np.testing.assert_allclose(np.asarray(ode).reshape(n, 2).mean(0), (np.exp(LW)[:, None] * A).sum(0), atol=0.08)


def test_second_order_reweight_k1_closed_form():
    gm = rand_gm(jax.random.key(20), b=2, n_tok=4, k=1)

    @jax.jit
    def run():
        mu, v = ops.surrogate(gm)
        bias = 0.1 * jax.random.normal(jax.random.key(21), mu.shape)
        out, bias_r = ops.second_order_reweight(gm, mu, v, bias)
        big, big_r = ops.second_order_reweight(gm, mu, v, 100.0 * bias)  # rescaled to mean square <= avg_var
        return mu, v, bias, ops.gm_mean(out), out.logstds, bias_r, big.means, big_r

    mu, v, bias, out_mean, out_logstds, bias_r, big_means, big_r = (np.asarray(a, np.float64) for a in run())
    np.testing.assert_allclose(out_mean, mu + bias_r, atol=1e-5)
    p = np.mean(bias**2, axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(np.exp(2 * out_logstds)[:, 0, 0, 0], (v * (1 - p / v))[:, 0, 0], rtol=1e-4)
    np.testing.assert_allclose(np.mean(big_r**2, axis=(1, 2)), v[:, 0, 0], rtol=1e-4)
    assert np.all(np.isfinite(big_means))


# ------------------------------------------------------------------------------------------------------------
# Guidance


def _np_official_guidance(gm, uncond_mean, w):
    """GMFlow's route in numpy: surrogate, bias, target N(mu_c + b, (1 - w^2) v), ratio mask N(mu_c + b / w^2,
    v (1 - w^2) / w^2), then the isotropic product with every component."""
    m, lw, ls = (np.asarray(a, np.float64) for a in gm)
    wts = np.exp(lw - lw.max(-1, keepdims=True))
    wts /= wts.sum(-1, keepdims=True)
    mu = (wts[..., None] * m).sum(-2)
    var_tok = (wts * ((m - mu[..., None, :]) ** 2).mean(-1)).sum(-1) + np.exp(2 * ls).reshape(-1, 1)
    v = var_tok.mean(-1)[:, None, None]
    d = mu - uncond_mean
    d = d - (d * mu).mean((1, 2), keepdims=True) / (mu * mu).mean((1, 2), keepdims=True) * mu
    bias = d * np.sqrt(v / (d * d).mean((1, 2), keepdims=True)) * w
    g_mean, g_var = mu + bias / w**2, v * (1 - w**2) / w**2
    gv, cv = np.exp(2 * ls), g_var[..., None]
    out_m = (cv * m + gv * g_mean[..., None, :]) / (cv + gv)
    out_lw = lw - 0.5 * ((m - g_mean[..., None, :]) ** 2).sum(-1) / (cv[..., 0] + gv[..., 0])
    out_lw = out_lw - out_lw.max(-1, keepdims=True)
    out_lw -= np.log(np.exp(out_lw).sum(-1, keepdims=True))
    return out_m, out_lw, bias


def test_probabilistic_guidance_matches_official_route_and_moves_along_bias():
    gm, g1 = rand_gm(jax.random.key(22), b=2, n_tok=6, k=3), rand_gm(jax.random.key(24), b=2, n_tok=6, k=1)

    @jax.jit
    def run():
        uncond = ops.gm_mean(gm) + 0.5 * jax.random.normal(jax.random.key(23), (2, 6, 2))
        out, b, mu_c, v = ops.probabilistic_guidance(gm, uncond, 0.4)
        out1, b1, mu1, _ = ops.probabilistic_guidance(g1, uncond, 0.4)
        out0 = ops.probabilistic_guidance(gm, uncond, 0.0)[0]
        return uncond, out, b, mu_c, v, ops.gm_mean(out), ops.gm_mean(out1), b1, mu1, out0

    uncond, out, b, mu_c, v, out_mean, out1_mean, b1, mu1, out0 = run()
    ref_m, ref_lw, ref_b = _np_official_guidance(gm, np.asarray(uncond, np.float64), 0.4)
    np.testing.assert_allclose(out.means, ref_m, atol=1e-5)
    np.testing.assert_allclose(out.logweights, ref_lw, atol=1e-4)
    np.testing.assert_allclose(b, ref_b, atol=1e-5)
    # b is orthogonal to mu_c and has RMS w sqrt(v); the guided mean moves along it
    b, mu_c, v = (np.asarray(a, np.float64) for a in (b, mu_c, v))
    np.testing.assert_allclose(np.mean(b * mu_c, axis=(1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.sqrt(np.mean(b * b, axis=(1, 2))), 0.4 * np.sqrt(v[:, 0, 0]), rtol=1e-4)
    shift = (np.asarray(out_mean) - mu_c).reshape(2, -1)
    bf = b.reshape(2, -1)
    cos = np.sum(shift * bf, -1) / np.linalg.norm(shift, axis=-1) / np.linalg.norm(bf, axis=-1)
    assert np.all(cos > 0.5), cos
    # K = 1: the guided mean is exactly mu_c + b
    np.testing.assert_allclose(out1_mean, mu1 + b1, atol=1e-5)
    # scale 0 is exactly the identity
    np.testing.assert_allclose(out0.means, gm.means, atol=1e-7)
    np.testing.assert_allclose(out0.logweights, gm.logweights, atol=1e-6)


def test_guided_sampling_and_sweep_equal_separate_runs():
    """Probabilistic AutoGuidance (a second gm_fn as guide); the vmapped sweep equals one run per scale; scale 0
    equals unguided sampling."""
    fn = gf.oracle_gm_fn(A, LW, S0, DIAG)
    guide = gf.oracle_gm_fn(0.8 * A, LW, 0.6, DIAG)  # a blurrier 'weak model'
    x1 = DIAG.mean + DIAG.std * jax.random.normal(jax.random.key(25), (16, 3, 2))
    keys = jax.random.split(jax.random.key(26), 16)
    scales = [0.0, 0.3, 0.6]
    common = dict(source=DIAG, guide_fn=guide)
    ode_kw = dict(num_substeps=4, order=2, **common)
    sde_kw = dict(solver="sde", keys=keys, **common)

    one_ode = jax.jit(lambda x, w: gf.gm_sample(fn, x, gf.gm_grid(3, 4), guidance_scale=w, **ode_kw))
    one_sde = jax.jit(lambda x, w: gf.gm_sample(fn, x, gf.gm_grid(3), guidance_scale=w, **sde_kw))

    @jax.jit
    def run(x):
        return (gf.sample_sweep(fn, x, gf.gm_grid(3, 4), scales, **ode_kw),
                gf.sample_sweep(fn, x, gf.gm_grid(3), scales, **sde_kw),
                gf.gm_sample(fn, x, gf.gm_grid(3, 4), num_substeps=4, order=2, source=DIAG))

    sweep_ode, sweep_sde, plain = run(x1)
    sep_ode = jnp.stack([one_ode(x1, w) for w in scales])  # one run per scale
    sep_sde = jnp.stack([one_sde(x1, w) for w in scales])
    assert sweep_ode.shape == (3, 16, 3, 2)
    np.testing.assert_allclose(sweep_ode, sep_ode, atol=1e-4)
    np.testing.assert_allclose(sweep_sde, sep_sde, atol=1e-4)
    np.testing.assert_allclose(sep_ode[0], plain, atol=1e-5)
    assert float(jnp.abs(sep_ode[2] - sep_ode[0]).mean()) > 0.05  # guidance does something
    assert bool(jnp.all(jnp.isfinite(sweep_sde)))


# ------------------------------------------------------------------------------------------------------------
# Grid and config validation


def test_grid_and_argument_checks():
    g = gf.gm_grid(4, 2, shift=3.0)
    s = 1 - np.arange(8) / 8
    np.testing.assert_allclose(g, np.append(3 * s / (1 + 2 * s), 0.0))
    fn = gf.oracle_gm_fn(A, LW, S0)
    x = jnp.zeros((2, 1, 2))
    with pytest.raises(ValueError, match="num_steps"):
        gf.gm_sample(fn, x, gf.gm_grid(3), num_substeps=2)
    with pytest.raises(ValueError, match="decrease"):
        gf.gm_sample(fn, x, np.array([1.0, 0.0, 0.5]))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        gf.gm_sample(fn, x, gf.gm_grid(2), guidance_scale=1.0, guide_fn=fn)
    with pytest.raises(ValueError, match="guide_fn"):
        gf.gm_sample(fn, x, gf.gm_grid(2), guidance_scale=0.3)
    with pytest.raises(ValueError, match="one substep"):
        gf.gm_sample(fn, x, gf.gm_grid(2, 2), solver="sde", num_substeps=2, keys=jax.random.split(jax.random.key(0), 2))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        gf.sample_sweep(fn, x, gf.gm_grid(2), [0.1, 1.2], guide_fn=fn)


def test_validate_gm_source():
    for kind, mc in (("gaussian", False), ("gmm", True)):
        gf.validate_gm_source(kind, mc, trans_ratio=0.5, solver="sde", order=2)
        gf.validate_gm_source(kind, mc, trans_ratio=0.5, solver="ode", num_substeps=8, order=2)
    gf.validate_gm_source("gmm", False)  # plain NLL + first-order GM-ODE without substeps: fine
    bad = [(dict(trans_ratio=0.5), "trans_ratio = 0.5:"), (dict(solver="sde"), "solver = 'sde':"),
           (dict(num_substeps=4), "num_substeps = 4:"), (dict(order=2), "order = 2:")]
    for kw, key in bad:  # the library names the argument; config validation maps it to a key (config_errors)
        with pytest.raises(ValueError, match=f"^{key}") as e:
            gf.validate_gm_source("gmm", False, **kw)
        assert "mode_conditional" in str(e.value) and not isinstance(e.value, ConfigError)
    with pytest.raises(ValueError, match="^kind = 'uniform'"):
        gf.validate_gm_source("uniform", False)
    with pytest.raises(ValueError, match="^trans_ratio = 0.0"):
        gf.validate_gm_source("gaussian", False, trans_ratio=0.0)
