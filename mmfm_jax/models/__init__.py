"""mmfm_jax.models."""
