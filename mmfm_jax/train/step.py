"""The jitted, sharded train step: mode coupling, time sampling, micro-batch accumulation, AdamW, EMA, skipping.

One ``jax.jit`` over the mesh with the state donated. For global batch ``G`` and ``A`` micro-batches:

- per-example keys ``fold_in(fold_in(rng, step), i)`` for the global row index i (never depends on devices,
  processes or A); the source draw uses the key's streams 0 (mode) and 1 (eps) (``gmm/source.py``), time stream 2;
- micro-batch m holds rows ``{j * A + m}`` (so every micro-batch is spread over all devices) and is scanned with
  ``lax.scan``; each contributes ``mean(w * loss) / A``, so the sum is the big-batch loss and gradient;
- coupling inside the step: ``gaussian`` (z0 ~ N(0, I)), ``gmm_indep`` (k ~ weights), ``gmm_mode``
  (k ~ p(k | [CLS]), exact posterior), z0 = mean_k + sigma_k eps from the (optionally K-sharded) table;
  the model sees ``y = k`` when ``y_from='mode'`` (mode-conditional), the dataset label when ``'label'``;
- time: shifted logit-normal (``flow/time.py``), x_t = (1 - t) x_data + t z0, target z0 - x_data, fp32 loss;
- adaptive per-mode weights from global statistics, updated once per micro-batch (``train/adaptive.py``);
- clip + AdamW (``train/optim.py``), EMA with the schedule indexed by the number of applied updates;
- ``head='gm'`` (GMFlow): the model returns the velocity GM at ``x_high = x_t``; the loss is the transition NLL
  (``flow.gmflow.transition_nll``, fp32) with lambda = ``gm_trans_ratio`` and ``gm_weight_scale``; x_low is drawn
  from the Gaussian bridge with the example's key stream 3; the bridge uses the coupled mode's Gaussian
  N(mean_k, var_k) when the model sees k (``y_from='mode'``), else N(0, I) (the GMM-unconditional case is only
  valid with lambda = 1, where the source drops out: ``gmflow.validate_gm_source``). The adaptive statistics use
  the per-sample squared error of the GM mean velocity (the NLL can be negative);
- a non-finite loss or gradient norm, or a non-finite [CLS] under mode coupling, skips the update: params, EMA,
  optimizer and adaptive state are kept, the step counter advances (the next batch is used next) and ``skipped`` /
  ``nonfinite_streak`` count it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmfm_jax import parallel
from mmfm_jax.flow import gmflow
from mmfm_jax.flow.loss import fm_loss_per_sample, interpolate
from mmfm_jax.flow.time import sample_time_per_example
from mmfm_jax.gmm.source import ModeSource, draw_modes, sample_source
from mmfm_jax.ops import gm as gm_ops
from mmfm_jax.train import adaptive as adaptive_lib
from mmfm_jax.train.optim import ema_update
from mmfm_jax.train.state import ModelDef, TrainState

TIME_STREAM = 2
BRIDGE_STREAM = 3  # GM head: the bridge noise of x_low
HEADS = ("velocity", "gm")
SOURCE_KINDS = ("gaussian", "gmm_indep", "gmm_mode")
Y_FROM = ("none", "mode", "label")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    grad_accum_steps: int = 1
    source_kind: str = "gaussian"
    assignment: str = "soft"
    temperature: float = 1.0
    y_from: str = "none"  # what the model is conditioned on: nothing, the coupled mode k, or the dataset label
    weight_by: str = "mode"  # key of the adaptive weighting: 'mode' (k) or 'label'
    time_kind: str = "logit_normal"
    time_mean: float = 0.0
    time_std: float = 1.0
    t_max: float = 0.999
    shift: float = 1.0
    shard_source: bool = True  # K-sharded gather when the table is sharded over > 1 device
    adaptive: adaptive_lib.AdaptiveConfig = adaptive_lib.AdaptiveConfig(enabled=False)
    head: str = "velocity"  # the model's output: 'velocity' (FM MSE) or 'gm' (GMFlow transition NLL)
    gm_trans_ratio: float = 0.5  # GMFlow's lambda (t_low = t_high (1 - lambda)); 1 = the plain u-NLL
    gm_weight_scale: float = 2.0

    def __post_init__(self):
        if self.source_kind not in SOURCE_KINDS:
            raise ValueError(f"source kind must be one of {SOURCE_KINDS}, got {self.source_kind!r}")
        if self.y_from not in Y_FROM:
            raise ValueError(f"y_from must be one of {Y_FROM}, got {self.y_from!r}")
        if self.y_from == "mode" and self.source_kind == "gaussian":
            raise ValueError("y_from='mode' needs a GMM source (gmm_indep or gmm_mode)")
        if self.adaptive.enabled and self.weight_by == "mode" and self.source_kind == "gaussian":
            raise ValueError("adaptive weighting by mode needs a GMM source")
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.head == "gm":
            gmflow.validate_gm_source("gaussian" if self.source_kind == "gaussian" else "gmm",
                                      self.y_from == "mode", trans_ratio=self.gm_trans_ratio)


def mode_gaussian(source: ModeSource, k: jax.Array, mesh: Mesh | None = None) -> gm_ops.GaussianSource:
    """The per-example source Gaussian of the drawn modes, for the GMFlow closed forms: ``mean`` [B, L, C] (the
    table row, gathered like a draw with zero variance, so K-sharded tables stay sharded) and ``std`` [B, 1, 1]
    (scalar variance per mode) or [B, L, C] (per dimension). fp32."""
    zero = ModeSource(source.gmm, source.means, jnp.zeros_like(source.variances))
    keys = jnp.zeros(k.shape + (2,), jnp.uint32)  # raw keys: eps is multiplied by a zero std
    mean = draw_modes(zero, k, keys, mesh, jnp.float32)
    std = jnp.sqrt(jnp.take(jnp.asarray(source.variances, jnp.float32), k, axis=0))
    return gm_ops.GaussianSource(mean, std.reshape(std.shape + (1,) * (mean.ndim - std.ndim)))


def gm_loss_terms(out: gm_ops.GM, x_data: jax.Array, z0: jax.Array, t: jax.Array, noise: jax.Array,
                  cfg: StepConfig, source: gm_ops.GaussianSource | None) -> tuple[jax.Array, jax.Array]:
    """GM head: ``(transition NLL [B], squared error of the GM mean velocity [B])`` (fp32) for the u-GM ``out``
    predicted at ``x_t = interpolate(x_data, z0, t)`` (``t`` already clipped by ``gmflow.transition_times``)."""
    batch = gmflow.transition_inputs(x_data, z0, t, noise, cfg.gm_trans_ratio, source)
    nll = gmflow.transition_nll(out, batch, source, cfg.gm_weight_scale)
    mse = fm_loss_per_sample(jax.lax.stop_gradient(gm_ops.gm_mean(out)), x_data, z0)
    return nll, mse


def _batch_spec(mesh: Mesh, ndim: int, lead: int = 0) -> NamedSharding:
    axes = parallel.batch_sharding(mesh, 1).spec[0]
    return NamedSharding(mesh, PartitionSpec(*([None] * lead), axes, *([None] * (ndim - lead - 1))))


def check_batch_geometry(global_batch: int, grad_accum_steps: int, mesh: Mesh) -> int:
    """Micro-batch size; raises unless ``global_batch / A`` is a multiple of the batch shards of the mesh."""
    n = parallel.batch_size_multiple(mesh)
    if global_batch % grad_accum_steps:
        raise ValueError(f"global batch {global_batch} is not divisible by grad_accum_steps {grad_accum_steps}")
    micro = global_batch // grad_accum_steps
    if micro % n:
        raise ValueError(f"micro-batch {micro} (= {global_batch} / {grad_accum_steps}) must be a multiple of the "
                         f"{n} batch shards of the mesh")
    return micro


def make_train_step(mdef: ModelDef, tx: optax.GradientTransformation, lr_fn: optax.Schedule,
                    ema_fn: Callable[[jax.Array], jax.Array], cfg: StepConfig, mesh: Mesh,
                    shardings: TrainState, compiler_options: dict[str, Any] | None = None, rules: Any = None
                    ) -> Callable[[TrainState, dict, Any], tuple[TrainState, dict]]:
    """``step(state, batch, source) -> (state, metrics)``, jitted with the state donated.

    ``batch``: global arrays split on the batch: ``latent`` [G, L, C] (any float dtype), plus ``cls`` [G, D] fp32
    for ``gmm_mode`` and ``label`` [G] int32 when the model or the weighting uses labels. ``source``: a
    ``ModeSource`` (placed with ``shard_source``) or None for ``gaussian``. Metrics are replicated fp32 scalars.
    The model's activations are split on the batch axes (``parallel.activation_sharding`` with ``rules``, default
    ``parallel.DEFAULT_RULES``), also under full FSDP, where the weights are all-gathered per layer.
    """
    A = int(cfg.grad_accum_steps)
    psh = shardings.params
    repl = NamedSharding(mesh, PartitionSpec())
    f32 = jnp.float32
    gm = cfg.head == "gm"
    gm_mode_src = gm and cfg.y_from == "mode" and cfg.source_kind != "gaussian"

    def step_fn(state: TrainState, batch: dict, source: Any) -> tuple[TrainState, dict]:
        x = batch["latent"]
        G = x.shape[0]
        M = G // A
        step_key = jax.random.fold_in(state.rng, state.step)
        keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(G, dtype=jnp.uint32))
        rows = dict(batch, keys=keys)

        def to_micro(a):
            a = jax.lax.with_sharding_constraint(a, _batch_spec(mesh, a.ndim))
            a = jnp.swapaxes(a.reshape((M, A) + a.shape[1:]), 0, 1)
            return jax.lax.with_sharding_constraint(a, _batch_spec(mesh, a.ndim, lead=1))

        micro = {k: to_micro(v) for k, v in rows.items()}
        params = state.params

        def body(carry, mb):
            gacc, ad, loss_acc, raw_acc, t_acc = carry
            x1 = mb["latent"].astype(f32)
            z0, k = sample_source(cfg.source_kind, source, mb.get("cls"), mb["keys"], x1.shape,
                                  assignment=cfg.assignment, temperature=cfg.temperature,
                                  mesh=mesh if cfg.shard_source else None, dtype=f32)
            tkeys = jax.vmap(lambda kk: jax.random.fold_in(kk, TIME_STREAM))(mb["keys"])
            t = sample_time_per_example(tkeys, cfg.time_kind, cfg.shift, cfg.time_mean, cfg.time_std, cfg.t_max)
            wkey = mb["label"] if cfg.weight_by == "label" and "label" in mb else k
            w = adaptive_lib.sample_weights(ad, cfg.adaptive, wkey)
            y = k if cfg.y_from == "mode" else mb["label"] if cfg.y_from == "label" else None
            if gm:
                t = gmflow.transition_times(t, cfg.gm_trans_ratio)[1]  # clip as GMFlow (no-op for t in (0, 1])
                noise = jax.vmap(lambda kk: jax.random.normal(jax.random.fold_in(kk, BRIDGE_STREAM), x1.shape[1:],
                                                              f32))(mb["keys"])
                src = mode_gaussian(source, k, mesh if cfg.shard_source else None) if gm_mode_src else None
            xt = interpolate(x1, z0, t)

            def loss_fn(p):
                with parallel.activation_sharding(mesh, rules):
                    out = mdef.merge(p, state.buffers)(xt, t, y)
                if gm:
                    per, stat = gm_loss_terms(out, x1, z0, t, noise, cfg, src)
                else:
                    per = stat = fm_loss_per_sample(out, x1, z0)
                return jnp.mean(per * w) / A, (per, stat)

            (loss, (per, stat)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
            g = jax.lax.with_sharding_constraint(g, psh)
            gacc = jax.tree.map(lambda a, b: a + b.astype(f32), gacc, g)
            ad = adaptive_lib.update(ad, cfg.adaptive, wkey, stat)
            return (gacc, ad, loss_acc + loss, raw_acc + jnp.mean(per) / A, t_acc + jnp.mean(t) / A), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, f32), params)
        zeros = jax.lax.with_sharding_constraint(zeros, psh)
        init = (zeros, state.adaptive, jnp.zeros((), f32), jnp.zeros((), f32), jnp.zeros((), f32))
        (grads, ad, loss, raw, tmean), _ = jax.lax.scan(body, init, micro)

        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if cfg.source_kind == "gmm_mode":  # a NaN/Inf [CLS] would couple to an arbitrary mode (argmax of NaN)
            finite = finite & jnp.all(jnp.isfinite(batch["cls"]))
        n_opt = state.step - state.skipped
        updates, new_opt = tx.update(grads, state.opt_state, params)
        new_params = optax.apply_updates(params, updates)
        decay = ema_fn(n_opt)
        new_ema = ema_update(state.ema, new_params, decay)

        def sel(new, old):
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        skipped = jnp.logical_not(finite).astype(jnp.int32)
        new_state = TrainState(
            step=state.step + 1, params=sel(new_params, params), ema=sel(new_ema, state.ema),
            opt_state=sel(new_opt, state.opt_state), buffers=state.buffers, rng=state.rng,
            adaptive=sel(ad, state.adaptive), skipped=state.skipped + skipped,
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1).astype(jnp.int32))
        metrics = dict(loss=loss, loss_unweighted=raw, grad_norm=grad_norm, lr=jnp.asarray(lr_fn(n_opt), f32),
                       ema_decay=decay, t_mean=tmean, skipped=skipped.astype(f32),
                       skipped_total=new_state.skipped.astype(f32),
                       nonfinite_streak=new_state.nonfinite_streak.astype(f32))
        return new_state, metrics

    return jax.jit(step_fn, out_shardings=(shardings, repl), donate_argnums=(0,),
                   compiler_options=compiler_options or None)


def batch_keys(cfg: StepConfig) -> tuple[str, ...]:
    """The batch fields the step reads."""
    keys = ["latent"]
    if cfg.source_kind == "gmm_mode":
        keys.append("cls")
    if cfg.y_from == "label" or (cfg.adaptive.enabled and cfg.weight_by == "label"):
        keys.append("label")
    return tuple(keys)


def put_batch(local_batch: dict, mesh: Mesh, cfg: StepConfig) -> dict:
    """This process's batch (numpy, leading dim = G / processes) -> global arrays split on the batch axes."""
    out = {}
    for k in batch_keys(cfg):
        v = local_batch[k]
        if k == "cls":
            v = v.astype("float32")
        elif k == "label":
            v = v.astype("int32")
        out[k] = v
    return parallel.host_to_global(out, mesh)
