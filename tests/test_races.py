"""Race windows of a shared study, forced: workers are held at a named window (dmg/runs/windows.py) and released
into it together, on SQLite and on real PostgreSQL and MariaDB servers. Each test fails on the code before its fix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from dmg.sweeps.trials import FAILURE_ATTR, claim_for_job, requeue_abandoned, uncached
from tests.mlflow_server import mlflow_ui

ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 300  # seconds: only a hang takes this long
pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def storage(request, tmp_path) -> str:
    """A new, empty Optuna storage: a SQLite file, or a database on a real PostgreSQL or MariaDB server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/optuna.db"
    return request.getfixturevalue({"postgresql": "postgres", "mysql": "mysql"}[request.param])()


def worker(
    tmp_path: Path,
    storage: str,
    n_trials: int,
    seed: int,
    *overrides: str,
    window: str = "",
    output: Path | None = None,
    **env: str,
) -> subprocess.Popen:
    """A sweep worker (tests/race_app.py) on ``storage``, held at ``window`` if one is given; its output goes to a
    pipe, or to the file ``output``."""
    (tmp_path / "race").mkdir(exist_ok=True)
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "DMG_RACE_DIR": str(tmp_path / "race"), **env}
    environment["DMG_RACE_WINDOW"] = window
    command = [sys.executable, str(ROOT / "tests" / "race_app.py"), "-m", f"hydra.sweeper.storage='{storage}'"]
    command += [f"hydra.sweeper.n_trials={n_trials}", f"hydra.sweeper.sampler.seed={seed}", *overrides]
    stdout = output.open("w") if output else subprocess.PIPE
    process = subprocess.Popen(
        command, cwd=tmp_path, env=environment, stdout=stdout, stderr=subprocess.STDOUT, text=True
    )
    process.output_file = output
    return process


def finish(*workers: subprocess.Popen) -> list[str]:
    """Wait for the workers; their outputs. Each must exit 0: a crashed worker fails the test."""
    outputs = [each.communicate(timeout=DEADLINE)[0] or each.output_file.read_text() for each in workers]
    assert [each.returncode for each in workers] == [0] * len(workers), "\n----\n".join(outputs)
    return outputs


def counted(storage: str) -> list[optuna.trial.FrozenTrial]:
    """The trials that count toward n_trials; the study must hold nothing else but re-queued (FAIL) attempts."""
    trials = optuna.load_study(study_name="race", storage=storage).trials
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.FAIL}, [t.state for t in trials]
    return [t for t in trials if t.state == TrialState.COMPLETE or FAILURE_ATTR in t.user_attrs]


def dead_process() -> dict:
    """How the sweeper identified a process of this host that has ended."""
    command = [sys.executable, str(ROOT / "tests" / "dead_process.py")]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(done.stdout)


def orphan(storage: str, x: float, process: dict | None = None) -> optuna.Study:
    """A study holding one RUNNING trial (``x``) claimed by ``process`` (a dead one of this host by default)."""
    study = optuna.create_study(study_name="race", storage=storage, direction="maximize")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.enqueue_trial({"x": x})
    trial = study.ask()
    assert trial.suggest_float("x", 0.0, 1.0) == x
    trial.set_system_attr("process", process or dead_process())
    return study


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.1)


def test_two_workers_that_find_the_same_dead_trial_queue_it_again_once(storage, tmp_path):
    orphan(storage, 0.123)
    workers = [worker(tmp_path, storage, 3, seed, window="requeue") for seed in (1, 2)]
    outputs = finish(*workers)
    trials = counted(storage)
    assert len(trials) == 3 and sorted(t.params["x"] for t in trials).count(0.123) == 1  # trained once, counted once
    assert sum("trial 0 is queued again" in output for output in outputs) == 1  # by one worker, said once


def test_two_workers_that_count_together_never_overshoot_n_trials(storage, tmp_path):
    workers = [worker(tmp_path, storage, 1, seed, window="count,ask:5") for seed in (1, 2)]
    finish(*workers)
    assert len(optuna.load_study(study_name="race", storage=storage).trials) == 1 and len(counted(storage)) == 1


def test_a_worker_killed_between_the_fail_and_the_requeue_loses_no_trial(storage, tmp_path):
    orphan(storage, 0.123)
    victim = worker(tmp_path, storage, 2, 1, window="requeue.write")
    wait_for(lambda: list((tmp_path / "race").glob("requeue.write.*")) or victim.poll() is not None, "the window")
    victim.kill()  # kill -9 between marking the trial failed and queueing its parameters again
    victim.wait()
    finish(worker(tmp_path, storage, 2, 2))
    trials = counted(storage)
    assert len(trials) == 2 and [t.params["x"] for t in trials].count(0.123) == 1  # its parameters still ran once


