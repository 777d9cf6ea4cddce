"""Sweeps across machines: one Optuna study and one MLflow store on a real PostgreSQL server (a throwaway one from the
system's binaries, tests/postgres.py), shared by workers started at the same instant."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from dmg.commands import report
from dmg.errors import SetupError
from dmg.runs.experiment import run
from dmg.runs.stores import check_store_uri
from tests.conftest import compose_config
from tests.postgres import PASSWORD

ROOT = Path(__file__).resolve().parents[1]
TINY = ["dataset.max_images=300", "backbone.network.width=4", "progress=false"]
STUDY = "dmg-rotated_mnist-small_cnn-rot30"


def test_a_run_and_the_report_on_a_postgresql_store(postgres, tmp_path, capsys):
    uri = postgres()
    value = run(compose_config([*TINY, "epochs=1", f"tracking.uri='{uri}'", f"checkpoint_dir={tmp_path}/c"]))
    client = MlflowClient(uri)
    (only,) = client.search_runs([client.get_experiment_by_name("rotated_mnist").experiment_id])
    assert only.info.status == "FINISHED" and only.data.metrics["selected/val/acc_mean"] == value
    report.main(["--tracking-uri", uri])
    assert f"| dmg | {100 * only.data.metrics['selected/test/acc_mean']:.2f} |" in capsys.readouterr().out


def test_an_unreachable_database_is_one_line_with_the_password_masked(postgres):
    good = postgres()
    wrong = good.replace(PASSWORD, "secret")  # a wrong password
    with pytest.raises(SetupError, match="cannot connect to the database") as caught:
        check_store_uri(wrong, "tracking.uri")
    assert "secret" not in str(caught.value) and "\n" not in str(caught.value)
    wrong = good.split("?")[0].rsplit("/", 1)[0] + "/no_such_database?" + good.split("?")[1]
    with pytest.raises(SetupError, match="cannot connect to the database") as caught:
        check_store_uri(wrong, "tracking.uri")
    assert PASSWORD not in str(caught.value) and "\n" not in str(caught.value)


def launch(folder: Path, *overrides: str) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "launch.py"), "-m", "+sweep=dmg_search", *TINY, *overrides]
    return subprocess.Popen(command, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def sweep_settings(storage: str, tracking: str, n_trials: int) -> list[str]:
    return [  # quoted: the socket URLs of the test server hold '?' and '='
        f"hydra.sweeper.storage='{storage}'",
        f"tracking.uri='{tracking}'",
        f"hydra.sweeper.n_trials={n_trials}",
        "hydra.sweeper.heartbeat_interval=2",
        "method.overlap_lambda=interval(0.0,1.0)",  # continuous: two workers never sample the same values
    ]


def check_study_and_store(storage: str, tracking: str, n_trials: int) -> list:
    study = optuna.load_study(study_name=STUDY, storage=storage)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n_trials and {t.state for t in study.trials} <= {TrialState.COMPLETE, TrialState.FAIL}
    values = [tuple(sorted(t.params.items())) for t in complete]
    assert len(set(values)) == n_trials  # no parameter set ran twice
    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("rotated_mnist").experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep") == "optuna"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(runs) == n_trials + 1 and len(children) == n_trials  # one run per trial, all under one parent
    assert {r.info.status for r in children} == {"FINISHED"}
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val/acc_mean")]
        assert steps == sorted(set(steps))  # one row per epoch
    return children


@pytest.mark.slow
def test_four_workers_started_together_share_one_postgresql_study_and_store(postgres, tmp_path):
    storage, tracking = postgres(), postgres()
    settings = sweep_settings(storage, tracking, 6)
    start = time.monotonic()
    workers = [launch(tmp_path, *settings, "epochs=1", f"hydra.sweeper.sampler.seed={seed}") for seed in range(4)]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    elapsed = time.monotonic() - start
    assert [worker.returncode for worker in workers] == [0] * 4, "\n".join(outputs)
    assert not [line for output in outputs for line in output.splitlines() if "ERROR" in line or "Traceback" in line]
    check_study_and_store(storage, tracking, 6)
    print(f"4 workers, 6 trials on PostgreSQL: {elapsed:.1f} s")


@pytest.mark.slow
def test_a_worker_killed_mid_trial_the_others_finish_the_study_continuing_its_run(postgres, tmp_path):
    storage, tracking = postgres(), postgres()
    settings = [*sweep_settings(storage, tracking, 5), "epochs=3", "dataset.max_images=900"]
    victim = launch(tmp_path, *settings, "hydra.sweeper.sampler.seed=0")

    def victims_run_with_a_checkpoint() -> str | None:
        """The MLflow run of the trial the first worker runs, once that run has a checkpoint."""
        try:
            running = optuna.load_study(study_name=STUDY, storage=storage).get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # the study does not exist yet
            return None
        mine = [t.number for t in running if t.system_attrs.get("process", {}).get("pid") == victim.pid]
        client = MlflowClient(tracking)
        experiment = client.get_experiment_by_name("rotated_mnist")
        runs = (
            client.search_runs([experiment.experiment_id], f"tags.trial = '{mine[0]}'") if mine and experiment else []
        )
        found = [r.info.run_id for r in runs if (tmp_path / "checkpoints" / r.info.run_id / "last.pt").exists()]
        return found[0] if found else None

    deadline = time.monotonic() + 300
    while not (killed_run := victims_run_with_a_checkpoint()):
        assert time.monotonic() < deadline and victim.poll() is None, "the first worker never had a trial running"
        time.sleep(0.5)
    victim.send_signal(signal.SIGSTOP)  # mid-trial still, however fast this machine trains
    others = [launch(tmp_path, *settings, f"hydra.sweeper.sampler.seed={seed}") for seed in (1, 2)]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    outputs = [worker.communicate(timeout=600)[0] for worker in others]
    assert [worker.returncode for worker in others] == [0, 0], "\n".join(outputs)
    children = check_study_and_store(storage, tracking, 5)
    assert killed_run in {r.info.run_id for r in children}  # the killed trial's run was continued, not duplicated
    # by one worker, from its checkpoint: "from epoch k", or "after its last epoch" when it was stopped after the
    # last epoch's checkpoint (a fast machine trains the next epochs between two looks at the store)
    continued = [output for output in outputs if f"continuing run {killed_run}" in output]
    assert len(continued) == 1, outputs
