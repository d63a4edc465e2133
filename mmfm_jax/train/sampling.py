"""The sampling program the ``sample`` job, the Python API (``mmfm_jax.api``), the planner and ``bench sample``
share: a training run's model config and time shift, its EMA weights (restored by
:func:`~mmfm_jax.train.checkpoint.restore_for_inference`) as a :class:`LoadedModel`, the time grid, and the jitted
sample function (source draw -> Euler / GM-ODE / GM-SDE, + (probabilistic) AutoGuidance -> decoder).

The sample config (``configs/sample.py``) keys read here: ``seed``, ``source.shard_table``, ``sampler.{solver,
num_points, shift, t_end, dtype, gm_substeps, gm_order}``, ``guide.{scale, scales, t_min, t_max}``. Sample ``i``
uses the key ``fold_in(PRNGKey(seed), i)`` (mode and source noise; GM-SDE noise on its stream 3), so results never
depend on the batch split or the device count.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from mmfm_jax import parallel
from mmfm_jax.flow import gmflow
from mmfm_jax.flow.samplers import autoguidance, euler_grid, euler_sample, guided_velocity_fn
from mmfm_jax.flow.time import resolution_shift
from mmfm_jax.gmm.source import sample_prior, sample_source
from mmfm_jax.models.ditdh import DiTDH, DiTDHConfig
from mmfm_jax.ops.gm import GM
from mmfm_jax.train.step import mode_gaussian
from mmfm_jax.utils import parse_compiler_options

log = logging.getLogger("mmfm_jax")
SDE_STREAM = 3
SOLVERS = ("euler", "gm_ode", "gm_sde")


def model_config(cfg: ml_collections.ConfigDict) -> DiTDHConfig:
    """The ``DiTDHConfig`` of a training config (``cfg.model`` fields, ``dtype`` = ``cfg.train.compute_dtype``)."""
    fields = {f.name for f in dataclasses.fields(DiTDHConfig)} - {"dtype"}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.model.items() if k in fields}
    return DiTDHConfig(dtype=cfg.train.compute_dtype, **kw)


def read_train_config(workdir: str | epath.PathLike) -> ml_collections.ConfigDict:
    """A training run's ``config.json`` as a ConfigDict (``FileNotFoundError`` naming the file if absent)."""
    path = epath.Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (not a training workdir, or the run has not started)")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def train_shift(train_cfg: ml_collections.ConfigDict, event_shape: tuple[int, ...]) -> float:
    """The time shift a run was trained with: ``train.time_shift``, or (0) ``sqrt(L * C / train.time_shift_base)``."""
    t = train_cfg.train
    return float(t.get("time_shift", 0.0)) or resolution_shift(math.prod(event_shape), int(t.get("time_shift_base",
                                                                                                   4096)))


def peek_model_config(spec: ml_collections.ConfigDict) -> DiTDHConfig | None:
    """The model config of a model spec (``kind='train'``: its run's ``config.json``) without loading weights; None
    when it cannot be read yet (an official checkpoint, or a run that has not started)."""
    if spec.kind != "train" or not spec.workdir:
        return None
    path = epath.Path(spec.workdir) / "config.json"
    if not path.is_file():
        return None
    return model_config(ml_collections.ConfigDict(json.loads(path.read_text())))


class LoadedModel(NamedTuple):
    """A model ready for sampling: ``nnx.merge(graphdef, state)`` is the module, ``state`` sharded on the mesh."""

    graphdef: Any
    state: Any
    config: DiTDHConfig
    description: str  # where it came from: ``workdir@step`` or the checkpoint file


def restore_train_ema(workdir: str | epath.PathLike, mesh, rules: Any = None, dtype: str | None = None, step: int = -1
                      ) -> tuple[nnx.GraphDef, Any, DiTDHConfig, int]:
    """EMA parameters (+ buffers) of a training run's checkpoint, restored onto ``mesh`` with the model's logical
    shardings by :func:`~mmfm_jax.train.checkpoint.restore_for_inference` (a partial restore with the
    Checkpointer's fallback and cross-process agreement; ``step=-1``: the newest step that restores).

    Returns ``(graphdef, state, model_config, step)``; ``nnx.merge(graphdef, state)`` is the model.
    """
    from mmfm_jax.train.checkpoint import restore_for_inference

    mcfg = model_config(read_train_config(workdir))
    if dtype is not None:
        mcfg = dataclasses.replace(mcfg, dtype=dtype)
    abstract = nnx.eval_shape(lambda: DiTDH(mcfg, nnx.Rngs(0)))
    g, state, restored_step = restore_for_inference(workdir, abstract, mesh, rules, int(step))
    return g, state, mcfg, restored_step


