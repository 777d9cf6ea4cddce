"""Batches of ``(x, y, d)`` from any domain dataset, reproducible per epoch."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

from dmg.data.sampling import SAMPLERS, BalancedBatches, domain_labels
from dmg.errors import UserError


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    drop_last: bool = False,
    sampler: str = "shuffled",
) -> DataLoader:
    """A DataLoader whose order is fixed by ``loader.generator`` (reseed it at each epoch for resumable runs).

    In-memory tensor datasets are sliced a whole batch at a time (no per-sample Python); file-backed
    datasets go through the usual per-sample workers. ``sampler="balanced"`` (training only) gives every
    batch the same number of samples of each source domain (dmg/data/sampling.py).
    """
    if sampler not in SAMPLERS:
        raise UserError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    generator = torch.Generator()
    balanced = None
    if sampler == "balanced":
        balanced = BalancedBatches(domain_labels(dataset), batch_size, generator, drop_last)
    if isinstance(dataset, TensorDataset):
        order = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        batches = balanced if balanced is not None else BatchSampler(order, batch_size, drop_last)
        return DataLoader(dataset, sampler=batches, batch_size=None, generator=generator)
    batching = (
        {"batch_sampler": balanced}
        if balanced is not None
        else {"batch_size": batch_size, "shuffle": shuffle, "drop_last": drop_last}
    )
    return DataLoader(
        dataset,
        **batching,
        num_workers=num_workers,
        generator=generator,
        # Fresh workers every epoch take their seeds from the reseeded generator: augmentation is then a function
        # of (seed, epoch) and a resumed run matches; idle evaluation loaders hold no processes.
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )


class OnDevice:
    """A loader's batches on ``device``, images passed through ``transform`` there (batched, per-sample random).

    Per-image work (decoding, cropping) happens in the loader's workers; work that vectorises well across a batch
    (colour jitter, normalisation) runs here, on the GPU when there is one, and uint8 images cross to it.
    """

    def __init__(self, loader: DataLoader, device: torch.device, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.loader = loader
        self.device = device
        self.transform = transform

    @property
    def generator(self) -> torch.Generator:
        """Seeds the batch order (and the workers' random transforms)."""
        return self.loader.generator

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        to_device = {"device": self.device, "non_blocking": True}
        for x, y, d in self.loader:
            yield self.transform(x.to(**to_device)), y.to(**to_device), d.to(**to_device)
