"""Learning-rate schedules the paper uses that torch does not name."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InverseDecay:
    """The lr factor ``(1 + gamma * t) ** (-power)`` at iteration ``t``: DomainNet's schedule in the DMG paper.

    A ``LambdaLR`` multiplier; an object rather than a lambda so that it pickles and its state is checkpointed.
    """

    gamma: float = 1e-4
    power: float = 0.75

    def __call__(self, step: int) -> float:
        return (1.0 + self.gamma * step) ** (-self.power)
