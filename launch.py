"""The one entry point: compose the config with Hydra, run the experiment, return the metric to optimise.

python launch.py                                   # DMG on the embedded Rotated MNIST
python launch.py method=aggregate target=rot0 optim.lr=3e-4
torchrun --nproc_per_node=4 launch.py method=coral   # one run on 4 GPUs (README: Many GPUs)
"""

import atexit
import logging
import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from dmg.engine.ranks import ranks_from_environment
from dmg.engine.signals import reraise_stop, sigterm_raises
from dmg.errors import Terminated, UserError
from dmg.runs.output_folder import remove_output_folder, share_output_folder
from dmg.runs.settings import check_overrides, check_settings
from dmg.sweeps.job import trial_heartbeat

log = logging.getLogger("dmg")


def task(cfg: DictConfig) -> float:
    """One job: check the command line against the config's defaults, then run. Bad input is one line, exit 1.

    The settings are checked before torch, torchvision and MLflow are imported (seconds), so that a mistake is
    answered at once. A trial of an Optuna sweep running in a process of its own (a SLURM job) records its trial's
    heartbeat while it trains (dmg/sweeps/job.py).
    """
    job = HydraConfig.get()
    share_output_folder(job)
    if not ranks_from_environment().is_writer:
        logging.getLogger("dmg").setLevel(logging.WARNING)  # rank 0 tells the story; the others only their problems
    try:
        check_overrides(cfg, job.overrides.task, job.job.config_name)
        check_settings(cfg)
        answer_if_in_progress(cfg)
        from dmg.runs.experiment import run

        with trial_heartbeat(cfg):
            return run(cfg)
    except UserError as error:
        if job.mode == RunMode.MULTIRUN:
            raise  # the sweeper records it; Hydra prints it on one line
        log.error("error: %s", error)
        if error.run_id is None:  # refused before any run started: nothing to keep
            remove_output_folder(job)
        sys.exit(1)
    except Exception as error:
        reraise_stop(error)
        raise


def answer_if_in_progress(cfg: DictConfig) -> None:
    """Stop with one line if a live process holds the run of this config, before the experiment's modules (data,
    models, torchvision: seconds on a busy machine) are imported, and long before its data and model are built.

    One process only: under torchrun or srun, rank 0 checks for every rank once their process group is up (the
    same check, in ``dmg.runs.experiment``), so that no rank is left waiting for the others.
    """
    if ranks_from_environment().distributed:
        return
    from dmg.runs.tracking import Tracker

    Tracker.check_not_in_progress(cfg, Path(cfg.checkpoint_dir))


def exit_now(code: int) -> None:
    """End a process that stops early (bad input, a run in progress, SIGTERM, Ctrl-C) once everything is written.

    The ``atexit`` handlers run (the sweep's, MLflow's, multiprocessing's: they end runs and stop loader workers),
    logs and output are flushed; the interpreter's teardown of torch, MLflow and the other modules is skipped: it
    holds a stopped process up for seconds (14 s on a busy 2-core machine) and writes nothing.
    """
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def rank_overrides(argv: list[str]) -> list[str]:
    """Hydra settings for the ranks other than 0 of a DDP job: they write no output folder (rank 0 writes the run's
    one folder; each process would otherwise resolve its own time-stamped path)."""
    if ranks_from_environment().is_writer or {"-m", "--multirun"} & set(argv):
        return []
    return ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]


main = hydra.main(version_base="1.3", config_path=str(Path(__file__).parent / "conf"), config_name="config")(task)

if __name__ == "__main__":
    sys.argv += rank_overrides(sys.argv)
    try:
        with sigterm_raises():
            main()
    except KeyboardInterrupt:
        exit_now(128 + signal.SIGINT)
    except Terminated:
        exit_now(128 + signal.SIGTERM)
    except SystemExit as stop:
        if isinstance(stop.code, int) and stop.code:
            exit_now(stop.code)
        raise
