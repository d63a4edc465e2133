"""The Trainer: one DiTDH flow-matching program (model definition, state and its shardings, ``StepConfig``,
optimizer, the placed source and the jitted step that donates the state), built from a train config.

``Trainer.from_config(cfg, mesh, latent_shape=..., cls_dim=..., source=...)`` is what the train job, the digits
demo and ``bench train`` run; loops (checkpoints, metrics, evaluation) stay with their callers::

    trainer = Trainer.from_config(cfg, mesh)
    state = trainer.init_state()
    state, metrics = trainer.train_step(state, trainer.put_batch(local_batch))

Trainers built from equal programs in one process (same model/step configs, optimizer keys, mesh, rules, seed
and XLA options; e.g. a run and its resume in a test, the demo's settings) share the compiled init and step
(``functools.lru_cache``, 4 programs): jax caches a jitted function per function object, so rebuilding the step
would compile it again.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from mmfm_jax import parallel
from mmfm_jax.gmm.source import ModeSource, cast_table, load_source, shard_source
from mmfm_jax.models.ditdh import DiTDH, DiTDHConfig, ditdh_flops_per_example
from mmfm_jax.train.config import check_inputs, model_config, step_config
from mmfm_jax.train.optim import optimizer_from_config
from mmfm_jax.train.state import ModelDef, TrainState, state_initializer
from mmfm_jax.train.step import StepConfig, check_batch_geometry, make_train_step, put_batch
from mmfm_jax.utils import parse_compiler_options

# the config.train fields the compiled init/step depend on (beyond the model and step configs)
PROGRAM_KEYS = ("initial_lr", "base_lr", "final_lr", "initial_phase_steps", "decay_start_steps", "decay_end_steps",
                "schedule", "b1", "b2", "eps", "weight_decay", "clip_grad", "initial_ema_decay", "ema_decay",
                "compiler_options", "adam_mu_dtype")


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps."""


@dataclasses.dataclass
class StepEvent:
    """What a training loop's per-step callback sees, after step ``step`` (1-based) was dispatched."""

    step: int
    state: TrainState
    metrics: dict
    checkpointer: Any  # train.checkpoint.Checkpointer
    guard: Any  # train.checkpoint.PreemptionGuard


Callback = Callable[[StepEvent], None]


@dataclasses.dataclass(frozen=True)
class _Program:
    tx: Any
    lr_fn: Any
    ema_fn: Any
    init: Callable[[], TrainState]
    shardings: TrainState
    model_def: ModelDef
    step: Callable[[TrainState, dict, Any], tuple[TrainState, dict]]


@functools.lru_cache(maxsize=4)
def _program(mcfg: DiTDHConfig, scfg: StepConfig, optim: tuple, mesh: Mesh, rules: tuple, seed: int,
             copts: tuple) -> _Program:
    tx, lr_fn, ema_fn = optimizer_from_config(ml_collections.ConfigDict(dict(optim)))
    options = dict(copts) or None
    init, shardings, mdef = state_initializer(lambda r: DiTDH(mcfg, r), tx, mesh, seed, scfg.adaptive.num_modes,
                                              dict(rules), options)
    return _Program(tx, lr_fn, ema_fn, init, shardings, mdef,
                    make_train_step(mdef, tx, lr_fn, ema_fn, scfg, mesh, shardings, options, dict(rules)))


