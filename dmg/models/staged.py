"""A backbone seen as an ordered list of named stages.

Stage names are the module names users know from torchvision (``layer3``, ``fc``, ``classifier.6``), so
masks and heads attach to a layer by name, and the part of the network before a layer can be computed
once and reused (DMG's out-of-domain ensemble, multi-head's shared trunk).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from dmg.errors import BadValue, UserError

StageHook = Callable[[str, torch.Tensor], torch.Tensor]


class InputTooSmall(UserError):
    """The backbone cannot take images this small; ``smallest`` is the smallest square size it takes."""

    def __init__(self, size: int, smallest: int):
        super().__init__(f"this backbone cannot take {size}x{size} inputs: the smallest it takes is {smallest} px")
        self.size, self.smallest = size, smallest


class StagedNetwork(nn.Module):
    """Runs its stages one after another; ``run`` can start and stop at any stage and transform stage inputs.

    ``freeze_bn`` (DomainBed's ``freeze_bn``): every BatchNorm layer stays in eval mode, also while training, so
    it normalises with its running statistics and never updates them; its affine weights still train.
    """

    def __init__(self, stages: Sequence[tuple[str, nn.Module]], freeze_bn: bool = False):
        super().__init__()
        self.names = [name for name, _ in stages]
        self.stages = nn.ModuleDict({name.replace(".", "_"): module for name, module in stages})
        if not isinstance(freeze_bn, bool):
            raise BadValue("freeze_bn", "true or false", freeze_bn)
        self.freeze_bn = freeze_bn
        self.train(self.training)

    def train(self, mode: bool = True) -> StagedNetwork:
        super().train(mode)
        if self.freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def index(self, name: str) -> int:
        """Position of the stage called ``name``; a clear error lists the valid names otherwise."""
        if name not in self.names:
            raise UserError(f"unknown layer {name!r}: this backbone's layers are {', '.join(self.names)}")
        return self.names.index(name)

    def run(self, x: torch.Tensor, start: int = 0, stop: int | None = None, before: StageHook | None = None):
        """Stages ``[start, stop)`` on ``x``; ``before(name, input)`` may replace each stage's input."""
        for name, stage in list(zip(self.names, self.stages.values()))[start:stop]:
            x = stage(before(name, x) if before else x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)

    def slice(self, start: int, stop: int | None = None) -> StagedNetwork:
        """The stages ``[start, stop)`` as a network of their own (sharing the modules)."""
        return StagedNetwork(list(zip(self.names, self.stages.values()))[start:stop], self.freeze_bn)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier stage's input (B, features): what feature-alignment methods compare across domains."""
        return self.run(x, stop=len(self.names) - 1)

    @property
    def classifier(self) -> nn.Linear:
        """The last stage: the linear classifier sized to the dataset."""
        return self.stages[self.names[-1].replace(".", "_")]

    @torch.no_grad()
    def stage_input_shapes(self, input_shape: Sequence[int]) -> dict[str, torch.Size]:
        """Shape of each stage's input for a batch of two ``input_shape`` images (found by a dry run).

        Raises :class:`InputTooSmall` when the images are too small for the network and a larger size fits.
        """
        try:
            return self._dry_run(input_shape)
        except RuntimeError as error:
            smallest = self.smallest_input_size(input_shape)
            if smallest is not None and smallest > input_shape[-1]:
                raise InputTooSmall(input_shape[-1], smallest) from None
            raise UserError(f"this backbone cannot take inputs of shape {tuple(input_shape)}: {error}") from None

    def smallest_input_size(self, input_shape: Sequence[int], largest: int = 1024) -> int | None:
        """The smallest square image size in ``(input size, largest]`` the network takes (binary search)."""
        low, high = input_shape[-1], largest  # low fails; find the first size that works
        if not self._fits(input_shape, high):
            return None
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if self._fits(input_shape, middle) else (middle, high)
        return high

    def _fits(self, input_shape: Sequence[int], size: int) -> bool:
        try:
            self._dry_run([*input_shape[:-2], size, size])
            return True
        except RuntimeError:
            return False

    @torch.no_grad()
    def _dry_run(self, input_shape: Sequence[int]) -> dict[str, torch.Size]:
        shapes = {}

        def record(name: str, x: torch.Tensor) -> torch.Tensor:
            shapes[name] = x.shape
            return x

        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        try:
            self.run(torch.zeros(2, *input_shape, device=device), before=record)
        finally:
            self.train(was_training)
        return shapes
