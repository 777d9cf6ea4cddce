"""Decoding image batches on the training device (``dataset.decode=gpu``): JPEG through nvJPEG on a GPU.

The loader's workers then only read each image's bytes; the batch crosses to the device encoded, is decoded
there, and each image goes through the same per-image transform as on the CPU path, seeded by the same
per-sample seed, so it gets the same crop and flip. Everything but the decode call runs on the CPU too
(``torchvision.io.decode_jpeg`` decodes on either device), which is how the tests check it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from dmg.data.images import BadImageError
from dmg.data.seeding import with_seed

JPEG_MAGIC = (0xFF, 0xD8, 0xFF)

ImageTransform = Callable[[torch.Tensor], torch.Tensor]


def collate_encoded(items: Sequence[tuple[torch.Tensor, int, int, int]]):
    """``(bytes of each image (list), labels (B,), domains (B,), per-sample seeds (list))``."""
    data, labels, domains, seeds = zip(*items)
    return list(data), torch.as_tensor(labels), torch.as_tensor(domains), list(seeds)


def is_jpeg(data: torch.Tensor) -> bool:
    return len(data) >= 3 and tuple(data[:3].tolist()) == JPEG_MAGIC


def decode_images(data: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Each encoded image as RGB uint8 (3, H, W) on ``device``: JPEGs in one batched call on that device,
    other formats (PNG, ...) on the CPU, then moved."""
    jpegs = [index for index, item in enumerate(data) if is_jpeg(item)]
    images: list[torch.Tensor | None] = [None] * len(data)
    if jpegs:
        try:
            decoded = decode_jpeg([data[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = [_decode_one(data[i], i, lambda d: decode_jpeg(d, ImageReadMode.RGB, device)) for i in jpegs]
        for index, image in zip(jpegs, decoded):
            images[index] = image
    for index, item in enumerate(data):
        if images[index] is None:
            images[index] = _decode_one(item, index, lambda d: decode_image(d, ImageReadMode.RGB)).to(device)
    return images


def _decode_one(data: torch.Tensor, index: int, decode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    try:
        return decode(data)
    except RuntimeError as error:
        raise BadImageError(
            f"cannot decode image {index} of a batch on the device ({error}); dataset.decode=cpu names the file"
        ) from None


class EncodedBatchDecoder:
    """Decodes a batch on the device and applies ``transform`` to each image under its sample's seed.

    ``transform`` is the dataset's per-image transform (the one the workers apply on the CPU path), so each
    image gets the crop and flip it would get there. Images differ in size, so the transform runs per image.
    """

    def __init__(self, transform: ImageTransform):
        self.transform = transform

    def __call__(self, data: Sequence[torch.Tensor], seeds: Sequence[int], device: torch.device) -> torch.Tensor:
        images = decode_images(data, device)
        return torch.stack([with_seed(seed, self.transform, image) for image, seed in zip(images, seeds)])
