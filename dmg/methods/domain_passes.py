"""Forward passes one source domain at a time, as DomainBed's CORAL, MMD, GroupDRO and Mixup make them.

DomainBed (``algorithms.py``) calls the network once per source domain (Mixup: once per pair of domains), so each
BatchNorm layer in training mode normalises every domain with that domain's own batch statistics and updates its
running statistics once per call. ``method.forward=per_domain`` does the same; ``method.forward=joint`` sends the
whole batch through the network once (faster; BatchNorm then normalises with the statistics of the mixed batch).

Per-domain passes need batches with the same number of samples of every source domain: ``sampler=balanced`` with a
``batch_size`` that is a multiple of the number of sources (DomainBed's batches hold ``batch_size`` samples of every
domain). The batch is then sorted by domain and cut into blocks whose size is known on the host, so nothing waits
for the device. A batch that is not balanced fails a device-side assertion (``experiment.build_method`` rejects
configs that would produce one).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dmg.errors import BadValue

FORWARDS = ("joint", "per_domain")


def check_forward(forward: str) -> str:
    """``forward`` if it is ``joint`` or ``per_domain``; a :class:`BadValue` naming the key otherwise."""
    if forward not in FORWARDS:
        raise BadValue("forward", "joint or per_domain", forward)
    return forward


def domain_blocks(
    x: torch.Tensor, y: torch.Tensor, d: torch.Tensor, num_domains: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch sorted by domain as equal blocks: x (D, n, ...), y (D, n), d (D, n); block k is domain k.

    Within a block the samples keep their batch order (as DomainBed's per-domain minibatches do).
    """
    if len(d) % num_domains:
        raise ValueError(f"forward=per_domain needs batches of equal parts of the {num_domains} domains, got {len(d)}")
    order = torch.argsort(d, stable=True)
    blocks = (num_domains, len(d) // num_domains)
    d_blocks = d[order].unflatten(0, blocks)
    expected = torch.arange(num_domains, device=d.device)[:, None]
    torch._assert_async(torch.all(d_blocks == expected), "forward=per_domain needs domain-balanced batches")
    return x[order].unflatten(0, blocks), y[order].unflatten(0, blocks), d_blocks


def per_block(network: Callable[[torch.Tensor], torch.Tensor], blocks: torch.Tensor) -> torch.Tensor:
    """``network`` called once per block, in block order, on blocks (D, n, ...): outputs (D, n, ...)."""
    return torch.stack([network(block) for block in blocks.unbind(0)])


def domain_forward(
    network: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    d: torch.Tensor,
    num_domains: int,
    forward: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``network``'s outputs (B, ...) with the labels and domains (B,) of their samples, in the outputs' order.

    ``joint``: one call on the batch, in batch order. ``per_domain``: one call per domain, domains in index order
    (DomainBed's order), the outputs in domain order.
    """
    if forward == "joint":
        return network(x), y, d
    x_blocks, y_blocks, d_blocks = domain_blocks(x, y, d, num_domains)
    return per_block(network, x_blocks).flatten(0, 1), y_blocks.flatten(), d_blocks.flatten()
