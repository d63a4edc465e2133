"""The notebook-facing entry point: load a training run or the official release, then sample, encode, decode.

    pipe = Pipeline.from_workdir("runs/xl_mode", decoder="artifacts/converted/dinov2-b/decoder.safetensors")
    images = pipe.sample(16, seed=0, steps=50)            # uint8 [16, 256, 256, 3]
    pipe = Pipeline.from_release("artifacts", variant="dinov2-b/mode-gmm-100k")   # guide=True: AutoGuidance 1.5

Every convention comes from what the run or release saved, never from a package default: the latent shape, the
model and its dtype and mode conditioning, the time shift (``train.time_shift`` / ``time_shift_base`` of the run's
``config.json``; the release's ``pipeline.json``), the mode source (the run's ``source.path``; Gaussian for a
Gaussian run), whether the model's latents are normalised and by which statistics (the run's latent dataset:
its manifest, ``data.normalize`` and ``stats.npz``), the guide and its scale. The sampling itself is the ``sample``
job's (``mmfm_jax.train.sampling.make_sample_fn``), so the same seed gives the same images as ``mmfm-jax sample``
with the same settings, whatever the device count or batch size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from mmfm_jax import parallel
from mmfm_jax.models import encoders
from mmfm_jax.train import sampling

log = logging.getLogger("mmfm_jax")
SOLVERS = sampling.SOLVERS
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "float32": "float32", "bfloat16": "bfloat16"}


@dataclasses.dataclass(repr=False)
class Pipeline:
    """A loaded model (+ optional guide, mode source, decoder, statistics, encoder) and its conventions.

    ``conventions``: ``shift``, ``t_end``, ``dtype``, ``guide_scale``, ``guide_t_min`` / ``guide_t_max``, ``encoder``
    (hub id, local dir or None), ``image_size``, ``normalized`` (the model's latents are normalised by ``var`` /
    ``mean``). Build it with :meth:`from_workdir` or :meth:`from_release`.
    """

    mesh: Any
    main: sampling.LoadedModel  # (graphdef, state, DiTDHConfig, description)
    guide: sampling.LoadedModel | None
    source: Any  # ModeSource or None (Gaussian)
    decoder: Any  # RAEDecoder or None (sample() returns latents)
    var: Any  # [L, C] or None
    mean: Any  # [L, C] or None
    conventions: dict[str, Any]
    encoder: Any = None  # Dinov2, built on first encode()
    _fns: dict = dataclasses.field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        c = self.conventions
        return (f"Pipeline(model={self.main[3]!r}, guide={self.guide[3] if self.guide else None!r}, "
                f"latents={self.latent_shape}, source={'GMM' if self.source is not None else 'Gaussian'}, "
                f"decoder={self.decoder is not None}, shift={c['shift']:.4g}, dtype={c['dtype']})")

    @property
    def latent_shape(self) -> tuple[int, int]:
        """``(L, C)`` of the model's latents (tokens-last)."""
        m = self.main[2]
        return (m.input_size ** 2, m.in_channels)

    # ------------------------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_workdir(cls, train_workdir: str | os.PathLike, *, step: int = -1, guide: str | os.PathLike | None = None,
                     guide_step: int = -1, guide_scale: float = 1.5, decoder: str | os.PathLike | None = None,
                     decoder_preset: str = "XL", encoder: Any = None, dtype: str | None = None,
                     mesh: Any = None) -> Pipeline:
        """A training run's EMA model (newest usable checkpoint, or ``step``), its source and conventions.

        ``guide``: another run's workdir as the AutoGuidance guide (``guide_scale`` its default scale).
        ``decoder``: RAE decoder weights (``.safetensors`` / ``.npz`` / ``.pt``, ``decoder_preset`` its size): without
        one, :meth:`sample` returns latents. ``encoder``: a ``Dinov2``, a hub id or a local directory (default: the
        encode job's ``config.json`` beside the run's latent dataset, when there is one). ``dtype``: overrides the
        run's ``train.compute_dtype`` for sampling.
        """
        cfg = sampling.read_train_config(train_workdir)
        mesh = parallel.make_mesh() if mesh is None else mesh
        rules = parallel.rules_from_config(cfg)
        dtype = _DTYPES[dtype or cfg.train.compute_dtype]
        var = mean = None
        normalized, enc, image_size, enc_name = False, encoder, 224, "dinov2_b"
        if cfg.data.kind == "latents":  # the latent dataset says whether and how the model's latents are normalised
            from mmfm_jax.data import latents as latents_lib

            ddir = epath.Path(cfg.data.path)
            if not (ddir / latents_lib.MANIFEST).exists():
                raise FileNotFoundError(f"{ddir / latents_lib.MANIFEST} missing: the run's latent dataset "
                                        "(config.data.path) holds its latent statistics")
            normalized = bool(json.loads((ddir / latents_lib.MANIFEST).read_text()).get("normalized", True)) or bool(
                cfg.data.normalize)
            stats = latents_lib.load_stats(ddir)
            if normalized:
                if stats is None or "var" not in stats:
                    raise ValueError(f"{ddir}: the run's latents are normalised but the dataset has no stats.npz var")
                var, mean = stats["var"], stats.get("mean")
            enc_cfg = ddir.parent / "config.json"
            if enc is None and enc_cfg.is_file():
                e = ml_collections.ConfigDict(json.loads(enc_cfg.read_text()))
                if "encoder" in e and not e.encoder.get("random_init", False):
                    enc, image_size = e.encoder.weights, int(e.data.image_size)
            enc_name = encoders.recorded_encoder(str(ddir)) or enc_name
        spec = lambda w, s: ml_collections.ConfigDict(dict(kind="train", workdir=str(w), step=int(s)))  # noqa: E731
        main = sampling.load_model(spec(train_workdir, step), mesh, rules, dtype)
        g = None if guide is None else sampling.load_model(spec(guide, guide_step), mesh, rules, dtype)
        mcfg = main[2]
        event = (mcfg.input_size ** 2, mcfg.in_channels)
        source = None
        if cfg.source.kind != "gaussian":
            from mmfm_jax.gmm.source import load_source

            source, _ = load_source(cfg.source.path, mesh)
        dec = None
        if decoder is not None:
            from mmfm_jax.convert.decoder import load_decoder
            from mmfm_jax.models.decoder import DecoderConfig

            espec = encoders.get(enc_name)  # the decoder de-normalises with its encoder's mean / std, as RAE does
            dec = load_decoder(decoder, DecoderConfig.preset(decoder_preset, dtype=dtype, image_mean=espec.mean,
                                                             image_std=espec.std))
        conv = dict(shift=sampling.train_shift(cfg, event), t_end=0.999, dtype=dtype, guide_scale=float(guide_scale),
                    encoder_name=enc_name,
                    guide_t_min=0.0, guide_t_max=1.0, encoder=None if enc is None or not isinstance(enc, str) else enc,
                    image_size=image_size, normalized=normalized, workdir=str(train_workdir))
        return cls._build(mesh, main, g, source, dec, var, mean, conv, enc if not isinstance(enc, str) else None)

    @classmethod
    def from_release(cls, dir_or_hub_repo: str | os.PathLike = "artifacts", variant: str = "dinov2-b/mode-gmm-100k",
                     *, guide: bool | str | os.PathLike = True, decoder: bool = True, encoder: Any = None,
                     dtype: str | None = None, mesh: Any = None, endpoint: str | None = None) -> Pipeline:
        """The official release variant ``variant`` (``mmfm_jax.release.manifest.VARIANTS``).

        ``dir_or_hub_repo``: a folder with the converted release (``mmfm-jax convert``; converted here if only the
        fetched files are present, which needs torch), or a hub repository id (``luo00042/mm-fm``): then the
        variant is fetched and converted into ``~/.cache/mmfm_jax/<repo>`` first. ``guide``: True (the variant's
        DiT-S guide, scale 1.5), False, or a guide checkpoint path. ``dtype``: overrides the release's bf16.
        """
        from mmfm_jax.release import convert as rconvert
        from mmfm_jax.release import manifest

        root = Path(dir_or_hub_repo).expanduser()
        if not root.is_dir():
            repo = str(dir_or_hub_repo)
            if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo) or repo.startswith("."):
                raise FileNotFoundError(f"from_release: {repo!r} is neither a folder nor a hub repository id "
                                        "('owner/name')")
            root = Path(os.environ.get("MMFM_CACHE", "~/.cache/mmfm_jax")).expanduser() / repo.replace("/", "--")
            from mmfm_jax.release.fetch import fetch_release

            fetch_release(variant, root, repo_id=repo, evaluation=False, endpoint=endpoint)
        desc_path = rconvert.converted_dir(root) / variant / rconvert.PIPELINE_FILE
        if not desc_path.exists() or (guide is True and "guide" not in json.loads(desc_path.read_text())["files"]):
            rconvert.convert_release(variant, root, guide=guide is True, evaluation=False)
        desc = json.loads(desc_path.read_text())
        manifest.variant(variant)  # a known variant
        conv, files = dict(desc["conventions"]), desc["files"]
        base = rconvert.converted_dir(root)
        mesh = parallel.make_mesh() if mesh is None else mesh
        dtype = _DTYPES[dtype or conv["dtype"]]
        yc = lambda b: "true" if b else "false"  # noqa: E731
        spec = lambda p, y: ml_collections.ConfigDict(dict(kind="official", path=str(p), prefix="",  # noqa: E731
                                                           use_y_conditioning=yc(y)))
        main = sampling.load_model(spec(base / files["model"], conv["use_y_conditioning"]), mesh, None, dtype)
        g = None
        if guide is True:
            if "guide" not in files:
                raise FileNotFoundError(f"{desc_path}: converted without a guide; run `mmfm-jax convert` again")
            g = sampling.load_model(spec(base / files["guide"], desc["guide_use_y_conditioning"]), mesh, None, dtype)
        elif guide:
            g = sampling.load_model(spec(guide, conv["use_y_conditioning"]), mesh, None, dtype)
        from mmfm_jax.data.stats import load_stats
        from mmfm_jax.gmm.source import load_source

        source, _ = load_source(base / files["source"], mesh)
        var, mean = load_stats(base / files["stats"])
        mean = mean if conv.get("stats_use_mean", True) else None
        dec = None
        if decoder:
            from mmfm_jax.convert.decoder import load_decoder
            from mmfm_jax.models.decoder import DecoderConfig

            over = {k: tuple(v) if isinstance(v, list) else v for k, v in conv.get("decoder_overrides", {}).items()}
            dec = load_decoder(base / files["decoder"], DecoderConfig.preset(conv["decoder_preset"], dtype=dtype,
                                                                             **over))
        conv.update(dtype=dtype, normalized=True, release=str(base), variant=variant)
        conv.setdefault("encoder_name", "dinov2_b")
        return cls._build(mesh, main, g, source, dec, var, mean, conv, encoder)

    @classmethod
    def _build(cls, mesh, main, guide, source, decoder, var, mean, conv, encoder) -> Pipeline:
        mcfg = main[2]
        if mcfg.patch_size != 1:
            raise ValueError("Pipeline: only patch_size 1 (token latents) is supported by the sampler")
        event = (mcfg.input_size ** 2, mcfg.in_channels)
        if source is not None:
            if tuple(source.event_shape) != event:
                raise ValueError(f"Pipeline: the source's event shape {source.event_shape} != the model's {event}")
            if mcfg.use_y_conditioning and source.n_modes > mcfg.num_modes:
                raise ValueError(f"Pipeline: {source.n_modes} source modes but the model has {mcfg.num_modes}")
        if var is not None and tuple(np.shape(var)) != event:
            raise ValueError(f"Pipeline: latent statistics of shape {np.shape(var)}, the model's latents are {event}")
        if decoder is not None and (decoder.config.num_patches, decoder.config.latent_dim) != event:
            raise ValueError(f"Pipeline: the decoder decodes {decoder.config.num_patches} x "
                             f"{decoder.config.latent_dim} latents, the model makes {event[0]} x {event[1]}")
        if guide is not None and mcfg.head == "velocity" and guide[2].head == "gm":
            raise ValueError("Pipeline: a GM guide model needs a GM main model")
        var = None if var is None else jnp.asarray(var, jnp.float32)
        mean = None if mean is None else jnp.asarray(mean, jnp.float32)
        log.info("Pipeline: model %s, guide %s, %s source, latents %s, shift %.4f, %s", main[3],
                 guide[3] if guide else None, "GMM" if source is not None else "Gaussian", event, conv["shift"],
                 "decoder" if decoder is not None else "no decoder (latents out)")
        return cls(mesh=mesh, main=main, guide=guide, source=source, decoder=decoder, var=var, mean=mean,
                   conventions=conv, encoder=encoder)

    # ------------------------------------------------------------------------------------------------------------
    # Sampling

    def _sample_fn(self, steps: int, w: float | None, solver: str, gm_substeps: int, gm_order: int):
        key = (steps, w, solver, gm_substeps, gm_order)
        if key not in self._fns:
            c = self.conventions
            cfg = ml_collections.ConfigDict(dict(
                seed=0, source=dict(shard_table=True),
                sampler=dict(num_points=int(steps), shift=float(c["shift"]), t_end=float(c["t_end"]), dtype=c["dtype"],
                             solver=solver, gm_substeps=int(gm_substeps), gm_order=int(gm_order)),
                guide=dict(scale=1.0 if w is None else float(w), scales=(), t_min=float(c["guide_t_min"]),
                           t_max=float(c["guide_t_max"]))))
            guide = self.guide if w is not None else None
            self._fns[key] = sampling.make_sample_fn(cfg, self.mesh, self.main, guide, self.source, self.decoder,
                                                     self.var, self.mean, self.latent_shape)[0]
            while len(self._fns) > 4:
                self._fns.pop(next(iter(self._fns)))
        return self._fns[key]

    def sample(self, n: int, seed: int = 0, steps: int = 50, guidance: float | None = None, solver: str = "euler",
               *, batch_size: int = 64, gm_substeps: int = 0, gm_order: int = 2, return_modes: bool = False):
        """``n`` samples: uint8 images ``[n, H, W, 3]`` (with a decoder) or latents ``[n, L, C]`` float32.

        ``steps``: grid points (the official "50-step Euler" = 50 points = 49 model evaluations per model).
        ``guidance``: the (probabilistic, for a GM model) AutoGuidance scale; None = the guide's default scale
        when a guide is loaded, else none. ``solver``: 'euler' | 'gm_ode' | 'gm_sde' (GM models). Sample ``i`` is a
        function of ``(seed, i)`` only. ``return_modes``: also return the source modes ``[n]`` (-1: Gaussian).
        """
        if int(n) < 1 or int(steps) < 2:
            raise ValueError(f"sample: need n >= 1 and steps >= 2, got n={n}, steps={steps}")
        if solver not in SOLVERS:
            raise ValueError(f"sample: solver {solver!r} not in {SOLVERS}")
        gm = self.main[2].head == "gm"
        if solver != "euler" and not gm:
            raise ValueError(f"sample: solver {solver!r} needs a GM model (model.head='gm'); this one predicts a "
                             "velocity: use 'euler'")
        if guidance is not None and self.guide is None:
            raise ValueError("sample: guidance needs a guide model (from_workdir(guide=...), from_release(guide=True))")
        w = None if self.guide is None else float(self.conventions["guide_scale"] if guidance is None else guidance)
        if gm and w is not None and not 0.0 <= w < 1.0:
            raise ValueError(f"sample: probabilistic AutoGuidance (a GM model) needs a scale in [0, 1), got {w}")
        if gm and solver != "euler":
            from mmfm_jax.flow import gmflow

            sub = 1 if solver == "gm_sde" else (gm_substeps or max(2, -(-128 // (int(steps) - 1))))
            gmflow.validate_gm_source("gmm" if self.source is not None else "gaussian", self.main[2].use_y_conditioning,
                                      solver="sde" if solver == "gm_sde" else "ode", num_substeps=sub, order=gm_order)
        if not 0 <= int(seed) < 2 ** 31:
            raise ValueError(f"sample: seed must be in [0, 2^31), got {seed}")
        fn = self._sample_fn(int(steps), w, solver, gm_substeps, gm_order)
        gb = parallel.round_up_batch(min(int(batch_size), int(n)), self.mesh)
        gstate = None if w is None else self.guide[1]
        dstate = None if self.decoder is None else jax.device_put(nnx.state(self.decoder),
                                                                  parallel.replicated(self.mesh))
        src = self.source if self.source is not None else None
        xs, ks = [], []
        for b0 in range(0, int(n), gb):
            idx = np.arange(b0, b0 + gb, dtype=np.int32)  # past n: computed and dropped
            g_idx = parallel.host_to_global(idx[parallel.local_batch_slice(gb)], self.mesh)
            x, k = parallel.global_to_host(fn(self.main[1], gstate, src, dstate, g_idx, seed=int(seed)))
            xs.append(np.asarray(x[:int(n) - b0]))
            ks.append(np.asarray(k[:int(n) - b0]))
        out = np.concatenate(xs)
        return (out, np.concatenate(ks)) if return_modes else out

    # ------------------------------------------------------------------------------------------------------------
    # Decoding and encoding

    def decode(self, latents: np.ndarray | jax.Array, batch_size: int = 64) -> np.ndarray:
        """The model's latents ``[B, L, C]`` -> uint8 images ``[B, H, W, 3]`` (de-normalised by the run's statistics
        when its latents are normalised, then the RAE decoder; clamp, x255, truncate as the official sampler)."""
        if self.decoder is None:
            raise ValueError("decode: no decoder loaded (from_workdir(decoder=...) or from_release(decoder=True))")
        z = np.asarray(latents, np.float32)
        if z.ndim != 3 or z.shape[1:] != self.latent_shape:
            raise ValueError(f"decode: expected latents [B, {self.latent_shape[0]}, {self.latent_shape[1]}], got "
                             f"{z.shape}")
        if "decode" not in self._fns:
            from mmfm_jax.models.decoder import decode_latents, to_uint8

            self._fns["decode"] = nnx.jit(lambda d, x, v, m: to_uint8(decode_latents(d, x, v, m)))
        return np.concatenate([np.asarray(self._fns["decode"](self.decoder, jnp.asarray(z[i:i + batch_size]),
                                                              self.var, self.mean))
                               for i in range(0, len(z), batch_size)])

    def encode(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """uint8 centre crops ``[B, S, S, 3]`` (S = 256 for the release: ADM crops) -> the model's latents
        ``[B, L, C]`` float32 (the run's encoder, ``conventions['encoder_name']``, fed ``image_size`` pixels with its
        mean / std; normalised as the run's latents are)."""
        from mmfm_jax.data.preprocess import mmfm_pixels

        espec = encoders.get(self.conventions.get("encoder_name", "dinov2_b"))
        if self.encoder is None:
            name = self.conventions.get("encoder")
            if not name:
                raise ValueError("encode: no encoder known for this run (its latent dataset has no encode "
                                 f"config.json); pass encoder=<{espec.name} model, hub id or local dir> when loading")
            from mmfm_jax.convert.encoders import load_encoder

            self.encoder = load_encoder(espec.name, name, dtype="float32", local_files_only=False,
                                        image_size=int(self.conventions["image_size"]))
        x = np.asarray(images)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] != x.shape[2]:
            raise ValueError(f"encode: expected uint8 square crops [B, S, S, 3], got {x.dtype} {x.shape}")
        size = int(self.conventions["image_size"])
        norm = self.conventions.get("normalized", False)
        if "encode" not in self._fns:
            self._fns["encode"] = nnx.jit(lambda e, im, v, m: espec.encode(
                e, mmfm_pixels(im, size, None, espec.mean, espec.std), v, m)[0])
        v, m = (self.var, self.mean) if norm else (None, None)
        out = np.concatenate([np.asarray(self._fns["encode"](self.encoder, jnp.asarray(x[i:i + batch_size]), v, m))
                              for i in range(0, len(x), batch_size)])
        if out.shape[1:] != self.latent_shape:
            raise ValueError(f"encode: the encoder makes {out.shape[1:]} latents, the model takes {self.latent_shape}")
        return out
