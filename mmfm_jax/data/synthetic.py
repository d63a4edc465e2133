"""Deterministic random latents for tests, benchmarks and the ``data.kind='synthetic'`` train config."""

from __future__ import annotations

import numpy as np

from mmfm_jax.data.latents import InMemoryLatents


def synthetic_latents(seed: int, n: int, latent_shape: tuple[int, int], cls_dim: int) -> InMemoryLatents:
    """``n`` examples from ``np.random.default_rng(seed)``: ``latent`` [n, L, C] and ``cls`` [n, cls_dim] standard
    normal (fp32, drawn in that order), ``label`` = index % 10."""
    r = np.random.default_rng(seed)
    L, C = latent_shape
    lat = r.normal(size=(n, L, C)).astype(np.float32)
    return InMemoryLatents(dict(latent=lat, label=np.arange(n) % 10,
                                cls=r.normal(size=(n, cls_dim)).astype(np.float32)))
