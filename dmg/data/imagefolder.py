"""DomainBed's layout for any multi-domain dataset: ``{root}/{domain}/{class}/{image}`` (OfficeHome, VLCS, ...).

There are no official splits: each source domain is split by a seeded random holdout (in-domain
validation), and a target domain is evaluated whole.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from dmg.data.domains import split_indices
from dmg.data.images import ImageFiles, Transform
from dmg.data.per_domain import PerDomainData, check_decode
from dmg.errors import UserError

Samples = tuple[list[str], torch.Tensor]


class ImageFolderDomains(PerDomainData):
    """One folder per domain, one subfolder per class; class folders must be the same in every domain.

    ``domains``: a list of folder names, a ``{name: folder}`` mapping (for folders such as ``Real World``),
    or null to take every subfolder of ``root`` in sorted order. ``decode``: ``cpu`` (in the loader's
    workers) or ``gpu`` (the workers only read the files' bytes).
    """

    def __init__(
        self,
        root: str,
        domains: Sequence[str] | Mapping[str, str] | None,
        num_classes: int,
        train_transform: Transform,
        eval_transform: Transform,
        holdout_fraction: float = 0.2,
        split_seed: int = 0,
        skip_bad_images: bool = False,
        decode: str = "cpu",
        hint: str = "",
    ):
        self.root = Path(os.path.expanduser(root))
        self._folders = (
            dict(domains) if isinstance(domains, Mapping) else None if domains is None else {d: d for d in domains}
        )
        super().__init__(num_classes, hint)
        self.transforms = {"train": train_transform, "val": eval_transform, "test": eval_transform}
        self.holdout_fraction = holdout_fraction
        self.split_seed = split_seed
        self.skip_bad_images = skip_bad_images
        self.encoded = check_decode(decode)

    @cached_property
    def folders(self) -> dict[str, Path]:
        """Domain name -> folder; read from disk only when the domains were not configured."""
        if not self.root.is_dir():
            raise UserError(self._not_found(f"data folder {self.root}"))
        names = self._folders or {
            entry.name: entry.name for entry in sorted(os.scandir(self.root), key=lambda e: e.name) if entry.is_dir()
        }
        return {name: self.root / folder for name, folder in names.items()}

    @property
    def domains(self) -> list[str]:
        return list(self._folders or self.folders)

    @cached_property
    def samples(self) -> dict[str, Samples]:
        """Every domain's image paths and class indices; class folders are checked to agree across domains."""
        missing = [str(folder) for folder in self.folders.values() if not folder.is_dir()]
        if missing:
            raise UserError(self._not_found(f"domain folder(s) {', '.join(missing)}"))
        classes = {name: _class_folders(folder) for name, folder in self.folders.items()}
        empty = [str(self.folders[name]) for name, found in classes.items() if not found]
        if empty:
            raise UserError(
                f"domain folder(s) {', '.join(empty)} hold no class folders: expected <domain>/<class>/<image>"
            )
        reference, expected = next(iter(classes.items()))
        for name, found in classes.items():
            _check_same_classes(reference, expected, name, found)
        if len(expected) != self.num_classes:
            raise UserError(
                f"{self.root} has {len(expected)} class folders but dataset.num_classes is {self.num_classes}: set dataset.num_classes={len(expected)}"
            )
        return {name: _scan(folder, expected) for name, folder in self.folders.items()}

    def required_files(self, domains: Mapping[str, Sequence[str]]) -> list[Path]:
        return [self.folders[name] for name in domains]

    def open(self, domain: str, role: str, domain_index: int) -> ImageFiles:
        paths, labels = self.samples[domain]
        if not paths:
            raise UserError(
                f"domain folder {self.folders[domain]} holds no images (extensions {', '.join(IMG_EXTENSIONS)})"
            )
        keep = torch.arange(len(paths)) if role == "test" else self.holdout(domain, len(paths))[role == "val"]
        chosen = [paths[index] for index in keep.tolist()]
        return ImageFiles(chosen, labels[keep], domain_index, self.transforms[role], self.skip_bad_images, self.encoded)

    def holdout(self, domain: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(train, val)`` indices of a domain: a function of ``split_seed`` and the domain's name only."""
        seed = zlib.crc32(f"{self.split_seed}:{domain}".encode())  # 32 bits: torch keeps no more
        return split_indices(count, self.holdout_fraction, torch.Generator().manual_seed(seed))

    def _not_found(self, what: str) -> str:
        return f"{what} not found: expected {self.root}/<domain>/<class>/<image>; {self.hint}".rstrip("; ")


def _class_folders(folder: Path) -> list[str]:
    try:
        return find_classes(str(folder))[0]
    except FileNotFoundError:
        return []


def _check_same_classes(reference: str, expected: list[str], name: str, found: list[str]) -> None:
    if found == expected:
        return
    lacks, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    raise UserError(
        f"class folders differ between domains: {name} lacks {lacks or 'none'} and has extra {extra or 'none'} "
        f"compared with {reference}; every domain needs the same class folders"
    )


def _scan(folder: Path, classes: list[str]) -> Samples:
    """Image files under each class folder (recursively, sorted), with their class index."""
    items = make_dataset(
        str(folder), {name: index for index, name in enumerate(classes)}, IMG_EXTENSIONS, allow_empty=True
    )
    return [path for path, _ in items], torch.tensor([label for _, label in items], dtype=torch.long)
