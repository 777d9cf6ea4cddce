"""SWAD: the loss-valley range, the dense average, BatchNorm recomputation, and runs with averaging=swad
(online results unchanged, resumable bit for bit, DMG's masks averaged)."""

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from dmg.data.loading import OnDevice, make_loader
from dmg.engine.averaging import SWAD, LossValley
from dmg.engine.compute import Precision
from dmg.engine.loop import recompute_batch_norm
from dmg.errors import UserError
from dmg.runs.experiment import run
from tests.test_run import run_interrupted_after_epoch


def valley(losses, **options):
    """The segments averaged, in the order they joined, once training ends after ``losses``."""
    rule = LossValley(**options)
    joined = [segment for loss in losses for segment in rule.add(loss)]
    return joined + rule.finish(), rule


def test_valley_starts_at_the_first_local_minimum_and_ends_when_the_loss_leaves_the_tolerance():
    losses = [5, 4, 3, 2.5, 2.6, 2.7, 2.2, 2.3, 4, 5, 6, 7, 8, 9]
    joined, rule = valley(losses)
    # 2.5 (segment 3) is the lowest of itself and the next two; tolerance 1.3 * mean(2.5, 2.6, 2.7) = 3.38;
    # segment 2 (3.0) is within it and among the n_tolerance - n_converge = 3 before the start: it joins too
    assert rule.threshold == pytest.approx(3.38) and rule.start == 2
    # segment 7 joins (2.3 is within); segment 8's window 4..9 is not: the valley ends there
    assert joined == [2, 3, 4, 5, 6, 7] and rule.ended


def test_valley_judges_the_last_segments_on_the_segments_there_are():
    joined, rule = valley([5, 4, 3, 3.1, 3.2, 3.3, 3.4])
    assert rule.start == 1 and joined == [1, 2, 3, 4, 5, 6] and not rule.ended


def test_valley_without_a_minimum_has_no_start():
    joined, rule = valley([5, 4, 3, 2, 1])
    assert joined == [] and rule.start is None


def test_valley_goes_back_at_most_n_tolerance_minus_n_converge_segments():
    joined, rule = valley([3.0, 2.5, 2.4, 2.3, 1.9, 2.0, 2.1], n_converge=3, n_tolerance=4)
    # start: segment 4 (1.9); tolerance 2.6 would admit segments 1-3, but only one segment before the start may join
    assert rule.start == 3 and joined == [3, 4, 5, 6]


def test_valley_keeps_only_the_segments_that_may_still_join():
    rule = LossValley(n_converge=2, n_tolerance=3)
    for loss in [3, 2]:
        rule.add(loss)
    assert [rule.keeps(s) for s in range(2)] == [True, True]  # no start yet: the last max(n_converge, n_tolerance)
    rule.add(2.5)  # start at segment 1
    assert rule.start == 1 and not rule.keeps(0) and not rule.keeps(1) and rule.keeps(2)


class Scalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))


def feed(swad: SWAD, model: Scalar, epochs: list[list[float]], losses: list[float]):
    for values, loss in zip(epochs, losses):
        for value in values:
            model.w.data.fill_(value)
            swad.after_step(model)
        swad.end_epoch(loss)


def test_swad_averages_every_step_of_the_chosen_epochs():
    model = Scalar()
    epochs = [[0.0, 2.0], [4.0, 6.0], [1.0, 3.0], [10.0, 20.0], [7.0, 9.0]]
    swad = SWAD(n_converge=2, n_tolerance=2, tolerance_ratio=0.1)
    feed(swad, model, epochs, [3.0, 2.0, 2.1, 9.0, 9.5])
    # start: epoch 1 (2.0 <= 2.1), tolerance 1.1 * 2.05; epoch 2 joins (2.1), epoch 3's window (9.0, 9.5) ends it
    (average,) = swad.final_weights()
    assert torch.allclose(average, torch.full((2,), (4 + 6 + 1 + 3) / 4))
    assert swad.summary() == {"first_epoch": 2, "last_epoch": 3, "epochs": 2, "converged": 1.0}
    assert set(swad.pending) == set()  # nothing kept once the valley has ended


def test_swad_without_a_valley_reports_the_last_epochs_average():
    model = Scalar()
    swad = SWAD()
    feed(swad, model, [[1.0, 3.0], [5.0, 7.0]], [2.0, 1.0])
    (average,) = swad.final_weights()
    assert torch.allclose(average, torch.full((2,), 6.0))
    assert swad.summary()["converged"] == 0.0 and swad.summary()["first_epoch"] == 2


def test_swad_state_round_trip_continues_the_same_average():
    epochs = [[float(i), float(i + 1)] for i in range(0, 16, 2)]
    losses = [5, 4, 3, 3.5, 3.2, 3.1, 9, 9]
    whole, model = SWAD(), Scalar()
    feed(whole, model, epochs, losses)
    first = SWAD()
    feed(first, model, epochs[:4], losses[:4])
    state = first.state_dict()
    second = SWAD()
    second.load_state_dict(state)
    feed(second, model, epochs[4:], losses[4:])
    assert torch.equal(second.final_weights()[0], whole.final_weights()[0])
    assert second.summary() == whole.summary()


@pytest.mark.parametrize("key, value", [("n_converge", 0), ("bn_batches", 1.5), ("tolerance_ratio", -0.1)])
def test_swad_settings_are_checked(key, value):
    with pytest.raises(UserError, match=f"^{key} must be"):
        SWAD(**{key: value})


