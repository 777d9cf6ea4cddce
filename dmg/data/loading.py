"""Batches of ``(x, y, d)`` from any domain dataset: a function of (seed, epoch) only.

Every random transform of sample ``i`` in epoch ``e`` draws from torch's generator seeded by
``(seed, e, i)`` (:func:`sample_seed`), and the batch-level transforms of step ``k`` from ``(seed, e, k)``.
The batch order comes from a generator seeded by ``(seed, e)``. So the images a model sees do not depend on
the number of loader workers, on which worker gets which batch, on whether workers persist, or on a resume.
Workers persist for the whole run: no process starts after the first epoch.

Under DDP (``dmg.engine.distributed``) a training loader gives each rank its shard of every global batch (``split``),
and an evaluation loader deals whole batches to the ranks in turn (``deal``: batch ``k`` to rank ``k % world``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    ConcatDataset,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    TensorDataset,
    default_collate,
)

from dmg.data.decode import EncodedBatchDecoder, collate_encoded
from dmg.data.seeding import batch_seed, epoch_seed, sample_seed, with_seed
from dmg.engine import distributed

BatchSamplerFactory = Callable[..., Iterable[list[int]]]  # (dataset=, batch_size=, drop_last=, generator=)
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class SeededItems(Dataset):
    """``dataset`` read by keys ``(index, seed, epoch)``: the item's random transforms draw from its own seed.

    With ``pass_seed`` the item's seed comes along as a fourth field (for transforms applied after the loader).
    """

    def __init__(self, dataset: Dataset, pass_seed: bool = False):
        self.dataset = dataset
        self.pass_seed = pass_seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]):
        index, seed, epoch = key
        item_seed = sample_seed(seed, epoch, index)
        if self.pass_seed:
            return (*self.dataset[index], item_seed)
        return with_seed(item_seed, self.dataset.__getitem__, index)


class EpochBatches(Sampler[list]):
    """Batches of dataset indices whose order is drawn from ``generator``, reseeded by :meth:`set_epoch`.

    ``keyed``: each index travels as ``(index, seed, epoch)`` so that a worker can seed the item's transforms.
    ``sharding`` (several ranks only): ``split`` yields this rank's shard of every batch (:attr:`shards` says which
    rows), ``deal`` this rank's whole batches.
    """

    def __init__(self, batches: Iterable[list[int]], generator: torch.Generator, keyed: bool, sharding: str = "split"):
        self.batches = batches
        self.generator = generator
        self.keyed = keyed
        self.sharding = sharding
        self.seed, self.epoch = 0, 0
        self.shards: list[distributed.BatchShard] = []

    def set_epoch(self, seed: int, epoch: int) -> None:
        self.seed, self.epoch = seed, epoch
        self.generator.manual_seed(epoch_seed(seed, epoch))

    def __len__(self) -> int:
        ranks = distributed.current()
        if ranks.distributed and self.sharding == "deal":
            return len(range(ranks.rank, len(self.batches), ranks.world_size))
        return len(self.batches)

    def step(self, local_step: int) -> int:
        """The global step of this rank's ``local_step``-th batch."""
        ranks = distributed.current()
        dealt = ranks.distributed and self.sharding == "deal"
        return ranks.rank + local_step * ranks.world_size if dealt else local_step

    def __iter__(self) -> Iterator[list]:
        for batch in self._this_ranks_batches():
            yield [(index, self.seed, self.epoch) for index in batch] if self.keyed else batch

    def _this_ranks_batches(self) -> Iterable[list[int]]:
        ranks = distributed.current()
        if not ranks.distributed:
            return self.batches
        if self.sharding == "deal":
            return (batch for k, batch in enumerate(self.batches) if k % ranks.world_size == ranks.rank)
        batches = list(self.batches)  # the epoch's global batches, drawn as in one process
        self.shards = [distributed.shard_of(len(batch), ranks) for batch in batches]
        return (batch[shard.start : shard.stop] for batch, shard in zip(batches, self.shards))


