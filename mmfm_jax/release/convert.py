"""Convert a fetched release variant once into torch-free files under ``<dir>/converted/``:

- DiTDH checkpoints (model, guide) and the RAE decoder: ``.safetensors`` with the official key names (the EMA
  weights of a training checkpoint), checked key by key and shape by shape by the converters in ``convert/`` first;
  every loader here reads them without torch (``load_official_ditdh``, ``load_decoder``);
- the Inception weights: ``inception.safetensors`` (checked by ``convert/inception.py``);
- the latent statistics: ``<encoder>/stats.npz`` (tokens-last ``var`` [L, C], ``mean`` when present);
- the [CLS] GMM + spatial GMM pickles: our ModeSource folder ``<encoder>/source`` (``gmm/official.py``, needs
  scikit-learn to unpickle);
- ``<variant>/pipeline.json``: the variant's conventions and the converted files (what
  ``mmfm_jax.api.Pipeline.from_release`` reads).

Every output is written to a temporary name and renamed when complete; outputs already present are kept (pass
``force=True`` to redo them). Reading the ``.pt`` files needs torch (``pip install -e ".[torch]"``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from mmfm_jax.release import manifest

log = logging.getLogger("mmfm_jax")
PIPELINE_FILE = "pipeline.json"
FORMAT = "mmfm_jax.release/1"


def converted_dir(directory: str | os.PathLike) -> Path:
    return Path(directory).absolute() / "converted"


def _save_safetensors(sd: dict[str, np.ndarray], dest: Path) -> None:
    from safetensors.numpy import save_file

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(tmp))
    os.replace(tmp, dest)


def _ditdh(src: Path, dest: Path, use_y: bool, trust_pickle: bool) -> None:
    from mmfm_jax.convert.common import load_state_dict
    from mmfm_jax.convert.ditdh import convert_ditdh_state_dict, infer_ditdh_config, strip_wrapper_prefixes

    sd = strip_wrapper_prefixes(load_state_dict(src, trust_pickle=trust_pickle))
    convert_ditdh_state_dict(sd, infer_ditdh_config(sd, use_y_conditioning=use_y), name=str(src))  # strict check
    _save_safetensors(sd, dest)


def _decoder(src: Path, dest: Path, conv: dict[str, Any], trust_pickle: bool) -> None:
    from mmfm_jax.convert.common import load_state_dict
    from mmfm_jax.convert.decoder import decoder_params_from_state_dict
    from mmfm_jax.models.decoder import DecoderConfig

    sd = load_state_dict(src, prefer_ema=False, trust_pickle=trust_pickle)
    over = {k: tuple(v) if isinstance(v, list) else v for k, v in conv.get("decoder_overrides", {}).items()}
    decoder_params_from_state_dict(sd, DecoderConfig.preset(conv["decoder_preset"], **over), name=str(src))
    _save_safetensors(sd, dest)


def _inception(src: Path, dest: Path, trust_pickle: bool) -> None:
    from mmfm_jax.convert.common import load_state_dict
    from mmfm_jax.convert.inception import inception_params_from_state_dict

    sd = load_state_dict(src, prefer_ema=False, trust_pickle=trust_pickle)
    inception_params_from_state_dict(sd, name=str(src))
    _save_safetensors(sd, dest)


def _stats(src: Path, dest: Path, conv: dict[str, Any], trust_pickle: bool) -> None:
    from mmfm_jax.data.stats import import_official_stats, save_stats

    var, mean = import_official_stats(src, trust_pickle=trust_pickle)
    want = (conv["latent_grid"] ** 2, conv["latent_channels"])
    if var.shape != want:
        raise ValueError(f"{src}: var has {var.shape[0]} tokens x {var.shape[1]} channels, the variant's latents "
                         f"are {want}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_stats(dest, var, mean)


def _source(cls_pkl: Path, spatial_pkl: Path, dest: Path, conv: dict[str, Any]) -> None:
    from mmfm_jax.gmm import official
    from mmfm_jax.gmm.source import ModeSource, save_source

    gmm, _ = official.import_cls_gmm(cls_pkl)
    g = int(conv["latent_grid"])
    means, var, weights, smeta = official.import_spatial_table(spatial_pkl, int(conv["latent_channels"]), g, g)
    if not np.allclose(weights, np.asarray(gmm.weights), rtol=1e-4, atol=1e-7):
        log.warning("convert: the spatial pickle's weights differ from the [CLS] GMM's; using the [CLS] GMM's")
    save_source(dest, ModeSource(gmm=gmm, means=means, variances=var),
                {"imported_from": [str(cls_pkl), str(spatial_pkl)], "cluster_counts": smeta["cluster_counts"]})


def convert_release(variant: str, directory: str | os.PathLike, *, guide: bool = True, evaluation: bool = True,
                    trust_pickle: bool = False, force: bool = False) -> dict[str, Any]:
    """Convert variant ``variant`` fetched into ``directory`` (see the module docstring). Returns the pipeline
    description written to ``<dir>/converted/<variant>/pipeline.json``."""
    from mmfm_jax.storage import write_json_atomic

    roles = manifest.files_for(variant, guide=guide, evaluation=evaluation)
    spec = manifest.variant(variant)
    conv, enc = spec["conventions"], spec["encoder_key"]
    directory = Path(directory).absolute()
    out_root = converted_dir(directory)
    src = {r: directory / manifest.FILES[k]["path"] for r, k in roles.items()}
    missing = [f"{r} ({p})" for r, p in src.items() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"convert: missing in {directory}: {', '.join(missing)}; run `mmfm-jax fetch-release "
                                f"--variant={variant} --dir={directory}` first")
    dests: dict[str, Path] = {}
    for role in ("model", "guide"):
        if role in roles:
            dests[role] = out_root / (roles[role] + ".safetensors")
    dests.update(decoder=out_root / enc / "decoder.safetensors", stats=out_root / enc / "stats.npz",
                 source=out_root / enc / "source")
    if "inception" in roles:
        dests["inception"] = out_root / "inception.safetensors"
    done = {r: (d / "metadata.json" if r == "source" else d).exists() and not force for r, d in dests.items()}
    todo = [r for r, ok in done.items() if not ok]
    log.info("convert: %s -> %s (%s)", variant, out_root, ", ".join(todo) if todo else "all present")
    for role in todo:
        d = dests[role]
        if role == "model":
            _ditdh(src[role], d, bool(conv["use_y_conditioning"]), trust_pickle)
        elif role == "guide":
            _ditdh(src[role], d, "mode" in roles[role].rsplit("/", 1)[-1], trust_pickle)
        elif role == "decoder":
            _decoder(src[role], d, conv, trust_pickle)
        elif role == "stats":
            _stats(src[role], d, conv, trust_pickle)
        elif role == "source":
            _source(src["cls_gmm"], src["spatial_gmm"], d, conv)
        elif role == "inception":
            _inception(src[role], d, trust_pickle)
    files = {r: os.path.relpath(d, out_root) for r, d in dests.items()}
    if "fid_reference" in roles:
        files["fid_reference"] = os.path.relpath(src["fid_reference"], out_root)
    desc = dict(format=FORMAT, variant=variant, repo_id=manifest.REPO_ID, conventions=conv, files=files,
                guide_use_y_conditioning=("mode" in roles["guide"].rsplit("/", 1)[-1]) if "guide" in roles else None)
    write_json_atomic(out_root / variant / PIPELINE_FILE, desc)
    return dict(desc, converted=todo, dir=str(out_root))
