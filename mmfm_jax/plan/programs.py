"""Each job's hot programs, built with abstract inputs on a planning mesh.

Every builder calls the job's own code: the same jitted functions (``make_train_step``, ``em._build_step``,
``spatial.accumulate``, ``make_sample_fn``, ``encode_program``, ``features.feature_function``) with the job's own
shardings; only the inputs are ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape`` / ``nnx.eval_shape``), so nothing
is materialised. Builders that take a per-chip batch are what ``--search-batch`` varies.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mmfm_jax import parallel
from mmfm_jax.config_utils import ConfigError
from mmfm_jax.plan.analyze import Program

PLACEHOLDER = "<plan: not read>"
IMAGENET_N = 1_281_167
# config sections that identify the job a config belongs to (first match wins)
JOB_KEYS = (("train", "train"), ("gmm", "fit-gmm"), ("sampler", "sample"), ("encoder", "encode"),
            ("inception", "evaluate"))


def detect_job(cfg: ml_collections.ConfigDict) -> str:
    for key, job in JOB_KEYS:
        if key in cfg:
            return job
    raise ConfigError("--config: not a config of a job plan knows (train, fit-gmm, sample, encode, evaluate)")


def sds(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), jnp.dtype(dtype), sharding=sharding)


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: sds(a.shape, a.dtype, s), tree, shardings)


@contextlib.contextmanager
def _quiet(name: str = "mmfm_jax"):
    """Silence the jobs' 'random weights: for tests only' warnings: planning builds abstract models on purpose."""
    lg = logging.getLogger(name)
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(old)


def prepare(cfg: ml_collections.ConfigDict, job: str) -> ml_collections.ConfigDict:
    """A copy of ``cfg`` with the input paths a plan never reads filled in, checked by the job's ``validate``."""
    import importlib

    from mmfm_jax.jobs import JOBS

    cfg = copy.deepcopy(cfg)
    with cfg.unlocked():
        if job == "train":
            cfg.data.path = cfg.data.path or PLACEHOLDER
            cfg.source.path = cfg.source.path or PLACEHOLDER
        elif job == "fit-gmm":
            if cfg.import_official.cls_pkl:
                raise ConfigError("config.import_official.cls_pkl: importing the official pickles runs no program to "
                                  "plan (plan the imagenet variant instead)")
            cfg.data.latents_dir = cfg.data.latents_dir or PLACEHOLDER
        elif job == "encode":
            cfg.encoder.random_init = True
            if cfg.data.source == "folder":
                cfg.data.root = cfg.data.root or PLACEHOLDER
        elif job == "evaluate":
            cfg.input.path = cfg.input.path or PLACEHOLDER
            cfg.inception.random_init = True
            cfg.ref.allow_none = True
        elif job == "sample":
            cfg.source.path = cfg.source.path or PLACEHOLDER
    validate = getattr(importlib.import_module(JOBS[job]), "validate", None)
    if validate is not None:
        validate(cfg)
    return cfg


