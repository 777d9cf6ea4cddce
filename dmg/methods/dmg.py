"""Domain-specific Masks for Generalization (Chattopadhyay, Balaji, Hoffman, ECCV 2020).

Every source domain learns a stochastic mask over the inputs of chosen layers. Training samples a hard
mask per sample from its domain's keep-probabilities (straight-through gradient, Sec. 3.2); an overlap
penalty (soft IoU between domains' masks) pushes domains toward specific units, an optional sparsity
penalty toward fewer units. In-domain prediction uses the domain's thresholded mask, out-of-domain
prediction averages the logits of the network run with each source's soft mask (Sec. 3.3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dmg.errors import check_number
from dmg.methods.base import Method, OptimizerFactory, SchedulerFactory, init_classifier
from dmg.models.masks import MaskedNetwork, MaskInit, greedy, mean_over_pairs, soft_iou
from dmg.models.staged import StagedNetwork

OUT_OF_DOMAIN_MODES = ("ensemble", "avg_mask")


class DMG(Method):
    """A network with per-domain masks on ``mask_layers``, trained with two optimisers (network, masks).

    ``schedule_masks``: the learning-rate schedule also drives the mask optimiser (the reference does so for its
    per-iteration DomainNet schedule, not for PACS's per-epoch one). ``mask_granularity``: ``channel`` (one mask
    entry per channel of a 4-D layer input) or ``element`` (one per activation, C x H x W: the reference's
    ``POLICY_CONV_MODE: False``).
    """

    def __init__(
        self,
        network: StagedNetwork,
        domains: Sequence[str],
        mask_layers: Sequence[str],
        mask_init: MaskInit,
        input_shape: Sequence[int],
        optimizer: OptimizerFactory,
        mask_optimizer: OptimizerFactory,
        overlap_lambda: float = 0.1,
        sparsity_lambda: float = 0.0,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        schedule_masks: bool = False,
        classifier_init_std: float | None = None,
        ood_mode: str = "ensemble",
        mask_granularity: str = "channel",
    ):
        super().__init__(scheduler, scheduler_interval)
        check_number("overlap_lambda", overlap_lambda, least=0)
        check_number("sparsity_lambda", sparsity_lambda, least=0)
        if ood_mode not in OUT_OF_DOMAIN_MODES:
            raise ValueError(f"ood_mode must be one of {', '.join(OUT_OF_DOMAIN_MODES)}, got {ood_mode!r}")
        init_classifier(network.classifier, classifier_init_std)
        self.domains = list(domains)
        self.masked = MaskedNetwork(network, mask_layers, len(self.domains), mask_init, input_shape, mask_granularity)
        self.overlap_lambda = overlap_lambda
        self.sparsity_lambda = sparsity_lambda
        self.ood_mode = ood_mode
        self.configure_optimizers(
            {"network": (optimizer, network.parameters()), "masks": (mask_optimizer, self.masked.masks.parameters())},
            scheduled=("network", "masks") if schedule_masks else ("network",),
        )

    def train(self, mode: bool = True):
        """Dropout stays in eval mode during DMG training: the masks take its place."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.eval()
        return self

    def objective(self, x, y, d):
        ce = F.cross_entropy(self.masked(x, d, "sample"), y)
        probabilities = self.masked.probabilities().values()
        overlap = sum(mean_over_pairs(soft_iou(p)) for p in probabilities)
        sparsity = sum(p.sum() for p in probabilities)
        loss = ce + self.overlap_lambda * overlap + self.sparsity_lambda * sparsity
        return {"loss": loss, "ce": ce, "overlap": overlap, "sparsity": sparsity}

    def predict(self, x: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
        if d is not None:
            return self.masked(x, d, "greedy")
        return self.masked.forward_ensemble(x) if self.ood_mode == "ensemble" else self.masked(x, None, "soft")

    @torch.no_grad()
    def mask_overlaps(self) -> dict[str, torch.Tensor]:
        """IoU of the thresholded masks (p > 0.5) for every pair of domains, per layer: (domains, domains)."""
        return {name: _hard_iou(greedy(p)) for name, p in self.masked.probabilities().items()}

    @torch.no_grad()
    def epoch_metrics(self) -> dict[str, float]:
        metrics = {}
        for name, iou in self.mask_overlaps().items():
            metrics[f"mask/{name}/iou_mean"] = mean_over_pairs(iou).item()
            for i, j in zip(*torch.triu_indices(*iou.shape, offset=1).tolist()):
                metrics[f"mask/{name}/iou/{self.domains[i]}-{self.domains[j]}"] = iou[i, j].item()
        for name, p in self.masked.probabilities().items():
            for domain, fraction in zip(self.domains, greedy(p).mean(1).tolist()):
                metrics[f"mask/{name}/active/{domain}"] = fraction
        return metrics


def _hard_iou(masks: torch.Tensor) -> torch.Tensor:
    """Exact IoU of binary masks (domains, units); two empty masks count as identical."""
    intersection = masks @ masks.T
    totals = masks.sum(1)
    union = totals[:, None] + totals[None, :] - intersection
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))