class EpochLoader:
    """A DataLoader over :class:`EpochBatches`: call :meth:`set_epoch` before iterating over an epoch."""

    def __init__(self, loader: DataLoader, batches: EpochBatches):
        self.loader = loader
        self.batches = batches

    def set_epoch(self, seed: int, epoch: int) -> None:
        self.batches.set_epoch(seed, epoch)

    @property
    def epoch(self) -> tuple[int, int]:
        return self.batches.seed, self.batches.epoch

    def start_step(self, local_step: int) -> int:
        """Say which rows of the global batch this rank's ``local_step``-th batch holds (several ranks); returns the
        batch's global step."""
        if self.batches.shards and local_step < len(self.batches.shards):
            distributed.set_batch_shard(self.batches.shards[local_step])
        return self.batches.step(local_step)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator:
        return iter(self.loader)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    drop_last: bool = False,
    batch_sampler: BatchSamplerFactory | None = None,
    pin_memory: bool = False,
    encoded: bool = False,
    sharding: str = "split",
) -> EpochLoader:
    """A loader whose batches depend only on the seed and epoch given to ``set_epoch``.

    ``batch_sampler(dataset=, batch_size=, drop_last=, generator=)`` may choose the batches (drawing its
    randomness from ``generator``); by default they are shuffled or sequential. In-memory tensor datasets are
    sliced a whole batch at a time; file-backed datasets go through per-sample workers that persist for the
    run. ``encoded``: the dataset yields encoded image bytes, decoded later on the device. ``sharding``: how several
    ranks share the batches (:class:`EpochBatches`).
    """
    generator = torch.Generator()
    if batch_sampler is None:
        order = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        batches = BatchSampler(order, batch_size, drop_last)
    else:
        batches = batch_sampler(dataset=dataset, batch_size=batch_size, drop_last=drop_last, generator=generator)
    if isinstance(dataset, TensorDataset):
        epoch_batches = EpochBatches(batches, generator, keyed=False, sharding=sharding)
        loader = DataLoader(dataset, sampler=epoch_batches, batch_size=None, generator=torch.Generator())
        return EpochLoader(loader, epoch_batches)
    epoch_batches = EpochBatches(batches, generator, keyed=True, sharding=sharding)
    loader = DataLoader(
        SeededItems(dataset, pass_seed=encoded),
        batch_sampler=epoch_batches,
        num_workers=num_workers,
        collate_fn=collate_encoded if encoded else default_collate,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        generator=torch.Generator(),  # its own draws (worker base seeds) leave torch's global generator alone
    )
    return EpochLoader(loader, epoch_batches)


class PartBatches(Sampler[list[int]]):
    """Sequential batches over consecutive parts of a concatenated dataset, never straddling two parts.

    ``owners[k]`` is the part batch ``k`` belongs to.
    """

    def __init__(self, sizes: Sequence[int], batch_size: int):
        ends = np.cumsum(sizes).tolist()
        self.batches, self.owners = [], []
        for part, (start, end) in enumerate(zip([0, *ends[:-1]], ends)):
            for first in range(start, end, batch_size):
                self.batches.append(list(range(first, min(first + batch_size, end))))
                self.owners.append(part)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)


def concatenate(datasets: Sequence[Dataset]) -> Dataset:
    """One dataset of all ``datasets`` in order; in-memory tensor datasets stay one tensor dataset."""
    if all(isinstance(dataset, TensorDataset) for dataset in datasets):
        return TensorDataset(*(torch.cat(columns) for columns in zip(*(d.tensors for d in datasets))))
    return ConcatDataset(datasets)


class OnDevice:
    """A loader's batches on ``device``, images passed through ``transform`` there (batched, per-sample random).

    Per-image work (decoding, cropping) happens in the loader's workers; work that vectorises well across a batch
    (colour jitter, normalisation) runs here, on the GPU when there is one, and uint8 images cross to it. The
    batch transform of step ``k`` draws from the seed ``(seed, epoch, k)``. With ``decoder`` the loader hands
    over encoded images, decoded here on the device. ``channels_last``: 4-D batches in NHWC memory format.
    """

    def __init__(
        self,
        loader: EpochLoader,
        device: torch.device,
        transform: Callable[[torch.Tensor], torch.Tensor],
        channels_last: bool = False,
        decoder: EncodedBatchDecoder | None = None,
    ):
        self.loader = loader
        self.device = device
        self.transform = transform
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.decoder = decoder

    def set_epoch(self, seed: int, epoch: int) -> None:
        self.loader.set_epoch(seed, epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        seed, epoch = self.loader.epoch
        to_device = {"device": self.device, "non_blocking": True}
        for local_step, batch in enumerate(self.loader):
            step = self.loader.start_step(local_step)
            if self.decoder:
                data, y, d, item_seeds = batch
                x = self.decoder(data, item_seeds, self.device)
            else:
                x, y, d = batch
                x = x.to(**to_device)
            x = with_seed(batch_seed(seed, epoch, step), self.transform, x)
            if x.dim() == 4:
                x = x.contiguous(memory_format=self.memory_format)
            yield x, y.to(**to_device), d.to(**to_device)