def _round_up(n: int, m: int) -> int:
    return -(-int(n) // m) * m


# ----------------------------------------------------------------------------------------------------------------
# train


def _abstract_source(mesh, k: int, cls_dim: int, event_shape: tuple[int, int], table_dtype: str):
    """A ``ModeSource`` of ShapeDtypeStructs placed as ``shard_source`` places it (K padded to the K-shards)."""
    from mmfm_jax.gmm import source as source_lib
    from mmfm_jax.gmm.diag import DiagGMM

    kpad = _round_up(k, source_lib._n_shards(mesh))
    shapes = source_lib.ModeSource(
        gmm=DiagGMM(jax.ShapeDtypeStruct((k,), jnp.float32), jax.ShapeDtypeStruct((k, cls_dim), jnp.float32),
                    jax.ShapeDtypeStruct((k, cls_dim), jnp.float32)),
        means=jax.ShapeDtypeStruct((kpad, *event_shape), jnp.dtype(table_dtype)),
        variances=jax.ShapeDtypeStruct((kpad,), jnp.float32))
    return _abstract(shapes, source_lib._table_shardings(shapes, mesh))


def train_builder(cfg: ml_collections.ConfigDict, mesh) -> tuple[Callable[[int], Program], int]:
    """-> (``build(micro_per_chip)``, the configured micro-batch per chip). The global batch is
    ``micro_per_chip x batch shards x train.grad_accum_steps``."""
    from mmfm_jax.models.ditdh import DiTDH, ditdh_flops_per_example
    from mmfm_jax.train.config import model_config, step_config
    from mmfm_jax.train.optim import optimizer_from_config
    from mmfm_jax.train.state import abstract_train_state
    from mmfm_jax.train.step import batch_keys, check_batch_geometry, make_train_step
    from mmfm_jax.utils import parse_compiler_options

    t = cfg.train
    A = int(t.grad_accum_steps)
    shards = parallel.batch_size_multiple(mesh)
    try:
        configured = check_batch_geometry(int(t.global_batch_size), A, mesh) // shards
    except ValueError as e:
        raise ConfigError(f"config.train.global_batch_size: {e}") from None
    mcfg = model_config(cfg)
    rules = parallel.rules_from_config(cfg)
    event = (mcfg.input_size ** 2, mcfg.in_channels)
    cls_dim = int(cfg.data.synthetic_cls_dim) if cfg.data.kind == "synthetic" else mcfg.in_channels
    k = int(mcfg.num_modes)
    source = None
    if cfg.source.kind != "gaussian":
        source = _abstract_source(mesh, k, cls_dim, event, cfg.source.get("table_dtype", "float32"))
    scfg = step_config(cfg, event, k)
    tx, lr_fn, ema_fn = optimizer_from_config(t)
    copts = parse_compiler_options(t.compiler_options, backend="tpu")
    target, shardings, mdef = abstract_train_state(lambda r: DiTDH(mcfg, r), tx, mesh, int(cfg.seed),
                                                   scfg.adaptive.num_modes, rules)
    step = make_train_step(mdef, tx, lr_fn, ema_fn, scfg, mesh, shardings, copts, rules)
    fields = {"latent": (event, jnp.float32), "cls": ((cls_dim,), jnp.float32), "label": ((), jnp.int32)}
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(target.params))
    fwd = ditdh_flops_per_example(mcfg)

    def build(micro: int) -> Program:
        g = int(micro) * shards * A
        batch = {key: sds((g, *fields[key][0]), fields[key][1], parallel.batch_sharding(mesh, 1 + len(fields[key][0])))
                 for key in batch_keys(scfg)}
        return Program("train_step", step, (target, batch, source), items_per_step=g,
                       per_chip_batch=int(micro),
                       notes=f"one optimizer step: {A} micro-batches of {micro} per chip (global batch {g})",
                       info=dict(params=int(n_params), global_batch=g, grad_accum_steps=A,
                                 model_flops_per_step=3.0 * fwd * g, source=scfg.source_kind, y_from=scfg.y_from,
                                 compute_dtype=cfg.train.compute_dtype))

    return build, configured


# ----------------------------------------------------------------------------------------------------------------
# fit-gmm


