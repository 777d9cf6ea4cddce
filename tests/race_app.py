"""The race tests' worker: ``python tests/race_app.py -m hydra.sweeper.storage=... hydra.sweeper.n_trials=N``
runs a one-parameter study on the dmg_optuna sweeper; a trial's objective is its ``x``."""

import hydra


@hydra.main(config_path="race_app", config_name="config", version_base="1.3")
def task(cfg) -> float:
    return cfg.x


if __name__ == "__main__":
    task()
