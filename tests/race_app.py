"""The race tests' worker: ``python tests/race_app.py -m hydra.sweeper.storage=... hydra.sweeper.n_trials=N``
runs a one-parameter study on the dmg_optuna sweeper; a trial's objective is its ``x``.

With ``stress.ledger=<file>`` each trial is a real MLflow run (found, continued or reported as a run of the project
is: dmg.runs.tracking), held open at the ``train`` window, and its end is appended to the ledger. Like launch.py's
task, a trial's job running in a process of its own beats for its trial while it trains (dmg/sweeps/job.py)."""

from pathlib import Path

import hydra


@hydra.main(config_path="race_app", config_name="config", version_base="1.3")
def task(cfg) -> float:
    if not cfg.stress:
        return cfg.x
    from dmg.sweeps.job import trial_heartbeat

    with trial_heartbeat(cfg):
        return train(cfg)


def train(cfg) -> float:
    """A trial as a real MLflow run, "trained" at the ``train`` window."""
    from dmg.runs.tracking import RunFinished, Tracker, finished_run
    from dmg.runs.windows import window
    from dmg.sweeps.callbacks import sweep_tags

    if done := finished_run(cfg):
        return done.data.metrics["value"]
    try:
        tracker = Tracker.start(cfg, sweep_tags(cfg.tracking), Path(cfg.checkpoint_dir))
    except RunFinished as finished:
        return finished.run.data.metrics["value"]
    window("train")  # "training": a kill -9 lands here
    with open(cfg.stress.ledger, "a") as ledger:
        ledger.write(f"{cfg.x!r}\n")
    tracker.log_metrics({"value": cfg.x}, 1)
    tracker.finish()
    tracker.release()
    return cfg.x


if __name__ == "__main__":
    task()