def test_a_paused_host_whose_trial_was_queued_again_neither_crashes_nor_counts_it_twice(storage, tmp_path):
    paused = worker(tmp_path, storage, 2, 1, window="tell", DMG_HOST_ID="host-a")
    wait_for(lambda: list((tmp_path / "race").glob("tell.*")), "the first trial's end")
    paused.send_signal(signal.SIGSTOP)  # its heartbeat stops too, as on a host that froze or lost the network
    other = worker(tmp_path, storage, 2, 2, "hydra.sweeper.grace_period=2", DMG_HOST_ID="host-b")
    [other_output] = finish(other)
    paused.send_signal(signal.SIGCONT)
    (tmp_path / "race" / "go").touch()
    finish(paused)
    trials = counted(storage)
    assert len(trials) == 2 and len({t.params["x"] for t in trials}) == 2
    assert "trial 0 is queued again: its heartbeat stopped" in other_output


GRACE = 2  # seconds (hydra.sweeper.grace_period); race_app beats every second


def jobs_apart(tmp_path: Path) -> list[str]:
    """Overrides of a worker whose trials are real MLflow runs, each trained by a job in a process of its own
    (submitit's local launcher: a SLURM job's life on one machine), that outlives a killed sweeper."""
    store = [f"+stress.ledger={tmp_path / 'ledger'}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    return [*store, "hydra/launcher=submitit_local", f"hydra.sweeper.grace_period={GRACE}"]


def kill_the_sweeper_of_a_training_job(tmp_path: Path, storage: str, **env: str) -> tuple[int, float]:
    """A worker whose one trial's job is held training; the worker killed (-9), the job still alive: the job's pid
    and the time of the kill."""
    sweeper = worker(tmp_path, storage, 1, 1, *jobs_apart(tmp_path), window="train", DMG_RACE_PARTIES="99", **env)
    wait_for(lambda: list((tmp_path / "race").glob("train.*")) or sweeper.poll() is not None, "the job's training")
    [held] = (tmp_path / "race").glob("train.*")
    job = int(held.name.split(".")[1])
    assert job != sweeper.pid
    sweeper.kill()
    sweeper.wait()
    killed = time.time()
    os.kill(job, 0)  # the job trains on, as a SLURM job does when its sweeper dies
    return job, killed


def looked_after(tmp_path: Path, rerun: subprocess.Popen, moment: float) -> bool:
    """Whether ``rerun`` has looked for abandoned trials after ``moment`` (it passes the ``count`` window after each
    look: a window of 0 s, where it touches its file), or has ended."""
    looks = (tmp_path / "race").glob(f"count.{rerun.pid}.*")
    return any(path.stat().st_mtime > moment for path in looks) or rerun.poll() is not None


def trained_once_counted_once(tmp_path: Path, storage: str) -> None:
    """The study's one trial was trained to its end once, counted once (by the copy of the re-queued trial,
    reporting the value of the MLflow run it stands for), in one MLflow run, FINISHED."""
    trials = optuna.load_study(study_name="race", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE] and counted(storage) == [trials[1]]
    x = trials[0].params["x"]
    assert trials[1].params["x"] == x and trials[1].value == x
    assert [float(line) for line in (tmp_path / "ledger").read_text().split()] == [x]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["value"] == x


def test_a_trial_whose_sweeper_died_is_left_to_its_job_until_the_job_ends(storage, tmp_path):
    """The sweeper is killed (-9) while its trial's job trains apart (a SLURM job): a rerun on the same host sees
    the sweeper's process gone, but the job's alive and beating, and leaves the trial to it for longer than the
    grace period; once the job ends, the rerun queues the trial again and its copy reports the job's finished
    run. Before the job beat for itself, the rerun queued the trial at once: two writers on one run."""
    job, killed = kill_the_sweeper_of_a_training_job(tmp_path, storage)
    log = tmp_path / "rerun.log"
    rerun = worker(tmp_path, storage, 1, 2, *jobs_apart(tmp_path), window="count:0", output=log)
    wait_for(lambda: looked_after(tmp_path, rerun, killed + GRACE + 2), "a look with the sweeper long silent")
    assert rerun.poll() is None and "trial 0 is queued again" not in log.read_text(), log.read_text()
    assert [t.state for t in optuna.load_study(study_name="race", storage=storage).trials] == [TrialState.RUNNING]
    (tmp_path / "race" / "go").touch()  # the job's training ends
    [output] = finish(rerun)
    assert output.count("trial 0 is queued again") == 1  # its job gone, or silent while its process exits
    trained_once_counted_once(tmp_path, storage)


def test_a_job_that_dies_on_another_host_is_queued_again_once_its_heartbeat_is_silent(storage, tmp_path):
    """As above, the rerun on another host (no pid to check: only the heartbeat tells): it leaves the trial to the
    job while the job beats; once the job is killed (-9) too, it queues the trial again after the grace period, and
    the copy continues the job's MLflow run to its end."""
    job, killed = kill_the_sweeper_of_a_training_job(tmp_path, storage, DMG_HOST_ID="host-a")
    log = tmp_path / "rerun.log"
    rerun = worker(tmp_path, storage, 1, 2, *jobs_apart(tmp_path), window="count:0", output=log, DMG_HOST_ID="host-b")
    wait_for(lambda: looked_after(tmp_path, rerun, killed + GRACE + 2), "a look with the sweeper long silent")
    assert rerun.poll() is None and "trial 0 is queued again" not in log.read_text(), log.read_text()
    os.kill(job, signal.SIGKILL)
    [output] = finish(rerun)
    assert f"trial 0 is queued again: its heartbeat stopped for more than {GRACE} s (process {job} on host-a)" in output
    trained_once_counted_once(tmp_path, storage)


def test_a_job_that_claims_its_trial_while_a_worker_queues_it_again_keeps_it(storage, tmp_path):
    """The trial's sweeper is dead and its job is only starting: a worker finds the trial abandoned, and before it
    queues the trial again the job records itself on it. The re-queue is rolled back: one process trains it."""
    study = orphan(storage, 0.123)
    log = tmp_path / "rerun.log"
    rerun = worker(tmp_path, storage, 1, 2, window="requeue,count:0", output=log, DMG_RACE_PARTIES="99")
    wait_for(lambda: list((tmp_path / "race").glob("requeue.*")) or rerun.poll() is not None, "the abandoned trial")
    [trial] = study.trials
    assert claim_for_job(uncached(study)._storage, trial._trial_id)  # the job (this live process) starts
    released = time.time()
    (tmp_path / "race" / "go").touch()
    wait_for(lambda: looked_after(tmp_path, rerun, released + 1), "a second look at the study")
    states = [t.state for t in optuna.load_study(study_name="race", storage=storage).trials]
    assert states == [TrialState.RUNNING] and "trial 0 is queued again" not in log.read_text(), log.read_text()
    study.tell(trial.number, 0.5)  # the job ends; its sweeper gone, another worker would record it
    finish(rerun)
    assert [t.state for t in optuna.load_study(study_name="race", storage=storage).trials] == [TrialState.COMPLETE]


def test_a_dead_pid_of_another_pid_namespace_is_not_taken_for_a_dead_trial(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    elsewhere = dead_process() | {"pid_namespace": "pid:[1]"}  # same host name, another container
    study = orphan(storage, 0.5, elsewhere)
    assert requeue_abandoned(study, grace_period=3600) == []
    assert study.trials[0].state == TrialState.RUNNING


@pytest.mark.parametrize("storage", ["sqlite", "mysql"], indirect=True)  # a file lock, a server's named lock
def test_workers_on_a_store_without_a_lock_of_its_own_share_one_parent_run(storage, tmp_path):
    """An ``http://`` MLflow server gives its clients no lock: the Optuna storage's lock serves."""
    (tmp_path / "race").mkdir()
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "DMG_RACE_DIR": str(tmp_path / "race")}
    environment["DMG_RACE_WINDOW"] = "parent:5"  # searched, not yet created; with the lock only one gets here at once
    with mlflow_ui(tmp_path) as tracking:
        command = [sys.executable, str(ROOT / "tests" / "parent_worker.py"), tracking, storage]
        workers = [subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, text=True) for _ in range(2)]
        outputs = finish(*workers)
        assert len({output.split()[-1] for output in outputs}) == 1  # both workers use the same parent run
        client = MlflowClient(tracking)
        assert len(client.search_runs([client.get_experiment_by_name("race").experiment_id])) == 1


