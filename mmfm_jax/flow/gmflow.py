"""GMFlow: the transition NLL loss, GM-ODE / GM-SDE solvers (first and second order), probabilistic guidance
(also with an AutoGuidance guide model) and guidance sweeps, on a Gaussian or an MM-FM mode-conditional source.

Convention: ``x_t = (1 - t) x_data + t x_source`` (t = 0 data, t = 1 source), velocity ``u = x_source - x_data``;
our t is GMFlow's ``sigma = T / 1000`` and the velocities coincide (see ``ops.gm`` and ``docs/gmflow.md``).

A GM network is ``gm_fn(x [B, *T, C], t [B] fp32) -> GM`` of the *velocity* (u) with the ``ops.gm.GM`` layout
(what ``models.gm_head.GMHead`` emits). All GM arithmetic is fp32. Sampling integrates down a time grid from t = 1
(source) to t = 0: ``gm_grid(num_steps, num_substeps, shift)`` is GMFlow's schedule, the same shifted grid as our
Euler sampler (``flow.samplers.euler_grid(N + 1, shift, t_end=1.0)``), ending exactly at t = 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mmfm_jax.flow.loss import interpolate
from mmfm_jax.flow.samplers import euler_grid
from mmfm_jax.ops import gm as ops
from mmfm_jax.ops.gm import F32, GM, GaussianSource

GMFn = Callable[[jax.Array, jax.Array], GM]
SOLVERS = ("ode", "sde")
SOURCE_KINDS = ("gaussian", "gmm")
# GMFlow clamps t_high >= eps and t_low <= t_high - eps with eps = 1e-4 on its 0..1000 time scale: 1e-7 in ours.
T_EPS = 1e-7


def gm_grid(num_steps: int, num_substeps: int = 1, shift: float = 1.0) -> np.ndarray:
    """GMFlow's schedule: ``shift(1 - i / N)`` for i = 0..N, N = num_steps * num_substeps, float64 [N + 1] from 1
    down to exactly 0 (``euler_grid(N + 1, shift, t_end=1.0)``)."""
    if num_steps < 1 or num_substeps < 1:
        raise ValueError(f"gm_grid: num_steps and num_substeps must be >= 1, got {num_steps}, {num_substeps}")
    return euler_grid(num_steps * num_substeps + 1, shift, t_end=1.0)


# ------------------------------------------------------------------------------------------------------------
# Training: transition NLL


class TransitionBatch(NamedTuple):
    x_low: jax.Array  # [B, *T, C] the loss target
    x_high: jax.Array  # [B, *T, C] the network input
    t_low: jax.Array  # [B]
    t_high: jax.Array  # [B]


def transition_times(t_high: jax.Array, trans_ratio: float, eps: float = T_EPS) -> tuple[jax.Array, jax.Array]:
    """GMFlow's pair: ``t_high = clip(t_high, eps, 1)``, ``t_low = max(min(t_high (1 - trans_ratio), t_high - eps),
    0)``. Returns ``(t_low, t_high)`` fp32 [B]. trans_ratio (lambda) = 1 gives t_low = 0 (plain NLL)."""
    th = jnp.clip(jnp.asarray(t_high, F32), eps, 1.0)
    tl = jnp.maximum(jnp.minimum(th * (1.0 - trans_ratio), th - eps), 0.0)
    return tl, th


def transition_inputs(x_data: jax.Array, x_source: jax.Array, t_high: jax.Array, noise: jax.Array,
                      trans_ratio: float, source: GaussianSource | None = None) -> TransitionBatch:
    """The loss's (x_low, x_high): ``x_high = interpolate(x_data, x_source, t_high)`` (the usual flow-matching input,
    with the given, possibly mode-coupled, source sample) and x_low drawn from the Gaussian bridge
    (:func:`ops.gm.bridge_sample`, ``noise`` ~ N(0, I) like x). Same joint law as GMFlow's (x_low, then the forward
    transition). ``source`` = the per-mode N(mu, sigma^2) of each example (MM-FM) or None (N(0, I)); it only
    matters when trans_ratio < 1."""
    tl, th = transition_times(t_high, trans_ratio)
    x_high = interpolate(jnp.asarray(x_data, F32), jnp.asarray(x_source, F32), th)
    x_low = ops.bridge_sample(x_data, x_high, tl, th, noise, source)
    return TransitionBatch(x_low, x_high, tl, th)


def transition_nll(gm_u: GM, batch: TransitionBatch, source: GaussianSource | None = None,
                   weight_scale: float = 2.0, eps: float = 1e-4) -> jax.Array:
    """GMFlow transition loss per sample [B] (fp32): the u-GM predicted at x_high mapped to a GM over x_low
    (:func:`ops.gm.reverse_transition`), per-token NLL of x_low (:func:`ops.gm.gm_nll`: no 2 pi constant, 1/s
    clamped at 1/eps), mean over tokens, times ``weight_scale`` (2.0 on ImageNet). The batch mean is GMFlow's
    'flatmean' loss."""
    gm_low = ops.reverse_transition(gm_u, batch.x_high, batch.t_low, batch.t_high, source)
    per_tok = ops.gm_nll(gm_low, batch.x_low, eps)
    return weight_scale * jnp.mean(per_tok.reshape(per_tok.shape[0], -1), axis=-1)


# ------------------------------------------------------------------------------------------------------------
# Helpers for callers


def gm_velocity_fn(gm_fn: GMFn) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The GM model as a velocity function (its u-GM mean), for ``flow.samplers.euler_sample``."""
    return lambda x, t: ops.gm_mean(gm_fn(x, t))


