"""Sweeps: the resumable Optuna sweeper (study in the storage, MLflow parent/child runs, best-params file, resume,
failed and NaN trials) and the leave-one-domain-out multirun on submitit's local executor."""

from __future__ import annotations

import errno
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import CompactHydraException
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState

from dmg.commands import report
from dmg.engine import checkpoints
from dmg.errors import SetupError, UserError
from dmg.sweeps.job import SWEEP_ENV, TrialTaken, anchored, trial_heartbeat
from dmg.sweeps.sweeper import SweepFailed, SweepStopped, describe, expand_glob
from dmg.sweeps.trials import FAILURE_ATTR, TOKEN, requeue
from launch import task as launch_task
from tests.conftest import CONF_DIR


def project_multirun(hydra_sweep_runner, overrides: list[str], tmp_path: Path):
    """``python launch.py -m <overrides>`` in this process, with the sweep folder under ``tmp_path/multirun``."""
    return hydra_sweep_runner(
        calling_file=__file__,
        calling_module=None,
        task_function=launch_task,
        config_path=str(CONF_DIR),
        config_name="config",
        overrides=overrides,
        temp_dir=str(tmp_path / "multirun"),
    )


ROOT = Path(__file__).resolve().parents[1]
TINY = ["dataset.max_images=300", "backbone.network.width=4", "epochs=1", "progress=false"]
FAKE_APP = """
defaults:
  - override hydra/sweeper: dmg_optuna
  - _self_
x: 0.0
tracking: {trial: null}
hydra:
  sweeper:
    study_name: fake
    params: {x: 'interval(0, 1)'}
    heartbeat_interval: 1
    grace_period: 1
"""


def load_study(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


@pytest.fixture
def fake_sweep(tmp_path, hydra_sweep_runner):
    """Run the dmg_optuna sweeper in-process on a one-parameter app whose task is ``task(trial_number, x)``."""
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "config.yaml").write_text(FAKE_APP)
    storage = f"sqlite:///{tmp_path}/optuna.db"

    def sweep(task, n_trials: int, *overrides: str) -> dict:
        settings = [
            "hydra.job.chdir=false",
            f"hydra.sweeper.storage={storage}",
            f"hydra.sweeper.n_trials={n_trials}",
            "hydra.sweeper.sampler.seed=0",
        ]
        with hydra_sweep_runner(
            calling_file=__file__,
            calling_module=None,
            task_function=lambda cfg: task(cfg.tracking.trial.number, cfg.x),
            config_path=str(tmp_path / "app"),
            config_name="config",
            overrides=settings + list(overrides),
            temp_dir=str(tmp_path / "multirun"),
        ):
            return OmegaConf.to_container(OmegaConf.load(tmp_path / "multirun" / "optimization_results.yaml"))

    sweep.storage = storage
    return sweep


def test_trial_description_reads_back_through_hydras_override_parser():
    study = optuna.create_study()
    trial = study.ask()
    trial.suggest_categorical("mask", ["scalar"])
    trial.suggest_float("mask.val", 0.25, 0.25)
    trial.suggest_categorical("method.sparsity_lambda", [1e-05])
    value = describe("it's", trial)
    parsed = OverridesParser.create().parse_override("tracking.trial=" + value).value()
    assert parsed == {
        "study": "it's",
        "number": 0,
        "origin": 0,
        "params": {"mask": "scalar", "mask.val": 0.25, "method.sparsity_lambda": 1e-05},
    }


def test_glob_over_a_config_group_becomes_a_choice_of_its_options():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        from hydra.core.global_hydra import GlobalHydra

        options = GlobalHydra.instance().config_loader().get_group_options
        assert expand_glob("mask=glob(*)", options) == "mask=choice(normal,random_uniform,scalar)"
        assert expand_glob("mask=glob(*,exclude=normal)", options) == "mask=choice(random_uniform,scalar)"
        assert expand_glob("method.overlap_lambda=choice(0,0.1)", options) == "method.overlap_lambda=choice(0,0.1)"


