"""Datasets stored per (domain, split): the protocol shared by every file format.

Sources contribute their ``train`` data (pooled) and their ``val`` data (in-domain evaluation); each
target contributes its ``test`` data (out-of-domain evaluation). A format only says how one
``(domain, role)`` is opened.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from torch.utils.data import ConcatDataset, Dataset

from dmg.data.domains import TARGET_DOMAIN_INDEX, DomainSplits
from dmg.errors import UserError

ROLES = ("train", "val", "test")
DECODE_MODES = ("cpu", "gpu")


class PerDomainData:
    """A multi-domain dataset whose parts are opened per ``(domain, role)``; roles are train, val, test."""

    domains: list[str]  # the dataset's domain names, in order

    def __init__(self, num_classes: int, hint: str = ""):
        self.num_classes = num_classes
        self.hint = hint  # how to obtain the data: ends every "not found" message

    def open(self, domain: str, role: str, domain_index: int) -> Dataset:
        """The ``role`` data of ``domain``, yielding ``(x, y, domain_index)``."""
        raise NotImplementedError

    def required_files(self, domains: Mapping[str, Sequence[str]]) -> list[Path]:
        """The files that must exist for these ``{domain: roles}``; checked before anything is read."""
        return []

    def build(self, sources: Sequence[str], targets: Sequence[str]) -> DomainSplits:
        """Sources' train (pooled) and val, targets' test: the paper's protocol."""
        self.check_files({**{name: ("train", "val") for name in sources}, **{name: ("test",) for name in targets}})
        train = ConcatDataset([self.open(name, "train", index) for index, name in enumerate(sources)])
        val = {name: self.open(name, "val", index) for index, name in enumerate(sources)}
        test = {name: self.open(name, "test", TARGET_DOMAIN_INDEX) for name in targets}
        return DomainSplits(list(sources), list(targets), self.num_classes, train, val, test)

    def check_files(self, domains: Mapping[str, Sequence[str]]) -> None:
        """One error listing every missing file, before any of them is opened."""
        missing = [path for path in self.required_files(domains) if not path.exists()]
        if not missing:
            return
        folder = Path(os.path.commonpath([str(path.parent) for path in missing]))
        names = [str(path.relative_to(folder)) for path in missing]
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        what = "not found: expected" if not folder.exists() else "lacks"
        raise UserError(f"folder {folder} {what} {shown}; {self.hint}".rstrip("; "))


def fill(template: str, domain: str) -> Path:
    """The path a template with a ``{domain}`` placeholder (and perhaps ``~``) names for ``domain``."""
    return Path(os.path.expanduser(template.format(domain=domain)))


def check_roles(files: Mapping[str, str]) -> dict[str, str]:
    """A ``{role: template}`` mapping with exactly the roles train, val and test."""
    if set(files) != set(ROLES):
        raise UserError(f"split files must be given for the roles {', '.join(ROLES)}, got {', '.join(files)}")
    return dict(files)


def check_decode(decode: str) -> bool:
    """Whether images stay encoded until the device decodes them (``dataset.decode=gpu``)."""
    if decode not in DECODE_MODES:
        raise UserError(f"dataset.decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    return decode == "gpu"


def choose(format: str, **formats: Callable[[], PerDomainData]) -> PerDomainData:
    """The dataset reader for ``format`` among ``formats`` (each a ``_partial_`` config)."""
    if format not in formats:
        raise UserError(f"unknown dataset.format {format!r}: expected one of {', '.join(formats)}")
    return formats[format]()
