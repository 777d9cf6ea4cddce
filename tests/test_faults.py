"""Fault injection with real processes: concurrent starts on a fresh store, kill -9 at chosen points, SIGTERM,
a second process for a live run, killed sweeps rerun at once. After any of them, rerunning the command leaves
exactly one FINISHED run per config with one metric row per epoch, equal to an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from dmg.engine import signals
from dmg.engine.signals import reraise_stop, sigterm_raises
from dmg.errors import Terminated
from dmg.runs.experiment import end_interrupted, run
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["dataset.max_images=300", "backbone.network.width=4", "progress=false"]
pytestmark = pytest.mark.slow


def launch(
    folder: Path, *overrides: str, script: tuple[str, ...] = ("launch.py",), env: dict[str, str] | None = None
) -> subprocess.Popen:
    """``python launch.py`` as a user starts it in ``folder``: default store and checkpoints land there."""
    flags = [option for option in overrides if option.startswith("-")]  # -m goes before the overrides
    settings = [option for option in overrides if not option.startswith("-")]
    command = [sys.executable, str(ROOT / script[0]), *script[1:], *flags, *TINY, *settings]
    environment = {**os.environ, **(env or {})}
    return subprocess.Popen(
        command, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment
    )


def race_window(folder: Path, window: str) -> dict[str, str]:
    """The environment that forces the race window ``window`` (dmg/runs/windows.py), its arrivals in ``folder``."""
    folder.mkdir(exist_ok=True)
    return {"DMG_RACE_WINDOW": window, "DMG_RACE_DIR": str(folder)}


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def runs_in(folder: Path, experiment: str = "rotated_mnist"):
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    found = client.get_experiment_by_name(experiment)
    return client, client.search_runs([found.experiment_id]) if found else []


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def wait_for(condition, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Per-epoch metrics of an uninterrupted 3-epoch run (what every interrupted run must end with)."""
    folder = tmp_path_factory.mktemp("reference")
    run(compose_config([*TINY, "epochs=3", f"tracking.uri=sqlite:///{folder}/mlflow.db", f"checkpoint_dir={folder}/c"]))
    client, (only,) = runs_in(folder)
    return {key: history(client, only.info.run_id, key) for key in only.data.metrics}


