"""The contract every method follows, and the optimisation step they share.

A method is an ``nn.Module`` with ``update(x, y, d)`` (one optimisation step on a batch whose ``d`` holds
source-domain indices) and ``predict(x, d=None)`` (in-domain with ``d``, the out-of-domain prediction
without). Subclasses only say what their loss is (``objective``) and how they predict; the few methods whose
step is not "every optimiser minimises ``loss``" override one of two hooks: ``stepping_optimizers`` (DANN's
alternating players) and ``after_step`` (GroupDRO's domain weights, IRM's and VREx's optimiser reset).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from dmg.errors import NonFiniteLossError

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]
SchedulerFactory = Callable[[Optimizer], LRScheduler]


class Method(nn.Module):
    """Owns the networks, their optimisers and their learning-rate schedules."""

    optimizers: dict[str, Optimizer]
    schedulers: dict[str, LRScheduler]

    def __init__(self, scheduler: SchedulerFactory | None = None, scheduler_interval: str = "epoch"):
        super().__init__()
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        self._scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.steps = 0

    def configure_optimizers(
        self,
        parameter_groups: dict[str, tuple[OptimizerFactory, Iterable[nn.Parameter]]],
        scheduled: Sequence[str] = ("network",),
    ):
        """One optimiser per named parameter group; the schedule drives the ``scheduled`` groups.

        By default only the ``network`` group is scheduled, as in the paper's code for per-epoch schedules.
        """
        self.optimizers = {name: make(params) for name, (make, params) in parameter_groups.items()}
        factory = self._scheduler_factory
        self.schedulers = {name: factory(self.optimizers[name]) for name in scheduled} if factory else {}

    def objective(self, x: torch.Tensor, y: torch.Tensor, d: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss terms of a batch; ``loss`` is the one minimised.

        No side effects: state that changes with a step changes in ``after_step``.
        """
        raise NotImplementedError

    def predict(self, x: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
        """Class scores (B, classes): in-domain with the samples' source domains ``d``, out-of-domain without."""
        raise NotImplementedError

    def update(self, x: torch.Tensor, y: torch.Tensor, d: torch.Tensor) -> dict[str, float]:
        """One optimisation step on a batch; returns the loss terms."""
        terms = self.objective(x, y, d)
        values = dict(zip(terms, torch.stack([value.detach() for value in terms.values()]).tolist()))  # one sync
        if not math.isfinite(values["loss"]):
            raise NonFiniteLossError(self.steps + 1, values)
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        for name in self.stepping_optimizers():
            self.optimizers[name].step()
        self.steps += 1
        self.after_step()
        if self.scheduler_interval == "step":
            self._step_schedules()
        return values

    def stepping_optimizers(self) -> Iterable[str]:
        """The optimisers that take this step (all of them; DANN alternates its two players)."""
        return self.optimizers.keys()

    def after_step(self) -> None:
        """State changes that belong to a completed step (``self.steps`` already counts it)."""

    def reset_optimizer(self, name: str) -> None:
        """Forget an optimiser's running statistics (Adam's moments), keeping its learning rate and schedule."""
        self.optimizers[name].state.clear()

    def end_epoch(self) -> None:
        if self.scheduler_interval == "epoch":
            self._step_schedules()

    def _step_schedules(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.step()

    def learning_rates(self) -> dict[str, float]:
        return {name: optimizer.param_groups[0]["lr"] for name, optimizer in self.optimizers.items()}

    def epoch_metrics(self) -> dict[str, float]:
        """Method-specific metrics logged once per epoch (e.g. DMG's mask overlaps)."""
        return {}

    def mask_overlaps(self) -> dict[str, torch.Tensor]:
        """Per masked layer, the (domains, domains) IoU of the domains' masks; empty for unmasked methods."""
        return {}

    def training_state(self) -> dict:
        """Everything besides the parameters that a resumed run needs."""
        return {
            "optimizers": {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()},
            "schedulers": {name: scheduler.state_dict() for name, scheduler in self.schedulers.items()},
            "steps": self.steps,
        }

    def load_training_state(self, state: dict) -> None:
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        schedulers = state.get("schedulers", {"network": state.get("scheduler")})  # older checkpoints: one schedule
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(schedulers[name])
        self.steps = state["steps"]


def init_classifier(layer: nn.Linear, std: float | None) -> None:
    """Fresh classifier weights: N(0, std) with zero bias (the reference's baselines), or PyTorch's default."""
    if std is None:
        layer.reset_parameters()
        return
    nn.init.normal_(layer.weight, 0.0, std)
    nn.init.zeros_(layer.bias)
