"""Many runs: the resumable Optuna sweeper, trial bookkeeping, grids and the Hydra callbacks around multiruns."""
