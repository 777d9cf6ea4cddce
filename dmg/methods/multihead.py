"""Multi-head training (baseline): a shared trunk and one independent head per source domain.

The network is split at ``split_layer``: the stages before it are shared, the split layer and every stage
after it exist once per source domain. (The paper's code accidentally shared the AlexNet head modules
between domains; here each head has its own parameters.)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dmg.methods.base import Method, OptimizerFactory, SchedulerFactory, init_classifier
from dmg.models.staged import StagedNetwork

OUT_OF_DOMAIN_AVERAGES = ("logits", "probabilities")


class MultiHead(Method):
    """Each sample goes through its own domain's head; out of domain, the heads' outputs are averaged."""

    def __init__(
        self,
        network: StagedNetwork,
        domains: Sequence[str],
        split_layer: str,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        classifier_init_std: float | None = None,
        ood_average: str = "logits",
    ):
        super().__init__(scheduler, scheduler_interval)
        if ood_average not in OUT_OF_DOMAIN_AVERAGES:
            raise ValueError(f"ood_average must be one of {', '.join(OUT_OF_DOMAIN_AVERAGES)}, got {ood_average!r}")
        split = network.index(split_layer)
        self.trunk = network.slice(0, split)
        self.heads = nn.ModuleList(copy.deepcopy(network.slice(split)) for _ in domains)
        for head in self.heads:
            init_classifier(head.classifier, classifier_init_std)
        self.heads_normalise_batches = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.heads.modules())
        self.ood_average = ood_average
        self.configure_optimizers({"network": (optimizer, self.parameters())})

    def objective(self, x, y, d):
        loss = F.cross_entropy(self.predict(x, d), y)
        return {"loss": loss}

    def predict(self, x: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
        features = self.trunk(x)
        return self._own_heads(features, d) if d is not None else self._mean_of_heads(features)

    def _own_heads(self, features: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Each sample's logits from the head of its own domain; only those reach the loss.

        Every head runs on the whole batch and each sample keeps its own head's output, so nothing waits for
        the device (a head gets gradients from its own samples only; from none when its domain is absent). Heads
        with batch normalisation (split before ``fc``) must see only their own samples while training: they
        take the routed path, which reads the batch's domains on the host.
        """
        if self.training and self.heads_normalise_batches:
            return self._routed(features, d)
        logits = torch.stack([head(features) for head in self.heads])  # (domains, B, classes)
        return logits[d, torch.arange(len(d), device=d.device)]

    def _routed(self, features: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Each sample through the head of its domain: every head sees only its own samples."""
        members = [(head, torch.nonzero(d == k).squeeze(1)) for k, head in enumerate(self.heads)]
        members = [(head, idx) for head, idx in members if len(idx)]
        outputs = torch.cat([head(features[idx]) for head, idx in members])
        order = torch.cat([idx for _, idx in members])
        return outputs[torch.argsort(order)]  # back in batch order

    def _mean_of_heads(self, features: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([head(features) for head in self.heads])  # (domains, B, classes)
        return logits.mean(0) if self.ood_average == "logits" else F.softmax(logits, -1).mean(0)
