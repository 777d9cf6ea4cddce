"""Split list files (``relative/path label`` per line) and label checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dmg.errors import UserError


def read_split_list(path: Path) -> tuple[list[str], torch.Tensor]:
    """The ``(relative paths, labels)`` of a list file whose lines read ``domain/class/file label``."""
    if not path.is_file():
        raise UserError(f"split file {path} not found")
    paths, labels = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.rsplit(maxsplit=1)
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            raise UserError(f"line {number} of {path} reads {line!r}: expected 'relative/path/to/image integer-label'")
        paths.append(fields[0])
        labels.append(int(fields[1]))
    return paths, torch.tensor(labels, dtype=torch.long)


def write_split_list(path: Path, paths: list[str], labels: list[int]) -> None:
    """Write a list file in the official format, atomically (a crash leaves no half-written list)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(f"{name} {label}\n" for name, label in zip(paths, labels)))
    partial.replace(path)


def shift_labels(labels: np.ndarray | torch.Tensor, first_label: int, num_classes: int, where: str) -> torch.Tensor:
    """Labels ``first_label .. first_label + num_classes - 1`` as class indices ``0 .. num_classes - 1``."""
    values = torch.as_tensor(np.asarray(labels)).flatten()
    if values.is_floating_point() and not torch.equal(values, values.round()):
        raise UserError(f"labels in {where} are not whole numbers")
    values = values.long() - first_label
    bad = (values < 0) | (values >= num_classes)
    if bad.any():
        found = int(values[bad][0]) + first_label
        raise UserError(
            f"label {found} in {where} is outside the class range "
            f"{first_label}..{first_label + num_classes - 1} ({num_classes} classes)"
        )
    return values
