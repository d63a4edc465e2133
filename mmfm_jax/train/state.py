"""The train state: every leaf a global array, sharded by the logical axis rules (FSDP), created under ``jit``.

``TrainState`` holds plain nested dicts (``nnx.to_pure_dict``) of the model's ``nnx.Param``s (fp32 master weights),
their EMA, the optax state, the non-trainable model state (``buffers``: e.g. DiTDH's position embedding and
Fourier frequencies), the base PRNG key (raw ``uint32[2]``), the adaptive-weighting state and counters. The model
structure lives in a ``ModelDef`` (graphdef + abstract states with the logical axis metadata); ``ModelDef.merge``
rebuilds the module from pure dicts inside jitted code.

Creation follows the multi-host-safe recipe (dependency notes item 3): shardings from the abstract state, then
``jax.jit(init, out_shardings=...)`` so the optimizer state (``count`` included) is a global array too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmfm_jax import parallel
from mmfm_jax.train.adaptive import AdaptiveState, init_adaptive

# stream constant separating the training base key from model initialisation
TRAIN_KEY_STREAM = 0x5452


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # [] int32: batches processed (applied + skipped updates)
    params: Any  # pure dict of fp32 Params
    ema: Any  # pure dict, like params
    opt_state: Any  # optax state over params
    buffers: Any  # pure dict of non-trainable model state
    rng: jax.Array  # [2] uint32: base key; step key = fold_in(rng, step)
    adaptive: AdaptiveState
    skipped: jax.Array  # [] int32: total skipped (non-finite) steps
    nonfinite_streak: jax.Array  # [] int32: consecutive non-finite steps

    @property
    def opt_steps(self) -> jax.Array:
        """Number of applied optimizer updates (indexes the LR and EMA schedules)."""
        return self.step - self.skipped


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """Graph definition + abstract (metadata-carrying) states of a model built by ``make_model(rngs)``."""

    graphdef: Any
    abstract_params: Any  # nnx.State of Param (ShapeDtypeStruct leaves, logical names in metadata)
    abstract_buffers: Any  # nnx.State of everything else

    def merge(self, params: Any, buffers: Any) -> nnx.Module:
        return nnx.merge(self.graphdef, nnx.State(params), nnx.State(buffers))


def model_def(make_model: Callable[[nnx.Rngs], nnx.Module]) -> ModelDef:
    g, p, r = nnx.split(nnx.eval_shape(lambda: make_model(nnx.Rngs(0))), nnx.Param, ...)
    return ModelDef(g, p, r)


def _pure_shardings(mesh: Mesh, abstract_state: Any, rules: Any) -> Any:
    return nnx.to_pure_dict(parallel.state_shardings(mesh, abstract_state, rules))


def state_shardings(mesh: Mesh, mdef: ModelDef, tx: optax.GradientTransformation, num_modes: int,
                    rules: Any = None) -> TrainState:
    """``NamedSharding`` per leaf of the ``TrainState`` (params/EMA/optimizer moments by the logical rules,
    everything else replicated)."""
    repl = NamedSharding(mesh, PartitionSpec())
    psh = _pure_shardings(mesh, mdef.abstract_params, rules)
    bsh = _pure_shardings(mesh, mdef.abstract_buffers, rules)
    abs_params = nnx.to_pure_dict(mdef.abstract_params)
    abs_opt = jax.eval_shape(tx.init, abs_params)
    osh = optax.tree_map_params(tx, lambda _, s: s, abs_opt, psh, transform_non_params=lambda _: repl,
                                is_leaf=lambda x: isinstance(x, NamedSharding))
    ad = jax.tree.map(lambda _: repl, init_adaptive(num_modes))
    return TrainState(step=repl, params=psh, ema=psh, opt_state=osh, buffers=bsh, rng=repl, adaptive=ad,
                      skipped=repl, nonfinite_streak=repl)


def _init_fn(make_model: Callable[[nnx.Rngs], nnx.Module], tx: optax.GradientTransformation, seed: int,
             num_modes: int) -> Callable[[], TrainState]:
    def init():
        _, p, r = nnx.split(make_model(nnx.Rngs(seed)), nnx.Param, ...)
        params = jax.tree.map(lambda x: x.astype(jnp.float32), nnx.to_pure_dict(p))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema=jax.tree.map(jnp.copy, params),
                          opt_state=tx.init(params), buffers=nnx.to_pure_dict(r),
                          rng=jax.random.fold_in(jax.random.PRNGKey(seed), TRAIN_KEY_STREAM),
                          adaptive=init_adaptive(num_modes), skipped=jnp.zeros((), jnp.int32),
                          nonfinite_streak=jnp.zeros((), jnp.int32))

    return init


def state_initializer(make_model: Callable[[nnx.Rngs], nnx.Module], tx: optax.GradientTransformation,
                      mesh: Mesh, seed: int, num_modes: int, rules: Any = None,
                      compiler_options: dict[str, Any] | None = None
                      ) -> tuple[Callable[[], TrainState], TrainState, ModelDef]:
    """``(init, shardings, model_def)``: ``init()`` is jitted with ``out_shardings`` (reusable, compiled once)."""
    mdef = model_def(make_model)
    shardings = state_shardings(mesh, mdef, tx, num_modes, rules)
    init = jax.jit(_init_fn(make_model, tx, seed, num_modes), out_shardings=shardings,
                   compiler_options=compiler_options or None)
    return init, shardings, mdef


def create_train_state(make_model: Callable[[nnx.Rngs], nnx.Module], tx: optax.GradientTransformation,
                       mesh: Mesh, seed: int, num_modes: int, rules: Any = None
                       ) -> tuple[TrainState, TrainState, ModelDef]:
    """A fresh state built directly into its shardings: ``(state, shardings, model_def)``.

    Model init uses ``nnx.Rngs(seed)``; the training base key is ``fold_in(PRNGKey(seed), TRAIN_KEY_STREAM)``.
    EMA starts equal to the params (the reference's ``update_ema(decay=0)``).
    """
    init, shardings, mdef = state_initializer(make_model, tx, mesh, seed, num_modes, rules)
    return init(), shardings, mdef


def abstract_train_state(make_model: Callable[[nnx.Rngs], nnx.Module], tx: optax.GradientTransformation,
                         mesh: Mesh, seed: int, num_modes: int, rules: Any = None
                         ) -> tuple[TrainState, TrainState, ModelDef]:
    """``(ShapeDtypeStruct tree with shardings, shardings, model_def)``: the restore target on this mesh."""
    mdef = model_def(make_model)
    shardings = state_shardings(mesh, mdef, tx, num_modes, rules)
    shapes = jax.eval_shape(_init_fn(make_model, tx, seed, num_modes))
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return target, shardings, mdef


def param_count(state: TrainState) -> int:
    return int(sum(x.size for x in jax.tree.leaves(state.params)))
