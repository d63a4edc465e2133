"""Optimizer and schedules of the official training recipe (spec 2d).

- AdamW (b1 0.9, b2 0.95, eps 1e-8, weight decay 0) after global-norm clipping at 1.0, PyTorch-style
  (``g * min(1, max_norm / (norm + 1e-6))``, the norm taken over all parameters after accumulation).
- LR (``build_scheduler``, type linear): ``initial_lr`` for steps < ``initial_phase_steps``; ``base_lr`` for steps
  < ``decay_start_steps``; then linear to ``final_lr`` at ``decay_end_steps``; ``final_lr`` after. ``cosine``
  replaces the linear piece by a cosine. Step = number of optimizer updates applied so far (0 for the first).
- EMA decay: ``initial_ema_decay`` while step < ``initial_phase_steps`` else ``ema_decay``; ``ema = params`` at
  step 0, then ``ema = d * ema + (1 - d) * params`` after every update.

Official numbers (1251 steps per epoch): initial phase ``int(20 * 1251) = 25,020``, decay start 50,040, decay end
1,000,800; lr 4e-4 / 2e-4 / 2e-5 (GMM XL), 2e-4 throughout the initial phase for the Gaussian baseline and DiT-S.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mmfm_jax.utils import dtype_from_name


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """``int(epochs * steps_per_epoch)`` as the official scheduler (1251 steps per ImageNet epoch at batch 1024)."""
    return int(float(epochs) * int(steps_per_epoch))


def lr_schedule(initial_lr: float, base_lr: float, final_lr: float, initial_phase_steps: int,
                decay_start_steps: int, decay_end_steps: int, kind: str = "linear") -> optax.Schedule:
    """The official piecewise schedule as an optax schedule (fp32); boundaries in optimizer steps."""
    p0 = max(int(initial_phase_steps), 0)
    p1 = max(int(decay_start_steps), p0)
    p2 = max(int(decay_end_steps), p1)
    total = max(p2 - p1, 1)
    if kind == "linear":
        decay = optax.linear_schedule(base_lr, final_lr, total)
    elif kind == "cosine":
        alpha = final_lr / base_lr if base_lr > 0 else 1.0
        decay = optax.cosine_decay_schedule(base_lr, total, alpha=alpha)
    else:
        raise ValueError(f"lr_schedule: kind must be 'linear' or 'cosine', got {kind!r}")
    if p2 == p1:  # no decay window: final_lr from p1 on
        decay = optax.constant_schedule(final_lr)
    return optax.join_schedules([optax.constant_schedule(initial_lr), optax.constant_schedule(base_lr), decay],
                                boundaries=[p0, p1])


def ema_decay_schedule(initial_decay: float, decay: float, initial_phase_steps: int):
    """``step -> initial_decay if step < initial_phase_steps else decay`` (fp32, jittable)."""

    def fn(step):
        return jnp.where(jnp.asarray(step) < initial_phase_steps, jnp.float32(initial_decay), jnp.float32(decay))

    return fn


def ema_update(ema: Any, params: Any, decay: jax.Array) -> Any:
    """``d * ema + (1 - d) * params`` leaf-wise (fp32)."""
    d = jnp.asarray(decay, jnp.float32)
    return jax.tree.map(lambda e, p: (d * e + (1 - d) * p.astype(jnp.float32)).astype(e.dtype), ema, params)


class ClipState(NamedTuple):
    pass


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_``: scale by ``min(1, max_norm / (norm + 1e-6))`` (norm in fp32)."""

    def init_fn(params):
        del params
        return ClipState()

    def update_fn(updates, state, params=None):
        del params
        norm = optax.global_norm(jax.tree.map(lambda g: g.astype(jnp.float32), updates))
        scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(lr: optax.Schedule | float, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   weight_decay: float = 0.0, clip_grad: float = 1.0, mu_dtype: Any = None
                   ) -> optax.GradientTransformation:
    """``chain(clip (if clip_grad > 0), adamw)``; the LR schedule is indexed by the number of applied updates.
    ``mu_dtype``: storage dtype of Adam's first moment (None: the parameters' dtype, fp32; ``bfloat16`` saves
    2 bytes per parameter, e.g. 1.7 GB for XL; the second moment always stays fp32)."""
    parts = []
    if clip_grad and clip_grad > 0:
        parts.append(clip_by_global_norm_torch(float(clip_grad)))
    parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mu_dtype=mu_dtype))
    return optax.chain(*parts)


def optimizer_from_config(t: Any) -> tuple[optax.GradientTransformation, optax.Schedule, Any]:
    """From a ``config.train`` node: ``(tx, lr_fn, ema_decay_fn)``."""
    lr = lr_schedule(t.initial_lr, t.base_lr, t.final_lr, t.initial_phase_steps, t.decay_start_steps,
                     t.decay_end_steps, t.schedule)
    mu = getattr(t, "adam_mu_dtype", "float32")
    tx = make_optimizer(lr, t.b1, t.b2, t.eps, t.weight_decay, t.clip_grad,
                        None if mu in ("float32", "fp32") else dtype_from_name(mu, "train.adam_mu_dtype"))
    return tx, lr, ema_decay_schedule(t.initial_ema_decay, t.ema_decay, t.initial_phase_steps)
