"""Adaptive per-mode focal loss weighting (the official ``AdaptiveClassWeighter``, spec 2d), jittable.

State per mode k: loss EMA (init 1), warm-up loss sums and counts, sample counts; plus the number of updates.
One *update* per micro-batch, with statistics of the **global** micro-batch (segment sums over all devices,
not per device as the reference's per-rank weighter):

- updates 1 .. ``warmup_steps``: accumulate per-mode loss sums and counts; at update ``warmup_steps`` the EMA of
  every mode seen is set to its warm-up mean (unseen modes keep 1).
- later: for modes present in the micro-batch, ``ema_k <- decay * ema_k + (1 - decay) * mean batch loss of k``.

Weights (computed *before* the micro-batch's update, as the reference): all 1 while ``num_updates <=
warmup_steps``; then ``w_k = (ema_k / (mean(ema) + 1e-8)) ** gamma`` (focal; ``inverse``: power 1, ``sqrt``:
power 1/2, ``log``: ``log(1 + ema_k) / (log(1 + mean) + 1e-8)``), divided by ``mean(w) + 1e-8`` if ``normalize``,
clipped to ``[min_weight, max_weight]``; a sample's weight is ``w_{k}`` of its mode. Official settings: focal,
gamma 2, normalize, min 0.3, max 3.0, ema_decay 0.9995, warmup 2500.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

STRATEGIES = ("focal", "inverse", "sqrt", "log")


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
    enabled: bool = True
    num_modes: int = 8192
    strategy: str = "focal"
    gamma: float = 2.0
    normalize: bool = True
    min_weight: float = 0.3
    max_weight: float = 3.0
    ema_decay: float = 0.9995
    warmup_steps: int = 2500

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"adaptive.strategy must be one of {STRATEGIES}, got {self.strategy!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AdaptiveState:
    loss_ema: jax.Array  # [K] fp32, init 1
    warm_sum: jax.Array  # [K] fp32
    warm_count: jax.Array  # [K] fp32
    counts: jax.Array  # [K] fp32: samples seen after warm-up (for logs)
    num_updates: jax.Array  # [] int32


def init_adaptive(num_modes: int) -> AdaptiveState:
    k = max(int(num_modes), 1)
    return AdaptiveState(loss_ema=jnp.ones((k,), jnp.float32), warm_sum=jnp.zeros((k,), jnp.float32),
                         warm_count=jnp.zeros((k,), jnp.float32), counts=jnp.zeros((k,), jnp.float32),
                         num_updates=jnp.zeros((), jnp.int32))


def mode_weights(state: AdaptiveState, cfg: AdaptiveConfig) -> jax.Array:
    """Per-mode weights [K] from the current state (before warm-up ends: ones)."""
    ema = state.loss_ema
    mean = jnp.mean(ema)
    if cfg.strategy == "focal":
        w = (ema / (mean + 1e-8)) ** cfg.gamma
    elif cfg.strategy == "inverse":
        w = ema / (mean + 1e-8)
    elif cfg.strategy == "sqrt":
        w = jnp.sqrt(ema / (mean + 1e-8))
    else:
        w = jnp.log1p(ema) / (jnp.log1p(mean) + 1e-8)
    if cfg.normalize:
        w = w / (jnp.mean(w) + 1e-8)
    w = jnp.clip(w, cfg.min_weight, cfg.max_weight)
    return jnp.where(state.num_updates <= cfg.warmup_steps, jnp.ones_like(w), w)


def sample_weights(state: AdaptiveState, cfg: AdaptiveConfig, k: jax.Array) -> jax.Array:
    """Weights of a batch with modes k [B] -> [B] fp32 (ones if disabled)."""
    if not cfg.enabled:
        return jnp.ones(k.shape, jnp.float32)
    return jnp.take(mode_weights(state, cfg), jnp.clip(k, 0, state.loss_ema.shape[0] - 1), axis=0)


def update(state: AdaptiveState, cfg: AdaptiveConfig, k: jax.Array, per_sample_loss: jax.Array) -> AdaptiveState:
    """One update with a (global) micro-batch: k [B] int, per-sample (unweighted) losses [B]."""
    if not cfg.enabled:
        return state
    kk = state.loss_ema.shape[0]
    loss = per_sample_loss.astype(jnp.float32)
    s = jax.ops.segment_sum(loss, k, num_segments=kk)
    c = jax.ops.segment_sum(jnp.ones_like(loss), k, num_segments=kk)
    n = state.num_updates + 1
    in_warmup = n <= cfg.warmup_steps
    warm_sum = jnp.where(in_warmup, state.warm_sum + s, state.warm_sum)
    warm_count = jnp.where(in_warmup, state.warm_count + c, state.warm_count)
    # end of warm-up: EMA <- warm-up means where seen
    init_ema = jnp.where(warm_count > 0, warm_sum / jnp.maximum(warm_count, 1.0), state.loss_ema)
    ema = jnp.where(n == cfg.warmup_steps, init_ema, state.loss_ema)
    # after warm-up: EMA of the batch mean per present mode
    present = c > 0
    batch_mean = s / jnp.maximum(c, 1.0)
    d = jnp.float32(cfg.ema_decay)
    ema_upd = jnp.where(present, d * ema + (1 - d) * batch_mean, ema)
    ema = jnp.where(in_warmup, ema, ema_upd)
    counts = jnp.where(in_warmup, state.counts, state.counts + c)
    return AdaptiveState(loss_ema=ema, warm_sum=warm_sum, warm_count=warm_count, counts=counts, num_updates=n)


def adaptive_from_config(a, num_modes: int) -> AdaptiveConfig:
    """From a ``config.adaptive`` node; ``num_modes`` used when ``a.num_modes <= 0``."""
    k = int(a.num_modes) if int(a.num_modes) > 0 else int(num_modes)
    return AdaptiveConfig(enabled=bool(a.enabled), num_modes=k, strategy=a.strategy, gamma=float(a.gamma),
                          normalize=bool(a.normalize), min_weight=float(a.min_weight), max_weight=float(a.max_weight),
                          ema_decay=float(a.ema_decay), warmup_steps=int(a.warmup_steps))
