"""Tiny datasets written in the official on-disk formats: for the tests and the loader benchmark.

Every writer draws its pixels from ``numpy.random.default_rng(seed)``, so the files are reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from dmg.data.lists import write_split_list


def write_pacs_hdf5(
    root: Path, domains: Sequence[str], counts: dict[str, int], size: int = 227, num_classes: int = 7, seed: int = 0
) -> dict[str, np.ndarray]:
    """PACS's official files ``{domain}_{split}.hdf5``: ``images`` (N, size, size, 3) uint8 BGR, ``labels`` 1..7.

    ``counts`` gives N per split (train, val, test); returns the RGB images written, keyed by file stem.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for domain in domains:
        for split, count in counts.items():
            rgb = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
            with h5py.File(root / f"{domain}_{split}.hdf5", "w") as file:
                file["images"] = rgb[..., ::-1]
                file["labels"] = (np.arange(count) % num_classes + 1).astype(np.float64)  # PACS stores labels as float
            written[f"{domain}_{split}"] = rgb
    return written


def write_image_tree(
    root: Path,
    domains: Sequence[str],
    classes: Sequence[str],
    per_class: int,
    size: int = 16,
    seed: int = 0,
    suffix: str = ".jpg",
    detail: int | None = None,
) -> dict[str, list[tuple[str, int]]]:
    """Images at ``root/{domain}/{class}/{class}_{i}{suffix}``; returns per domain ``(relative path, class index)``.

    Pixels are uniform noise, or with ``detail`` a ``detail`` x ``detail`` random image smoothly upsampled
    (files and decoding costs closer to photos').
    """
    rng = np.random.default_rng(seed)
    entries: dict[str, list[tuple[str, int]]] = {}
    for domain in domains:
        entries[domain] = []
        for label, name in enumerate(classes):
            (root / domain / name).mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                relative = f"{domain}/{name}/{name}_{index:03d}{suffix}"
                _random_image(rng, size, detail).save(root / relative)
                entries[domain].append((relative, label))
    return entries


def _random_image(rng: np.random.Generator, size: int, detail: int | None) -> Image.Image:
    if detail is None:
        return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    coarse = Image.fromarray(rng.integers(0, 256, (detail, detail, 3), dtype=np.uint8))
    return coarse.resize((size, size), Image.Resampling.BICUBIC)


def write_list(path: Path, entries: Sequence[tuple[str, int]], first_label: int = 0) -> None:
    """An official split list: ``relative/path label`` lines, labels counted from ``first_label``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_split_list(path, [name for name, _ in entries], [label + first_label for _, label in entries])


def write_pacs_kfold(
    root: Path,
    domains: Sequence[str],
    classes: Sequence[str],
    per_class: int = 3,
    size: int = 16,
    detail: int | None = None,
) -> None:
    """PACS's official images ``root/kfold/{domain}/{class}/*`` and lists ``{domain}_{train,crossval,test}_kfold.txt``.

    Per class, the first image goes to crossval and the rest to train; test lists the whole domain (labels 1..7).
    """
    entries = write_image_tree(root / "kfold", domains, classes, per_class, size, detail=detail)
    for domain, items in entries.items():
        val = items[::per_class]
        write_list(root / f"{domain}_crossval_kfold.txt", val, 1)
        write_list(root / f"{domain}_train_kfold.txt", [item for item in items if item not in val], 1)
        write_list(root / f"{domain}_test_kfold.txt", items, 1)


def write_domainnet(
    root: Path, domains: Sequence[str], classes: Sequence[str], per_class: int = 4, size: int = 16
) -> None:
    """DomainNet's tree ``root/{domain}/{class}/*`` and official lists ``{domain}_{train,test}.txt`` (labels 0-based).

    Per class, the last image goes to test, the rest to train.
    """
    entries = write_image_tree(root, domains, classes, per_class, size)
    for domain, items in entries.items():
        test = items[per_class - 1 :: per_class]
        write_list(root / f"{domain}_test.txt", test)
        write_list(root / f"{domain}_train.txt", [item for item in items if item not in test])
