"""What every dataset hands to a run: source training data, in-domain validation, out-of-domain test.

A batch is always ``(x, y, d)``: images, class indices, and the index of the sample's source domain
(``-1`` for target-domain samples, which belong to no source).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dmg.errors import UserError

if TYPE_CHECKING:  # torch is imported where it is used: a config check imports this module, and need not wait for it
    import torch
    from torch.utils.data import Dataset

TARGET_DOMAIN_INDEX = -1


@dataclass
class DomainSplits:
    """The data of one experiment: sources are trained on, targets are only ever evaluated."""

    sources: list[str]
    targets: list[str]
    num_classes: int
    train: Dataset  # all sources' training data, yields (x, y, d) with d = source index
    val: dict[str, Dataset]  # per source: held-out in-domain data, d = source index
    test: dict[str, Dataset]  # per target: out-of-domain data, d = TARGET_DOMAIN_INDEX


def choose_domains(
    domains: Sequence[str], target: str | Sequence[str], sources: Sequence[str] | None = None
) -> tuple[list[str], list[str]]:
    """Validate the target domain(s) and pick the sources (by default every other domain).

    Returns ``(sources, targets)`` in the dataset's domain order.
    """
    targets = _names(target)
    known = ", ".join(domains)
    sources = None if sources is None else _names(sources)
    for name in targets + (sources or []):
        if name not in domains:
            raise UserError(f"unknown domain {name!r}: this dataset's domains are {known}")
    for key, names in (("target", targets), ("sources", sources or [])):
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise UserError(f"{key} names {', '.join(repeated)} more than once: list each domain once")
    if not targets:
        raise UserError(f"no target domain given: choose target= one of {known}")
    if sources is None:
        sources = [name for name in domains if name not in targets]
    overlap = sorted(set(sources) & set(targets))
    if overlap:
        raise UserError(f"target domain(s) {', '.join(overlap)} also listed as source: a target must be unseen")
    if not sources:
        raise UserError(f"no source domain left to train on: targets are {', '.join(targets)}, domains {known}")
    ordered = lambda names: [name for name in domains if name in names]  # noqa: E731
    return ordered(sources), ordered(targets)


def _names(value: str | int | Sequence[str]) -> list[str]:
    """``target``/``sources`` as a list of names: one name (``target=c``) or a list (``target=[a,b]``)."""
    return [str(name) for name in ([value] if isinstance(value, (str, int, float)) else value)]


def split_indices(count: int, holdout_fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random ``(keep, holdout)`` split of ``range(count)``; the holdout has ``round(count * fraction)`` items."""
    import torch

    if not 0.0 < holdout_fraction < 1.0:
        raise UserError(f"holdout fraction must be strictly between 0 and 1, got {holdout_fraction}")
    order = torch.randperm(count, generator=generator)
    holdout = round(count * holdout_fraction)
    return order[holdout:].sort().values, order[:holdout].sort().values
