"""The toy study: the paper's R^10 experiment (Len, W2^2 for Compact / Spread targets) and, in ``gm_steps`` mode,
Euler vs GMFlow's solvers vs number of steps; run by ``mmfm-jax toy`` (config ``configs/toy.py``, design docs/toy.md).

Modules: ``job`` (the CLI entry: ``DEFAULT_CONFIG``, ``validate``, ``run``), ``target`` (target geometry and
samples, the GMM fit, exact ``w2_squared``), ``study`` (the ``paper`` mode), ``gm`` (the ``gm_steps`` mode),
``report`` (tables, markdown, figure) and ``loop``: the study keeps its own small training loop, since it trains
many tiny MLPs at once under ``vmap``; sources, losses, samplers and models come from ``gmm``, ``flow``, ``models``.
"""
