"""Fitting the MM-FM source, end to end: the resumable [CLS] EM, the spatial pass, the official pickles' import.

1. [CLS] EM (:func:`fit_resumable`): ``em.fit`` with its state checkpointed (Orbax, ``gmm.io``) every few iterations,
   so a killed fit resumes at the last saved iteration (:func:`resume_state`); a float64 fit returns float32
   parameters (the source and the samplers are float32).
2. Spatial pass (:func:`spatial_table`): every image's normalised latent (and its latent-space horizontal flip)
   hard-assigned by the [CLS] GMM and summed per component, K-sharded; then per component the mean latent and one
   scalar variance. The batches come from the caller (``data.gmm_inputs.spatial_batches`` reads a latent dataset).
3. :func:`import_official`: the official pickles as a [CLS] GMM and a ``ModeSource``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmfm_jax import parallel
from mmfm_jax.gmm import diag, em, spatial
from mmfm_jax.gmm import io as gmm_io
from mmfm_jax.gmm.source import ModeSource, save_source

log = logging.getLogger("mmfm_jax")


def resume_state(state_dir: str | os.PathLike, mesh: Any, dtype: str = "float32") -> em.EMState | None:
    """The EM state a killed fit saved in ``state_dir`` (restored onto ``mesh``), or None."""
    with em.x64_scope(dtype):  # a float64 fit's state is float64: restore it with 64-bit types on
        state = gmm_io.load_em_state(state_dir, mesh=mesh) if gmm_io.has_em_state(state_dir) else None
    if state is not None:
        log.info("fit-gmm: resuming EM at iteration %d", int(state.iteration))
    return state


def fit_resumable(x: Any, n_components: int, *, mesh: Any, state_dir: str | os.PathLike, state: Any = None,
                  checkpoint_every: int = 0, on_iteration: Callable[[int, float], None] | None = None,
                  before_checkpoint: Callable[[], None] | None = None, dtype: str = "float32", **em_kwargs: Any
                  ) -> tuple[diag.DiagGMM, dict]:
    """``em.fit(x, n_components, ...)`` from ``state`` (:func:`resume_state`; None: from the start), saving the EM
    state to ``state_dir`` every ``checkpoint_every`` iterations (0: never) after calling ``before_checkpoint``
    (e.g. flush the metric writer, so the logged iterations are durable before the checkpoint that covers them).
    ``on_iteration(iteration, lower_bound)`` runs after every iteration. Returns (float32 GMM, ``em.fit``'s info)."""

    def on_iter(it: int, lower_bound: float, st) -> None:
        if on_iteration is not None:
            on_iteration(it, lower_bound)
        if checkpoint_every and it % checkpoint_every == 0:
            if before_checkpoint is not None:
                before_checkpoint()
            gmm_io.save_em_state(state_dir, st)

    gmm, info = em.fit(x, int(n_components), mesh=mesh, state=state, on_iteration=on_iter, dtype=dtype, **em_kwargs)
    if dtype == "float64":  # the source and the samplers are float32
        gmm = em.replicate(jax.tree.map(lambda a: np.asarray(a, np.float32), gmm), mesh)
    return gmm, info


def spatial_table(batches: Iterable[dict[str, np.ndarray]], gmm: diag.DiagGMM, n_components: int, tokens: int,
                  channels: int, *, mesh: Any, height: int, width: int, flip: bool, compensated: bool,
                  shift: jax.Array | None = None) -> tuple[jax.Array, jax.Array, dict]:
    """-> (means [K, L, C], variances [K], info). ``batches``: this process's rows of each global batch, dicts of
    ``latent`` [b, L, C] (normalised), ``cls`` [b, D] and ``valid`` [b] (False: padding or a flipped example);
    ``flip``: also count each latent's horizontal flip; ``shift``: [L, C] subtracted before the sums."""
    stats = spatial.init_stats(n_components, tokens * channels, mesh)
    predict = jax.jit(diag.predict)
    for ex in batches:
        batch = parallel.host_to_global(ex, mesh)
        labels = predict(gmm, batch["cls"])
        stats = spatial.accumulate(stats, batch["latent"], labels, batch["valid"], mesh=mesh, height=height,
                                   width=width, flip=flip, compensated=compensated, shift=shift)
    means, var, counts = spatial.finalize(stats, n_components, tokens, channels, shift=shift)
    counts = np.asarray(counts)
    info = dict(images=int(parallel.global_to_host(jnp.sum(counts)) // (2 if flip else 1)),
                empty_components=int((counts == 0).sum()), variance_mean=float(jnp.mean(var)),
                variance_min=float(jnp.min(var)), variance_max=float(jnp.max(var)))
    return means, var, info


def import_official(cls_pkl: str, spatial_pkl: str, channels: int, height: int, width: int,
                    gmm_dir: str | os.PathLike, source_dir: str | os.PathLike) -> dict:
    """The official [CLS] GMM pickle -> ``gmm_dir`` and, with ``spatial_pkl``, the spatial table -> a ``ModeSource``
    in ``source_dir`` (the [CLS] GMM's weights win if the pickles disagree). Returns the summary entries."""
    from mmfm_jax.gmm import official

    gmm, _ = official.import_cls_gmm(cls_pkl)
    gmm_io.save_gmm(gmm_dir, gmm, {"imported_from": cls_pkl})
    out = dict(n_components=gmm.n_components, cls_dim=gmm.dim, imported=True)
    if spatial_pkl:
        means, var, weights, _ = official.import_spatial_table(spatial_pkl, int(channels), height, width)
        if not np.allclose(weights, np.asarray(gmm.weights), rtol=1e-4, atol=1e-7):
            log.warning("fit-gmm: the spatial pickle's weights differ from the [CLS] GMM's; using the [CLS] GMM's")
        src = ModeSource(gmm=gmm, means=means, variances=var)
        save_source(source_dir, src, {"imported_from": [cls_pkl, spatial_pkl]})
        out.update(event_shape=list(means.shape[1:]), variance_mean=float(var.mean()))
    return out
