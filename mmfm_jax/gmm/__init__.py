"""mmfm_jax.gmm."""
