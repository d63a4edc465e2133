"""Numerical building blocks shared by the models and the data pipeline (imports nothing above ``mmfm_jax.utils``)."""
