"""What a run tells and records: its start line, one epoch numbering (checkpoints, summary, MLflow steps, logs),
the learning rate each epoch used, and the summary metrics it promises before training."""

from __future__ import annotations

import json
import logging
import shutil
from math import nan
from pathlib import Path

import pytest
import torch

from dmg.commands.report import setting
from dmg.engine.checkpoints import Checkpointer
from dmg.engine.loop import train_epoch
from dmg.errors import NonFiniteLossError, RunInProgress
from dmg.methods.aggregate import Aggregate
from dmg.runs import experiment
from dmg.runs.experiment import run
from dmg.runs.tracking import RunLock
from tests.test_run import epoch_metrics, only_run, run_interrupted_after_epoch
from tests.test_training_step import batch, loader_of, small_method


def start_lines(caplog) -> list[str]:
    lines = [record.getMessage() for record in caplog.records if record.name == "dmg.runs.experiment"]
    return [line.split(": sources")[0] for line in lines if "run " in line and ": sources" in line]


def test_the_start_line_says_whether_the_run_starts_continues_or_trains_again(
    quick_config, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO)
    cfg = quick_config("epochs=3", "method=aggregate")
    run_interrupted_after_epoch(cfg, 2, monkeypatch)
    _, (interrupted,) = only_run(tmp_path)
    run_id = interrupted.info.run_id
    run(cfg)
    assert start_lines(caplog) == [
        f"starting run {run_id}",
        f"continuing run {run_id} from epoch 3 of 3 (its checkpoint holds epochs 1-2)",
    ]
    caplog.clear()
    again = quick_config("epochs=2", "method=aggregate")
    run_interrupted_after_epoch(again, 1, monkeypatch)
    _, runs = only_run(tmp_path)
    (moved,) = [r for r in runs if r.info.run_id != run_id]
    shutil.rmtree(tmp_path / "checkpoints" / moved.info.run_id)  # as on a machine whose checkpoint_dir is not shared
    run(again)
    folder = tmp_path / "checkpoints" / moved.info.run_id
    assert start_lines(caplog) == [
        f"starting run {moved.info.run_id}",
        f"no checkpoint of run {moved.info.run_id} here ({folder}): training it again from epoch 1",
    ]


def test_epochs_count_from_one_in_checkpoints_summary_steps_and_logs(quick_config, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    predicted = spy_on_reported_metrics(monkeypatch)
    saved = []
    save_best = Checkpointer.save_best
    monkeypatch.setattr(
        Checkpointer, "save_best", lambda self, method, epoch: saved.append(epoch) or save_best(self, method, epoch)
    )
    run(quick_config("epochs=3"))
    client, (record,) = only_run(tmp_path)
    run_id = record.info.run_id
    summary = json.loads(Path(client.download_artifacts(run_id, "summary.json", str(tmp_path))).read_text())
    best = torch.load(client.download_artifacts(run_id, "checkpoints/best.pt", str(tmp_path)), weights_only=True)
    assert best["epoch"] == summary["selected_epoch"] == saved[-1] and 1 <= best["epoch"] <= 3
    accuracies = dict(epoch_metrics(client, run_id, "val/acc_mean"))
    assert list(accuracies) == [1, 2, 3] and accuracies[best["epoch"]] == max(accuracies.values())
    assert set(summary) == set(predicted[0])  # optimized_metric is checked against these before training
    for key in ("selected/val/acc_mean", "selected/test/acc/rot30"):  # on the step they describe
        assert epoch_metrics(client, run_id, key) == [(best["epoch"], summary[key])]
    for key in ("last/val/acc_mean", "last/test/acc/rot30"):
        assert epoch_metrics(client, run_id, key) == [(3, summary[key])]
    curated = {key: value for key, value in record.data.params.items() if key.startswith("hp/")}
    assert {
        "hp/method": "dmg",
        "hp/target": "rot30",
        "hp/seed": "0",
        "hp/overlap_lambda": "0.1",
    }.items() <= curated.items()
    assert curated["hp/optimizer.lr"] == record.data.params["optim.network.lr"] and len(curated) < 40
    assert setting(record.data.params) == setting({k: v for k, v in record.data.params.items() if k not in curated})
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split(":")[0] for line in logged] == ["epoch 1", "epoch 2", "epoch 3"]
    assert f"val/acc_mean={accuracies[best['epoch']]:.4f}" in logged[best["epoch"] - 1]


def spy_on_reported_metrics(monkeypatch) -> list[list[str]]:
    predicted = []
    reported_metrics = experiment.reported_metrics
    monkeypatch.setattr(
        experiment, "reported_metrics", lambda *a: predicted.append(reported_metrics(*a)) or predicted[-1]
    )
    return predicted


