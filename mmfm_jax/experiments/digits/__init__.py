"""The digits demo (``mmfm-jax demo``): MM-FM vs the Gaussian baseline on scikit-learn's 8x8 digits, and GMFlow's
solvers vs the number of steps.

Modules: ``demo`` (the CLI job: ``validate``, ``run``; the convergence study), ``gm`` (the ``gm_steps`` mode),
``common`` (settings, GMM source, classifier scoring, ``make_trainer``: the train job's ``Trainer`` per setting),
``report`` (tables, figures, report.md).
"""
