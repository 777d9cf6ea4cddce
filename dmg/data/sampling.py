"""Which dataset indices form each training batch: shuffled (the paper's) or balanced over source domains.

``balanced`` is DomainBed's protocol: every batch holds ``batch_size / sources`` samples of each source domain
(when ``batch_size`` is not a multiple of the number of sources, the remainder goes to different domains in
turn, so each domain gets the same share over an epoch). Each domain's samples are drawn from its own random
permutations, one after another (a small domain repeats within an epoch before a large one does). An epoch has
as many batches as a shuffled epoch. Everything is drawn from the loader's generator at the start of each
epoch, so the batches depend only on the seed the loop gives that generator.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import ConcatDataset, Dataset, Sampler, TensorDataset

from dmg.errors import UserError


def domain_labels(dataset: Dataset) -> torch.Tensor:
    """The source-domain index of every sample, read without loading any image: (N,) long."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[2].long()
    if isinstance(dataset, ConcatDataset):
        return torch.cat([domain_labels(part) for part in dataset.datasets])
    if isinstance(getattr(dataset, "domain", None), int):
        return torch.full((len(dataset),), dataset.domain, dtype=torch.long)
    raise UserError(f"sampler=balanced needs to know each sample's domain, which {type(dataset).__name__} does not say")


class BalancedBatches(Sampler[list[int]]):
    """Batches of dataset indices with (nearly) ``batch_size / domains`` samples of every domain."""

    def __init__(self, domains: torch.Tensor, batch_size: int, generator: torch.Generator, drop_last: bool = False):
        self.members = [torch.nonzero(domains == k).squeeze(1) for k in domains.unique().tolist()]
        if batch_size < len(self.members):
            raise UserError(
                f"batch_size must be at least the number of source domains ({len(self.members)}) "
                f"with sampler=balanced, got {batch_size}"
            )
        self.batch_size = batch_size
        self.generator = generator
        self.batches = len(domains) // batch_size if drop_last else -(-len(domains) // batch_size)

    def __len__(self) -> int:
        return self.batches

    def per_domain_counts(self) -> torch.Tensor:
        """(batches, domains) samples of each domain in each batch; the remainder rotates over the domains."""
        domains = len(self.members)
        base, remainder = divmod(self.batch_size, domains)
        turn = (torch.arange(domains)[None, :] - remainder * torch.arange(self.batches)[:, None]) % domains
        return base + (turn < remainder).long()

    def __iter__(self) -> Iterator[list[int]]:
        counts = self.per_domain_counts()  # (batches, domains)
        batch_of, index = [], []
        for k, members in enumerate(self.members):  # one stream of indices per domain
            needed = int(counts[:, k].sum())
            passes = -(-needed // len(members))
            draws = torch.cat([torch.randperm(len(members), generator=self.generator) for _ in range(passes)])
            index.append(members[draws[:needed]])
            batch_of.append(torch.repeat_interleave(torch.arange(self.batches), counts[:, k]))
        order = torch.argsort(torch.cat(batch_of), stable=True)  # batch-major, domain-major within a batch
        for batch in torch.cat(index)[order].split(counts.sum(1).tolist()):
            yield batch.tolist()


def balanced_batches(dataset: Dataset, batch_size: int, drop_last: bool, generator: torch.Generator) -> BalancedBatches:
    """``sampler=balanced`` as a loader's batch sampler factory."""
    return BalancedBatches(domain_labels(dataset), batch_size, generator, drop_last)


BATCH_SAMPLERS = {"shuffled": None, "balanced": balanced_batches}  # None: the loader's own shuffled batches
SAMPLERS = tuple(BATCH_SAMPLERS)
