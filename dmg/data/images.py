"""Datasets that decode one image per item (from files or HDF5), with an optional skip for undecodable images."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dmg.errors import UserError

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image], torch.Tensor]


class BadImageError(UserError):
    """An image that cannot be read or decoded; the message names it."""

    def __init__(self, message: str):
        # A DataLoader worker's exception is re-raised as ``type(error)(traceback text)``: keep only the original line.
        super().__init__(message.rstrip().rsplit(f"{type(self).__name__}: ", 1)[-1])


def read_image(path: str) -> Image.Image:
    """An image file as RGB; an unreadable or undecodable file raises :class:`BadImageError` naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise BadImageError(f"cannot decode image {path}: {error}") from None


class DecodedImages(Dataset):
    """Yields ``(transform(image), label, domain)``; subclasses say how item ``i`` is decoded.

    With ``skip_bad_images`` an undecodable item is replaced by the next decodable one (its own label
    comes along), and a warning names the file and counts the skips of this process. With ``encoded`` the
    item is the image file's bytes as a uint8 tensor, to be decoded and transformed later on the device
    (``dataset.decode=gpu``, :mod:`dmg.data.decode`).
    """

    def __init__(
        self,
        labels: torch.Tensor,
        domain: int,
        transform: Transform,
        skip_bad_images: bool = False,
        encoded: bool = False,
    ):
        self.labels = labels
        self.domain = domain
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.encoded = encoded
        self.skipped = 0

    def read(self, index: int) -> Image.Image:
        """Item ``index`` as an RGB PIL image; raises :class:`BadImageError`."""
        raise NotImplementedError

    def read_encoded(self, index: int) -> torch.Tensor:
        """Item ``index`` as the bytes of its image file (1-D uint8); raises :class:`BadImageError`."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        for offset in range(len(self)):
            item = (index + offset) % len(self)
            try:
                image = self.read_encoded(item) if self.encoded else self.read(item)
            except BadImageError as error:
                if not self.skip_bad_images:
                    raise
                self.skipped += 1
                log.warning("skipping %s (%d skipped so far in this process)", error, self.skipped)
                continue
            return (image if self.encoded else self.transform(image)), self.labels[item], self.domain
        raise UserError(f"none of the {len(self)} images of this dataset could be decoded")


class ImageFiles(DecodedImages):
    """Images stored as files, one path per item."""

    def __init__(
        self,
        paths: Sequence[str],
        labels: torch.Tensor,
        domain: int,
        transform: Transform,
        skip_bad_images: bool = False,
        encoded: bool = False,
    ):
        super().__init__(labels, domain, transform, skip_bad_images, encoded)
        self.paths = np.array(paths)  # one numpy array, not a list of str: workers do not copy it page by page

    def read(self, index: int) -> Image.Image:
        return read_image(str(self.paths[index]))

    def read_encoded(self, index: int) -> torch.Tensor:
        path = str(self.paths[index])
        try:
            with open(path, "rb") as file:
                return torch.frombuffer(bytearray(file.read()), dtype=torch.uint8)
        except OSError as error:
            raise BadImageError(f"cannot read image {path}: {error}") from None
