"""End-to-end runs on the embedded data: MLflow records, resume after interruption, determinism, errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from dmg.engine import checkpoints
from dmg.errors import NonFiniteLossError, UserError
from dmg.methods.aggregate import Aggregate
from dmg.runs.experiment import run
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[1]


def only_run(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("rotated_mnist")
    runs = client.search_runs([experiment.experiment_id])
    return client, runs


def epoch_metrics(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def run_interrupted_after_epoch(cfg, epoch: int, monkeypatch) -> None:
    """Run ``cfg`` and stop it as Ctrl-C does right after the checkpoint of ``epoch`` (1-based) is written."""
    save = checkpoints.Checkpointer.save

    def save_then_interrupt(self, method, history, is_best, averaging=None):
        save(self, method, history, is_best, averaging)
        if len(history) == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.Checkpointer, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.undo()


@pytest.mark.slow
def test_launch_py_trains_and_logs_everything_to_mlflow(tmp_path):
    command = [sys.executable, "launch.py", "dataset.max_images=1200", "backbone.network.width=8", "epochs=2"]
    command += [
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"checkpoint_dir={tmp_path}/ckpt",
        f"hydra.run.dir={tmp_path}/out",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "out-of-domain" in result.stdout  # the summary table
    client, runs = only_run(tmp_path)
    assert len(runs) == 1
    run_ = runs[0]
    assert run_.info.status == "FINISHED"
    assert run_.data.tags["method"] == "dmg" and run_.data.tags["target"] == "rot30"
    assert run_.data.tags["backbone"] == "small_cnn" and run_.data.tags["dataset"] == "rotated_mnist"
    assert run_.data.params["method.overlap_lambda"] == "0.1"
    assert run_.data.params["optim.network.target"] == "torch.optim.Adam"
    for key in [
        "val/acc/rot0",
        "val/acc_mean",
        "test/acc/rot30",
        "train/loss",
        "train/overlap",
        "mask/fc/iou_mean",
        "mask/conv3/active/rot0",
    ]:
        assert [step for step, _ in epoch_metrics(client, run_.info.run_id, key)] == [1, 2], key
    artifacts = {
        a.path for folder in ["", "checkpoints", "masks"] for a in client.list_artifacts(run_.info.run_id, folder)
    }
    assert {"config.yaml", "summary.json", "checkpoints/best.pt"} <= artifacts
    assert "checkpoints/last.pt" not in artifacts  # keep_checkpoints=selected: one copy of the selected model
    assert not (tmp_path / "ckpt" / run_.info.run_id).exists()  # the local training state is gone when finished
    assert run_.info.run_name == "dmg-small_cnn-rot30-seed0"
    (dataset,) = client.get_run(run_.info.run_id).inputs.dataset_inputs
    assert dataset.dataset.name == "rotated_mnist" and len(dataset.dataset.digest) == 8
    assert json.loads(dataset.dataset.profile)["targets"] == ["rot30"]
    assert {"masks/iou_conv3.png", "masks/iou_fc.png"} <= artifacts
    summary = json.loads(Path(client.download_artifacts(run_.info.run_id, "summary.json", str(tmp_path))).read_text())
    test_history = dict(epoch_metrics(client, run_.info.run_id, "test/acc/rot30"))
    assert summary["selected/test/acc/rot30"] == test_history[summary["selected_epoch"]]
    assert summary["last/test/acc/rot30"] == test_history[2]


def test_same_seed_same_metrics_and_selected_epoch_is_best_in_domain(quick_config, tmp_path):
    first = run(quick_config("epochs=3", "resume=never"))
    second = run(quick_config("epochs=3", "resume=never"))
    assert first == second
    client, runs = only_run(tmp_path)
    histories = [epoch_metrics(client, r.info.run_id, "val/acc_mean") for r in runs]
    assert histories[0] == histories[1]
    assert first == max(value for _, value in histories[0])


def test_interrupted_run_resumes_in_same_mlflow_run_with_same_final_metrics(quick_config, tmp_path, monkeypatch):
    reference = run(quick_config("epochs=3", f"checkpoint_dir={tmp_path}/reference", "tracking.experiment=reference"))
    run_interrupted_after_epoch(quick_config("epochs=3"), 2, monkeypatch)
    client, runs = only_run(tmp_path)
    assert [r.info.status for r in runs] == ["KILLED"]
    resumed = run(quick_config("epochs=3"))
    client, runs = only_run(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert resumed == reference
    reference_run = client.search_runs([client.get_experiment_by_name("reference").experiment_id])[0]
    for key in ["test/acc/rot30", "val/acc_mean", "train/loss"]:
        assert epoch_metrics(client, runs[0].info.run_id, key) == epoch_metrics(client, reference_run.info.run_id, key)


@pytest.mark.parametrize(
    "damaged, continues_after",
    [(["last.pt"], 1), (["last.pt", "previous.pt"], 0), (["best.pt"], 0)],
    ids=["last", "last and previous", "best"],
)
def test_a_truncated_checkpoint_is_named_and_the_run_continues_from_an_older_one_or_from_scratch(
    quick_config, tmp_path, monkeypatch, caplog, damaged, continues_after
):
    aggregate = ("epochs=3", "method=aggregate")
    reference = run(quick_config(*aggregate, f"checkpoint_dir={tmp_path}/reference", "tracking.experiment=reference"))
    run_interrupted_after_epoch(quick_config(*aggregate), 2, monkeypatch)
    _, (interrupted,) = only_run(tmp_path)
    folder = tmp_path / "checkpoints" / interrupted.info.run_id
    for name in damaged:
        (folder / name).write_bytes((folder / name).read_bytes()[:1000])  # as a full disk leaves a copy
    restored = []
    restore = checkpoints.Checkpointer.restore

    def restore_and_count(self, method, averaging=None):
        history = restore(self, method, averaging)
        restored.append(len(history))
        return history

    monkeypatch.setattr(checkpoints.Checkpointer, "restore", restore_and_count)
    assert run(quick_config(*aggregate)) == reference
    assert restored == [continues_after]  # epochs restored: from previous.pt, or none (from scratch)
    assert f"checkpoint {folder / damaged[0]} cannot be read" in caplog.text
    client, runs = only_run(tmp_path)
    assert [(r.info.run_id, r.info.status) for r in runs] == [(interrupted.info.run_id, "FINISHED")]
    reference_run = client.search_runs([client.get_experiment_by_name("reference").experiment_id])[0]
    for key in ["train/loss", "val/acc_mean", "test/acc/rot30"]:
        assert epoch_metrics(client, interrupted.info.run_id, key) == epoch_metrics(
            client, reference_run.info.run_id, key
        )


def test_finished_run_is_not_resumed(quick_config, tmp_path):
    run(quick_config("epochs=1"))
    run(quick_config("epochs=1"))
    _, runs = only_run(tmp_path)
    assert len(runs) == 2


def test_non_finite_loss_keeps_last_good_checkpoint_and_fails_the_run(quick_config, tmp_path, monkeypatch):
    objective = Aggregate.objective

    def diverge_in_second_epoch(self, x, y, d):
        terms = objective(self, x, y, d)
        return terms if self.steps < 20 else {"loss": terms["loss"] * float("nan")}

    monkeypatch.setattr(Aggregate, "objective", diverge_in_second_epoch)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at training step 21"):
        run(quick_config("epochs=3", "method=aggregate"))
    _, runs = only_run(tmp_path)
    assert runs[0].info.status == "FAILED"
    last = torch.load(tmp_path / "checkpoints" / runs[0].info.run_id / "last.pt", weights_only=False)
    assert not list((tmp_path / "checkpoints" / runs[0].info.run_id).glob("*.tmp"))
    assert last["epoch"] == 1 and len(last["history"]) == 1  # epoch 1 ran 13 finite steps
    assert all(torch.isfinite(value).all() for value in last["model"].values() if value.is_floating_point())


@pytest.mark.slow
def test_launch_py_reports_bad_input_on_one_line_with_nonzero_exit(tmp_path):
    command = [
        sys.executable,
        "launch.py",
        "target=rot90",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"hydra.run.dir={tmp_path}/out",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() + result.stdout.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "unknown domain 'rot90'" in errors[0]
    assert "Traceback" not in result.stderr


def test_skip_finished_reports_the_finished_run_without_training_again(quick_config, tmp_path, monkeypatch):
    first = run(quick_config("epochs=1"))
    monkeypatch.setattr("dmg.runs.experiment.fit", lambda *args, **kwargs: pytest.fail("trained again"))
    assert run(quick_config("epochs=1", "resume=skip_finished")) == first
    _, runs = only_run(tmp_path)
    assert len(runs) == 1
    with pytest.raises(pytest.fail.Exception, match="trained again"):
        run(quick_config("epochs=1", "resume=skip_finished", "seed=1"))  # another config: it trains


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error(isolated):
    with pytest.raises(UserError, match="PyTorch sees no CUDA GPU here"):
        run(compose_config(["dataset.max_images=600", *isolated, "device=cuda"]))


def test_a_running_run_of_another_host_is_left_alone_unless_a_sweep_requeued_its_trial(quick_config, tmp_path):
    from dmg.runs.tracking import HOST_TAG, Tracker, config_hash, experiment_id

    trial = "tracking.trial={study:s,number:5,origin:2,params:{}}"
    first = quick_config("tracking.trial={study:s,number:2,origin:2,params:{}}")
    client = MlflowClient(first.tracking.uri)
    elsewhere = client.create_run(
        experiment_id(client, "rotated_mnist"), tags={"config_hash": config_hash(first), HOST_TAG: "other-node"}
    ).info.run_id  # a RUNNING run of this trial on another node, whose checkpoints this machine does not see
    fresh = Tracker.start(first, {}, tmp_path / "checkpoints")
    fresh.release()
    assert fresh.run_id != elsewhere and not fresh.resumed  # it may be alive there: not taken over
    client.set_terminated(fresh.run_id, "FINISHED")
    requeued = Tracker.start(quick_config(trial), {}, tmp_path / "checkpoints")
    requeued.release()
    assert requeued.run_id == elsewhere and requeued.resumed  # the sweeper found its process dead: continue it
