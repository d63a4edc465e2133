#!/usr/bin/env bash
# Thin wrapper: python -m mmfm_jax.launch slurm [flags] -- <job> [job flags]   (see launch/README.md; --dry-run prints)
exec "${PYTHON:-python3}" -m mmfm_jax.launch slurm "$@"
