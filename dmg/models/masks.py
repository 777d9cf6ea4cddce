"""Domain-specific masks over layer inputs (DMG, Chattopadhyay et al., ECCV 2020, Sec. 3).

Each masked layer ``l`` has one logit per source domain and input unit, ``s[l]`` of shape
(domains, units); ``p = sigmoid(s)`` is the probability of keeping a unit. Units are features for a 2-D
input; for a 4-D input they are channels (``granularity="channel"``, the mask is broadcast over H x W) or
single activations (``granularity="element"``, C x H x W units: the reference code's default,
``POLICY_CONV_MODE: False``). All domains are handled at once by indexing with the batch's domain-index tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from dmg.engine import distributed
from dmg.errors import UserError
from dmg.models.staged import StagedNetwork

MaskInit = Callable[[torch.Tensor], torch.Tensor]


def sample_straight_through(p: torch.Tensor) -> torch.Tensor:
    """Training: a hard Bernoulli sample whose gradient flows to ``p`` (straight-through estimator).

    Drawn as ``uniform < p`` rather than ``torch.bernoulli``, which asserts on the GPU when ``p`` is NaN: a
    diverged run then ends with the training loop's clear error, not a device-side assert. ``p`` has one row per
    sample of the batch.
    """
    hard = (distributed.rand_rows_like(p) < p).to(p.dtype)  # under DDP: this rank's rows of the batch's draws
    return hard + p - p.detach()


def greedy(p: torch.Tensor) -> torch.Tensor:
    """In-domain evaluation: keep exactly the units more likely kept than dropped."""
    return (p > 0.5).to(p.dtype)


def soft(p: torch.Tensor) -> torch.Tensor:
    """Out-of-domain evaluation ("softscale"): scale each unit by its keep-probability."""
    return p


MASK_MODES = {"sample": sample_straight_through, "greedy": greedy, "soft": soft}
GRANULARITIES = ("channel", "element")


class DomainMask(nn.Module):
    """The masks of one layer for every source domain: logits of shape (domains, units).

    ``unit_shape`` is how the units lie on the layer's input: ``(C,)`` for features or channels, ``(C, H, W)``
    for single activations.
    """

    def __init__(self, num_domains: int, units: int | Sequence[int], init: MaskInit):
        super().__init__()
        self.unit_shape = (units,) if isinstance(units, int) else tuple(units)
        self.logits = nn.Parameter(torch.empty(num_domains, math.prod(self.unit_shape)))
        with torch.no_grad():
            init(self.logits)

    def probabilities(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    def forward(self, x: torch.Tensor, d: torch.Tensor | None, mode: str) -> torch.Tensor:
        """``x`` (B, units[, H, W]) times the mask of each sample's domain ``d`` (B,); ``d=None`` uses the mean mask."""
        p = self.probabilities()  # fp32, whatever the autocast precision
        keep = MASK_MODES[mode](p[d] if d is not None else p.mean(0, keepdim=True))  # (B or 1, units)
        return x * keep.view(len(keep), *self.unit_shape, *(1,) * (x.dim() - 1 - len(self.unit_shape))).to(x.dtype)


class MaskedNetwork(nn.Module):
    """A :class:`StagedNetwork` whose chosen layers see their input multiplied by a per-domain mask."""

    def __init__(
        self,
        network: StagedNetwork,
        layers: Sequence[str],
        num_domains: int,
        init: MaskInit,
        input_shape: Sequence[int],
        granularity: str = "channel",
    ):
        super().__init__()
        if not layers or len(set(layers)) != len(layers):
            raise UserError(f"backbone.mask_layers must name distinct layers, at least one; got {list(layers)}")
        if granularity not in GRANULARITIES:
            raise UserError(f"mask.granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
        self.network = network
        self.num_domains = num_domains
        self.layers = sorted(layers, key=network.index)
        shapes = network.stage_input_shapes(input_shape)
        self.masks = nn.ModuleDict(
            {_key(name): DomainMask(num_domains, _units(name, shapes[name], granularity), init) for name in self.layers}
        )
        self.first_masked = network.index(self.layers[0])

    def probabilities(self) -> dict[str, torch.Tensor]:
        """Keep-probabilities (domains, units) of every masked layer, by layer name."""
        return {name: self.masks[_key(name)].probabilities() for name in self.layers}

    def forward(self, x: torch.Tensor, d: torch.Tensor | None, mode: str) -> torch.Tensor:
        """Logits with each sample's own domain mask (``d`` given) or the mean mask over domains (``d=None``)."""
        return self.network.run(x, before=self._masker(d, mode))

    def forward_ensemble(self, x: torch.Tensor) -> torch.Tensor:
        """Out-of-domain logits: the mean over source domains of the network run with that domain's soft mask.

        The stages before the first masked layer do not depend on the domain, so they run once; the rest
        runs on the trunk output repeated once per domain, as one batch of (domains x B) samples.
        """
        trunk = self.network.run(x, stop=self.first_masked)  # (B, ...)
        batch = trunk.shape[0]
        repeated = trunk.repeat(self.num_domains, *(1,) * (trunk.dim() - 1))  # (D*B, ...), domain-major
        domains = torch.arange(self.num_domains, device=x.device).repeat_interleave(batch)  # (D*B,)
        logits = self.network.run(repeated, start=self.first_masked, before=self._masker(domains, "soft"))
        return logits.view(self.num_domains, batch, -1).mean(0)  # (B, classes)

    def _masker(self, d: torch.Tensor | None, mode: str):
        def mask_input(name: str, x: torch.Tensor) -> torch.Tensor:
            key = _key(name)
            return self.masks[key](x, d, mode) if key in self.masks else x

        return mask_input


def _key(layer: str) -> str:
    return layer.replace(".", "_")


def _units(layer: str, shape: torch.Size, granularity: str) -> tuple[int, ...]:
    """The mask's unit shape for a layer input of ``shape`` (batch first)."""
    if len(shape) not in (2, 4):
        raise UserError(
            f"cannot mask layer {layer!r}: its input has shape {tuple(shape[1:])}, expected (C,) or (C, H, W)"
        )
    return tuple(shape[1:]) if granularity == "element" else (shape[1],)


def soft_iou(p: torch.Tensor) -> torch.Tensor:
    """Pairwise soft IoU of the rows of ``p`` (domains, units): ``(sum a*b + 1e-6) / (sum a+b-a*b + 1e-6)``.

    Always in fp32: autocast would run the product in half precision.
    """
    with torch.autocast(p.device.type, enabled=False):
        return _soft_iou(p.float())


def _soft_iou(p: torch.Tensor) -> torch.Tensor:
    intersection = p @ p.T  # (D, D)
    totals = p.sum(1)
    union = totals[:, None] + totals[None, :] - intersection
    return (intersection + 1e-6) / (union + 1e-6)


def mean_over_pairs(matrix: torch.Tensor) -> torch.Tensor:
    """Mean of the entries above the diagonal (each domain pair once); 0 for a single domain."""
    rows, cols = torch.triu_indices(*matrix.shape, offset=1, device=matrix.device)
    return matrix[rows, cols].mean() if len(rows) else matrix.new_zeros(())
