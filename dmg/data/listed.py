"""Image trees with split list files: PACS's official ``kfold`` images, DomainNet's image tree."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from dmg.data.images import ImageFiles, Transform
from dmg.data.lists import read_split_list, shift_labels
from dmg.data.per_domain import PerDomainData, check_decode, check_roles, fill
from dmg.errors import UserError


class ListedImages(PerDomainData):
    """Images under ``images_root`` named by one list file per (domain, role) (``files[role]``, with ``{domain}``).

    List lines read ``domain/class/file label``; labels start at ``first_label`` (PACS 1, DomainNet 0).
    ``decode``: ``cpu`` (in the loader's workers) or ``gpu`` (the workers only read the files' bytes).
    """

    def __init__(
        self,
        images_root: str,
        files: Mapping[str, str],
        domains: Sequence[str],
        num_classes: int,
        train_transform: Transform,
        eval_transform: Transform,
        first_label: int = 0,
        skip_bad_images: bool = False,
        decode: str = "cpu",
        hint: str = "",
    ):
        super().__init__(num_classes, hint)
        self.domains = list(domains)
        self.images_root = Path(os.path.expanduser(images_root))
        self.files = check_roles(files)
        self.transforms = {"train": train_transform, "val": eval_transform, "test": eval_transform}
        self.first_label = first_label
        self.skip_bad_images = skip_bad_images
        self.encoded = check_decode(decode)

    def required_files(self, domains: Mapping[str, Sequence[str]]) -> list[Path]:
        lists = [fill(self.files[role], name) for name, roles in domains.items() for role in roles]
        return [self.images_root, *lists]

    def open(self, domain: str, role: str, domain_index: int) -> ImageFiles:
        path = fill(self.files[role], domain)
        names, raw_labels = read_split_list(path)
        if not names:
            raise UserError(f"split file {path} lists no images: domain {domain} has no {role} data")
        labels = shift_labels(raw_labels, self.first_label, self.num_classes, str(path))
        paths = [str(self.images_root / name) for name in names]
        return ImageFiles(paths, labels, domain_index, self.transforms[role], self.skip_bad_images, self.encoded)
