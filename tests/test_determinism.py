"""``deterministic=true|false``, and a resumed run whose recomputed epoch differs from what MLflow holds."""

from __future__ import annotations

import os

import pytest
import torch

from dmg.engine import checkpoints, loop
from dmg.engine.compute import configure_determinism
from dmg.runs.experiment import run
from tests.test_run import epoch_metrics, only_run, run_interrupted_after_epoch


@pytest.fixture
def restores_determinism(monkeypatch):
    """The process-wide flags as they were before the test."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[1], False


def test_deterministic_true_turns_on_deterministic_algorithms_and_false_the_fast_ones(restores_determinism):
    configure_determinism(True)
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.deterministic and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    configure_determinism(False)
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    assert not torch.backends.cudnn.deterministic


@pytest.mark.slow
def test_on_the_cpu_both_modes_train_the_same_numbers(quick_config, tmp_path, restores_determinism):
    """Every method's step runs under deterministic algorithms (none stops for lack of one), and on the CPU, whose
    kernels are deterministic anyway, both modes give the same result."""
    results = {
        mode: run(quick_config("epochs=1", "method=coral", "method.forward=joint", f"deterministic={mode}"))
        for mode in ("true", "false")
    }
    assert results["true"] == results["false"]
    client, runs = only_run(tmp_path)
    assert sorted(r.data.tags["deterministic"] for r in runs) == ["false", "true"]


def test_a_resumed_run_keeps_the_values_mlflow_holds_for_a_recomputed_epoch(quick_config, tmp_path, monkeypatch):
    """Epoch 2 is logged, its checkpoint lost; the rerun recomputes it with different numbers (as a GPU without
    deterministic algorithms may): MLflow keeps one value per epoch, and the summary agrees with those values."""
    aggregate = ("epochs=3", "method=aggregate")
    run_interrupted_after_epoch(quick_config(*aggregate), 2, monkeypatch)
    _, (interrupted,) = only_run(tmp_path)
    folder = tmp_path / "checkpoints" / interrupted.info.run_id
    (folder / "last.pt").write_bytes((folder / "last.pt").read_bytes()[:1000])  # back to epoch 1's checkpoint
    evaluate, calls = loop.evaluate, []

    def recomputed_differently(method, loaders):
        metrics = evaluate(method, loaders)
        calls.append(None)
        if len(calls) == 1:  # the recomputed epoch 2 looks better than it did the first time
            metrics = {key: value + 0.5 if key.startswith("val/acc") else value for key, value in metrics.items()}
        return metrics

    monkeypatch.setattr(loop, "evaluate", recomputed_differently)
    monkeypatch.setattr(checkpoints.Checkpointer, "save", checkpoints.Checkpointer.save)
    returned = run(quick_config(*aggregate))
    client, (finished,) = only_run(tmp_path)
    held = epoch_metrics(client, finished.info.run_id, "val/acc_mean")
    assert [step for step, _ in held] == [1, 2, 3] and max(value for _, value in held) <= 1  # the first values
    best_step, best = max(held, key=lambda pair: (pair[1], -pair[0]))
    assert returned == best and epoch_metrics(client, finished.info.run_id, "selected/val/acc_mean") == [
        (best_step, best)
    ]
