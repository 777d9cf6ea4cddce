"""Many runs: the resumable Optuna sweeper, trial bookkeeping, grids and the Hydra callbacks around multiruns."""

import logging

# Optuna's SQL storage imports alembic, which logs its plugins at INFO on import: under Hydra's logging that is
# a screen of "setup plugin" lines before the sweep's own first line.
logging.getLogger("alembic").setLevel(logging.WARNING)