def oracle_gm_fn(data_means: jax.Array, data_logweights: jax.Array, data_std: float,
                 source: GaussianSource | None = None) -> GMFn:
    """The exact u-GM for data ``x0 ~ sum_j pi_j N(a_j, s0^2 I)`` per token (``data_means`` [J, C],
    ``data_logweights`` [J], scalar ``data_std``) and source N(mu, sigma^2) (None: N(0, I)): what a perfect GMFlow
    network outputs. Posterior components (per dimension): ``m_j = (a_j t^2 sigma^2 + a s0^2 (x - t mu)) / D``,
    ``v = s0^2 t^2 sigma^2 / D``, ``D = t^2 sigma^2 + a^2 s0^2``, ``a = 1 - t``; weights
    ``log pi_j - 0.5 sum_d (x - a a_j - t mu)^2 / D``. Returned as u = (x - x0) / t. For tests and toy oracles."""
    a_j = jnp.asarray(data_means, F32)
    logpi = jax.nn.log_softmax(jnp.asarray(data_logweights, F32))
    s0sq = jnp.float32(data_std) ** 2

    def fn(x: jax.Array, t: jax.Array) -> GM:
        x = jnp.asarray(x, F32)
        mu, sd = ops._src(source)
        tb = ops.bcast_t(t, x.ndim)
        a = 1.0 - tb
        tsig2 = jnp.square(tb * sd)
        den = tsig2 + a * a * s0sq  # [B, 1, 1] or [B, *T, C]
        y = (x - tb * mu)[..., None, :]  # [B, *T, 1, C]
        g = ops._g
        logw = logpi - 0.5 * jnp.sum(jnp.square(y - g(a) * a_j) / g(den), axis=-1)
        m = (a_j * g(tsig2) + g(a) * s0sq * y) / g(den)
        logs_x0 = 0.5 * (jnp.log(s0sq) + jnp.log(g(tsig2)) - jnp.log(g(den)))
        gm_x0 = GM(m, jax.nn.log_softmax(logw, axis=-1), logs_x0)
        return ops.x0_to_u(gm_x0, x, t)

    return fn


# ------------------------------------------------------------------------------------------------------------
# Sampling


