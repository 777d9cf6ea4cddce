"""MixStyle (Zhou et al., ICLR 2021): mix the feature statistics of random pairs of samples during training.

After each stage named in ``layers``, with probability ``p`` per forward pass, every sample's feature map is
normalised by its own channel means and standard deviations (over H x W, detached) and re-scaled by a convex
combination, with weight ``lam ~ Beta(alpha, alpha)`` per sample, of its statistics and those of a randomly
chosen sample of the batch (the ``random`` shuffle of the official code and of SWAD's ``Mixstyle``). Prediction
runs the plain network. The mixed features are computed at every training pass and kept with probability ``p``
(a choice made on the device, so the step never waits for it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dmg.errors import BadValue, UserError, check_number
from dmg.methods.aggregate import Aggregate
from dmg.methods.mixup import beta_samples


def mix_style(x: torch.Tensor, lam: torch.Tensor, permutation: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x`` (B, C, H, W) with each sample's channel statistics mixed with those of sample ``permutation[i]``."""
    mean = x.mean((2, 3), keepdim=True).detach()
    std = (x.var((2, 3), keepdim=True) + eps).sqrt().detach()
    lam = lam.view(-1, 1, 1, 1)
    mixed_mean = lam * mean + (1 - lam) * mean[permutation]
    mixed_std = lam * std + (1 - lam) * std[permutation]
    return (x - mean) / std * mixed_std + mixed_mean


class MixStyle(Aggregate):
    """Cross-entropy of the network with MixStyle after the stages ``layers`` (training only)."""

    def __init__(self, *args, layers: Sequence[str], p: float = 0.5, alpha: float = 0.1, eps: float = 1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        names = self.network.names
        positions = [self.network.index(name) for name in layers]
        if not layers or max(positions) >= len(names) - 1:
            raise BadValue("layers", f"a list of stages before the last one ({names[-1]})", list(layers))
        check_number("p", p, least=0)
        if p > 1:
            raise BadValue("p", "a probability in [0, 1]", p)
        check_number("alpha", alpha, above=0)
        check_number("eps", eps, above=0)
        self.mixed_inputs = {names[position + 1] for position in positions}  # mixing after a stage = before the next
        self.p = p
        self.eps = eps
        self.alpha = float(alpha)

    def objective(self, x, y, d):
        loss = F.cross_entropy(self.network.run(x, before=self._mix), y)
        return {"loss": loss}

    def _mix(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name not in self.mixed_inputs:
            return x
        if x.dim() != 4:
            raise UserError(
                f"MixStyle needs (B, C, H, W) features, but the input of stage {name!r} is {tuple(x.shape)}"
            )
        batch = x.shape[0]
        mixed = mix_style(
            x, beta_samples(self.alpha, batch, x.device), torch.randperm(batch, device=x.device), self.eps
        )
        applies = torch.rand((), device=x.device) < self.p  # decided on the device: the host never waits for it
        return torch.where(applies, mixed, x)