def test_four_processes_started_together_on_a_fresh_store_all_succeed(tmp_path):
    processes = [launch(tmp_path, "epochs=1", f"seed={seed}", f"hydra.run.dir=out{seed}") for seed in range(4)]
    results = [finish(process) for process in processes]
    assert [code for code, _ in results] == [0] * 4, "\n".join(output for _, output in results)
    client, runs = runs_in(tmp_path)
    assert sorted(r.data.tags["seed"] for r in runs) == ["0", "1", "2", "3"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    tables = {row[0] for row in sqlite3.connect(tmp_path / "mlflow.db").execute("select name from sqlite_master")}
    assert not [name for name in tables if name.startswith("_alembic_tmp")]  # the schema was migrated once
    assert {experiment.name for experiment in client.search_experiments()} == {"rotated_mnist", "Default"}


@pytest.fixture(scope="module")
def store_template(tmp_path_factory) -> Path:
    """An empty MLflow store, copied into tests that are not about creating one (creating takes seconds)."""
    folder = tmp_path_factory.mktemp("template")
    MlflowClient(f"sqlite:///{folder}/mlflow.db").search_experiments()
    return folder / "mlflow.db"


KILL_POINTS = [
    "dmg.engine.checkpoints:Checkpointer.save:1",  # epoch 1 logged, no checkpoint yet: a run without any checkpoint
    "dmg.engine.checkpoints:torch.save:2",  # inside a checkpoint write (epoch 2): a temporary file is left behind
    "dmg.engine.checkpoints:Checkpointer.save:2",  # epoch 3 logged, its checkpoint not written
    "dmg.runs.tracking:Tracker.log_artifact:1",  # in the end-of-run summary, after its metrics were logged
]


def test_kill_9_anywhere_then_rerun_gives_one_finished_run_equal_to_an_uninterrupted_one(
    tmp_path, reference, store_template
):
    shutil.copy(store_template, tmp_path / "mlflow.db")
    run_ids = set()
    for point in KILL_POINTS:  # each rerun continues the run and is killed again, further on
        code, output = finish(launch(tmp_path, "epochs=3", script=("tests/crash.py", point)))
        assert code == -signal.SIGKILL, output
        _, runs = runs_in(tmp_path)
        assert [r.info.status for r in runs] == ["RUNNING"], point  # what kill -9 leaves; a rerun must close it
        run_ids.add(runs[0].info.run_id)
    code, output = finish(launch(tmp_path, "epochs=3"))
    assert code == 0, output
    client, runs = runs_in(tmp_path)
    assert len(run_ids) == 1 and [(r.info.run_id, r.info.status) for r in runs] == [(run_ids.pop(), "FINISHED")]
    for key, expected in reference.items():
        assert history(client, runs[0].info.run_id, key) == expected, key  # one row per step, same values
    assert not (tmp_path / "checkpoints" / runs[0].info.run_id).exists()  # the local state is gone when finished
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_sigterm_that_surfaces_wrapped_in_another_error_is_still_a_stop(monkeypatch):
    """torchrun stops the other ranks with SIGTERM when one fails; one rank got it while importing matplotlib, where
    Python 3.11 wraps the handler's exception in a RuntimeError (``__set_name__``), and the stop passed for a crash
    (a traceback instead of the refused rank's line). launch.py's task raises the stop it stands for."""
    monkeypatch.setattr(signals, "_received", [])  # this process's record of signals, fresh and thrown away after

    class StopsWhenNamed:
        def __set_name__(self, owner, name):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts it at once

    with pytest.raises(Terminated), sigterm_raises():
        try:
            type("Owner", (), {"attribute": StopsWhenNamed()})
        except Exception as error:  # RuntimeError on Python 3.11; 3.12 lets Terminated through unwrapped
            reraise_stop(error)


def test_a_signal_while_a_failed_run_is_marked_does_not_cut_the_marking_short(monkeypatch):
    """torchrun's SIGTERM reached a rank while it marked its run FAILED (its peer had died, its connection with it):
    the signal's exception cut the marking short and the run stayed RUNNING."""
    monkeypatch.setattr(signals, "_received", [])
    marked = []

    class Tracker:  # what end_interrupted asks of dmg.runs.tracking.Tracker
        run_id = "run"

        def finish(self, status: str) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs here, at once
            marked.append(status)

    with sigterm_raises():
        end_interrupted(Tracker(), RuntimeError("connection closed by peer"))
    assert marked == ["FAILED"] and signals.stop_requested()


def test_sigterm_marks_the_run_killed_and_exits_promptly_then_the_rerun_resumes(tmp_path, store_template):
    shutil.copy(store_template, tmp_path / "mlflow.db")
    command = ("epochs=3", "dataset.max_images=1200")
    process = launch(tmp_path, *command)
    folder = tmp_path / "checkpoints"
    wait_for(lambda: list(folder.glob("*/last.pt")), what="the first checkpoint")
    process.send_signal(signal.SIGSTOP)  # so the signal lands mid-run, however fast this machine trains
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    process.send_signal(signal.SIGCONT)
    code, output = finish(process)
    assert code == 128 + signal.SIGTERM and time.monotonic() - sent < HANG, output  # a deadline for a hang only
    assert "Traceback" not in output and "rerun the same command to continue it" in output
    client, (stopped,) = runs_in(tmp_path)
    assert stopped.info.status == "KILLED"
    code, output = finish(launch(tmp_path, *command))
    assert code == 0 and f"continuing run {stopped.info.run_id}" in output, output
    client, (resumed,) = runs_in(tmp_path)
    assert resumed.info.status == "FINISHED" and len(history(client, resumed.info.run_id, "val/acc_mean")) == 3


def test_a_second_process_for_a_live_run_stops_with_one_line_naming_the_holder(tmp_path, store_template):
    shutil.copy(store_template, tmp_path / "mlflow.db")
    shared = "hydra.run.dir=out"  # one output folder, as for two runs started in the same second
    first = launch(tmp_path, "epochs=40", shared)
    wait_for(lambda: list((tmp_path / "checkpoints").glob("*/last.pt")), what="the first checkpoint")
    first.send_signal(signal.SIGSTOP)  # alive and holding the run, however fast this machine trains
    race = tmp_path / "race"  # the window after the data is built, open (0 s): a process that gets there leaves a file
    timed = {"PYTHONPROFILEIMPORTTIME": "1"}  # every import, on a line of its own
    code, output = finish(launch(tmp_path, "epochs=40", shared, env=race_window(race, "in_progress:0") | timed))
    first.kill()
    first.wait()
    imported = {line.split("|")[-1].strip() for line in output.splitlines() if line.startswith("import time:")}
    said = [line for line in output.splitlines() if not line.startswith("import time:")]
    errors = [line for line in said if "error" in line.lower()]
    assert code == 1 and len(errors) == 1, "\n".join(said)
    assert "mlflow" in imported and not {"torchvision", "dmg.runs.experiment"} & imported  # before the heavy part
    assert f"is in progress (process {first.pid} on host" in errors[0] and "resume=never" in errors[0]
    assert not list(race.iterdir())  # refused before building the data and the model
    assert "starting run" in (tmp_path / "out" / "launch.log").read_text()  # the live run's folder is kept
    _, runs = runs_in(tmp_path)
    assert len(runs) == 1  # no duplicate run was started


def test_a_process_that_found_the_run_free_before_building_its_data_is_still_refused_when_taken(
    tmp_path, store_template
):
    shutil.copy(store_template, tmp_path / "mlflow.db")
    race = tmp_path / "race"
    late = launch(tmp_path, "epochs=40", "hydra.run.dir=outputs/late/run", env=race_window(race, "in_progress"))
    wait_for(lambda: list(race.glob("in_progress.*")), what="the late process to build its data")  # waits there
    first = launch(tmp_path, "epochs=40", "hydra.run.dir=outputs/first/run")  # takes the run meanwhile
    wait_for(lambda: list((tmp_path / "checkpoints").glob("*/last.pt")), what="the first checkpoint")
    first.send_signal(signal.SIGSTOP)
    (race / "go").touch()
    code, output = finish(late)
    first.kill()
    first.wait()
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert code == 1 and len(errors) == 1 and f"is in progress (process {first.pid} on host" in errors[0], output
    assert [path.name for path in (tmp_path / "outputs").iterdir()] == ["first"]  # the refused run's folder is gone
    _, runs = runs_in(tmp_path)
    assert len(runs) == 1


def study_trials(folder: Path, name: str) -> list:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder}/optuna-{name}.db").trials