def _check_grid(grid: Any, num_substeps: int) -> tuple[jax.Array, int]:
    try:
        g = np.asarray(grid, np.float64)
    except jax.errors.TracerArrayConversionError:
        g = None  # a traced grid: checked by the caller
    shape = np.shape(grid)
    if len(shape) != 1 or shape[0] < 2 or (shape[0] - 1) % num_substeps:
        raise ValueError(f"gm_sample: the grid must be 1-D with num_steps * num_substeps + 1 points, got shape "
                         f"{shape} for num_substeps={num_substeps}")
    n_pts = shape[0]
    if g is not None and (np.any(np.diff(g) >= 0) or np.any(g[:-1] <= 0)):
        raise ValueError("gm_sample: the grid must decrease strictly, with only its last point allowed to be 0")
    return jnp.asarray(grid, F32), (n_pts - 1) // num_substeps


def _check_scale(scale: Any) -> None:
    if isinstance(scale, (int, float)) and not 0.0 <= scale < 1.0:
        raise ValueError(f"probabilistic guidance: guidance_scale must be in [0, 1), got {scale}")


def gm_sample(gm_fn: GMFn, x: jax.Array, grid: Any, *, solver: str = "ode", num_substeps: int = 1, order: int = 1,
              guidance_scale: Any = 0.0, guide_fn: GMFn | None = None, orthogonal: float = 1.0,
              gm2_coefs: Sequence[float] = (0.005, 1.0), source: GaussianSource | None = None,
              keys: jax.Array | None = None) -> jax.Array:
    """Sample with GM-ODE (``solver='ode'``) or GM-SDE (``'sde'``) from ``x`` [B, *T, C] (a source sample at
    ``grid[0]``) down ``grid`` ([num_steps * num_substeps + 1] times, e.g. :func:`gm_grid`). Jittable (``lax.scan``).

    Per network step at t (``gm_fn`` called once, plus ``guide_fn`` when given):
    u-GM -> x0-GM; probabilistic guidance with ``guidance_scale`` w in [0, 1) against ``guide_fn``'s x0 mean
    (a null-condition call = probabilistic CFG; a weaker guide model = probabilistic AutoGuidance; w may be
    traced, w = 0 is exactly no guidance); ``order=2``: GMFlow's second-order reweighting (``gm2_coefs = (ca,
    cb)``); then GM-ODE: ``num_substeps`` Euler substeps ``x <- x + (tau' - tau)(x - x0hat) / tau`` with x0hat the
    mean of the x0-GM transported to (x, tau) (exact Eq. 10), or GM-SDE (``num_substeps`` = 1): x0hat ~ x0-GM, then
    the Gaussian bridge ``x <- c1 (x - t mu) + t' mu + c2 x0hat + sqrt(c3) sigma xi``. ``source``: the mode's
    Gaussian for an MM-FM mode-conditional model (None: N(0, I)). ``keys`` [B] per-example keys (SDE only): step i
    uses ``fold_in(keys[b], i)``, so samples do not depend on the batch split. Returns x at grid[-1], fp32.
    """
    if solver not in SOLVERS:
        raise ValueError(f"gm_sample: solver must be one of {SOLVERS}, got {solver!r}")
    if order not in (1, 2):
        raise ValueError(f"gm_sample: order must be 1 or 2, got {order}")
    if solver == "sde" and num_substeps != 1:
        raise ValueError("gm_sample: GM-SDE takes one substep per step (num_substeps=1)")
    if solver == "sde" and keys is None:
        raise ValueError("gm_sample: GM-SDE needs per-example keys")
    _check_scale(guidance_scale)
    guided = guide_fn is not None
    if not guided and not (isinstance(guidance_scale, (int, float)) and guidance_scale == 0.0):
        raise ValueError("gm_sample: guidance_scale > 0 needs a guide_fn (null-condition model or guide model)")
    grid, num_steps = _check_grid(grid, num_substeps)
    n = num_substeps
    idx = np.arange(num_steps)[:, None] * n + np.arange(n + 1)[None, :]
    windows = grid[idx]  # [S, n + 1]
    x = jnp.asarray(x, F32)
    b = x.shape[0]
    w = jnp.asarray(guidance_scale, F32)
    ca, cb = float(gm2_coefs[0]), float(gm2_coefs[1])
    mu_s, sd_s = ops._src(source)

    def predict(xc, t):
        tb = jnp.full((b,), t, F32)
        gm_x = ops.u_to_x0(gm_fn(xc, tb).astype(F32), xc, tb)
        if guided:
            uncond = ops.gm_mean(ops.u_to_x0(guide_fn(xc, tb).astype(F32), xc, tb))
            gm_g, bias, base_mean, avg_var = ops.probabilistic_guidance(gm_x, uncond, w, orthogonal)
            return gm_g, gm_x, base_mean, avg_var, bias
        base_mean, avg_var = ops.surrogate(gm_x)
        return gm_x, gm_x, base_mean, avg_var, jnp.zeros_like(base_mean)

    def second_order(prev, cur_gm, base_gm, base_mean, avg_var, cfg_bias, xc, t, h):
        prev_gm, prev_x, prev_t, prev_h, has_prev = prev
        mean_prev = ops.transport_mean(prev_gm, prev_x, prev_t, xc, t, source)
        k = 0.5 * h / prev_h
        err_power = avg_var * (w * w * cb * cb + ca)
        mean_diff = (ops.gm_mean(cur_gm) - mean_prev) * (jnp.sqrt(jnp.maximum(1.0 - err_power / (prev_h * prev_h),
                                                                               0.0)) * k)
        gm2, _ = ops.second_order_reweight(base_gm, base_mean, avg_var, mean_diff + cfg_bias)
        return jax.tree.map(lambda a2, a1: jnp.where(has_prev, a2, a1), gm2, cur_gm)

    def step(carry, inp):
        xc, prev = carry
        i, win = inp
        t = win[0]
        cur_gm, base_gm, base_mean, avg_var, cfg_bias = predict(xc, t)
        out_gm = cur_gm
        if order == 2:
            out_gm = second_order(prev, cur_gm, base_gm, base_mean, avg_var, cfg_bias, xc, t, t - win[-1])
            prev = (cur_gm, xc, t, t - win[-1], jnp.bool_(True))
        if solver == "sde":
            k_i = jax.vmap(lambda kk: jax.random.fold_in(kk, i))(keys)
            x0hat = _sample_per_example(out_gm, k_i)
            noise = jax.vmap(lambda kk: jax.random.normal(jax.random.fold_in(kk, 1), xc.shape[1:], F32))(k_i)
            c1, c2, c3 = ops.transition_coefs(win[1], t)
            x_new = c1 * (xc - t * mu_s) + win[1] * mu_s + c2 * x0hat + jnp.sqrt(jnp.maximum(c3, 0.0)) * sd_s * noise
            return (x_new, prev), None

        def sub(xs, tt):
            tau, tau_next = tt
            x0hat = ops.transport_mean(out_gm, xc, t, xs, tau, source)
            return xs + (tau_next - tau) * (xs - x0hat) / tau, None

        x_new, _ = jax.lax.scan(sub, xc, (win[:-1], win[1:]))
        return (x_new, prev), None

    prev0 = None
    if order == 2:
        shapes = jax.eval_shape(lambda: predict(x, grid[0])[0])
        prev_gm0 = jax.tree.map(lambda s: jnp.zeros(s.shape, F32), shapes)
        prev0 = (prev_gm0, x, jnp.float32(1.0), jnp.float32(1.0), jnp.bool_(False))
    (xf, _), _ = jax.lax.scan(step, (x, prev0), (jnp.arange(num_steps), windows))
    return xf


