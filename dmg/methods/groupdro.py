"""Group DRO (Sagawa et al., ICLR 2020, Algorithm 1) over source domains, as DomainBed's ``GroupDRO``.

Online domain weights ``q`` (a probability vector over source domains) grow exponentially with each domain's
risk: ``q_d <- q_d * exp(eta * risk_d)``, then ``q <- q / sum(q)``; the loss is ``sum_d q_d * risk_d`` with the updated
weights. Expects balanced batches (``sampler=balanced``); a domain absent from a batch keeps its weight, and the
loss renormalises the weights of the domains present. ``forward=per_domain`` (the default) calls the network once per
domain, as DomainBed does (BatchNorm statistics per domain); ``forward=joint`` once on the batch.
"""

from __future__ import annotations

import torch

from dmg.engine.distributed import gather_batch
from dmg.errors import check_number
from dmg.methods import by_domain
from dmg.methods.aggregate import Aggregate
from dmg.methods.domain_passes import check_forward, domain_forward


class GroupDRO(Aggregate):
    """Minimises the risk of the worst domains through exponentiated-gradient domain weights."""

    def __init__(self, *args, eta: float = 1e-2, forward: str = "per_domain", **kwargs):
        super().__init__(*args, **kwargs)
        check_number("eta", eta, least=0)
        self.eta = eta
        self.forward_mode = check_forward(forward)
        self.register_buffer("domain_weights", torch.ones(self.num_domains))  # q, checkpointed with the weights
        self._next_weights: torch.Tensor | None = None

    def objective(self, x, y, d):
        per_domain = domain_forward(self.network, x, y, d, self.num_domains, self.forward_mode)
        logits, y, d = gather_batch(*per_domain)  # the global batch under DDP
        risks = by_domain.risks(logits, y, d, self.num_domains)  # (D,)
        present = (by_domain.counts(d, self.num_domains) > 0).to(risks.dtype)
        weights = self.domain_weights * torch.exp(self.eta * risks.detach() * present)
        weights = weights / weights.sum()
        self._next_weights = weights  # becomes q once the step is taken (after_step)
        loss = (weights * present * risks).sum() / (weights * present).sum()
        return {"loss": loss, "ce": by_domain.mean_over(risks, present > 0)}

    def after_step(self) -> None:
        self.domain_weights.copy_(self._next_weights)

    def epoch_metrics(self) -> dict[str, float]:
        return {f"groupdro/weight/{name}": weight for name, weight in zip(self.domains, self.domain_weights.tolist())}
