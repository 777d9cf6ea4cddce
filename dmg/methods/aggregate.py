"""Aggregate training (baseline): pool every source domain and minimise plain cross-entropy."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dmg.methods.base import Method, OptimizerFactory, SchedulerFactory, init_classifier
from dmg.models.staged import StagedNetwork


class Aggregate(Method):
    """One network for all domains; domain labels are ignored (subclasses that compare domains use them)."""

    def __init__(
        self,
        network: StagedNetwork,
        domains: Sequence[str],
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        classifier_init_std: float | None = None,
    ):
        super().__init__(scheduler, scheduler_interval)
        self.network = network
        self.domains = list(domains)
        self.num_domains = len(self.domains)
        init_classifier(network.classifier, classifier_init_std)
        self.configure_optimizers({"network": (optimizer, network.parameters())})

    def objective(self, x, y, d):
        loss = F.cross_entropy(self.network(x), y)
        return {"loss": loss}

    def predict(self, x: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
        return self.network(x)