def load_model(spec: ml_collections.ConfigDict, mesh, rules: Any, dtype: str) -> LoadedModel:
    """The model of ``spec.kind`` 'train' (``workdir``, ``step``: its EMA weights, :func:`restore_train_ema`) or
    'official' (``path``: ``.pt`` / ``.safetensors`` / ``.npz``, ``prefix``, ``use_y_conditioning``)."""
    if spec.kind == "train":
        g, state, mcfg, step = restore_train_ema(spec.workdir, mesh, rules, dtype, int(spec.step))
        return LoadedModel(g, state, mcfg, f"{spec.workdir}@{step}")
    from mmfm_jax.convert.ditdh import load_official_ditdh

    overrides: dict[str, Any] = {"dtype": dtype}
    if spec.use_y_conditioning in ("true", "false"):
        overrides["use_y_conditioning"] = spec.use_y_conditioning == "true"
    model = load_official_ditdh(spec.path, prefix=spec.prefix, **overrides)
    g, state = nnx.split(model)
    state = jax.device_put(state, parallel.state_shardings(mesh, state, rules))
    return LoadedModel(g, state, model.config, str(spec.path))


# ----------------------------------------------------------------------------------------------------------------
# Grid, solver and guidance settings


def gm_substeps(cfg: ml_collections.ConfigDict) -> int:
    """GM-ODE substeps per model evaluation (``sampler.gm_substeps``; 0: GMFlow's ``max(2, ceil(128 / NFE))``);
    GM-SDE: 1."""
    if cfg.sampler.solver == "gm_sde":
        return 1
    n = int(cfg.sampler.gm_substeps)
    return n if n > 0 else max(2, math.ceil(128 / (int(cfg.sampler.num_points) - 1)))


def guide_scales(cfg: ml_collections.ConfigDict) -> tuple[float, ...]:
    """The guidance scale(s): ``guide.scales`` when set (a sweep), else ``(guide.scale,)``."""
    return tuple(float(w) for w in cfg.guide.scales) or (float(cfg.guide.scale),)


def sample_grid(cfg: ml_collections.ConfigDict, event_shape: tuple[int, ...]) -> np.ndarray:
    """The time grid: Euler's ``num_points`` points down to ``t_end``, or GMFlow's ``(num_points - 1) *
    substeps + 1`` points down to 0; the shift is ``sampler.shift`` (0: the resolution shift)."""
    shift = float(cfg.sampler.shift) or resolution_shift(math.prod(event_shape))
    if cfg.sampler.solver == "euler":
        return euler_grid(int(cfg.sampler.num_points), shift, float(cfg.sampler.t_end))
    return gmflow.gm_grid(int(cfg.sampler.num_points) - 1, gm_substeps(cfg), shift)


def as_gm(out: jax.Array | GM) -> GM:
    """A velocity model's output as a one-component GM (only its mean is used, by guidance)."""
    if isinstance(out, GM):
        return out
    v = jnp.asarray(out, jnp.float32)
    return GM(v[..., None, :], jnp.zeros(v.shape[:-1] + (1,), jnp.float32), jnp.zeros((v.shape[0],) + (1,) * v.ndim,
                                                                                           jnp.float32))


# ----------------------------------------------------------------------------------------------------------------