def test_recipes_compose_with_their_sweeper_launcher_and_callbacks():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        search = compose(
            "config",
            ["+sweep=dmg_search_lr", "hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
        loo = compose("config", ["+sweep=leave_one_out", "method=aggregate"], return_hydra_config=True)
    sweeper = search.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.dmg_sweeps.ResumableOptunaSweeper" and search.method.name == "dmg"
    assert sweeper.study_name == "dmg-lr-rotated_mnist-small_cnn-rot30"
    assert sweeper.storage == "sqlite:///optuna-dmg-lr-rotated_mnist-small_cnn-rot30.db"
    assert {"method.overlap_lambda", "method.sparsity_lambda", "mask", "optim.lr", "optim.mask_lr"} == set(
        sweeper.params
    )
    assert sweeper.conditional_params["mask.val"].when == {"mask": "scalar"}
    assert set(search.hydra.callbacks) == {"mask_secrets", "preflight", "mlflow_parent_run"}
    launcher = search.hydra.launcher
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 1, 720)
    assert loo.hydra.sweeper.params.seed == "0,1,2" and loo.method.name == "aggregate"


def test_trials_failing_by_their_config_or_numerics_count_as_failed_and_the_sweep_goes_on(fake_sweep):
    def task(number, x):
        if number == 1:
            return math.nan
        if number == 2:
            raise UserError("bad input")
        return x

    results = fake_sweep(task, 4)
    trials = load_study(fake_sweep.storage, "fake").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] + [TrialState.FAIL] * 2 + [TrialState.COMPLETE]
    assert [t.user_attrs.get("failure") for t in trials[1:3]] == ["the objective is nan", "UserError: bad input"]
    best = max((trials[0], trials[3]), key=lambda t: t.value)
    assert results["best_trial"] == best.number and results["best_value"] == best.value
    assert results["best_params"] == {"x": best.params["x"]} and results["trials"] == {"complete": 2, "fail": 2}


@pytest.mark.parametrize("error", [RuntimeError("crash"), SetupError("store unreachable"), OSError(28, "No space")])
def test_an_error_outside_the_config_requeues_the_trial_stops_the_sweep_and_never_consumes_the_study(fake_sweep, error):
    seen = []

    def broken_once(number, x):
        seen.append((number, x))
        if number == 1:
            raise error
        return x

    with pytest.raises(SweepStopped, match="queued again: fix the problem and rerun the same command"):
        fake_sweep(broken_once, 3)
    trials = load_study(fake_sweep.storage, "fake").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert "failure" not in trials[1].user_attrs  # not counted as a failure of the config
    results = fake_sweep(broken_once, 3)
    trials = load_study(fake_sweep.storage, "fake").trials
    assert results["trials"] == {"complete": 3, "fail": 1} and seen[2] == (2, seen[1][1])  # same params again
    assert trials[2].system_attrs["failed_trial"] == 1


def test_sweep_stops_after_too_many_config_failures_in_a_row_with_one_line(fake_sweep):
    def task(number, x):
        raise UserError("every trial is misconfigured")

    with pytest.raises(SweepFailed, match="the last 2 trials of study fake failed") as failure:
        fake_sweep(task, 10, "hydra.sweeper.max_consecutive_failures=2")
    assert isinstance(failure.value, CompactHydraException)  # Hydra prints it as one line
    assert len(load_study(fake_sweep.storage, "fake").trials) == 2


def test_interrupted_sweep_resumes_at_once_without_rerunning_finished_trials(fake_sweep):
    calls = []

    def interrupted(number, x):
        calls.append((number, x))
        if number == 1:
            raise KeyboardInterrupt  # Ctrl-C while trial 1 runs
        return x

    with pytest.raises(KeyboardInterrupt):
        fake_sweep(interrupted, 3)
    states = [t.state for t in load_study(fake_sweep.storage, "fake").trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]  # trial 1 queued again at once
    first = list(calls)
    calls.clear()
    fake_sweep(lambda number, x: calls.append((number, x)) or x, 3)
    trials = load_study(fake_sweep.storage, "fake").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert [number for number, _ in calls] == [2, 3]  # trial 0 is not run again
    assert calls[0][1] == first[1][1] and trials[2].system_attrs["failed_trial"] == 1  # trial 1 re-queued as is
    assert calls[1][1] != first[0][1]  # the resumed sampler does not repeat its first suggestion
    fake_sweep(lambda number, x: calls.append((number, x)) or x, 3)
    assert len(calls) == 2  # the study is complete: a rerun does nothing


