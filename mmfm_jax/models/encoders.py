"""The three MM-FM encoders by name (``encoder.name``): what each is fed, what it returns, how its artifacts are named.

- ``dinov2_b``: DINOv2-B with registers (``facebook/dinov2-with-registers-base``); ADM crop 256 -> bicubic 224;
  ImageNet mean/std; latent = the 256 patch tokens; global = [CLS]; statistics variance-only.
- ``siglip2_b``: SigLIP2-B/16 vision tower (``google/siglip2-base-patch16-256``); the 256 crop as is; mean = std =
  0.5; latent = all 256 tokens; global = the MAP head's pooled output; statistics variance-only.
- ``mae_b``: ViT-MAE-B/16 encoder (``facebook/vit-mae-base``); the 256 crop as is (position table 14 -> 16);
  ImageNet mean/std; latent = tokens 1:; global = token 0; statistics with a mean.

Every encoder's final LayerNorm is used without its affine; latents are 16 x 16 tokens x 768 and are normalised per
position by the statistics (``(z - mean) / sqrt(var + 1e-5)``); the global descriptor (the GMM's input) never is.
``release`` is the folder name in the official artifacts (``checkpoints/<release>/``, ``gmm/<release>/``,
``decoders/<release>/ViTXL_n08/model.pt``, ``normalization_stats/<release>/stat.pt``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from mmfm_jax.models import dinov2, mae, siglip

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    name: str
    release: str  # artifact folder name in the official release
    hub_id: str
    image_size: int  # pixels fed (after the ADM crop to 256)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    stats_mean: bool  # the official statistics carry a mean
    global_descriptor: str
    encode: Callable[..., tuple[jax.Array, jax.Array]]  # (model, pixels, stats_var=None, stats_mean=None)
    random: Callable[[str, str, int], nnx.Module]  # (preset, dtype, image_size) -> random-weight model


def _random_dinov2(preset: str, dtype: str, image_size: int) -> dinov2.Dinov2:
    model = dinov2.Dinov2(dinov2.Dinov2Config.preset(preset, dtype=dtype), rngs=nnx.Rngs(0))
    model.precompute_pos_embed(int(image_size))
    return model


def _random_siglip(preset: str, dtype: str, image_size: int) -> siglip.SiglipVision:
    return siglip.SiglipVision(siglip.SiglipVisionConfig.preset(preset, dtype=dtype), rngs=nnx.Rngs(0))


def _random_mae(preset: str, dtype: str, image_size: int) -> mae.ViTMAEEncoder:
    return mae.ViTMAEEncoder(mae.MAEConfig.preset(preset, dtype=dtype), rngs=nnx.Rngs(0))


ENCODERS: dict[str, EncoderSpec] = {
    "dinov2_b": EncoderSpec("dinov2_b", "dinov2-b", "facebook/dinov2-with-registers-base", 224, IMAGENET_MEAN,
                            IMAGENET_STD, False, "[CLS] token", dinov2.encode_mmfm, _random_dinov2),
    "siglip2_b": EncoderSpec("siglip2_b", "siglip2-b", "google/siglip2-base-patch16-256", 256, (0.5, 0.5, 0.5),
                             (0.5, 0.5, 0.5), False, "MAP-head pooled output", siglip.encode_mmfm, _random_siglip),
    "mae_b": EncoderSpec("mae_b", "mae-b", "facebook/vit-mae-base", 256, IMAGENET_MEAN, IMAGENET_STD, True,
                         "token 0 ([CLS])", mae.encode_mmfm, _random_mae),
}
NAMES = tuple(ENCODERS)


def get(name: str, key: str = "encoder.name") -> EncoderSpec:
    """The spec of ``name``; an unknown name raises ``ValueError`` naming the config ``key``."""
    if name not in ENCODERS:
        raise ValueError(f"config.{key}: unknown encoder {name!r} (choose from {', '.join(NAMES)})")
    return ENCODERS[name]


def geometry(model: Any, image_size: int) -> tuple[int, int]:
    """(grid side, hidden size) of ``model`` fed ``image_size`` px."""
    cfg = model.config
    return int(image_size) // cfg.patch_size, cfg.hidden_size


def recorded_encoder(latents_dir: str | None) -> str | None:
    """The ``encoder.name`` a latent dataset was encoded with (its manifest's ``extra.encoder_name``); None when the
    folder has no manifest yet or predates the field."""
    import json

    from etils import epath

    if not latents_dir:
        return None
    path = epath.Path(latents_dir) / "manifest.json"
    try:
        return json.loads(path.read_text()).get("extra", {}).get("encoder_name") or None
    except (FileNotFoundError, ValueError, AttributeError):
        return None


def check_encoder(name: str, latents_dir: str | None, key: str = "encoder.name",
                  data_key: str = "data.path") -> str | None:
    """``name`` (``''``: any) against the latents' recorded encoder: a mismatch raises ``ValueError`` naming both
    config keys. Returns the encoder in use (``name`` or the recorded one; None if neither is known)."""
    found = recorded_encoder(latents_dir)
    if name:
        get(name, key)
        if found and found != name:
            raise ValueError(f"config.{key} = {name!r}, but the latents in config.{data_key} ({latents_dir}) were "
                             f"encoded with {found!r}")
    return name or found
