"""Training: state, step, optimizer, checkpoints and the sampling program.

``state`` (``TrainState``, ``create_train_state``, ``state_shardings``), ``step`` (``StepConfig``,
``make_train_step``), ``optim`` (``make_optimizer``, ``lr_schedule``, ``ema_update``), ``adaptive`` (per-mode
focal weighting), ``checkpoint`` (``Checkpointer``, ``PreemptionGuard``), ``sampling`` (``load_model``,
``make_sample_fn``, ``restore_train_ema``: shared by the sample job and ``mmfm_jax.api``), ``preview`` (sample grids
for TensorBoard).
"""