def make_sample_fn(cfg: ml_collections.ConfigDict, mesh, main: LoadedModel, guide: LoadedModel | None = None,
                   source: Any = None, decoder: Any = None, var: Any = None, mean: Any = None,
                   event_shape: tuple[int, int] | None = None):
    """The sampling program, jit over the mesh: global sample indices [B] -> (uint8 images or latents [B, ...],
    modes [B]); with a guidance sweep (``guide.scales``) the first output is [B, S, ...], entry s for scale s.

    ``cfg``: a sample config (the keys of the module docstring). ``main`` / ``guide``: :class:`LoadedModel`s (or
    tuples in that order; guide None: no guidance); ``source``: a ``ModeSource`` or None (Gaussian); ``decoder``: an
    ``RAEDecoder`` or None (latents out); ``var`` / ``mean``: the latent statistics the decoder de-normalises with;
    ``event_shape``: ``(L, C)``, by default the main model's. Call as ``fn(main_state, guide_state, source,
    decoder_state, indices, seed=cfg.seed)``: the seed (in [0, 2^31)) is an argument of the compiled program, so
    another seed does not recompile. Returns ``(fn, grid)``.
    """
    main = LoadedModel(*main)
    guide = None if guide is None else LoadedModel(*guide)
    g_main, mcfg_main = main.graphdef, main.config
    if event_shape is None:
        event_shape = (mcfg_main.input_size ** 2, mcfg_main.in_channels)
    grid = sample_grid(cfg, event_shape)
    table_sharded = source is not None and cfg.source.shard_table
    batch_sh = parallel.batch_sharding(mesh, 1)
    dec_graph = None if decoder is None else nnx.graphdef(decoder)
    gm = mcfg_main.head == "gm"
    sweep = len(cfg.guide.scales) > 0
    scales = guide_scales(cfg)
    solver = cfg.sampler.solver
    gm_kw = dict(solver="sde" if solver == "gm_sde" else "ode", num_substeps=gm_substeps(cfg) if solver != "euler"
                 else 1, order=int(cfg.sampler.gm_order) if solver != "euler" else 1)

    def fn(main_state, guide_state, src, dec_state, indices, seed):
        base = jax.random.PRNGKey(seed)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)
        b = indices.shape[0]
        if src is None:
            z0, k = sample_source("gaussian", None, None, keys, (b, *event_shape))
        else:
            z0, k = sample_prior(src, keys, mesh=mesh if table_sharded else None)
        z0 = z0.astype(jnp.bfloat16 if cfg.sampler.dtype == "bfloat16" else jnp.float32)
        model = nnx.merge(g_main, main_state)
        y = k if mcfg_main.use_y_conditioning else None
        main_fn = lambda x, t: model(x, t, y)  # noqa: E731
        guide_fn = None
        if guide is not None:
            gmodel = nnx.merge(guide.graphdef, guide_state)
            gy = k if guide.config.use_y_conditioning else None
            guide_fn = lambda x, t: gmodel(x, t, gy)  # noqa: E731
        gsrc = None
        if gm and src is not None and mcfg_main.use_y_conditioning:
            gsrc = mode_gaussian(src, k, mesh if table_sharded else None)
        sde_keys = jax.vmap(lambda kk: jax.random.fold_in(kk, SDE_STREAM))(keys)

        def one(w):
            if gm:
                return gmflow.gm_sample(main_fn, z0, grid, guidance_scale=w, source=gsrc, keys=sde_keys,
                                        guide_fn=None if guide_fn is None else (lambda x, t: as_gm(guide_fn(x, t))),
                                        **gm_kw)
            if guide_fn is None:
                return euler_sample(main_fn, z0, grid)
            if not sweep:  # as before sweeps existed (a scale of 1 skips the guide)
                return euler_sample(guided_velocity_fn(main_fn, guide_fn, float(w), float(cfg.guide.t_min),
                                                       float(cfg.guide.t_max)), z0, grid)
            return euler_sample(lambda x, t: autoguidance(main_fn(x, t), guide_fn(x, t), w, t,
                                                          float(cfg.guide.t_min), float(cfg.guide.t_max)), z0, grid)

        if sweep:
            x = jnp.swapaxes(jax.vmap(one)(jnp.asarray(scales, jnp.float32)), 0, 1)  # [B, S, L, C]
        else:
            x = one(scales[0] if guide_fn is not None else 0.0)
        if dec_graph is None:
            return x, k
        from mmfm_jax.models.decoder import decode_latents, to_uint8

        flat = x.reshape((-1,) + x.shape[-2:])
        imgs = to_uint8(decode_latents(nnx.merge(dec_graph, dec_state), flat, var, mean))
        return imgs.reshape(x.shape[:-2] + imgs.shape[1:]), k

    ndim = (4 if decoder is not None else 3) + int(sweep)
    jitted = jax.jit(fn, out_shardings=(parallel.batch_sharding(mesh, ndim), batch_sh),
                     compiler_options=parse_compiler_options("auto") or None)

    def call(main_state, guide_state, src, dec_state, indices, seed: int = int(cfg.seed)):
        return jitted(main_state, guide_state, src, dec_state, indices, np.int32(seed))

    call.jitted = jitted  # the compiled program itself, seed an int32 argument (the planner lowers it abstractly)
    return call, grid
