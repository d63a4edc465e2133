"""mmfm_jax: MM-FM (flow matching from a GMM source with mode coupling) and GMFlow in JAX / Flax NNX, for TPU/GPU pods.

Entry points: ``mmfm_jax.api.Pipeline`` (load a training run or the official release; sample, encode, decode) and the
``mmfm-jax`` command (``cli``; jobs in ``jobs``, studies in ``experiments``). Library packages, lowest first: ``ops``;
``models``, ``gmm``, ``flow``; ``data``, ``convert``, ``eval``; ``train``; then ``jobs``, ``experiments``, ``bench``,
``plan``, ``release``. Shared modules: ``parallel`` (meshes, logical axis rules, shardings), ``distributed``
(multi-process set-up, compilation cache, barrier), ``config_utils`` / ``config_files`` (validation naming the key,
``--config`` specs), ``storage`` (files on local paths or gs://, atomic writes), ``utils`` (logging, progress, metric
writer), ``torch_io`` (the safe ``.pt`` reader), ``workdir`` (run locks, stage fingerprints), ``launch`` (pods, SLURM,
local).
"""
