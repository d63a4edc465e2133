"""mmfm_jax.data."""
