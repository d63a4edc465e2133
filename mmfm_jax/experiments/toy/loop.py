"""The study's own small training loop, shared by both modes.

The toy trains many tiny MLPs at once (runs x seeds, or heads x sources x seeds, stacked under ``vmap``) inside one
jitted ``lax.scan`` per chunk of steps; the library's ``train`` package targets one sharded image model with
checkpoints, which this study does not need, so the loop is kept here (about 30 lines): an optax Adam with cosine
decay, per-seed keys by purpose, and chunks logged to the job's writer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mmfm_jax.utils import progress


def optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam, ``train.lr`` with cosine decay to ``train.final_lr_frac`` over ``train.steps``."""
    return optax.adam(optax.cosine_decay_schedule(cfg.train.lr, cfg.train.steps, alpha=cfg.train.final_lr_frac))


def seed_keys(seed: int, stream: int, seeds: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(train, init, eval) keys [seeds]: ``fold_in(fold_in(fold_in(key(seed), stream), s), purpose)``."""
    base = jax.random.fold_in(jax.random.key(seed), stream)
    per_seed = jax.vmap(lambda s: jax.random.fold_in(base, s))(jnp.arange(seeds))
    purpose = lambda p: jax.vmap(lambda k: jax.random.fold_in(k, p))(per_seed)
    return purpose(0), purpose(1), purpose(2)


def tail(v: Any, n: int) -> np.ndarray:
    """The last fifth (at least one row) of a chunk's n per-step values [n, ...] (what the loss log averages)."""
    return np.asarray(v)[-max(1, n // 5):]


def train_chunks(cfg: ml_collections.ConfigDict, ctx, chunk_fn: Callable, params: Any, opt_state: Any,
                 args: tuple, *, desc: str, prefix: str,
                 summarize: Callable[[dict, int], dict[str, float]]) -> tuple[Any, Any, dict[str, float]]:
    """Run ``chunk_fn(params, opt_state, steps, *args) -> (params, opt_state, losses)`` over ``train.steps`` in
    chunks of ``train.chunk``; after each chunk log ``summarize(losses, n)`` as ``<prefix>/<name>/loss``.
    Returns the trained params, the optimizer state and the last chunk's summary."""
    done, last = 0, {}
    with progress(total=cfg.train.steps, desc=desc) as bar:
        while done < cfg.train.steps:
            n = min(cfg.train.chunk, cfg.train.steps - done)
            params, opt_state, losses = chunk_fn(params, opt_state, jnp.arange(done, done + n), *args)
            done += n
            last = summarize(losses, n)
            ctx.writer.scalars(done, {f"{prefix}/{k}/loss": v for k, v in last.items()}, console=False)
            bar.update(n)
    return params, opt_state, last
