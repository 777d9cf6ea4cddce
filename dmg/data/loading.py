"""Batches of ``(x, y, d)`` from any domain dataset, reproducible per epoch."""

from __future__ import annotations

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0, drop_last: bool = False
) -> DataLoader:
    """A DataLoader whose order is fixed by ``loader.generator`` (reseed it at each epoch for resumable runs).

    In-memory tensor datasets are sliced a whole batch at a time (no per-sample Python); file-backed
    datasets go through the usual per-sample workers.
    """
    generator = torch.Generator()
    if isinstance(dataset, TensorDataset):
        order = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        batches = BatchSampler(order, batch_size, drop_last)
        return DataLoader(dataset, sampler=batches, batch_size=None, generator=generator)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=generator,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