def _sample_per_example(gm: GM, keys: jax.Array) -> jax.Array:
    """One GM draw per example from its own key (keys [B]); logstds broadcast to a leading batch axis."""
    b = gm.means.shape[0]
    ls = jnp.asarray(gm.logstds, F32)
    ls = jnp.broadcast_to(ls, (b,) + ls.shape[1:]) if ls.ndim == gm.means.ndim else jnp.broadcast_to(
        ls, (b,) + (1,) * (gm.means.ndim - 1))

    def one(m, lw, s, k):
        return ops.gm_sample(GM(m[None], lw[None], s[None]), jax.random.fold_in(k, 0))[0]

    return jax.vmap(one)(gm.means, gm.logweights, ls, keys)


def sample_sweep(gm_fn: GMFn, x: jax.Array, grid: Any, guidance_scales: Sequence[float] | jax.Array,
                 guide_fn: GMFn, **kwargs: Any) -> jax.Array:
    """:func:`gm_sample` for several guidance scales as one program (``jax.vmap`` over the scale): returns
    [S, B, *T, C], entry s equal to ``gm_sample(..., guidance_scale=scales[s])`` (same x and keys for every scale).
    """
    scales = np.asarray(guidance_scales, np.float64) if not isinstance(guidance_scales, jax.Array) else None
    if scales is not None:
        if scales.ndim != 1 or scales.size == 0 or np.any(scales < 0) or np.any(scales >= 1):
            raise ValueError(f"sample_sweep: guidance scales must be a non-empty list in [0, 1), got {guidance_scales}")
    ws = jnp.asarray(guidance_scales, F32)
    return jax.vmap(lambda w: gm_sample(gm_fn, x, grid, guidance_scale=w, guide_fn=guide_fn, **kwargs))(ws)


