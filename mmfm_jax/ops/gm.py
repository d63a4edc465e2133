"""Closed-form Gaussian-mixture (GM) operations behind GMFlow, as pure, jittable jax functions in fp32.

Time convention (the package's): ``x_t = (1 - t) x_data + t x_source``, t = 0 data, t = 1 source, velocity
``u = x_source - x_data``. GMFlow writes ``x_t = (1 - sigma) x0 + sigma eps`` with ``sigma = T / 1000`` and
``u = eps - x0``: our ``t`` *is* GMFlow's ``sigma`` (``alpha = 1 - t``) and the velocities coincide, so every
formula below is GMFlow's with ``sigma -> t``. ``x0 = x_t - t u`` holds for any source law.

Source: ``GaussianSource(mean, std)``, arrays broadcastable to ``x`` ([B, *T, C]); ``None`` means N(0, I).
For MM-FM's mode-conditional model the source given the mode m is N(mu_m, diag(sigma_m^2)), so
``p(x_t | x0, m) = N((1 - t) x0 + t mu_m, t^2 sigma_m^2)`` per dimension: every closed form here takes the source
and generalises dimension by dimension (``x_t -> x_t - t mu``, ``t^2 -> t^2 sigma^2``).

GM layout (one mixture per token, over its C channels; all components of a token share one std):
``GM(means [B, *T, K, C], logweights [B, *T, K], logstds)`` with ``logstds`` broadcastable to
``[B, *T, 1, C]``: ``[B, 1, 1, 1]`` (one isotropic std per sample, what the network head emits) or
``[B, *T, 1, C]`` (diagonal, once a per-dimension source std has entered). ``*T`` is usually one axis (L tokens);
a flat vector is ``[B, 1, C]``. Times are ``[B]`` (or scalars). Per-sample scalars in x layout are ``[B, 1, .., 1]``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

F32 = jnp.float32


class GM(NamedTuple):
    """A per-token Gaussian mixture with a shared (per-sample or diagonal) std; see the module docstring."""

    means: jax.Array  # [B, *T, K, C]
    logweights: jax.Array  # [B, *T, K], log-softmax normalised over K
    logstds: jax.Array  # broadcastable to [B, *T, 1, C]

    def astype(self, dtype: Any = F32) -> GM:
        return GM(*(jnp.asarray(a).astype(dtype) for a in self))


class GaussianSource(NamedTuple):
    """Source N(mean, diag(std^2)); ``mean``/``std`` broadcastable to x [B, *T, C] (per mode: the sampled mode's)."""

    mean: Any = 0.0
    std: Any = 1.0


def bcast_t(t: Any, ndim: int) -> jax.Array:
    """t [B] (or scalar) -> fp32 [B, 1, ..., 1] with ``ndim`` axes (scalar stays scalar)."""
    t = jnp.asarray(t, F32)
    return t if t.ndim == 0 else t.reshape(t.shape + (1,) * (ndim - t.ndim))


def _src(source: GaussianSource | None) -> tuple[jax.Array, jax.Array]:
    if source is None:
        return jnp.zeros((), F32), jnp.ones((), F32)
    return jnp.asarray(source.mean, F32), jnp.asarray(source.std, F32)


def _g(a: jax.Array) -> jax.Array:
    """x-layout [B, *T, C] (or broadcastable) -> GM layout [B, *T, 1, C]; scalars unchanged."""
    a = jnp.asarray(a, F32)
    return a if a.ndim == 0 else jnp.expand_dims(a, -2)


def _nonbatch_mean(a: jax.Array) -> jax.Array:
    return jnp.mean(a, axis=tuple(range(1, a.ndim)), keepdims=True)


# ------------------------------------------------------------------------------------------------------------
# Moments, conversions, densities


def gm_weights(gm: GM) -> jax.Array:
    """Mixture weights softmax(logweights): [B, *T, K]."""
    return jax.nn.softmax(jnp.asarray(gm.logweights, F32), axis=-1)


def gm_mean(gm: GM) -> jax.Array:
    """Mixture mean sum_k A_k mu_k: [B, *T, C]."""
    return jnp.sum(gm_weights(gm)[..., None] * jnp.asarray(gm.means, F32), axis=-2)


def gm_iso_gaussian(gm: GM) -> tuple[jax.Array, jax.Array]:
    """Isotropic Gaussian surrogate per token: ``(mean [B, *T, C], var [B, *T, 1])`` with
    ``var = sum_k A_k mean_c (mu_kc - mean_c)^2 + mean_c s_c^2``."""
    w = gm_weights(gm)
    mu = gm_mean(gm)
    d2 = jnp.mean(jnp.square(gm.means - mu[..., None, :]), axis=-1)  # [B, *T, K]
    comp_var = jnp.mean(jnp.broadcast_to(jnp.exp(2.0 * gm.logstds), gm.means.shape[:-2] + (1, gm.means.shape[-1])),
                        axis=(-2, -1))  # [B, *T]
    return mu, (jnp.sum(w * d2, axis=-1) + comp_var)[..., None]


def gm_sample(gm: GM, key: jax.Array) -> jax.Array:
    """One draw per token: component ~ Cat(A), then mu_k + s * N(0, I). Returns [B, *T, C] fp32."""
    kc, kn = jax.random.split(key)
    idx = jax.random.categorical(kc, jnp.asarray(gm.logweights, F32), axis=-1)  # [B, *T]
    mu = jnp.take_along_axis(jnp.asarray(gm.means, F32), idx[..., None, None], axis=-2)[..., 0, :]
    std = jnp.exp(jnp.asarray(gm.logstds, F32))
    std = std if std.ndim == 0 else std[..., 0, :]  # drop the K axis: broadcastable to [B, *T, C]
    return mu + std * jax.random.normal(kn, mu.shape, F32)


def u_to_x0(gm_u: GM, x_t: jax.Array, t: Any, eps: float = 1e-6) -> GM:
    """Velocity GM at (x_t, t) -> x0 (data) GM: means ``x_t - t mu_k``, ``log s_x = log s + log max(t, eps)``."""
    x_t = jnp.asarray(x_t, F32)
    tg = _g(bcast_t(t, x_t.ndim))
    gm_u = gm_u.astype(F32)
    return GM(x_t[..., None, :] - tg * gm_u.means, gm_u.logweights, gm_u.logstds + jnp.log(jnp.maximum(tg, eps)))


def x0_to_u(gm_x0: GM, x_t: jax.Array, t: Any, eps: float = 1e-6) -> GM:
    """Inverse of :func:`u_to_x0`: means ``(x_t - mu^x_k) / t``, ``log s = log s_x - log max(t, eps)``."""
    x_t = jnp.asarray(x_t, F32)
    tg = jnp.maximum(_g(bcast_t(t, x_t.ndim)), eps)
    gm_x0 = gm_x0.astype(F32)
    return GM((x_t[..., None, :] - gm_x0.means) / tg, gm_x0.logweights, gm_x0.logstds - jnp.log(tg))


def gm_nll(gm: GM, x: jax.Array, eps: float = 1e-4) -> jax.Array:
    """Per-token GM negative log-likelihood as GMFlow computes it (fp32): [B, *T].

    ``-logsumexp_k [log A_k + sum_c (-0.5 ((x_c - mu_kc) / s_c)^2 - log s_c)]`` with ``1/s`` clamped at ``1/eps``
    and *no* ``0.5 log(2 pi)`` constant (add ``0.5 C log(2 pi)`` for the true NLL). ``logweights`` must be
    normalised (log-softmax), as the head emits them.
    """
    gm = gm.astype(F32)
    x = jnp.asarray(x, F32)
    inv = jnp.minimum(jnp.exp(-gm.logstds), 1.0 / eps)
    z = (gm.means - x[..., None, :]) * inv
    ll = jnp.sum(-0.5 * jnp.square(z) - jnp.broadcast_to(gm.logstds, z.shape), axis=-1)  # [B, *T, K]
    return -jax.nn.logsumexp(ll + gm.logweights, axis=-1)


# ------------------------------------------------------------------------------------------------------------
# Products with Gaussians (guidance, second order, transport), in natural parameters


def gm_mul_gaussian(gm: GM, center: jax.Array, lam: Any, beta: Any, eps: float = 1e-6) -> GM:
    """Multiply every component by ``exp(-0.5 sum_d lam_d (x_d - m_d)^2)`` and renormalise.

    The factor is given in natural parameters around ``center``: precision ``lam`` and ``beta = lam (m - center)``
    (so lam = 0 with beta = 0 is exactly the identity and no infinite variance ever appears). ``center`` [B, *T, C];
    ``lam``, ``beta`` broadcastable to it. With ``v = s^2`` and ``d_k = mu_k - center``:
    ``mu_k' = center + (d_k + v beta) / (1 + lam v)``, ``v' = v / (1 + lam v)``,
    ``log A_k' = log A_k + sum_d d_k (beta - lam d_k / 2) / (1 + lam v)`` (log-softmax; the terms that do not depend
    on k cancel). The denominator is clamped at ``eps`` (as GMFlow's ``norm_factor``).
    """
    gm = gm.astype(F32)
    c, lam, beta = _g(center), _g(lam), _g(beta)
    v = jnp.exp(2.0 * gm.logstds)
    den = jnp.maximum(1.0 + lam * v, eps)
    d = gm.means - c
    means = c + (d + v * beta) / den
    delta = jnp.sum(d * (beta - 0.5 * lam * d) / den, axis=-1)
    logw = jax.nn.log_softmax(gm.logweights + delta, axis=-1)
    return GM(means, logw, gm.logstds - 0.5 * jnp.log(den))


def transport_x0_gm(gm_x0: GM, x_src: jax.Array, t_src: Any, x_dst: jax.Array, t_dst: Any,
                    source: GaussianSource | None = None, eps: float = 1e-6) -> GM:
    """GMFlow Eq. (10): the x0-GM predicted at (x_src, t_src) turned into the x0-posterior at (x_dst, t_dst).

    ``q(x0 | x_dst) ∝ p(x_dst | x0) / p(x_src | x0) q(x0 | x_src)``; with ``p(x_t | x0) = N(a_t x0 + t mu,
    t^2 sigma^2)`` (a = 1 - t) the ratio is ``exp(-zeta x0^2 / 2 + nu x0)`` per dimension with
    ``zeta = ((a_d / t_d)^2 - (a_s / t_s)^2) / sigma^2`` and ``nu = (a_d y_d / t_d^2 - a_s y_s / t_s^2) / sigma^2``,
    ``y = x - t mu``. It is applied by :func:`gm_mul_gaussian` centred at the mixture mean c, with
    ``beta = nu - zeta c`` evaluated as ``(a_d (y_d - a_d c) / t_d^2 - a_s (y_s - a_s c) / t_s^2) / sigma^2``,
    which avoids the cancellation of two O(1/t^2) terms (the numerically safe form). t is clamped at ``eps``.
    Exact for t_dst < t_src (zeta >= 0); for t_dst > t_src it is valid while ``1 + zeta s^2 > 0``.
    Times [B] or scalars; x [B, *T, C].
    """
    x_src = jnp.asarray(x_src, F32)
    x_dst = jnp.asarray(x_dst, F32)
    mu, sd = _src(source)
    ts = jnp.maximum(bcast_t(t_src, x_src.ndim), eps)
    td = jnp.maximum(bcast_t(t_dst, x_src.ndim), eps)
    a_s, a_d = 1.0 - ts, 1.0 - td
    inv_var = 1.0 / jnp.square(sd)
    c = gm_mean(gm_x0)
    zeta = (jnp.square(a_d / td) - jnp.square(a_s / ts)) * inv_var
    r_d = x_dst - td * mu - a_d * c
    r_s = x_src - ts * mu - a_s * c
    beta = (a_d * r_d / jnp.square(td) - a_s * r_s / jnp.square(ts)) * inv_var
    return gm_mul_gaussian(gm_x0, c, zeta, beta, eps)


def transport_mean(gm_x0: GM, x_src: jax.Array, t_src: Any, x_dst: jax.Array, t_dst: Any,
                   source: GaussianSource | None = None, eps: float = 1e-6) -> jax.Array:
    """Mean of :func:`transport_x0_gm`: the GM-ODE's x0 estimate at a substep. [B, *T, C]."""
    return gm_mean(transport_x0_gm(gm_x0, x_src, t_src, x_dst, t_dst, source, eps))


# ------------------------------------------------------------------------------------------------------------
# Transition kernels (training loss, GM-SDE)


def transition_coefs(t_to: Any, t: Any, eps: float = 1e-6) -> tuple[jax.Array, jax.Array, jax.Array]:
    """GMFlow's ``(c1, c2, c3)`` of the Gaussian bridge ``q(x_{t_to} | x_t, x0) = N(c1 x_t + c2 x0, c3)``
    (standard source; t_to < t), with ``r = 1 - (t_to a_t / (t a_to))^2``: ``c1 = (t_to / t)^2 a_t / a_to``,
    ``c2 = r a_to``, ``c3 = r t_to^2``; divisors clamped at eps exactly as the reference."""
    t_to, t = jnp.asarray(t_to, F32), jnp.asarray(t, F32)
    ratio_t = t_to / jnp.maximum(t, eps)
    ratio_a = (1.0 - t) / jnp.maximum(1.0 - t_to, eps)
    r = 1.0 - jnp.square(ratio_t * ratio_a)
    return jnp.square(ratio_t) * ratio_a, r * (1.0 - t_to), r * jnp.square(t_to)


def bridge_sample(x_data: jax.Array, x_high: jax.Array, t_low: Any, t_high: Any, noise: jax.Array,
                  source: GaussianSource | None = None) -> jax.Array:
    """Draw ``x_low ~ q(x_low | x_high, x0)``: ``c1 (x_high - t_high mu) + t_low mu + c2 x0 + sqrt(c3) sigma xi``.

    Together with ``x_high = interpolate(x0, x_source, t_high)`` this gives the same joint law of
    (x_low, x_high) as GMFlow's order (x_low first, then :func:`forward_transition_sample`), and x_high is exactly
    the flow-matching input with the (possibly mode-coupled) source sample. ``noise`` ~ N(0, I) like x.
    """
    x_high = jnp.asarray(x_high, F32)
    mu, sd = _src(source)
    tl, th = bcast_t(t_low, x_high.ndim), bcast_t(t_high, x_high.ndim)
    c1, c2, c3 = transition_coefs(tl, th)
    return (c1 * (x_high - th * mu) + tl * mu + c2 * jnp.asarray(x_data, F32)
            + jnp.sqrt(jnp.maximum(c3, 0.0)) * sd * jnp.asarray(noise, F32))


def forward_transition_sample(x_low: jax.Array, t_low: Any, t_high: Any, noise: jax.Array,
                              source: GaussianSource | None = None) -> jax.Array:
    """GMFlow's ``sample_forward_transition``: ``x_high = t_h mu + (a_h / a_l)(x_low - t_l mu) + s_tr sigma eps``
    with ``s_tr = sqrt(t_h^2 - (a_h t_l / a_l)^2)``."""
    x_low = jnp.asarray(x_low, F32)
    mu, sd = _src(source)
    tl, th = bcast_t(t_low, x_low.ndim), bcast_t(t_high, x_low.ndim)
    m = (1.0 - th) / (1.0 - tl)
    s_tr = jnp.sqrt(jnp.maximum(jnp.square(th) - jnp.square(m * tl), 0.0))
    return th * mu + m * (x_low - tl * mu) + s_tr * sd * jnp.asarray(noise, F32)


def reverse_transition(gm: GM, x_high: jax.Array, t_low: Any, t_high: Any, source: GaussianSource | None = None,
                       prediction: str = "u", eps: float = 1e-6) -> GM:
    """GM over x_low given x_high: the bridge applied to the predicted GM (``prediction`` 'u' or 'x0').

    Means ``c1 (x_high - t_h mu) + t_l mu + c2 mu^x_k``; shared std ``sqrt((c2 s_x)^2 + c3 sigma^2)`` computed as
    GMFlow does, ``0.5 logaddexp(2 (log s + log max(t_h c2, eps)), log max(c3, eps) + 2 log sigma)``
    (for 'x0': ``log max(c2, eps)``). Same weights.
    """
    x_high = jnp.asarray(x_high, F32)
    gm = gm.astype(F32)
    mu, sd = _src(source)
    tl, th = bcast_t(t_low, x_high.ndim), bcast_t(t_high, x_high.ndim)
    c1, c2, c3 = transition_coefs(tl, th, eps)
    thg, c2g, c3g = _g(th), _g(c2), _g(c3)
    if prediction == "u":
        means_x0 = x_high[..., None, :] - thg * gm.means
        log_scale = jnp.log(jnp.maximum(thg * c2g, eps))
    elif prediction == "x0":
        means_x0 = gm.means
        log_scale = jnp.log(jnp.maximum(c2g, eps))
    else:
        raise ValueError(f"reverse_transition: prediction must be 'u' or 'x0', got {prediction!r}")
    base = c1 * (x_high - th * mu) + tl * mu  # [B, *T, C]
    means = base[..., None, :] + c2g * means_x0
    logstds = 0.5 * jnp.logaddexp(2.0 * (gm.logstds + log_scale), jnp.log(jnp.maximum(c3g, eps)) + 2.0 * _g(
        jnp.log(sd)))
    return GM(means, gm.logweights, logstds)


# ------------------------------------------------------------------------------------------------------------
# Probabilistic guidance (GMFlow 1.5) and the second-order reweighting (GMFlow A.2)


def surrogate(gm_x0: GM) -> tuple[jax.Array, jax.Array]:
    """Gaussian surrogate used by guidance / second order: ``(mean [B, *T, C], avg_var [B, 1, .., 1])`` with the
    per-token isotropic variance averaged over tokens (and channels)."""
    mu, var = gm_iso_gaussian(gm_x0)
    return mu, _nonbatch_mean(var)


def guidance_bias(cond_mean: jax.Array, uncond_mean: jax.Array, avg_var: jax.Array, scale: Any,
                  orthogonal: float = 1.0) -> jax.Array:
    """GMFlow's guidance bias b: ``D = cond - uncond``, minus ``orthogonal`` times its projection on cond_mean
    (means over all non-batch axes, denominator clamped at 1e-6), rescaled to RMS ``scale sqrt(avg_var)``."""
    d = cond_mean - uncond_mean
    if orthogonal > 0.0:
        proj = _nonbatch_mean(d * cond_mean) / jnp.maximum(_nonbatch_mean(cond_mean * cond_mean), 1e-6)
        d = d - orthogonal * proj * cond_mean
    power = _nonbatch_mean(d * d)
    return d * (jnp.sqrt(avg_var / jnp.maximum(power, 1e-6)) * jnp.asarray(scale, F32))


def probabilistic_guidance(gm_cond: GM, uncond_mean: jax.Array, scale: Any, orthogonal: float = 1.0
                           ) -> tuple[GM, jax.Array, jax.Array, jax.Array]:
    """Probabilistic guidance on an x0-GM: reweight ``gm_cond`` by target / surrogate, target =
    ``N(mu_c + b, (1 - w^2) v)``, surrogate ``N(mu_c, v)`` (v = token-averaged total variance). In natural
    parameters the mask is ``lam = w^2 / ((1 - w^2) v)``, ``beta = b / ((1 - w^2) v)`` (finite at w = 0, where it is
    the identity). ``scale`` w in [0, 1) (may be traced). ``uncond_mean`` [B, *T, C]: the null-condition model's mean
    (CFG-style) or an AutoGuidance guide model's mean. Returns ``(gm_guided, b, mu_c, v)``.
    """
    mu_c, avg_var = surrogate(gm_cond)
    w = jnp.asarray(scale, F32)
    b = guidance_bias(mu_c, uncond_mean, avg_var, w, orthogonal)
    k = 1.0 / ((1.0 - w * w) * avg_var)
    return gm_mul_gaussian(gm_cond, mu_c, w * w * k, b * k), b, mu_c, avg_var


def second_order_reweight(base_gm: GM, base_mean: jax.Array, avg_var: jax.Array, bias: jax.Array
                          ) -> tuple[GM, jax.Array]:
    """GMFlow's fused second-order / guidance update: rescale ``bias`` so its mean square is <= avg_var, target
    ``N(mu + bias', v f)`` with ``f = max(1 - P / max(v, 1e-6), 1e-6)`` (P = mean square of the unscaled bias), and
    reweight ``base_gm`` by target / ``N(mu, v)``: ``lam = (1 - f) / (v f)``, ``beta = bias' / (v f)``.
    Returns ``(gm, bias')``; for K = 1 (v = s^2) the output mean is exactly ``mu + bias'``, its variance ``s^2 f``.
    """
    power = _nonbatch_mean(bias * bias)
    bias_r = bias * jnp.sqrt(jnp.minimum(avg_var / jnp.maximum(power, 1e-6), 1.0))
    f = jnp.maximum(1.0 - power / jnp.maximum(avg_var, 1e-6), 1e-6)
    vf = avg_var * f
    return gm_mul_gaussian(base_gm, base_mean, (1.0 - f) / vf, bias_r / vf), bias_r
