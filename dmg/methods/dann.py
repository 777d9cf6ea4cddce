"""Domain-adversarial training (DANN, Ganin et al., JMLR 2016), as DomainBed's two-player update.

A discriminator MLP predicts each sample's source domain from its features (the classifier's input). Steps
alternate: ``discriminator_steps`` steps of the discriminator minimising its cross-entropy (plus an optional
gradient penalty on its input), then one step of the network minimising
``classification CE - adversarial_weight * discriminator loss``. Each player has its own Adam (DomainBed:
betas (0.5, 0.9)); only the player whose turn it is steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dmg.errors import BadValue, check_count, check_number
from dmg.methods.base import Method, OptimizerFactory, SchedulerFactory, init_classifier
from dmg.models.staged import StagedNetwork


def discriminator_mlp(inputs: int, outputs: int, width: int, depth: int, dropout: float) -> nn.Sequential:
    """DomainBed's MLP: ``depth`` linear layers of ``width`` units, each hidden one followed by dropout and ReLU."""
    sizes = [inputs] + [width] * (depth - 1)
    layers: list[nn.Module] = []
    for size_in, size_out in zip(sizes, sizes[1:]):
        layers += [nn.Linear(size_in, size_out), nn.Dropout(dropout), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], outputs))


class DANN(Method):
    """A network and a domain discriminator on its features, trained as a two-player game."""

    def __init__(
        self,
        network: StagedNetwork,
        domains: Sequence[str],
        optimizer: OptimizerFactory,
        discriminator_optimizer: OptimizerFactory,
        adversarial_weight: float = 1.0,
        discriminator_width: int = 256,
        discriminator_depth: int = 3,
        discriminator_dropout: float = 0.0,
        discriminator_steps: int = 1,
        grad_penalty: float = 0.0,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        classifier_init_std: float | None = None,
    ):
        super().__init__(scheduler, scheduler_interval)
        check_number("adversarial_weight", adversarial_weight, least=0)
        check_count("discriminator_width", discriminator_width, 1)
        check_count("discriminator_depth", discriminator_depth, 2)
        check_fraction("discriminator_dropout", discriminator_dropout)
        check_count("discriminator_steps", discriminator_steps, 1)
        check_number("grad_penalty", grad_penalty, least=0)
        self.network = network
        init_classifier(network.classifier, classifier_init_std)
        features = network.classifier.in_features
        self.discriminator = discriminator_mlp(
            features, len(domains), discriminator_width, discriminator_depth, discriminator_dropout
        )
        self.adversarial_weight = adversarial_weight
        self.discriminator_steps = discriminator_steps
        self.grad_penalty = grad_penalty
        self.configure_optimizers(
            {
                "network": (optimizer, network.parameters()),
                "discriminator": (discriminator_optimizer, self.discriminator.parameters()),
            },
            scheduled=("network", "discriminator"),
        )

    def discriminators_turn(self) -> bool:
        """DomainBed's schedule: the discriminator's turn unless the 1-based step count modulo
        ``discriminator_steps + 1`` equals ``discriminator_steps`` (one network step in every
        ``discriminator_steps + 1``)."""
        return self._discriminators_turn(self.steps)

    def _discriminators_turn(self, steps):
        return (steps + 1) % (self.discriminator_steps + 1) < self.discriminator_steps

    def stepping_optimizers(self):
        return ["discriminator"] if self.discriminators_turn() else ["network"]

    def objective(self, x, y, d):
        features = self.network.features(x)  # (B, F)
        domain_logits = self.discriminator(features)  # (B, domains)
        domain_ce = F.cross_entropy(domain_logits, d)
        discriminator_loss = domain_ce
        if self.grad_penalty > 0:
            discriminator_loss = domain_ce + self.grad_penalty * _input_gradient_penalty(features, domain_logits, d)
        ce = F.cross_entropy(self.network.classifier(features), y)
        generator_loss = ce - self.adversarial_weight * discriminator_loss
        # whose turn, decided on the device: compiled code does not see the step count change
        loss = torch.where(self._discriminators_turn(self.step_count), discriminator_loss, generator_loss)
        return {"loss": loss, "ce": ce, "domain_ce": domain_ce}

    def predict(self, x: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
        return self.network(x)


def check_fraction(key: str, value: float) -> None:
    check_number(key, value, least=0)
    if value >= 1:
        raise BadValue(key, "a number in [0, 1)", value)


def _input_gradient_penalty(features: torch.Tensor, domain_logits: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Mean squared norm of the gradient of the summed discriminator CE with respect to its input (DomainBed)."""
    (gradient,) = torch.autograd.grad(F.cross_entropy(domain_logits, d, reduction="sum"), [features], create_graph=True)
    return gradient.pow(2).sum(1).mean()