class Trainer:
    """A compiled train program on ``mesh``; see the module docstring. Attributes: ``model_config``,
    ``step_config``, ``mesh``, ``model_def``, ``shardings`` (a ``TrainState`` of ``NamedSharding``), ``tx``,
    ``lr_fn``, ``ema_fn``, ``source`` (placed ``ModeSource`` or None), ``global_batch_size``, ``step`` (the jitted
    ``step(state, batch, source) -> (state, metrics)``, state donated)."""

    def __init__(self, mcfg: DiTDHConfig, scfg: StepConfig, mesh: Mesh, program: _Program, source: ModeSource | None,
                 global_batch_size: int):
        self.model_config, self.step_config, self.mesh, self.source = mcfg, scfg, mesh, source
        self.global_batch_size = int(global_batch_size)
        self._program = program
        self.model_def, self.shardings, self.step = program.model_def, program.shardings, program.step
        self.tx, self.lr_fn, self.ema_fn = program.tx, program.lr_fn, program.ema_fn
        # labels index a table when the model sees them or they key the adaptive weights: checked per batch
        self.num_labels = (mcfg.num_modes if scfg.y_from == "label" else scfg.adaptive.num_modes
                           if scfg.adaptive.enabled and scfg.weight_by == "label" else 0)

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, mesh: Mesh, *, latent_shape: tuple[int, int] | None = None,
                    cls_dim: int | None = None, source: ModeSource | None = None) -> Trainer:
        """The program of train config ``cfg`` on ``mesh``. ``latent_shape`` [L, C] / ``cls_dim``: the dataset's
        (checked against the config; default: the model's, unchecked). ``source``: a ``ModeSource`` (numpy or
        placed) instead of loading ``cfg.source.path``; placed with ``shard_source`` and cast to
        ``source.table_dtype``. Config mismatches raise ``ConfigError``; a batch that does not divide over the
        mesh ``ValueError``."""
        t = cfg.train
        check_batch_geometry(t.global_batch_size, t.grad_accum_steps, mesh)
        mcfg = model_config(cfg)
        shape = tuple(latent_shape) if latent_shape is not None else (mcfg.input_size ** 2, mcfg.in_channels)
        if source is None and cfg.source.kind != "gaussian":
            source, _ = load_source(cfg.source.path, mesh)
        elif source is not None and isinstance(source.means, np.ndarray):
            source = shard_source(source, mesh)
        check_inputs(cfg, mcfg, shape, cls_dim, source)
        if source is not None:
            source = cast_table(source, cfg.source.get("table_dtype", "float32"))
        num_modes = source.n_modes if source is not None and cfg.adaptive.weight_by == "mode" else mcfg.num_modes
        scfg = step_config(cfg, shape, num_modes)
        optim = tuple((k, t[k]) for k in PROGRAM_KEYS if k in t)
        rules = tuple(sorted(parallel.rules_from_config(cfg).items()))
        copts = tuple(sorted(parse_compiler_options(t.get("compiler_options", "")).items()))
        program = _program(mcfg, scfg, optim, mesh, rules, int(cfg.seed), copts)
        return cls(mcfg, scfg, mesh, program, source, t.global_batch_size)

    def init_state(self) -> TrainState:
        """A fresh state, built directly into its shardings (EMA = params)."""
        return self._program.init()

    def abstract_state(self) -> TrainState:
        """``ShapeDtypeStruct`` leaves with the shardings: the checkpoint restore target."""
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            jax.eval_shape(self._program.init), self.shardings)

    def put_batch(self, local_batch: dict, step: int | None = None) -> dict:
        """This process's numpy batch -> global arrays; labels the config uses must lie in the table
        (``ValueError`` naming ``step``, the 1-based step the batch is for)."""
        n = self.num_labels
        if n and np.size(local_batch["label"]):
            lab = np.asarray(local_batch["label"])
            if lab.min() < 0 or lab.max() >= n:
                s = self.step_config
                raise ValueError(
                    f"train: a batch at step {step} has labels in [{lab.min()}, {lab.max()}], outside [0, {n}) "
                    f"(source.y_from={s.y_from!r}, adaptive.weight_by={s.weight_by!r}): the dataset has no usable "
                    "labels for this config (-1 = unlabelled), or model.num_modes is too small")
        return put_batch(local_batch, self.mesh, self.step_config)

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One step on a placed batch (``put_batch``); ``state`` is donated."""
        return self.step(state, batch, self.source)

    @property
    def flops_per_example(self) -> float:
        """Model FLOPs of one training example: 3 x the forward matmul FLOPs (forward + backward)."""
        return 3.0 * ditdh_flops_per_example(self.model_config)

    @staticmethod
    def check_finite(metrics: dict, step: int, max_bad: int, last_checkpoint: int | None) -> None:
        """Raise ``NonFiniteError`` when the metrics of ``step`` count ``max_bad`` consecutive non-finite steps."""
        streak = int(jax.device_get(metrics["nonfinite_streak"]))
        if streak >= max_bad:
            raise NonFiniteError(
                f"train: {streak} consecutive non-finite steps (loss={float(metrics['loss']):.4g}, grad_norm="
                f"{float(metrics['grad_norm']):.4g}) at step {int(step)}; stopping. Parameters were not updated by "
                f"those steps; the last checkpoint is step {last_checkpoint}. Check the data (NaN/Inf), "
                "the learning rate, or use train.compute_dtype=float32.")