def test_runs_recording_one_dataset_at_the_same_instant_both_record_it(postgres, tmp_path):
    """MLflow looks for an experiment's dataset row, then inserts it: two runs starting together both insert, and
    the second breaks the row's unique key (seen with four runs on a fresh SQLite store). It is tried again."""
    tracking = postgres()
    (tmp_path / "race").mkdir()
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "DMG_RACE_DIR": str(tmp_path / "race")}
    environment["DMG_RACE_WINDOW"] = "dataset.insert"  # both looked for the row and found none
    command = [sys.executable, str(ROOT / "tests" / "dataset_worker.py"), tracking]
    outputs = finish(*[subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, text=True) for _ in range(2)])
    client = MlflowClient(tracking)
    inputs = [client.get_run(output.split()[-1]).inputs.dataset_inputs for output in outputs]
    assert [[each.dataset.digest for each in recorded] for recorded in inputs] == [["713a2a83"]] * 2


def test_processes_creating_an_experiment_on_a_file_store_create_one(tmp_path, monkeypatch):
    """A ``file:`` store accepts a second experiment of one name: it is searched and created under a lock."""
    tracking = f"file:{tmp_path}/mlruns"
    (tmp_path / "race").mkdir()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores in maintenance mode
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "DMG_RACE_DIR": str(tmp_path / "race")}
    environment["DMG_RACE_WINDOW"] = "experiment:5"  # searched, not yet created: one at a time under the lock
    create = "import sys; from dmg.runs.stores import mlflow_client; from dmg.runs.tracking import experiment_id; "
    create += "print(experiment_id(mlflow_client(sys.argv[1]), 'race'))"
    command = [sys.executable, "-c", create, tracking]
    outputs = finish(*[subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, text=True) for _ in range(2)])
    assert len({output.split()[-1] for output in outputs}) == 1
    names = [experiment.name for experiment in MlflowClient(tracking).search_experiments()]
    assert names.count("race") == 1


