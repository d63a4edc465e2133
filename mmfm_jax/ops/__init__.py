"""Numerical building blocks shared by the models and the data pipeline (imports nothing above ``mmfm_jax.utils``).

``resize`` (torch-exact bicubic resampling: ``resize_bicubic_torch``, ``resize_token_grid``), ``gm`` (closed-form
Gaussian-mixture operations: ``GM``, ``GaussianSource``, shared by the GM head and GMFlow).
"""
