"""The diagonal Gaussian mixture: parameters and jittable densities.

``DiagGMM(weights [K], means [K, D], variances [K, D])``, float32 (or float64). Densities are computed in fp32 (or
the input's wider dtype) with the two-GEMM form sklearn uses for the diagonal case:
``log N(x | mu_k, diag var_k) = -0.5 (D log 2pi + sum_d log var_kd
+ sum_d (x_d^2 - 2 x_d mu_kd + mu_kd^2) / var_kd)``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiagGMM:
    weights: jax.Array  # [K], sums to 1
    means: jax.Array  # [K, D]
    variances: jax.Array  # [K, D], > 0

    @property
    def n_components(self) -> int:
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])


def log_gaussian(gmm: DiagGMM, x: jax.Array, precision=jax.lax.Precision.HIGHEST) -> jax.Array:
    """Per-component log densities ``log N(x_n | mu_k, var_k)``: x [N, D] -> [N, K] (fp32 or wider)."""
    dt = jnp.promote_types(x.dtype, jnp.float32)
    x = x.astype(dt)
    prec = 1.0 / gmm.variances.astype(dt)  # [K, D]
    mu = gmm.means.astype(dt)
    d = x.shape[-1]
    const = -0.5 * (d * math.log(2 * math.pi) + jnp.sum(jnp.log(gmm.variances.astype(dt)), -1)
                    + jnp.sum(mu * mu * prec, -1))  # [K]
    quad = jnp.matmul(x * x, prec.T, precision=precision) - 2.0 * jnp.matmul(x, (mu * prec).T, precision=precision)
    return const[None, :] - 0.5 * quad


def log_joint(gmm: DiagGMM, x: jax.Array) -> jax.Array:
    """``log w_k + log N(x_n | k)``: [N, D] -> [N, K]."""
    lg = log_gaussian(gmm, x)
    return lg + jnp.log(gmm.weights.astype(lg.dtype))[None, :]


def log_prob(gmm: DiagGMM, x: jax.Array) -> jax.Array:
    """Per-sample log-likelihood (sklearn ``score_samples``): [N, D] -> [N]."""
    return jax.nn.logsumexp(log_joint(gmm, x), axis=-1)


def responsibilities(gmm: DiagGMM, x: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Posterior ``p(k | x_n)`` (sklearn ``predict_proba``): [N, D] -> [N, K]."""
    return jax.nn.softmax(log_joint(gmm, x) / temperature, axis=-1)


def predict(gmm: DiagGMM, x: jax.Array) -> jax.Array:
    """Hard assignment (sklearn ``predict``): [N, D] -> [N] int32."""
    return jnp.argmax(log_joint(gmm, x), axis=-1).astype(jnp.int32)
