"""mmfm_jax.flow."""