class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(3)

    def predict(self, x, d=None):
        return self.norm(x)

    def autocast(self):
        return Precision("fp32").autocast()


def test_batch_norm_statistics_are_recomputed_as_the_mean_over_batches():
    torch.manual_seed(0)
    x = torch.randn(40, 3) * 2 + 5
    data = torch.utils.data.TensorDataset(x, torch.zeros(40, dtype=torch.long), torch.zeros(40, dtype=torch.long))
    loader = OnDevice(make_loader(data, 10, False), torch.device("cpu"), nn.Identity())
    method = Normed()
    method.norm.running_mean.fill_(100.0)
    recompute_batch_norm(method, loader, batches=6)  # 4 batches, then 2 of the next pass
    batches = list(x.split(10))
    seen = batches + batches[:2]
    assert torch.allclose(method.norm.running_mean, torch.stack([b.mean(0) for b in seen]).mean(0), atol=1e-5)
    assert torch.allclose(method.norm.running_var, torch.stack([b.var(0) for b in seen]).mean(0), atol=1e-4)
    assert method.norm.momentum == 0.1


# Runs: DMG with SWAD on the quick settings. n_converge=1, n_tolerance=2 make a valley appear within 4 epochs.
SWAD_RUN = [
    "method=dmg",
    "averaging=swad",
    "averaging.n_converge=1",
    "averaging.n_tolerance=2",
    "averaging.bn_batches=4",
]


def runs(tmp_path, experiment="rotated_mnist"):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    return client, client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.slow
def test_swad_leaves_the_online_model_as_without_averaging_and_reports_the_average(quick_config, tmp_path):
    averaged = run(quick_config("epochs=4", *SWAD_RUN, "tracking.experiment=swad"))
    plain = run(quick_config("epochs=4", "method=dmg", "tracking.experiment=plain"))
    client, (swad_run,) = runs(tmp_path, "swad")
    _, (plain_run,) = runs(tmp_path, "plain")
    for key in ["val/acc_mean", "test/acc_mean", "train/loss", "val/loss_mean", "mask/fc/iou_mean"]:
        assert history(client, swad_run.info.run_id, key) == history(client, plain_run.info.run_id, key), key
    metrics = swad_run.data.metrics
    assert swad_run.data.tags["method"] == "dmg+swad" and swad_run.data.tags["averaging"] == "swad"
    assert metrics["online/val/acc_mean"] == plain_run.data.metrics["selected/val/acc_mean"] == plain
    assert metrics["selected/val/acc_mean"] == averaged != metrics["online/val/acc_mean"]
    assert metrics["averaged/converged"] == 1.0 and metrics["averaged/epochs"] >= 2
    assert "averaged/mask/fc/iou_mean" in metrics and "averaged/val/loss_mean" in metrics
    artifacts = {a.path for a in client.list_artifacts(swad_run.info.run_id, "masks")}
    assert {"masks/iou_fc.png", "masks/iou_conv3.png"} <= artifacts


@pytest.mark.slow
def test_swad_run_resumed_after_an_interruption_ends_bit_for_bit_as_an_uninterrupted_one(
    quick_config, tmp_path, monkeypatch
):
    reference = run(
        quick_config("epochs=4", *SWAD_RUN, "tracking.experiment=reference", f"checkpoint_dir={tmp_path}/r")
    )
    run_interrupted_after_epoch(quick_config("epochs=4", *SWAD_RUN), 2, monkeypatch)
    assert run(quick_config("epochs=4", *SWAD_RUN)) == reference
    client, (resumed,) = runs(tmp_path)
    _, (uninterrupted,) = runs(tmp_path, "reference")
    assert resumed.info.status == "FINISHED"
    summaries = [
        json.loads(download(client, r.info.run_id, "summary.json", tmp_path).read_text())
        for r in (resumed, uninterrupted)
    ]
    assert summaries[0] == summaries[1] and summaries[0]["averaged/converged"] == 1.0
    best = [
        torch.load(download(client, r.info.run_id, "checkpoints/best.pt", tmp_path), weights_only=True)["model"]
        for r in (resumed, uninterrupted)
    ]
    assert all(torch.equal(best[0][key], best[1][key]) for key in best[0])


def download(client: MlflowClient, run_id: str, artifact: str, folder: Path) -> Path:
    return Path(client.download_artifacts(run_id, artifact, str(folder / run_id)))


def test_dmg_masks_are_averaged_with_the_rest():
    from dmg.methods.dmg import DMG
    from dmg.models.backbones import small_cnn

    torch.manual_seed(0)
    sgd = partial(torch.optim.SGD, lr=1.0)
    method = DMG(small_cnn(10, 1, width=4), ["a", "b"], ["conv3", "fc"], nn.init.zeros_, (1, 28, 28), sgd, sgd)
    swad = SWAD(n_converge=1, n_tolerance=1)
    x, y, d = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)), torch.arange(8) % 2
    logits = []
    for loss in (1.0, 1.0):
        method.optimizers["network"].param_groups[0]["lr"] = 0.0  # only the masks move
        method.update(x, y, d)
        logits.append(method.masked.masks["fc"].logits.detach().clone())
        swad.after_step(method)
        swad.end_epoch(loss)
    names = [name for name, _ in method.named_parameters()]
    average = dict(zip(names, swad.final_weights()))
    assert torch.allclose(average["masked.masks.fc.logits"], (logits[0] + logits[1]) / 2)
    assert not torch.equal(logits[0], logits[1])
