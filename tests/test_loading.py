"""Results independent of loader workers: per-sample seeded augmentation, persistent workers, resumes."""

from __future__ import annotations

import multiprocessing.process

import pytest
import torch
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient

from dmg.data.loading import PartBatches, concatenate, make_loader
from dmg.data.seeding import sample_seed, with_seed
from dmg.data.synthetic import write_image_tree
from dmg.engine import loop
from dmg.runs.experiment import run
from tests.conftest import compose_config
from tests.test_run import run_interrupted_after_epoch

DOMAINS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_image_tree(root, DOMAINS, ["cat", "dog"], per_class=10, size=24)  # JPEG files
    return root


def config(root, tmp_path, *overrides):
    """One-epoch DMG on the image files: random crops, flips, colour jitter and mask samples all in play."""
    return compose_config(
        [
            "dataset=imagefolder",
            f"dataset.root={root}",
            "dataset.num_classes=2",
            "dataset.image_size=16",
            "backbone=small_cnn",
            "backbone.network.width=4",
            "method=dmg",
            "target=c",
            "batch_size=8",
            "eval_batch_size=6",
            "epochs=1",
            "progress=false",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"checkpoint_dir={tmp_path}/checkpoints",
            *overrides,
        ]
    )


def training_set(root, tmp_path):
    cfg = config(root, tmp_path)
    return instantiate(cfg.dataset.builder).build(["a", "b"], ["c"]).train


def epochs_of_batches(loader, epochs=(0, 1)):
    batches = []
    for epoch in epochs:
        loader.set_epoch(7, epoch)
        batches.append(list(loader))
    return batches


def test_seeds_are_per_sample_and_leave_the_global_generator_alone():
    assert sample_seed(0, 1, 2) == sample_seed(0, 1, 2)
    assert len({sample_seed(0, 1, 2), sample_seed(0, 1, 3), sample_seed(0, 2, 2), sample_seed(1, 1, 2)}) == 4
    state = torch.get_rng_state()
    first = with_seed(5, torch.rand, 3)
    assert torch.equal(first, with_seed(5, torch.rand, 3)) and torch.equal(state, torch.get_rng_state())


def test_batches_are_bit_identical_for_0_1_and_2_persistent_workers(image_root, tmp_path):
    train = training_set(image_root, tmp_path)
    runs = [epochs_of_batches(make_loader(train, 8, shuffle=True, num_workers=n)) for n in (0, 1, 2)]
    for other in runs[1:]:
        for epoch, batches in enumerate(runs[0]):
            assert len(batches) == len(other[epoch]) == 4
            for mine, theirs in zip(batches, other[epoch]):
                assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    assert not torch.equal(runs[0][0][0][0], runs[0][1][0][0])  # another epoch, another order and crops


def test_a_sample_gets_the_same_augmentation_whatever_batch_it_is_in(image_root, tmp_path):
    train = training_set(image_root, tmp_path)
    backwards = lambda dataset, batch_size, drop_last, generator: [[i] for i in reversed(range(len(dataset)))]  # noqa: E731
    in_order = make_loader(train, 5, shuffle=False, num_workers=2)
    one_by_one = make_loader(train, 1, shuffle=False, batch_sampler=backwards)
    (forward,), (backward,) = epochs_of_batches(in_order, [3]), epochs_of_batches(one_by_one, [3])
    images = torch.cat([x for x, _, _ in forward])
    assert torch.equal(images, torch.cat([x for x, _, _ in reversed(backward)]))


def test_evaluation_batches_never_straddle_two_domains():
    parts = PartBatches([5, 2, 4], batch_size=3)
    assert parts.batches == [[0, 1, 2], [3, 4], [5, 6], [7, 8, 9], [10]]
    assert parts.owners == [0, 0, 1, 2, 2]
    data = concatenate([torch.utils.data.TensorDataset(torch.arange(n)) for n in (5, 2, 4)])
    assert isinstance(data, torch.utils.data.TensorDataset) and len(data) == 11


def history(tmp_path, experiment="imagefolder"):
    """Every metric of the only run of ``experiment``: ``{key: [(step, value), ...]}``."""
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (record,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(record.info.run_id, key))
        for key in record.data.metrics
    }


@pytest.mark.slow
def test_an_epoch_gives_the_same_metrics_with_0_1_and_2_workers(image_root, tmp_path):
    results = []
    for workers in (0, 1, 2):
        run(config(image_root, tmp_path / str(workers), f"num_workers={workers}"))
        results.append(history(tmp_path / str(workers)))
    assert {"train/loss", "train/overlap", "val/acc/a", "test/acc/c"} <= set(results[0])
    assert results[0] == results[1] == results[2]


@pytest.mark.slow
def test_a_run_resumed_with_another_worker_count_follows_the_same_trajectory(image_root, tmp_path, monkeypatch):
    run(config(image_root, tmp_path / "reference", "epochs=2", "num_workers=1"))
    run_interrupted_after_epoch(config(image_root, tmp_path / "resumed", "epochs=2", "num_workers=2"), 1, monkeypatch)
    run(config(image_root, tmp_path / "resumed", "epochs=2", "num_workers=0"))
    resumed, reference = history(tmp_path / "resumed"), history(tmp_path / "reference")
    assert [step for step, _ in resumed["train/loss"]] == [1, 2]
    assert resumed == reference


@pytest.mark.slow
def test_worker_processes_start_in_the_first_epoch_only(image_root, tmp_path, monkeypatch):
    starts, per_epoch = [], []
    start, train_epoch = multiprocessing.process.BaseProcess.start, loop.train_epoch

    def counted_start(self):
        starts.append(self.name)
        return start(self)

    def counted_epoch(*args, **kwargs):
        per_epoch.append(len(starts))
        return train_epoch(*args, **kwargs)

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", counted_start)
    monkeypatch.setattr(loop, "train_epoch", counted_epoch)
    run(config(image_root, tmp_path, "epochs=3", "num_workers=2"))
    per_epoch.append(len(starts))
    assert [after - before for before, after in zip(per_epoch, per_epoch[1:])] == [4, 0, 0]  # 2 train + 2 evaluation
