"""Balanced batches (sampler=balanced): per-domain counts, equal shares over an epoch, seeded, any dataset format."""

import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import TensorDataset

from dmg.data.loading import make_loader
from dmg.data.sampling import BalancedBatches, balanced_batches, domain_labels
from dmg.data.synthetic import write_image_tree
from dmg.errors import UserError
from dmg.runs.experiment import run
from tests.conftest import compose_config

SIZES = [10, 25, 7]  # samples per domain: unequal on purpose


def domains() -> torch.Tensor:
    d = torch.cat([torch.full((n,), k) for k, n in enumerate(SIZES)])
    return d[torch.randperm(len(d), generator=torch.Generator().manual_seed(0))]  # domains interleaved


def epoch(sampler: BalancedBatches, seed: int) -> list[list[int]]:
    sampler.generator.manual_seed(seed)
    return list(sampler)


@pytest.mark.parametrize("batch_size", [9, 8])
def test_every_batch_holds_each_domain_equally_and_leftovers_rotate(batch_size):
    d = domains()
    sampler = BalancedBatches(d, batch_size, torch.Generator())
    batches = epoch(sampler, 0)
    assert len(batches) == len(sampler) == -(-len(d) // batch_size)
    per_batch = torch.stack([torch.bincount(d[batch], minlength=3) for batch in batches])  # (batches, domains)
    assert (per_batch.sum(1) == batch_size).all()
    assert (per_batch.max(1).values - per_batch.min(1).values <= (batch_size % 3 > 0)).all()
    totals = per_batch.sum(0)
    assert totals.max() - totals.min() <= 1  # over the epoch every domain gets the same share


def test_small_domains_repeat_only_after_all_their_samples_were_drawn():
    d = domains()
    batches = epoch(BalancedBatches(d, 9, torch.Generator()), 0)
    drawn = torch.tensor([index for batch in batches for index in batch])
    small = drawn[d[drawn] == 2]  # 7 samples, drawn 15 times: two full passes, then one more sample
    assert len(small) == 15
    assert sorted(small[:7].tolist()) == sorted(small[7:14].tolist()) == torch.nonzero(d == 2).squeeze(1).tolist()


def test_batches_depend_on_the_generator_seed_only():
    sampler = BalancedBatches(domains(), 9, torch.Generator())
    first = epoch(sampler, 3)
    assert epoch(sampler, 4) != first
    assert epoch(BalancedBatches(domains(), 9, torch.Generator()), 3) == first


def test_drop_last_gives_as_many_batches_as_a_shuffled_epoch_without_the_last():
    assert len(BalancedBatches(domains(), 9, torch.Generator(), drop_last=True)) == len(domains()) // 9


def test_batch_smaller_than_the_number_of_domains_is_refused():
    with pytest.raises(UserError, match="batch_size must be at least the number of source domains \\(3\\)"):
        BalancedBatches(domains(), 2, torch.Generator())


def test_loader_of_a_tensor_dataset_yields_balanced_batches_whole():
    d = domains()
    data = TensorDataset(torch.arange(len(d)).float()[:, None], torch.zeros(len(d), dtype=torch.long), d)
    loader = make_loader(data, 6, True, batch_sampler=balanced_batches)
    loader.set_epoch(0, 0)
    for x, _, batch_domains in loader:
        assert torch.equal(torch.bincount(batch_domains, minlength=3), torch.tensor([2, 2, 2]))
        assert torch.equal(d[x.squeeze(1).long()], batch_domains)


def test_domains_of_file_datasets_are_read_without_images(tmp_path):
    write_image_tree(tmp_path / "data", ["p", "q"], ["cat", "dog"], per_class=4, size=8)
    cfg = compose_config(
        [
            "dataset=imagefolder",
            f"dataset.root={tmp_path}/data",
            "dataset.num_classes=2",
            "target=q",
            "dataset.image_size=8",
        ]
    )
    splits = instantiate(cfg.dataset.builder).build(["p"], ["q"])
    labels = domain_labels(splits.train)
    assert torch.equal(labels, torch.zeros(len(splits.train), dtype=torch.long))
    loader = make_loader(splits.train, 2, True, batch_sampler=balanced_batches)
    loader.set_epoch(0, 0)
    assert sum(len(y) for _, y, _ in loader) == len(splits.train) + len(splits.train) % 2


def test_unknown_sampler_is_one_clear_error(isolated):
    with pytest.raises(UserError, match="sampler must be one of shuffled, balanced, got 'random'"):
        run(compose_config(["dataset.max_images=600", *isolated, "sampler=random"]))