def test_a_run_finished_while_an_identical_command_started_is_reported_not_trained_again(tmp_path):
    store = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"checkpoint_dir={tmp_path}/checkpoints"]
    tiny = ["dataset.max_images=300", "backbone.network.width=4", "epochs=1", "progress=false", "resume=skip_finished"]
    (tmp_path / "race").mkdir()
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "DMG_RACE_DIR": str(tmp_path / "race")}
    environment["DMG_RACE_WINDOW"] = "skip_finished"  # found no finished run, not yet under the config's lock
    command = [sys.executable, str(ROOT / "launch.py"), *tiny, *store]
    late = subprocess.Popen(
        command, cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wait_for(lambda: list((tmp_path / "race").glob("skip_finished.*")) or late.poll() is not None, "the window")
    first = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=DEADLINE)  # no window
    assert first.returncode == 0, first.stdout + first.stderr
    (tmp_path / "race" / "go").touch()
    [output] = finish(late)
    assert "already finished with this config" in output
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert len(client.search_runs([client.get_experiment_by_name("rotated_mnist").experiment_id])) == 1


STRESS_ROUNDS, STRESS_WORKERS, STRESS_TRIALS, STRESS_KILLS = 3, 5, 7, 2


@pytest.mark.parametrize("round_", range(STRESS_ROUNDS))
def test_stress_five_workers_seven_trials_random_kill_9(tmp_path, round_):
    """5 workers share a 7-trial study whose trials are MLflow runs; 2 random workers are killed (-9) while they
    train and replaced. Exactly 7 trials count, each trained to its end once, one MLflow run each, none RUNNING."""
    import random

    chooser = random.Random(round_)
    storage, ledger = f"sqlite:///{tmp_path}/optuna.db", tmp_path / "ledger"
    stress = [f"+stress.ledger={ledger}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]

    def start(seed: int) -> subprocess.Popen:
        return worker(tmp_path, storage, STRESS_TRIALS, seed, *stress, window="train:1", DMG_RACE_PARTIES="99")

    workers = {seed: start(seed) for seed in range(STRESS_WORKERS)}
    seen, killed = set(), 0
    while killed < STRESS_KILLS and any(each.poll() is None for each in workers.values()):
        training = {path.name.split(".")[1] for path in (tmp_path / "race").glob("train.*")} - seen
        live = [seed for seed, each in workers.items() if each.poll() is None and str(each.pid) in training]
        if live:
            victim = chooser.choice(sorted(live))
            workers[victim].kill()
            workers[victim].wait()
            seen.add(str(workers.pop(victim).pid))
            killed += 1
            workers[100 + killed] = start(100 + killed)  # the cluster restarts a worker
        time.sleep(0.05)
    finish(*workers.values())
    trials = counted(storage)
    assert len(trials) == STRESS_TRIALS and len({t.params["x"] for t in trials}) == STRESS_TRIALS
    trained = [float(line) for line in ledger.read_text().split()]
    assert sorted(trained) == sorted(t.params["x"] for t in trials)  # each trial's params trained to the end once
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert len(runs) == STRESS_TRIALS and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.data.metrics["value"] for r in runs) == sorted(trained)  # one run per trial
    print(f"stress round {round_}: {killed} kills, {len(trials)} trials, {len(runs)} runs")