def test_a_trial_whose_process_died_on_this_host_is_requeued_at_once(fake_sweep):
    study = optuna.create_study(study_name="fake", storage=fake_sweep.storage, direction="maximize")
    orphan = study.ask()
    orphan.suggest_float("x", 0.0, 1.0)
    identity = "import json; from dmg.sweeps.trials import this_process; print(json.dumps(this_process()))"
    dead = subprocess.run([sys.executable, "-c", identity], capture_output=True, text=True, cwd=ROOT, check=True)
    orphan.set_system_attr("process", json.loads(dead.stdout))  # a process of this host that has ended
    fake_sweep(lambda number, x: x, 2)  # the orphan has no heartbeat: only its dead process can queue it again
    trials = load_study(fake_sweep.storage, "fake").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[1].params == orphan.params and trials[1].system_attrs["failed_trial"] == 0


def test_a_worker_waits_for_trials_of_live_processes_before_ending(fake_sweep):
    study = optuna.create_study(study_name="fake", storage=fake_sweep.storage, direction="maximize")
    busy = study.ask()
    busy.suggest_float("x", 0.0, 1.0)
    busy.set_system_attr("process", {"host": socket.gethostname(), "pid": os.getpid(), "started": None})
    finisher = threading.Timer(2.0, lambda: study.tell(busy, 0.5))  # "another worker" completes its trial
    finisher.start()
    results = fake_sweep(lambda number, x: x, 2)
    finisher.join()
    assert results["trials"] == {"complete": 2}  # it waited for the other worker's trial instead of ending without it


def job_config(monkeypatch, storage: str, number: int, interval: float = 1, sweeper: tuple = (0, "elsewhere")):
    """The config of trial ``number``'s job, in the environment its sweeper (another process by default) gave it."""
    sweep = {"storage": storage, "heartbeat_interval": interval, "trial_key": "tracking.trial", "sweeper": sweeper}
    monkeypatch.setenv(SWEEP_ENV, json.dumps(sweep))
    return OmegaConf.create({"tracking": {"trial": {"study": "fake", "number": number, "origin": number}}})


def test_a_job_beats_for_its_trial_while_it_trains_and_a_failing_beat_does_not_stop_it(tmp_path, monkeypatch, caplog):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    trial = optuna.create_study(study_name="fake", storage=storage).ask()
    beats, record_heartbeat = [], optuna.storages.RDBStorage.record_heartbeat

    def store_down_twice(self, trial_id: int) -> None:
        beats.append(trial_id)
        if len(beats) in (2, 3):
            raise optuna.exceptions.StorageInternalError("the store is down")
        record_heartbeat(self, trial_id)

    monkeypatch.setattr(optuna.storages.RDBStorage, "record_heartbeat", store_down_twice)
    with trial_heartbeat(job_config(monkeypatch, storage, trial.number, interval=0.05)):  # the job trains
        deadline = time.monotonic() + 60
        while len(beats) < 5:
            assert time.monotonic() < deadline, "the heartbeat stopped"
            time.sleep(0.01)
        job = load_study(storage, "fake").trials[0].system_attrs["job"]
        assert job["pid"] == os.getpid() and job["token"] == TOKEN  # the trial names its job beside its sweeper
    after = len(beats)
    assert caplog.text.count("could not record a heartbeat (the store is down); trying again") == 2
    assert len(beats) == after and beats == [trial._trial_id] * after  # the job ended: no beat after it


def test_jobs_get_the_storage_of_a_relative_sqlite_path_wherever_they_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert anchored("sqlite:///optuna.db?timeout=30") == f"sqlite:///{tmp_path}/optuna.db?timeout=30"
    assert anchored(f"sqlite:///{tmp_path}/o.db") == f"sqlite:///{tmp_path}/o.db"
    assert anchored("postgresql://u:p@h/optuna") == "postgresql://u:p@h/optuna"


def test_a_job_started_after_its_trial_was_queued_again_does_nothing(tmp_path, monkeypatch):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="fake", storage=storage)
    trial = study.ask()
    requeue(study, trial, "its sweeper died")  # while its job waited in SLURM's queue
    trained = []
    with pytest.raises(TrialTaken, match="trial 0 of study fake was queued again before this job started"):
        with trial_heartbeat(job_config(monkeypatch, storage, trial.number)):
            trained.append(True)
    assert not trained and "job" not in load_study(storage, "fake").trials[0].system_attrs


def test_a_job_in_its_sweepers_process_leaves_the_heartbeat_to_the_sweeper(tmp_path, monkeypatch):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    trial = optuna.create_study(study_name="fake", storage=storage).ask()
    with trial_heartbeat(job_config(monkeypatch, storage, trial.number, sweeper=(os.getpid(), TOKEN))):
        pass
    assert "job" not in load_study(storage, "fake").trials[0].system_attrs


