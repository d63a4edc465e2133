"""Load any of the MM-FM encoders (``models.encoders.NAMES``) from a hub directory or repo id."""

from __future__ import annotations

import os
from typing import Any

from mmfm_jax.models import encoders


def load_encoder(name: str, weights: str | os.PathLike, dtype: str = "float32", local_files_only: bool = True,
                 image_size: int = 224) -> Any:
    """``dinov2_b`` -> ``load_dinov2`` (position table precomputed for ``image_size``), ``siglip2_b`` ->
    ``load_siglip``, ``mae_b`` -> ``load_mae``; ``weights`` is a local directory or a hub repo id."""
    encoders.get(name)
    if name == "dinov2_b":
        from mmfm_jax.convert.dinov2 import load_dinov2

        return load_dinov2(weights, dtype=dtype, local_files_only=local_files_only, image_sizes=(int(image_size),))
    if name == "siglip2_b":
        from mmfm_jax.convert.siglip import load_siglip

        return load_siglip(weights, dtype=dtype, local_files_only=local_files_only)
    from mmfm_jax.convert.mae import load_mae

    return load_mae(weights, dtype=dtype, local_files_only=local_files_only)
