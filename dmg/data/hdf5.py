"""Images stored in HDF5 files: PACS's official files and the packed files of ``dmg.commands.prepare``.

A file holds ``images`` and ``labels`` (N,). ``images`` is (N, H, W, 3) uint8 in BGR order (PACS) or RGB
order, or (N,) variable-length byte strings, each an encoded image file (packed DomainNet). A packed file
says which in its ``encoding`` attribute. Files are opened lazily in the process that reads them, so no
HDF5 handle crosses a DataLoader fork and no worker holds more than the item it decodes.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image

from dmg.data.images import BadImageError, DecodedImages, Transform
from dmg.data.lists import shift_labels
from dmg.data.per_domain import PerDomainData, check_decode, check_roles, fill
from dmg.errors import UserError


def _from_bgr(item: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(item[..., ::-1]))


def _from_rgb(item: np.ndarray) -> Image.Image:
    return Image.fromarray(item)


def _from_encoded(item: np.ndarray) -> Image.Image:
    with Image.open(io.BytesIO(item.tobytes())) as image:
        return image.convert("RGB")


DECODERS = {"bgr": _from_bgr, "rgb": _from_rgb, "encoded": _from_encoded}


class HDF5Images(DecodedImages):
    """The items of one HDF5 file; the file is opened on first use in each process."""

    def __init__(
        self,
        path: Path,
        labels: torch.Tensor,
        domain: int,
        transform: Transform,
        encoding: str,
        skip_bad_images: bool = False,
        encoded: bool = False,
    ):
        super().__init__(labels, domain, transform, skip_bad_images, encoded)
        self.path = str(path)
        self.decode = DECODERS[encoding]
        self._images: h5py.Dataset | None = None
        self._pid: int | None = None

    def read(self, index: int) -> Image.Image:
        try:
            return self.decode(self._stored(index))
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise BadImageError(f"cannot decode image {index} of {self.path}: {error}") from None

    def read_encoded(self, index: int) -> torch.Tensor:
        try:
            return torch.from_numpy(self._stored(index))
        except OSError as error:
            raise BadImageError(f"cannot read image {index} of {self.path}: {error}") from None

    def _stored(self, index: int) -> np.ndarray:
        if self._images is None or self._pid != os.getpid():
            self._images, self._pid = h5py.File(self.path, "r")["images"], os.getpid()
        return self._images[index]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None, "_pid": None}


def inspect_hdf5(path: Path, default_encoding: str) -> tuple[np.ndarray, str]:
    """The labels and image encoding of an HDF5 file, after checking that it is complete and well formed."""
    try:
        with h5py.File(path, "r") as file:
            missing = [key for key in ("images", "labels") if key not in file]
            if missing:
                raise UserError(
                    f"HDF5 file {path} lacks the dataset(s) {', '.join(missing)}: expected 'images' and 'labels'"
                )
            images, labels = file["images"], file["labels"][()]
            encoding = str(file.attrs.get("encoding", default_encoding))
            if file.attrs.get("complete", True) is False or len(images) != len(labels):
                raise UserError(f"HDF5 file {path} is incomplete: {len(images)} images, {len(labels)} labels")
            _check_layout(path, images, encoding)
    except OSError as error:
        raise UserError(
            f"cannot read HDF5 file {path} (truncated or not HDF5: {error}); download or create it again"
        ) from None
    return labels, encoding


def _check_layout(path: Path, images: h5py.Dataset, encoding: str) -> None:
    if encoding not in DECODERS:
        raise UserError(f"HDF5 file {path} has image encoding {encoding!r}: expected one of {', '.join(DECODERS)}")
    if encoding != "encoded" and (images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8):
        raise UserError(f"'images' in {path} is {images.dtype} {images.shape}: expected (N, H, W, 3) uint8")


class HDF5Files(PerDomainData):
    """One HDF5 file per (domain, role), named by ``files[role]`` with a ``{domain}`` placeholder.

    ``decode``: ``cpu`` (in the loader's workers) or ``gpu`` (encoded files only: the workers read the bytes).
    """

    def __init__(
        self,
        files: Mapping[str, str],
        domains: Sequence[str],
        num_classes: int,
        train_transform: Transform,
        eval_transform: Transform,
        encoding: str = "rgb",
        first_label: int = 0,
        skip_bad_images: bool = False,
        decode: str = "cpu",
        hint: str = "",
    ):
        super().__init__(num_classes, hint)
        self.domains = list(domains)
        self.files = check_roles(files)
        self.encoded = check_decode(decode)
        self.transforms = {"train": train_transform, "val": eval_transform, "test": eval_transform}
        self.encoding = encoding
        self.first_label = first_label
        self.skip_bad_images = skip_bad_images

    def required_files(self, domains: Mapping[str, Sequence[str]]) -> list[Path]:
        return [fill(self.files[role], name) for name, roles in domains.items() for role in roles]

    def open(self, domain: str, role: str, domain_index: int) -> HDF5Images:
        path = fill(self.files[role], domain)
        raw_labels, encoding = inspect_hdf5(path, self.encoding)
        if len(raw_labels) == 0:
            raise UserError(f"{path} holds no images: domain {domain} has no {role} data")
        labels = shift_labels(raw_labels, self.first_label, self.num_classes, str(path))
        if self.encoded and encoding != "encoded":
            raise UserError(
                f"dataset.decode=gpu needs encoded images, but {path} stores decoded {encoding} pixels: "
                "use dataset.decode=cpu, or pack the images with --pack encoded"
            )
        return HDF5Images(
            path, labels, domain_index, self.transforms[role], encoding, self.skip_bad_images, self.encoded
        )