def fit_gmm_programs(cfg: ml_collections.ConfigDict, mesh, n_samples: int = 0) -> list[Program]:
    """One EM iteration at (N, K, D) and one batch of the spatial pass. N: ``n_samples``, else the dataset's
    (``data.latents_dir`` manifest), else ImageNet-1k's 1,281,167; D = ``latent.channels`` ([CLS] width)."""
    from mmfm_jax.gmm import em, spatial
    from mmfm_jax.gmm.diag import DiagGMM
    from mmfm_jax.gmm.precision import step_precisions

    g = cfg.gmm
    k, d = int(g.n_components), int(cfg.latent.channels)
    n = int(n_samples) or _dataset_size(cfg.data.latents_dir) or IMAGENET_N
    spec = parallel.logical_to_mesh_spec(("samples", None), mesh=mesh)
    entry = spec[0] if len(spec) else None
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    n_shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    local_len = -(-n // n_shards)
    chunk = em.chunk_rows(int(g.chunk_size), mesh, local_len)
    precs = step_precisions(g.precision)
    exact_top = precs[0] != jax.lax.Precision.HIGHEST
    m_top = int(g.m_step_top)
    m_top = 0 if m_top >= k else m_top
    step = em._build_step(mesh, axes, n, local_len, chunk, k, d, precs, bool(exact_top), m_top, 1e-7)
    rep = NamedSharding(mesh, PartitionSpec())
    x = sds((local_len * n_shards, d), jnp.float32, NamedSharding(mesh, PartitionSpec(entry, None)))
    params = DiagGMM(sds((k,), jnp.float32, rep), sds((k, d), jnp.float32, rep), sds((k, d), jnp.float32, rep))
    n_chunks = -(-local_len // chunk)
    out = [Program("em_iteration", step, (x, params, sds((d,), jnp.float32, rep), sds((), jnp.float32, rep),
                                          sds((), jnp.float32, rep)),
                   notes=f"one EM iteration over N={n:,} (K={k}, D={d}): {n_chunks} chunks of {chunk} rows per chip",
                   info=dict(n=n, k=k, d=d, chunk=chunk, chunks_per_chip=n_chunks, precision=str(g.precision),
                             m_step_top=m_top))]
    if cfg.spatial.enabled:
        h, w = (int(v) for v in cfg.latent.grid)
        tokens = h * w
        shards = spatial._n_shards(mesh)
        kpad = _round_up(k, shards)
        table = NamedSharding(mesh, spatial._modes_spec(mesh))
        stats = spatial.SpatialStats(
            sums=sds((kpad, tokens * d), jnp.float32, table), sums_c=sds((kpad, tokens * d), jnp.float32, table),
            sq=sds((kpad,), jnp.float32, rep), sq_c=sds((kpad,), jnp.float32, rep),
            counts=sds((kpad,), jnp.float32, rep))
        b = _round_up(int(cfg.data.batch_size), parallel.batch_size_multiple(mesh))
        bs = lambda nd: parallel.batch_sharding(mesh, nd)  # noqa: E731
        out.append(Program(
            "spatial_batch", spatial.accumulate,
            (stats, sds((b, tokens, d), jnp.float32, bs(3)), sds((b,), jnp.int32, bs(1)), sds((b,), jnp.bool_, bs(1))),
            kwargs=dict(mesh=mesh, height=h, width=w, flip=bool(cfg.spatial.flip),
                        compensated=bool(cfg.spatial.compensated)),
            items_per_step=b, per_chip_batch=b // parallel.batch_size_multiple(mesh),
            notes=f"one batch of {b} latents into the K x {tokens * d:,} sums (K-sharded over {shards} chips)",
            info=dict(table_bytes_per_chip=2 * kpad * tokens * d * 4 // shards, k_shards=shards)))
    return out


def _dataset_size(path: str) -> int:
    manifest = Path(path) / "manifest.json" if path and path != PLACEHOLDER else None
    if manifest is None or not manifest.is_file():
        return 0
    m = json.loads(manifest.read_text())
    return int(m.get("num_examples") or 0)


# ----------------------------------------------------------------------------------------------------------------
# sample


def _model_config(spec: ml_collections.ConfigDict, what: str):
    from mmfm_jax.train.sampling import peek_model_config

    mcfg = peek_model_config(spec)
    if mcfg is None and spec.kind == "official" and spec.path and Path(spec.path).is_file():
        from mmfm_jax.convert.ditdh import load_official_ditdh

        mcfg = load_official_ditdh(spec.path, prefix=spec.prefix).config
    if mcfg is None:
        raise ConfigError(f"config.{what}: plan reads the model's shape from a training workdir's config.json "
                          f"({what}.kind='train', {what}.workdir) or an official checkpoint file ({what}.path)")
    return mcfg


def _abstract_model(mesh, mcfg, rules):
    from mmfm_jax.models.ditdh import DiTDH

    g, state = nnx.split(nnx.eval_shape(lambda: DiTDH(mcfg, nnx.Rngs(0))))
    pure = nnx.to_pure_dict(state)
    shardings = nnx.to_pure_dict(parallel.state_shardings(mesh, state, rules))
    return g, nnx.State(_abstract(pure, shardings))


def sample_builder(cfg: ml_collections.ConfigDict, mesh) -> tuple[Callable[[int], list[Program]], int]:
    """-> (``build(per_chip)`` -> [one step of the main model (+ guide), the same step + the decoder], configured
    per-chip batch). Both are the sample job's ``make_sample_fn`` program with ``sampler.num_points = 2``."""
    from mmfm_jax.train.sample_io import build_decoder
    from mmfm_jax.train.sampling import make_sample_fn

    rules = parallel.rules_from_config(cfg)
    dtype = cfg.sampler.dtype
    mcfg = dataclasses.replace(_model_config(cfg.model, "model"), dtype=dtype)
    g, state = _abstract_model(mesh, mcfg, rules)
    main = (g, state, mcfg, "plan")
    guide = None
    if cfg.guide.enabled:
        gcfg = dataclasses.replace(_model_config(cfg.guide, "guide"), dtype=dtype)
        gg, gstate = _abstract_model(mesh, gcfg, rules)
        guide = (gg, gstate, gcfg, "plan")
    event = (mcfg.input_size ** 2, mcfg.in_channels)
    source = None
    if cfg.source.kind == "gmm":
        source = _abstract_source(mesh, int(mcfg.num_modes), mcfg.in_channels, event, "float32")
        if not cfg.source.shard_table:
            rep = parallel.replicated(mesh)
            source = jax.tree.map(lambda a: sds(a.shape, a.dtype, rep), source)
    one = copy.deepcopy(cfg)
    with one.unlocked():
        one.sampler.num_points = 2
        one.decoder.random_init = True
    rep = parallel.replicated(mesh)
    decoder = dec_state = None
    if cfg.decoder.enabled:
        with _quiet():
            decoder = nnx.eval_shape(lambda: build_decoder(one))
        dec_state = jax.tree.map(lambda a: sds(a.shape, a.dtype, rep), nnx.state(decoder))
    stats = np.ones(event, np.float32)
    nfe = int(cfg.sampler.num_points) - 1
    mult = parallel.batch_size_multiple(mesh)
    per_chip = _round_up(int(cfg.batch_size), mult) // mult

    def build(b: int) -> list[Program]:
        gb = int(b) * mult
        idx = sds((gb,), jnp.int32, parallel.batch_sharding(mesh, 1))
        progs = []
        for name, dec in (("sample_step", None), ("sample_step_decode", decoder)):
            if name == "sample_step_decode" and dec is None:
                continue
            fn, _ = make_sample_fn(one, mesh, main, guide, source, dec, stats, stats, event)
            progs.append(Program(name, fn.jitted, (state, None if guide is None else guide[1], source,
                                                   None if dec is None else dec_state, idx,
                                                   sds((), jnp.int32, rep)),
                                 items_per_step=gb, per_chip_batch=int(b),
                                 notes="one solver step of the main model" + (" and its guide" if guide else "") +
                                       (" + the decoder" if dec is not None else "") + f" on {gb} samples; the job "
                                       f"runs {nfe} model evaluations per sample",
                                 info=dict(nfe=nfe, guide=guide is not None, solver=cfg.sampler.solver)))
        return progs

    return build, per_chip


# ----------------------------------------------------------------------------------------------------------------
# encode, evaluate


def encode_builder(cfg: ml_collections.ConfigDict, mesh) -> tuple[Callable[[int], Program], int]:
    from mmfm_jax.data.encoding import build_encoder, encode_program

    size = int(cfg.data.image_size)
    crop = int(cfg.data.crop_size) if cfg.data.path == "train" else size
    with _quiet():
        model = nnx.eval_shape(lambda: build_encoder(cfg))
    g, state = nnx.split(model)
    rep = parallel.replicated(mesh)
    state = jax.tree.map(lambda a: sds(a.shape, a.dtype, rep), state)
    fn = encode_program(g, mesh, size, cfg.encoder.name)
    mult = parallel.batch_size_multiple(mesh)

    def build(b: int) -> Program:
        gb = int(b) * mult
        return Program("encode_step", fn, (state, sds((gb, crop, crop, 3), jnp.uint8, parallel.batch_sharding(mesh, 4)),
                                           sds((gb,), jnp.bool_, parallel.batch_sharding(mesh, 1))),
                       items_per_step=gb, per_chip_batch=int(b), notes=f"one encoder batch of {gb} {crop}px crops")

    return build, _round_up(int(cfg.data.batch_size), mult) // mult


def evaluate_builder(cfg: ml_collections.ConfigDict, mesh, image_size: int = 256
                     ) -> tuple[Callable[[int], Program], int]:
    from mmfm_jax.eval.features import feature_function
    from mmfm_jax.models.inception import InceptionV3

    model = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))
    fn = feature_function(model, mesh, cfg.inception.input_path)
    rep = parallel.replicated(mesh)
    state = jax.tree.map(lambda a: sds(a.shape, a.dtype, rep), nnx.state(model))
    mult = parallel.batch_size_multiple(mesh)

    def build(b: int) -> Program:
        gb = int(b) * mult
        imgs = sds((gb, image_size, image_size, 3), jnp.uint8, parallel.batch_sharding(mesh, 4))
        return Program("inception_features", fn, (state, imgs), items_per_step=gb, per_chip_batch=int(b),
                       notes=f"Inception features of {gb} {image_size}px images")

    return build, _round_up(int(cfg.batch_size), mult) // mult
