"""Gaussian mixtures: sharded EM, k-means++ and the MM-FM source with mode coupling.

``diag`` (``DiagGMM``, ``log_prob``, ``responsibilities``, ``predict``), ``em`` (``fit``, ``score``: sharded, chunked EM
with scikit-learn semantics), ``kmeanspp`` (``kmeans_plusplus``), ``spatial`` (the per-mode patch-latent table),
``source`` (``ModeSource``, ``sample_source``, ``sample_prior``, ``shard_source``, ``save_source``, ``load_source``),
``io`` (``save_gmm``, ``load_gmm``, resumable EM states), ``official`` (import the official GMM pickles), ``fit`` (the
fit-gmm job's EM and spatial pass). Internals of the EM step: ``mstep``, ``sparse``, ``precision``, ``samples``.
"""
