"""Per-domain statistics of a batch, vectorised over domains with the batch's domain-index tensor ``d``.

A batch may lack a domain (shuffled batches): every helper reports which domains are present, and the
penalties built on them average over present domains (or pairs of them) only. Nothing here synchronises
with the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def counts(d: torch.Tensor, num_domains: int) -> torch.Tensor:
    """Samples of each domain in the batch: (domains,) long.

    A sum of ones per domain rather than ``torch.bincount``, whose output size depends on the values (it waits
    for the device).
    """
    return d.new_zeros(num_domains).index_add_(0, d, torch.ones_like(d))


def one_hot(d: torch.Tensor, num_domains: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """(B, domains) indicator of each sample's domain: a comparison with ``arange`` rather than ``F.one_hot``,
    which checks the range of ``d`` on the host."""
    return (d[:, None] == torch.arange(num_domains, device=d.device)).to(dtype)


def means(values: torch.Tensor, d: torch.Tensor, num_domains: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-domain mean of per-sample ``values`` (B, ...): (domains, ...); 0 for an absent domain.

    ``weights`` (B,) of 0 or 1 counts some samples only: the mean is over the samples with weight 1.
    """
    if weights is None:
        weights = torch.ones_like(d, dtype=values.dtype)
    weights = weights.to(values.dtype)
    per_sample = weights.view(-1, *(1,) * (values.dim() - 1))
    totals = values.new_zeros(num_domains, *values.shape[1:]).index_add(0, d, values * per_sample)
    n = values.new_zeros(num_domains).index_add(0, d, weights).clamp_min(1)
    return totals / n.view(-1, *(1,) * (values.dim() - 1))


def risks(logits: torch.Tensor, y: torch.Tensor, d: torch.Tensor, num_domains: int) -> torch.Tensor:
    """Each domain's mean cross-entropy (domains,): DomainBed's per-environment risk."""
    return means(F.cross_entropy(logits, y, reduction="none"), d, num_domains)


def mean_over(values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (domains,) over the ``present`` domains (bool mask)."""
    present = present.to(values.dtype)
    return (values * present).sum() / present.sum().clamp_min(1)


def mean_over_pairs(matrix: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean of a (domains, domains) matrix over unordered pairs i < j of present domains; 0 without a pair."""
    rows, cols = torch.triu_indices(*matrix.shape, offset=1, device=matrix.device)
    weight = (present[rows] & present[cols]).to(matrix.dtype)
    return (matrix[rows, cols] * weight).sum() / weight.sum().clamp_min(1)


def rank_within_domain(d: torch.Tensor, num_domains: int) -> torch.Tensor:
    """Position of each sample among the batch's samples of its own domain, in batch order: (B,) long."""
    return (one_hot(d, num_domains).cumsum(0) - 1).gather(1, d[:, None]).squeeze(1)
