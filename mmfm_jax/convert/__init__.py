"""mmfm_jax.convert."""
