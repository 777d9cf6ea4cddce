"""Feature alignment between source domains: Deep CORAL and MMD, as in DomainBed's ``AbstractMMD``.

Both minimise the mean of the domains' risks plus ``penalty_weight`` times the mean, over pairs of source
domains in the batch, of a distance between the two domains' features (the classifier's input).

- CORAL (Sun & Saenko, ECCV-W 2016): ``mean((mu_i - mu_j)^2) + mean((C_i - C_j)^2)``, feature means and
  covariances (normalised by n - 1) of each domain.
- MMD (Li et al., CVPR 2018): ``mean K(a, a') + mean K(b, b') - 2 mean K(a, b)`` with the Gaussian mixture kernel
  ``K(a, b) = sum_g exp(-g * |a - b|^2)`` over DomainBed's bandwidths.

``forward=per_domain`` (the default) computes the features with one network call per source domain, as DomainBed
does, so BatchNorm normalises each domain with its own statistics; ``forward=joint`` makes one call on the whole
batch (faster; see :mod:`dmg.methods.domain_passes`). The penalties are exact either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dmg.engine.compute import in_fp32
from dmg.engine.distributed import gather_batch
from dmg.errors import check_number
from dmg.methods import by_domain
from dmg.methods.aggregate import Aggregate
from dmg.methods.domain_passes import check_forward, domain_forward

DOMAINBED_GAMMAS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


class FeatureAlignment(Aggregate):
    """Mean domain risk + ``penalty_weight`` x mean over domain pairs of ``distances`` between their features."""

    min_samples = 1  # a domain joins the penalty with at least this many samples in the batch

    def __init__(self, *args, penalty_weight: float = 1.0, forward: str = "per_domain", **kwargs):
        super().__init__(*args, **kwargs)
        check_number("penalty_weight", penalty_weight, least=0)
        self.penalty_weight = penalty_weight
        self.forward_mode = check_forward(forward)

    def distances(self, features: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """(domains, domains) distances between the feature distributions of every pair of domains (in fp32)."""
        raise NotImplementedError

    def objective(self, x, y, d):
        per_domain = domain_forward(self.network.features, x, y, d, self.num_domains, self.forward_mode)
        features, y, d = gather_batch(*per_domain)  # (B, F): the global batch under DDP
        logits = self.network.classifier(features)
        n = by_domain.counts(d, self.num_domains)
        ce = by_domain.mean_over(by_domain.risks(logits, y, d, self.num_domains), n > 0)
        penalty = by_domain.mean_over_pairs(self.distances(features, d), n >= self.min_samples)
        return {"loss": ce + self.penalty_weight * penalty, "ce": ce, "penalty": penalty}


class CORAL(FeatureAlignment):
    """Deep CORAL: align the feature means and covariances of every pair of source domains."""

    min_samples = 2  # a covariance needs two samples

    @in_fp32
    def distances(self, features, d):
        n = by_domain.counts(d, self.num_domains)
        mean = by_domain.means(features, d, self.num_domains)  # (D, F)
        centred = features - mean[d]
        one_hot = by_domain.one_hot(d, self.num_domains, features.dtype)  # (B, D)
        scatter = torch.einsum("bd,bf,bg->dfg", one_hot, centred, centred)
        covariance = scatter / (n - 1).clamp_min(1).to(features.dtype)[:, None, None]  # (D, F, F)
        rows, cols = torch.triu_indices(self.num_domains, self.num_domains, offset=1, device=features.device)
        pairs = (mean[rows] - mean[cols]).pow(2).mean(1) + (covariance[rows] - covariance[cols]).pow(2).mean((1, 2))
        return features.new_zeros(self.num_domains, self.num_domains).index_put((rows, cols), pairs)


class MMD(FeatureAlignment):
    """Maximum mean discrepancy with a mixture of Gaussian kernels between every pair of source domains."""

    def __init__(self, *args, kernel_gammas: Sequence[float] = DOMAINBED_GAMMAS, **kwargs):
        super().__init__(*args, **kwargs)
        for gamma in kernel_gammas:
            check_number("kernel_gammas", gamma, above=0)
        self.kernel_gammas = [float(gamma) for gamma in kernel_gammas]
        # on the model's device: made from Python floats at every step, it would be a blocking copy from the host
        # float64: cast to the features' dtype at use, so each gamma is as exact as that dtype allows
        self.register_buffer("gammas", torch.tensor(self.kernel_gammas, dtype=torch.float64), persistent=False)

    @in_fp32
    def distances(self, features, d):
        squared = features.pow(2).sum(1, keepdim=True)  # (B, 1)
        distance = (squared.T - 2 * features @ features.T + squared).clamp_min(1e-30)  # (B, B), as DomainBed
        kernel = torch.exp(-self.gammas.to(features.dtype)[:, None, None] * distance).sum(0)  # (B, B)
        one_hot = by_domain.one_hot(d, self.num_domains, features.dtype)  # (B, D)
        n = by_domain.counts(d, self.num_domains).clamp_min(1).to(features.dtype)
        block = one_hot.T @ kernel @ one_hot / (n[:, None] * n[None, :])  # (D, D): mean kernel between domains
        within = block.diagonal()
        return within[:, None] + within[None, :] - 2 * block
