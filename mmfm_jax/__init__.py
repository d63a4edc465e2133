"""mmfm_jax."""
