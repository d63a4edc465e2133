"""Training: the Trainer, state, step, optimizer, checkpoints and the sampling program.

``trainer`` (``Trainer.from_config``: the model, state shardings and the jitted step the train job, the digits demo and
``bench train`` share), ``config`` (train-config validation, ``step_config``), ``state`` (``TrainState``,
``create_train_state``, ``state_shardings``), ``step`` (``StepConfig``, ``make_train_step``), ``optim``
(``make_optimizer``, ``lr_schedule``, ``ema_update``), ``adaptive`` (per-mode focal weighting), ``checkpoint``
(``Checkpointer``, ``PreemptionGuard``, ``restore_for_inference``; array checksums in ``checksums``), ``sampling``
(``load_model``, ``make_sample_fn``, ``restore_train_ema``: shared by the sample job, ``bench sample`` and
``mmfm_jax.api``), ``sample_io`` (the sample job's inputs and sample shards), ``preview`` (sample grids for
TensorBoard).
"""
