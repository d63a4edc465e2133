"""mmfm_jax.train."""