SWEEP = ["-m", "+sweep=dmg_search", "epochs=1", "hydra.sweeper.sampler.seed=0"]  # heartbeats: 60 s, grace 120 s
STUDY = "dmg-rotated_mnist-small_cnn-rot30"
HANG = 300  # seconds: only a hang takes this long; a busy machine never fails a test


def test_a_sweep_killed_during_a_trial_finishes_when_rerun_at_once(tmp_path, store_template):
    shutil.copy(store_template, tmp_path / "mlflow.db")
    sweep = launch(tmp_path, *SWEEP, "hydra.sweeper.n_trials=3")
    database = tmp_path / f"optuna-{STUDY}.db"
    wait_for(
        lambda: database.exists() and [t.state for t in study_trials(tmp_path, STUDY)].count(TrialState.COMPLETE) == 1
        and any(t.state == TrialState.RUNNING for t in study_trials(tmp_path, STUDY)),
        what="trial 1 to run",
    )  # fmt: skip
    sweep.kill()
    sweep.wait()
    code, output = finish(launch(tmp_path, *SWEEP, "hydra.sweeper.n_trials=3"))
    assert code == 0, output
    assert "trial 1 is queued again: its process is gone" in output  # found dead at once, not by the 120 s grace
    trials = study_trials(tmp_path, STUDY)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3 and {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.FAIL}
    client, runs = runs_in(tmp_path)
    parent = [r for r in runs if r.data.tags.get("sweep") == "optuna"]
    children = [r for r in runs if r not in parent]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert len(children) == 3 and {r.info.status for r in children} == {"FINISHED"}  # one run per trial
    for child in children:
        assert [step for step, _ in history(client, child.info.run_id, "val/acc_mean")] == [1]


def test_sweep_workers_started_together_on_a_fresh_directory_share_one_study(tmp_path):
    workers = [
        launch(tmp_path, *SWEEP, "hydra.sweeper.n_trials=4", f"hydra.sweeper.sampler.seed={seed}") for seed in (0, 1)
    ]
    results = [finish(worker) for worker in workers]
    assert [code for code, _ in results] == [0, 0], "\n".join(output for _, output in results)
    trials = study_trials(tmp_path, STUDY)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    client, runs = runs_in(tmp_path)
    parents = [r for r in runs if r.data.tags.get("sweep") == "optuna"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 4 and {r.info.status for r in children} == {"FINISHED"}
    assert sorted(int(r.data.tags["trial"]) for r in children) == [0, 1, 2, 3]