# ------------------------------------------------------------------------------------------------------------
# Config validation


def validate_gm_source(kind: str, mode_conditional: bool, *, trans_ratio: float = 1.0, solver: str = "ode",
                       num_substeps: int = 1, order: int = 1) -> None:
    """Fail before work starts when a GMFlow option has no closed form for the source: ``ValueError`` whose message
    starts with the argument's name (``trans_ratio = 0.5: ...``; ``config_utils.config_errors`` maps it to a key).

    - ``gaussian`` source, or ``gmm`` with ``mode_conditional`` (the model sees the mode m, and
      ``p(x_t | x0, m)`` is Gaussian): everything works (pass the mode's N(mu_m, sigma_m^2) as ``source``).
    - ``gmm`` unconditional: the model does not see m and the coupling draws m from x0's posterior, so
      ``p(x_t | x0)`` is a mixture over modes; the bridge (transition loss with trans_ratio < 1, GM-SDE) and the
      Eq. (10) transport (GM-ODE substeps, second order) lose their closed form. Only the plain u-NLL
      (``trans_ratio = 1``), first-order GM-ODE with one substep (it needs only E[x0 | x_t]) and probabilistic
      guidance remain.
    """
    if kind not in SOURCE_KINDS:
        raise ValueError(f"kind = {kind!r}: must be one of {SOURCE_KINDS}")
    if solver not in SOLVERS:
        raise ValueError(f"solver = {solver!r}: must be one of {SOLVERS}")
    if not 0.0 < trans_ratio <= 1.0 or not math.isfinite(trans_ratio):
        raise ValueError(f"trans_ratio = {trans_ratio!r}: must be in (0, 1]")
    if order not in (1, 2):
        raise ValueError(f"order = {order!r}: must be 1 or 2")
    if not isinstance(num_substeps, int) or num_substeps < 1:
        raise ValueError(f"num_substeps = {num_substeps!r}: must be an int >= 1")
    if solver == "sde" and num_substeps != 1:
        raise ValueError(f"num_substeps = {num_substeps}: GM-SDE takes one substep per step")
    if kind == "gaussian" or mode_conditional:
        return
    why = ("has no closed form on a GMM source whose mode the model does not see (mode_conditional = False: "
           "p(x_t | x0) is a mixture over modes); use a Gaussian or mode-conditional source")
    if trans_ratio != 1.0:
        raise ValueError(f"trans_ratio = {trans_ratio}: the transition loss (< 1) {why}, or 1.0")
    if solver == "sde":
        raise ValueError(f"solver = 'sde': the GM-SDE bridge {why}, or the GM-ODE solver")
    if num_substeps != 1:
        raise ValueError(f"num_substeps = {num_substeps}: GM-ODE substeps (Eq. 10) {why}, or 1")
    if order != 1:
        raise ValueError(f"order = {order}: the second-order GM solver {why}, or order 1")
