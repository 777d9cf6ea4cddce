"""Risk-invariance penalties with annealing: IRMv1 (Arjovsky et al., 2019) and V-REx (Krueger et al., ICML 2021).

Both minimise the mean of the source domains' risks plus a penalty weighted 1 for the first ``anneal_steps``
steps and ``penalty_weight`` afterwards; when the weight switches, the optimiser's statistics are reset (Adam
does not like the jump in gradient scale), as in DomainBed. Expect balanced batches (``sampler=balanced``);
domains absent from a batch are left out of both the risk mean and the penalty.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmg.engine.compute import in_fp32
from dmg.engine.distributed import gather_batch
from dmg.errors import check_count, check_number
from dmg.methods import by_domain
from dmg.methods.aggregate import Aggregate


class AnnealedPenalty(Aggregate):
    """Mean domain risk + (1 before ``anneal_steps`` steps, ``penalty_weight`` after) x ``penalty``."""

    def __init__(self, *args, penalty_weight: float, anneal_steps: int = 500, **kwargs):
        super().__init__(*args, **kwargs)
        check_number("penalty_weight", penalty_weight, least=0)
        check_count("anneal_steps", anneal_steps, 0)
        self.penalty_weight = penalty_weight
        self.anneal_steps = anneal_steps

    def penalty(self, logits: torch.Tensor, y: torch.Tensor, d: torch.Tensor, risks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def objective(self, x, y, d):
        logits, y, d = gather_batch(self.network(x), y, d)  # the global batch under DDP
        risks = by_domain.risks(logits, y, d, self.num_domains)
        ce = by_domain.mean_over(risks, by_domain.counts(d, self.num_domains) > 0)
        penalty = self.penalty(logits, y, d, risks)
        annealed = self.step_count >= self.anneal_steps  # on the device: compiled code does not see a changing int
        weight = torch.where(annealed, self.penalty_weight, 1.0)
        return {"loss": ce + weight * penalty, "ce": ce, "penalty": penalty}

    def after_step(self) -> None:
        if self.steps == self.anneal_steps:  # the next step is the first with the full penalty weight
            self.reset_optimizer("network")


class IRM(AnnealedPenalty):
    """IRMv1: per domain, the product of the gradients of the risks of the batch's two halves with respect
    to a scale on the logits (at 1), averaged over domains.

    The gradient has a closed form per sample, ``d CE(s * z, y) / ds at s = 1 = softmax(z) . z - z_y``; the halves
    are a domain's samples at even and odd positions, as DomainBed's ``logits[::2]`` and ``logits[1::2]``.
    """

    def __init__(self, *args, penalty_weight: float = 1e2, **kwargs):
        super().__init__(*args, penalty_weight=penalty_weight, **kwargs)

    @in_fp32
    def penalty(self, logits, y, d, risks):
        scale_gradient = (F.softmax(logits, 1) * logits).sum(1) - logits.gather(1, y[:, None]).squeeze(1)  # (B,)
        odd = by_domain.rank_within_domain(d, self.num_domains) % 2
        even_half = by_domain.means(scale_gradient, d, self.num_domains, weights=1 - odd)
        odd_half = by_domain.means(scale_gradient, d, self.num_domains, weights=odd)
        return by_domain.mean_over(even_half * odd_half, by_domain.counts(d, self.num_domains) >= 2)


class VREx(AnnealedPenalty):
    """V-REx: the variance of the domains' risks."""

    def __init__(self, *args, penalty_weight: float = 1e1, **kwargs):
        super().__init__(*args, penalty_weight=penalty_weight, **kwargs)

    @in_fp32
    def penalty(self, logits, y, d, risks):
        present = by_domain.counts(d, self.num_domains) > 0
        mean = by_domain.mean_over(risks, present)
        return by_domain.mean_over((risks - mean) ** 2, present)