def test_an_averaged_run_logs_the_summary_it_promised_at_the_end_of_training(quick_config, tmp_path, monkeypatch):
    predicted = spy_on_reported_metrics(monkeypatch)
    run(quick_config("epochs=2", "averaging=swad", "averaging.n_converge=1", "averaging.n_tolerance=2"))
    client, (record,) = only_run(tmp_path)
    run_id = record.info.run_id
    summary = json.loads(Path(client.download_artifacts(run_id, "summary.json", str(tmp_path))).read_text())
    assert set(summary) == set(predicted[0]) and "averaged/mask/fc/iou_mean" in summary
    assert epoch_metrics(client, run_id, "selected/val/acc_mean") == [(2, summary["selected/val/acc_mean"])]
    assert epoch_metrics(client, run_id, "averaged/first_epoch") == [(2, summary["averaged/first_epoch"])]
    online = summary["selected_epoch"]
    assert epoch_metrics(client, run_id, "online/val/acc_mean") == [(online, summary["online/val/acc_mean"])]


def test_a_checkpoint_written_with_epochs_from_zero_loads_counted_from_one(tmp_path):
    method = small_method("aggregate")
    history = [{"val/acc_mean": 0.5}, {"val/acc_mean": 0.7}]
    state = {"epoch": 1, "model": method.state_dict(), "training": method.training_state(), "history": history}
    tmp_path.mkdir(exist_ok=True)
    torch.save(state, tmp_path / "last.pt")  # as checkpoints were written before they counted from 1
    torch.save({"epoch": 1, "model": method.state_dict()}, tmp_path / "best.pt")
    checkpoints = Checkpointer(tmp_path)
    restored = small_method("aggregate")
    assert checkpoints.restore(restored) == history
    assert checkpoints.load_best(restored) == 2  # the second epoch, as summary.json and MLflow count it
    checkpoints.save(restored, history + [{"val/acc_mean": 0.6}], is_best=False)
    assert torch.load(tmp_path / "last.pt", weights_only=False)["epoch"] == 3
    assert checkpoints.load_best(restored) == 2


def test_the_learning_rate_of_an_epoch_is_the_one_its_last_step_used():
    method = small_method("dmg", optim="domainnet")  # lr x (1 + 1e-4 t)^(-0.75) at iteration t, masks too
    x, y, d = batch(12)
    first = train_epoch(method, loader_of(x, y, d, batch_size=4), "epoch 1", progress=False)  # steps t = 0, 1, 2
    second = train_epoch(method, loader_of(x, y, d, batch_size=4), "epoch 2", progress=False)  # t = 3, 4, 5
    for name in ("network", "masks"):
        assert first[f"lr/{name}"] == 1e-4 * (1 + 1e-4 * 2) ** -0.75
        assert second[f"lr/{name}"] == 1e-4 * (1 + 1e-4 * 5) ** -0.75
        assert method.learning_rates()[name] == 1e-4 * (1 + 1e-4 * 6) ** -0.75  # the next step's, not logged


def test_a_run_that_ends_before_its_first_checkpoint_leaves_no_folder(quick_config, tmp_path, monkeypatch):
    objective = Aggregate.objective
    monkeypatch.setattr(Aggregate, "objective", lambda self, *batch: {"loss": objective(self, *batch)["loss"] * nan})
    with pytest.raises(NonFiniteLossError):
        run(quick_config("epochs=2", "method=aggregate"))
    monkeypatch.undo()
    save = Checkpointer.save
    monkeypatch.setattr(Checkpointer, "save", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run(quick_config("epochs=2", "method=aggregate", "seed=1"))
    monkeypatch.setattr(Checkpointer, "save", save)
    _, runs = only_run(tmp_path)
    assert sorted(r.info.status for r in runs) == ["FAILED", "KILLED"]
    assert [path.name for path in (tmp_path / "checkpoints").iterdir()] == [".locks"]  # no lock-only run folders


def test_a_run_held_by_a_live_process_is_refused_before_the_data_is_built(quick_config, tmp_path, monkeypatch):
    cfg = quick_config("epochs=2", "method=aggregate")
    run_interrupted_after_epoch(cfg, 1, monkeypatch)
    _, (interrupted,) = only_run(tmp_path)
    holder = RunLock(tmp_path / "checkpoints" / interrupted.info.run_id)
    assert holder.acquire()  # as a live process running it holds it
    built = []
    monkeypatch.setattr(experiment, "build", lambda *args, **kwargs: built.append(args) or pytest.fail("built"))
    with pytest.raises(RunInProgress, match=f"run {interrupted.info.run_id} of this config is in progress"):
        run(cfg)
    assert not built
    holder.release()
    monkeypatch.undo()
    run(cfg)  # free again: continued and finished
    _, (finished,) = only_run(tmp_path)
    assert finished.info.status == "FINISHED"
