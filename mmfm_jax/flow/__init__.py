"""Flow matching: time samplers, the loss, ODE samplers and GMFlow.

``time`` (``sample_time``, ``sample_time_per_example``, ``shift_time``), ``loss`` (``interpolate``,
``fm_loss_per_sample``, ``fm_loss``), ``samplers`` (``euler_grid``, ``euler_sample``, ``autoguidance``,
``guided_velocity_fn``), ``gmflow`` (GMFlow: ``transition_nll``, ``gm_sample`` with GM-ODE / GM-SDE,
``sample_sweep``, ``validate_gm_source``; its closed-form Gaussian-mixture operations are ``mmfm_jax.ops.gm``).
"""
