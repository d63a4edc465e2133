"""GMFlow closed forms and the transition NLL against brute-force numerics (solvers, guidance and validation:
test_gmflow_solvers.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gm_fixture import LW, S0, SOURCES, A, grid2d, np_gm_logpdf, rand_gm

from mmfm_jax.flow import gmflow as gf
from mmfm_jax.flow.loss import fm_loss_per_sample
from mmfm_jax.ops import gm as ops
from mmfm_jax.ops.gm import GM, GaussianSource

# ------------------------------------------------------------------------------------------------------------
# Closed forms


def test_conversions_and_nll():
    gm = rand_gm(jax.random.key(0), diag=True)
    x = jax.random.normal(jax.random.key(1), (3, 1, 2))
    y = jax.random.normal(jax.random.key(2), (3, 1, 2))
    t = jnp.array([0.2, 0.5, 0.9])
    tiny = GM(gm.means[:, :, :1], jnp.zeros((3, 1, 1)), jnp.full((3, 1, 1, 1), math.log(1e-6)))
    big = GM(jnp.broadcast_to(gm.means[:1, :1], (1, 20000, 3, 2)),
             jnp.broadcast_to(gm.logweights[:1, :1], (1, 20000, 3)), gm.logstds[:1])

    @jax.jit
    def run():
        gx = ops.u_to_x0(gm, x, t)
        return (gx, ops.x0_to_u(gx, x, t), ops.gm_mean(gx), ops.gm_mean(gm), ops.gm_nll(gm, y), ops.gm_nll(tiny, y),
                ops.gm_sample(big, jax.random.key(3)))

    gx, back, mean_x0, mean_u, nll, nll_tiny, s = run()
    for a, b in zip(back, gm):
        np.testing.assert_allclose(a, jnp.broadcast_to(b, a.shape), atol=1e-5)
    np.testing.assert_allclose(mean_x0, x - t[:, None, None] * mean_u, atol=1e-5)
    # per-token NLL = -log density - C/2 log(2 pi) (GMFlow drops the constant)
    ref = -np_gm_logpdf(gm, np.asarray(y))[:, 0] - math.log(2 * math.pi)
    np.testing.assert_allclose(nll[:, 0], ref, rtol=1e-5)
    # 1/s is clamped at 1/eps (GMFlow eps = 1e-4), the log s term is not
    d = np.asarray(y - tiny.means[:, :, 0])
    np.testing.assert_allclose(nll_tiny, np.sum(0.5 * (d * 1e4) ** 2 + math.log(1e-6), -1), rtol=1e-5)
    # GM-SDE's per-token sampler has the mixture's moments
    np.testing.assert_allclose(np.asarray(s)[0].mean(0), mean_u[0, 0], atol=0.03)


@pytest.mark.parametrize("src_name", ["gaussian", "mode_gmm"])
@pytest.mark.parametrize("t_src,t_dst", [(0.7, 0.35), (0.5, 0.55)])
def test_transport_matches_quadrature(src_name, t_src, t_dst):
    """Eq. (10): q(x0 | x_dst) ∝ p(x_dst | x0) / p(x_src | x0) q(x0 | x_src), on a 2-D grid (both directions)."""
    src = SOURCES[src_name]
    mu, sd = (np.zeros(2), np.ones(2)) if src is None else (src.mean, src.std)
    gm = rand_gm(jax.random.key(4), b=2, diag=(src is not None), scale=0.8)
    x_src = np.asarray(jax.random.normal(jax.random.key(5), (2, 1, 2)), np.float64)
    x_dst = x_src + 0.3 * np.asarray(jax.random.normal(jax.random.key(6), (2, 1, 2)))
    out = jax.jit(ops.transport_x0_gm)(gm, x_src, jnp.full((2,), t_src), x_dst, jnp.full((2,), t_dst), src)
    pts, da = grid2d(-8, 8, 321)

    def log_lik(x, t):  # log p(x_t | x0) on the grid, up to x0-independent constants
        return np.sum(-0.5 * ((x[:, None, 0] - (1 - t) * pts[None] - t * mu) / (t * sd)) ** 2, -1)

    for bi in range(2):
        lq = np_gm_logpdf(gm, np.broadcast_to(pts, (2,) + pts.shape))[bi]
        lp = lq + log_lik(x_dst[bi:bi + 1], t_dst)[0] - log_lik(x_src[bi:bi + 1], t_src)[0]
        p = np.exp(lp - lp.max())
        p /= p.sum() * da
        mean_q = (p[:, None] * pts).sum(0) * da
        mean_gm = np.asarray(out.means[bi, 0]).T @ np.exp(np.asarray(out.logweights[bi, 0], np.float64))
        np.testing.assert_allclose(mean_gm, mean_q, atol=2e-4)
        dens = np.exp(np_gm_logpdf(out, np.broadcast_to(pts, (2,) + pts.shape))[bi])
        np.testing.assert_allclose(dens, p, atol=2e-4 * p.max())


@pytest.mark.parametrize("src_name", ["gaussian", "mode_gmm"])
def test_transport_of_exact_posterior_is_exact_posterior(src_name):
    src = SOURCES[src_name]
    fn = gf.oracle_gm_fn(A, LW, S0, src)
    x = jax.random.normal(jax.random.key(7), (4, 3, 2))
    y = x + 0.5 * jax.random.normal(jax.random.key(8), (4, 3, 2))
    t, tau = jnp.full((4,), 0.8), jnp.full((4,), 0.3)

    @jax.jit
    def run():
        return ops.transport_x0_gm(ops.u_to_x0(fn(x, t), x, t), x, t, y, tau, src), ops.u_to_x0(fn(y, tau), y, tau)

    moved, exact = run()
    np.testing.assert_allclose(moved.means, exact.means, atol=2e-5)
    np.testing.assert_allclose(moved.logweights, exact.logweights, atol=2e-4)
    np.testing.assert_allclose(jnp.broadcast_to(moved.logstds, (4, 3, 1, 2)),
                               jnp.broadcast_to(exact.logstds, (4, 3, 1, 2)), atol=2e-5)


def test_transport_is_accurate_in_fp32_at_wide_tokens():
    """C = 768 channels per token, t -> 0.02: the centred fp32 form stays close to a float64 evaluation of Eq. 10
    (the uncentred form loses about 0.1 in the logits here)."""
    b, n_tok, k, c, ts, td = 2, 4, 8, 768, 0.3, 0.02

    @jax.jit
    def make():
        ks = jax.random.split(jax.random.key(30), 5)
        x0c = 1.5 * jax.random.normal(ks[0], (b, n_tok, 1, c))
        gm = GM(x0c + 0.3 * jax.random.normal(ks[1], (b, n_tok, k, c)),
                jax.nn.log_softmax(jax.random.normal(ks[2], (b, n_tok, k))), jnp.full((b, 1, 1, 1), math.log(0.05)))
        xs = (1 - ts) * x0c[:, :, 0] + ts * jax.random.normal(ks[3], (b, n_tok, c))
        xd = (1 - td) * x0c[:, :, 0] + td * jax.random.normal(ks[4], (b, n_tok, c))
        return gm, xs, xd, ops.transport_x0_gm(gm, xs, ts, xd, td)

    gm, xs, xd, out = make()
    m, lw, xs, xd = (np.asarray(a, np.float64) for a in (gm.means, gm.logweights, xs, xd))
    v = 0.05**2
    zeta = ((1 - td) / td) ** 2 - ((1 - ts) / ts) ** 2
    nu = (1 - td) * xd / td**2 - (1 - ts) * xs / ts**2
    ref = lw + np.sum(m * (nu[..., None, :] - 0.5 * zeta * m), -1) / (1 + v * zeta)
    ref -= ref.max(-1, keepdims=True)
    ref -= np.log(np.exp(ref).sum(-1, keepdims=True))
    np.testing.assert_allclose(out.logweights, ref, atol=0.01)
    np.testing.assert_allclose(out.means, (m + v * nu[..., None, :]) / (1 + v * zeta), atol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# Loss


@pytest.mark.parametrize("src_name", ["gaussian", "mode_gmm"])
def test_transition_nll_equals_bruteforce_density(src_name):
    """The loss = -log p(x_low | x_high) with p = ∫ q(x_low | x_high, x0) q_theta(x0 | x_high) dx0, where the
    bridge q(x_low | x_high, x0) ∝ p(x_high | x_low) p(x_low | x0) is normalised numerically (no c1/c2/c3)."""
    src = SOURCES[src_name]
    mu, sd = (np.zeros(2), np.ones(2)) if src is None else (np.asarray(src.mean, np.float64), src.std)
    b = 3
    gm_u = rand_gm(jax.random.key(9), b=b, scale=0.7)
    gm_u = gm_u._replace(logstds=jnp.full((b, 1, 1, 1), math.log(0.5)))
    x_data = jax.random.normal(jax.random.key(10), (b, 1, 2))
    x_source = mu + sd * jax.random.normal(jax.random.key(11), (b, 1, 2))
    batch = gf.transition_inputs(x_data, x_source, jnp.array([0.6, 0.45, 0.8]), jax.random.normal(
        jax.random.key(12), (b, 1, 2)), trans_ratio=0.5, source=src)
    np.testing.assert_allclose(batch.t_low, batch.t_high * 0.5)
    loss = np.asarray(jax.jit(gf.transition_nll)(gm_u, batch, src, weight_scale=2.0))
    gx_all = jax.jit(ops.u_to_x0)(gm_u, batch.x_high, batch.t_high)

    pts, da = grid2d(-5.5, 5.5, 221)
    xl_1d = np.linspace(-12, 12, 4001)
    for bi in range(b):
        th, tl = float(batch.t_high[bi]), float(batch.t_low[bi])
        xh, xl = np.asarray(batch.x_high[bi, 0], np.float64), np.asarray(batch.x_low[bi, 0], np.float64)
        log_q0 = np_gm_logpdf(GM(*(a[bi:bi + 1] for a in gx_all)), pts[None])[0]  # [P]
        m_tr = (1 - th) / (1 - tl)
        s_tr = math.sqrt(th**2 - (m_tr * tl) ** 2)
        log_kernel = np.zeros(len(pts))
        for d in range(2):
            def gauss(x, m, s):
                return np.exp(-0.5 * ((x - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))
            fwd = gauss(xh[d], th * mu[d] + m_tr * (xl_1d - tl * mu[d]), s_tr * sd[d])  # p(x_high | x_low grid)
            g1 = np.unique(pts[:, d])
            marg = gauss(xl_1d[None], (1 - tl) * g1[:, None] + tl * mu[d], tl * sd[d])  # p(x_low | x0)
            z = np.trapezoid(fwd[None] * marg, xl_1d, axis=1)  # = p(x_high | x0), numerically
            num = gauss(xh[d], th * mu[d] + m_tr * (xl[d] - tl * mu[d]), s_tr * sd[d]) * gauss(
                xl[d], (1 - tl) * g1 + tl * mu[d], tl * sd[d])
            log_kernel += np.log(num / z)[np.searchsorted(g1, pts[:, d])]
        lp = np.log(np.sum(np.exp(log_q0 + log_kernel)) * da)
        want = 2.0 * (-lp - math.log(2 * math.pi))
        np.testing.assert_allclose(loss[bi], want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("src_name", ["gaussian", "mode_gmm"])
def test_bridge_order_has_the_reference_joint_law(src_name):
    """(x_low then forward transition) and (x_high then bridge) give the same joint law given x0."""
    src = SOURCES[src_name]
    mu, sd = (0.0, 1.0) if src is None else (float(src.mean[0]), float(src.std[0]))
    s1 = GaussianSource(mu, sd)
    n, tl, th, x0 = 200_000, 0.25, 0.7, 0.8

    @jax.jit
    def run():
        e = jax.random.normal(jax.random.key(13), (4, n, 1, 1))
        xl_a = (1 - tl) * x0 + tl * (mu + sd * e[0])
        xh_a = ops.forward_transition_sample(xl_a, tl, th, e[1], s1)
        xh_b = (1 - th) * x0 + th * (mu + sd * e[2])
        xl_b = ops.bridge_sample(jnp.full((n, 1, 1), x0), xh_b, tl, th, e[3], s1)
        return xl_a, xh_a, xl_b, xh_b

    xl_a, xh_a, xl_b, xh_b = run()
    ja, jb = (np.stack([np.ravel(u), np.ravel(v)]) for u, v in ((xl_a, xh_a), (xl_b, xh_b)))
    np.testing.assert_allclose(ja.mean(1), jb.mean(1), atol=0.01)
    np.testing.assert_allclose(np.cov(ja), np.cov(jb), atol=0.01)
    np.testing.assert_allclose(np.cov(ja)[1, 1], (th * sd) ** 2, rtol=0.02)


def test_k1_fixed_std_loss_is_affine_in_fm_mse():
    """K = 1, fixed std, trans_ratio = 1: loss_b = a(t) * fm_mse_b + c(t) with the closed-form a, c."""
    b, n_tok, c, t, s = 64, 4, 3, 0.6, 0.8

    @jax.jit
    def run():
        ks = jax.random.split(jax.random.key(14), 4)
        shape = (b, n_tok, c)
        x_data, x_source = jax.random.normal(ks[0], shape), jax.random.normal(ks[1], shape)
        batch = gf.transition_inputs(x_data, x_source, jnp.full((b,), t), jax.random.normal(ks[2], shape), 1.0)
        v_pred = (x_source - x_data) + jax.random.normal(ks[3], shape) * jnp.linspace(0.1, 2, b)[:, None, None]
        gm_u = GM(v_pred[:, :, None, :], jnp.zeros((b, n_tok, 1)), jnp.full((b, 1, 1, 1), math.log(s)))
        return (x_data, x_source, batch, gf.transition_nll(gm_u, batch, weight_scale=2.0),
                fm_loss_per_sample(v_pred, x_data, x_source))

    x_data, x_source, batch, loss, mse = run()
    np.testing.assert_array_equal(batch.t_low, 0.0)
    np.testing.assert_allclose(batch.x_low, x_data, atol=1e-6)
    np.testing.assert_allclose(batch.x_high, (1 - t) * x_data + t * x_source, atol=1e-6)
    loss, mse = np.asarray(loss, np.float64), np.asarray(mse, np.float64)
    slope, icpt = np.polyfit(mse, loss, 1)
    np.testing.assert_allclose(loss, slope * mse + icpt, atol=2e-4 * np.abs(loss).max())
    var = (t * s) ** 2 + 1e-6  # c3 = 0 is floored at eps = 1e-6 as in the reference
    np.testing.assert_allclose(slope, 2.0 * c * t * t / (2 * var), rtol=1e-4)
    np.testing.assert_allclose(icpt, 2.0 * c * 0.5 * math.log(var), rtol=1e-4, atol=1e-4)


def test_loss_with_head_is_differentiable():
    from flax import nnx

    from mmfm_jax.models.gm_head import GMHead

    head = GMHead(8, 2, 4, 6, rngs=nnx.Rngs(0), logstd_inner_dim=16)
    gd, state = nnx.split(head)
    feats, cond = jax.random.normal(jax.random.key(0), (2, 5, 8)), jax.random.normal(jax.random.key(1), (2, 6))
    x_data, x_src = jax.random.normal(jax.random.key(2), (2, 5, 2)), jax.random.normal(jax.random.key(3), (2, 5, 2))
    batch = gf.transition_inputs(x_data, x_src, jnp.array([0.3, 0.9]), jax.random.normal(jax.random.key(4), (2, 5, 2)),
                                 0.5)

    @jax.jit
    def lossf(st):
        return jnp.mean(gf.transition_nll(nnx.merge(gd, st)(feats, cond), batch))

    g = jax.grad(lossf)(state)
    leaves = jax.tree.leaves(g)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in leaves)
    assert float(jnp.abs(g["proj_kernel"][...]).sum()) > 0
    assert float(jnp.abs(g["logstd_layers"][1]["kernel"][...]).sum()) > 0  # zero-init last layer still learns
