"""Inter-domain Mixup (Xu et al., AAAI 2020; Yan et al., 2020), as DomainBed's ``Mixup``.

The batch's source domains are put in a random cycle; each domain ``a`` is mixed with the next one ``b``:
sample ``k`` of ``a`` with sample ``k`` of ``b``, ``x = lam_a * x_a + (1 - lam_a) * x_b``,
``lam_a ~ Beta(alpha, alpha)`` drawn per pair, and the pair's loss is
``mean(lam_a * CE(f(x), y_a) + (1 - lam_a) * CE(f(x), y_b))``. The objective is the sum of the pairs' losses
divided by the number of domains. Expects balanced batches (``sampler=balanced``).

``forward=per_domain`` (the default) calls the network once per pair of domains, in the order of the cycle, as
DomainBed does (BatchNorm normalises each mixed pair with its own statistics; it needs equal domain shares in every
batch). ``forward=joint`` makes one call on the whole mixed batch; there a sample without a partner of the same
rank in the next domain is left out of the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmg.errors import check_number
from dmg.methods import by_domain
from dmg.methods.aggregate import Aggregate
from dmg.methods.domain_passes import check_forward, domain_blocks, per_block


class Mixup(Aggregate):
    """Cross-entropy on convex combinations of samples of two source domains."""

    def __init__(self, *args, alpha: float = 0.2, forward: str = "per_domain", **kwargs):
        super().__init__(*args, **kwargs)
        check_number("alpha", alpha, above=0)
        self.alpha = float(alpha)
        self.forward_mode = check_forward(forward)

    def objective(self, x, y, d):
        cycle = torch.randperm(self.num_domains, device=d.device)  # order of the domains in the cycle
        lam = beta_samples(self.alpha, self.num_domains, x.device)  # one weight per pair (per first domain)
        mixed = self.pairwise_objective if self.forward_mode == "per_domain" else self.mixed_objective
        return mixed(x, y, d, cycle, lam)

    def pairwise_objective(self, x, y, d, cycle: torch.Tensor, lam: torch.Tensor) -> dict[str, torch.Tensor]:
        """``forward=per_domain``: one network call per pair of domains, pairs in the cycle's order (DomainBed's
        ``Mixup.update`` with ``random_pairs_of_minibatches``); ``lam`` is indexed by the pair's first domain."""
        x_blocks, y_blocks, _ = domain_blocks(x, y, d, self.num_domains)  # (D, n, ...), block k: domain k
        first, second = cycle, cycle.roll(-1)  # pair i: domains cycle[i] and cycle[i + 1]
        weight = lam[first]  # (D,)
        spread = weight.view(-1, *(1,) * x.dim())
        logits = per_block(self.network, spread * x_blocks[first] + (1 - spread) * x_blocks[second])  # (D, n, C)
        ce_first = F.cross_entropy(logits.transpose(1, 2), y_blocks[first], reduction="none").mean(1)  # (D,)
        ce_second = F.cross_entropy(logits.transpose(1, 2), y_blocks[second], reduction="none").mean(1)
        return {"loss": (weight * ce_first + (1 - weight) * ce_second).sum() / self.num_domains}

    def mixed_objective(self, x, y, d, cycle: torch.Tensor, lam: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss for a given cycle of domains and per-pair weights ``lam`` (indexed by the pair's first domain)."""
        partner, paired = self.partners(d, cycle)  # (B,) indices, (B,) bool
        weight = lam[d].view(-1, *(1,) * (x.dim() - 1))
        logits = self.network(weight * x + (1 - weight) * x[partner])
        per_sample = lam[d] * F.cross_entropy(logits, y, reduction="none")
        per_sample = per_sample + (1 - lam[d]) * F.cross_entropy(logits, y[partner], reduction="none")
        pair_losses = by_domain.means(per_sample, d, self.num_domains, weights=paired)  # (D,)
        loss = pair_losses.sum() / (by_domain.counts(d, self.num_domains) > 0).sum()
        return {"loss": loss}

    def partners(self, d: torch.Tensor, cycle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's partner: the sample of the same rank in the next domain of the cycle (present domains only).

        Returns the partner indices (a sample without a partner is its own) and which samples have one.
        """
        present = by_domain.counts(d, self.num_domains) > 0
        position = torch.empty_like(cycle).scatter_(0, cycle, torch.arange(len(cycle), device=cycle.device))
        order = torch.argsort(torch.where(present, position, position + len(cycle)))  # present domains first
        following = torch.empty_like(order)
        following[order] = order[(torch.arange(len(order), device=d.device) + 1) % present.sum()]
        rank = by_domain.rank_within_domain(d, self.num_domains)
        table = torch.full((self.num_domains, len(d)), -1, dtype=torch.long, device=d.device)
        table[d, rank] = torch.arange(len(d), device=d.device)  # table[domain, rank] = sample index
        partner = table[following[d], rank]
        paired = partner >= 0
        return torch.where(paired, partner, torch.arange(len(d), device=d.device)), paired


def beta_samples(alpha: float, count: int, device: torch.device) -> torch.Tensor:
    """``count`` draws of Beta(alpha, alpha), made on ``device`` (no copy from the host, no argument checks that
    would read device values), as ``G1 / (G1 + G2)`` of two Gamma(alpha, 1) draws: the same distribution as
    ``torch.distributions.Beta``, whose Dirichlet sampler ``torch.compile`` cannot trace (a graph break)."""
    concentration = torch.full((), alpha, device=device)
    gamma = torch.distributions.Gamma(concentration, torch.ones((), device=device), validate_args=False)
    draws = gamma.sample((2, count))  # (2, count), clamped above 0 by the sampler
    return draws[0] / draws.sum(0)
