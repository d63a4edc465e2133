"""mmfm_jax.eval."""
