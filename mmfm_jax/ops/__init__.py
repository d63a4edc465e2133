"""Numerical building blocks shared by the models and the data pipeline (imports nothing above ``mmfm_jax.utils``).

``resize`` (torch-exact bicubic resampling: ``resize_bicubic_torch``, ``resize_token_grid``).
"""
