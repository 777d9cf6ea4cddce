"""The contract every method follows, and the optimisation step they share.

A method is an ``nn.Module`` with ``update(x, y, d)`` (one optimisation step on a batch whose ``d`` holds
source-domain indices) and ``predict(x, d=None)`` (in-domain with ``d``, the out-of-domain prediction
without). Subclasses only say what their loss is (``objective``) and how they predict; the few methods whose
step is not "every optimiser minimises ``loss``" override one of two hooks: ``stepping_optimizers`` (DANN's
alternating players) and ``after_step`` (GroupDRO's domain weights, IRM's and VREx's optimiser reset).

``update`` never waits for the device: it returns the loss terms as tensors still on the device, and the
training loop checks their finiteness once per epoch. So no method code may read a device value on the host
in ``objective`` or ``after_step`` (``.item()``, ``.tolist()``, ``bool(tensor)``, ``torch.nonzero``, boolean-mask
indexing...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from dmg.engine import distributed
from dmg.engine.compute import Precision

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
        self.steps = 0  # optimisation steps taken (an fp16 step the gradient scaler skipped is not one)
        # The same count on the device, for objectives that depend on it (IRM's and VREx's annealing, DANN's turns):
        # a tensor changed in place, so that torch.compile does not specialise (and recompile) on a Python int.
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long), persistent=False)
        self.last_step_taken = True  # False after an fp16 step whose gradients overflowed
        self.precision = Precision()
        self.scaler = self.precision.grad_scaler()

    def configure_compute(self, precision: Precision, compile: bool = False) -> None:
        """Autocast (and fp16 loss scaling) for ``precision``; ``compile``: ``torch.compile`` the loss and prediction.

        Compiling replaces the bound methods, not the modules: parameter names and checkpoints stay the same.
        """
        self.precision = precision
        self.scaler = precision.grad_scaler()
        if compile:
            self.objective = torch.compile(self.objective)
            self.predict = torch.compile(self.predict)

    def autocast(self) -> AbstractContextManager:
        """The context forward passes run in (training and evaluation)."""
        return self.precision.autocast()

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

    def update(self, x: torch.Tensor, y: torch.Tensor, d: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimisation step on a batch; returns the loss terms, detached, fp32, still on the device.

        Nothing here waits for the device (the finiteness of the loss is checked by the training loop).
        """
        with self.autocast():
            terms = self.objective(x, y, d)
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()
        distributed.reduce_gradients(self.parameters())  # DDP: the global batch's gradient on every rank
        self.last_step_taken = self._step_optimizers()
        if self.last_step_taken:
            self.steps += 1
            self.step_count += 1
            self.after_step()
            if self.scheduler_interval == "step":
                self._step_schedules()
        return {name: value.detach().float() for name, value in terms.items()}

    def _step_optimizers(self) -> bool:
        """Step the optimisers on turn; whether the step was taken (fp16: not when the gradients overflowed).

        Without fp16 every step is taken, and nothing is read from the device. With fp16, torch's ``GradScaler``
        already reads each optimiser's overflow flag on the host before stepping it (non-fused optimisers), so the
        step waits for the device anyway; whether it was skipped is one more read at the same point: the scaler
        lowers its scale exactly when it skipped (the comparison is made on the device).
        """
        if not self.scaler.is_enabled():
            for name in self.stepping_optimizers():
                self.optimizers[name].step()
            return True
        scale = self.scaler._scale.clone()  # the scaler's current scale, on the device
        for name in self.stepping_optimizers():
            self.scaler.step(self.optimizers[name])  # skipped when the gradients overflowed
        self.scaler.update()
        return bool(self.scaler._scale >= scale)

    def stepping_optimizers(self) -> Iterable[str]:
        """The optimisers that take this step (all of them; DANN alternates its two players)."""
        return self.optimizers.keys()

    def after_step(self) -> None:
        """State changes that belong to a completed step (``self.steps`` already counts it; not called after an fp16
        step the gradient scaler skipped)."""

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
            "scaler": self.scaler.state_dict(),  # empty unless fp16
        }

    def load_training_state(self, state: dict) -> None:
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        schedulers = state.get("schedulers", {"network": state.get("scheduler")})  # older checkpoints: one schedule
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(schedulers[name])
        self.steps = state["steps"]
        self.step_count.fill_(self.steps)
        if state.get("scaler") and self.scaler.is_enabled():  # an fp16 run's loss scale; other precisions have none
            self.scaler.load_state_dict(state["scaler"])


def init_classifier(layer: nn.Linear, std: float | None) -> None:
    """Fresh classifier weights: N(0, std) with zero bias (the reference's baselines), or PyTorch's default."""
    if std is None:
        layer.reset_parameters()
        return
    nn.init.normal_(layer.weight, 0.0, std)
    nn.init.zeros_(layer.bias)