def search(tmp_path: Path, *extra: str) -> tuple[str, list[str]]:
    """The Optuna storage and the overrides of a 3-trial ``+sweep=dmg_search`` on tiny settings in ``tmp_path``."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    overrides = ["hydra.job.chdir=false", "+sweep=dmg_search", "hydra.sweeper.n_trials=3"]
    overrides += [f"hydra.sweeper.storage={storage}", *extra, *TINY]
    return storage, overrides + [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"checkpoint_dir={tmp_path}/ckpt"]


@pytest.mark.slow
def test_optuna_sweep_stores_trials_nests_mlflow_runs_and_writes_best_params(tmp_path, hydra_sweep_runner, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's default Optuna storage would land here
    storage, overrides = search(
        tmp_path,
        "hydra.sweeper.sampler.seed=0",
        "method.overlap_lambda=choice(0.0,1.0)",  # a searched name on the command line replaces its search space
    )
    with project_multirun(hydra_sweep_runner, overrides, tmp_path):
        results = OmegaConf.to_container(OmegaConf.load(tmp_path / "multirun" / "optimization_results.yaml"))
    study = load_study(storage, "dmg-rotated_mnist-small_cnn-rot30")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert study.trials[0].distributions["mask"].choices == ("normal", "random_uniform", "scalar")
    assert study.trials[0].distributions["method.overlap_lambda"].choices == (0.0, 1.0)
    for trial in study.trials:
        assert ("mask.val" in trial.params) == (trial.params["mask"] == "scalar")  # sampled only where it applies
    assert "scalar" in {t.params["mask"] for t in study.trials}  # seed 0 samples the conditional branch

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("rotated_mnist").experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("sweep") == "optuna"]
    children = sorted((r for r in runs if r is not parent), key=lambda r: int(r.data.tags["trial"]))
    assert parent.info.status == "FINISHED" and len(children) == 3
    for trial, child in zip(study.trials, children):
        tags = child.data.tags
        assert (
            tags["mlflow.parentRunId"] == parent.info.run_id
            and child.info.run_name == f"{study.study_name}-trial{trial.number}"
        )
        assert {key: tags[f"trial.{key}"] for key in trial.params} == {
            key: str(value) for key, value in trial.params.items()
        }
        assert child.data.params["method.overlap_lambda"] == str(trial.params["method.overlap_lambda"])
        assert child.data.metrics["selected/val/acc_mean"] == trial.value  # the objective, not a target metric
        assert {"masks/active_conv3.png", "masks/active_fc.png"} <= {
            a.path for a in client.list_artifacts(child.info.run_id, "masks")
        }

    best = study.best_trial
    assert (
        results["best_trial"] == best.number
        and results["best_params"] == best.params
        and results["best_value"] == best.value
    )
    assert parent.data.metrics["best/selected/val/acc_mean"] == best.value
    assert {key: parent.data.tags[f"best.{key}"] for key in best.params} == {k: str(v) for k, v in best.params.items()}
    assert "optimization_results.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert not list(tmp_path.glob("optuna-*.db"))  # the storage override was honoured


@pytest.mark.slow
def test_leave_one_out_on_submitits_local_launcher_gives_one_finished_run_per_target(tmp_path, hydra_sweep_runner):
    overrides = ["hydra.job.chdir=false", "+sweep=leave_one_out", "hydra/launcher=submitit_local", "method=aggregate"]
    overrides += [
        "target=rot0,rot75",
        "seed=0",
        *TINY,
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"checkpoint_dir={tmp_path}/ckpt",
    ]
    with project_multirun(hydra_sweep_runner, overrides, tmp_path):
        assert (
            len(list((tmp_path / "multirun").glob(".submitit/*/*_result.pkl"))) == 2
        )  # the jobs went through submitit
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("rotated_mnist").experiment_id])
    assert sorted(r.data.tags["target"] for r in runs) == ["rot0", "rot75"]
    assert all(r.info.status == "FINISHED" and "mlflow.parentRunId" not in r.data.tags for r in runs)

    frame = report.run_frame(client, runs, report.SELECTIONS["validation"])
    cells = report.table(frame, "ood")
    for run_ in runs:
        assert (
            cells.loc["aggregate", run_.data.tags["target"]].mean == 100 * run_.data.metrics["selected/test/acc_mean"]
        )


@pytest.mark.slow
def test_a_full_disk_in_a_project_trial_requeues_it_and_the_rerun_continues_its_run(
    tmp_path, hydra_sweep_runner, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    storage, overrides = search(tmp_path)
    save, calls = checkpoints.Checkpointer.save, []

    def disk_full_once(self, *args, **kwargs):
        calls.append(None)
        if len(calls) == 2:  # trial 1's first checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, *args, **kwargs)

    monkeypatch.setattr(checkpoints.Checkpointer, "save", disk_full_once)
    with pytest.raises(SweepStopped, match="stopped by a problem outside its config"):
        with project_multirun(hydra_sweep_runner, overrides, tmp_path):
            pass
    study = load_study(storage, "dmg-rotated_mnist-small_cnn-rot30")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert "failure" not in study.trials[1].user_attrs  # the disk's fault, not the config's: not counted
    with project_multirun(hydra_sweep_runner, overrides, tmp_path):
        pass
    study = load_study(storage, "dmg-rotated_mnist-small_cnn-rot30")
    assert [t.state for t in study.trials].count(TrialState.COMPLETE) == 3 and len(study.trials) == 4
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("rotated_mnist").experiment_id])
    children = [r for r in runs if "trial" in r.data.tags]
    assert len(children) == 3 and {r.info.status for r in children} == {"FINISHED"}  # trial 1's run was continued
    assert sorted(r.data.tags["trial"] for r in children) == ["0", "1", "3"]  # name, params and tag: the trial
    [retried] = [r for r in children if r.data.tags["trial"] == "1"]  # it stands for; the attempt that ran it last
    assert retried.data.tags["trial.attempt"] == "2" and retried.info.run_name.endswith("-trial1")
    assert retried.data.params["tracking.trial.origin"] == "1"


@pytest.mark.parametrize(
    "override, message",
    [
        ("y=interval(0,1)", "hydra.sweeper.params: y is not a key of the config"),
        ("x=tag(log,interval(0,1))", "hydra.sweeper.params: an impossible range"),
    ],
)
def test_a_bad_search_space_is_one_line_before_the_study_is_touched(fake_sweep, override, message):
    with pytest.raises(UserError, match=message) as caught:
        fake_sweep(lambda number, x: x, 2, override)
    assert "\n" not in str(caught.value)
    assert optuna.get_all_study_summaries(fake_sweep.storage) == []  # nothing created, nothing queued


def test_a_typo_is_named_with_the_key_it_probably_meant(fake_sweep):
    with pytest.raises(UserError, match=r"tracking.trail is not a key of the config \(did you mean tracking.trial\?\)"):
        fake_sweep(lambda number, x: x, 2, "tracking.trail=choice(0,1)")


def test_trials_that_failed_on_a_corrected_typo_do_not_count_toward_n_trials(fake_sweep):
    """A typo's trial that ran and failed (by an older version, or queued by hand) is a failure of another search
    space: rerun with the typo fixed, the study still gets n_trials of its own."""
    study = optuna.create_study(study_name="fake", storage=fake_sweep.storage, direction="maximize")
    failed = optuna.create_trial(
        state=TrialState.FAIL,
        params={"x_typo": 1},
        distributions={"x_typo": optuna.distributions.CategoricalDistribution([0, 1])},
        user_attrs={FAILURE_ATTR: "x_typo is not a key of the config"},
    )
    study.add_trial(failed)
    results = fake_sweep(lambda number, x: x, 2)
    assert results["trials"] == {"complete": 2, "fail": 1}


def test_a_study_poisoned_by_a_queued_typo_is_repaired_by_the_corrected_command(fake_sweep):
    study = optuna.create_study(study_name="fake", storage=fake_sweep.storage, direction="maximize")
    poisoned = optuna.create_trial(
        state=TrialState.WAITING,
        params={"x_typo": 1},
        distributions={"x_typo": optuna.distributions.CategoricalDistribution([0, 1])},
    )
    study.add_trial(poisoned)
    results = fake_sweep(lambda number, x: x, 2)
    trials = load_study(fake_sweep.storage, "fake").trials
    assert trials[0].state == TrialState.FAIL and "failure" not in trials[0].user_attrs  # dropped, not counted
    assert results["trials"] == {"complete": 2, "fail": 1} and all("x" in t.params for t in trials[1:])
