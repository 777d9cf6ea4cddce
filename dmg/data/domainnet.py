"""DomainNet preparation: the paper's deterministic 90/10 train/val split of each official train list.

The split is a pure function of ``(seed, image path)``: each image's rank is the SHA-256 digest of
``"{seed}:{path}"``, and within every class the lowest-ranked ``round(fraction * n)`` images form the
validation set. It does not depend on the order of the list, the file system, Python's ``hash`` or the
torch version, so every machine derives the same split.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from dmg.data.lists import read_split_list, write_split_list
from dmg.errors import UserError

Entries = list[tuple[str, int]]


def split_train_list(entries: Entries, val_fraction: float, seed: int) -> tuple[Entries, Entries]:
    """``(train, val)`` of an official train list, stratified by class; both keep the list's order."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"validation fraction must be strictly between 0 and 1, got {val_fraction}")
    by_class: dict[int, list[str]] = defaultdict(list)
    for path, label in entries:
        by_class[label].append(path)
    val_paths = set()
    for paths in by_class.values():
        ranked = sorted(paths, key=lambda path: hashlib.sha256(f"{seed}:{path}".encode()).digest())
        val_paths.update(ranked[: round(val_fraction * len(ranked))])
    return [e for e in entries if e[0] not in val_paths], [e for e in entries if e[0] in val_paths]


def prepare_splits(
    root: Path, split_dir: Path, domains: Sequence[str], val_fraction: float = 0.1, seed: int = 0
) -> dict[str, dict[str, int]]:
    """Write ``split_dir/{domain}_{train,val,test}.txt`` (test: the official test list); returns the counts."""
    split_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for domain in domains:
        lists = {name: _official_list(root, domain, name) for name in ("train", "test")}
        train, val = split_train_list(lists["train"], val_fraction, seed)
        for name, entries in (("train", train), ("val", val), ("test", lists["test"])):
            write_split_list(
                split_dir / f"{domain}_{name}.txt", [p for p, _ in entries], [label for _, label in entries]
            )
        counts[domain] = {"train": len(train), "val": len(val), "test": len(lists["test"])}
    manifest = {"seed": seed, "val_fraction": val_fraction, "counts": counts}
    (split_dir / "split.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return counts


def _official_list(root: Path, domain: str, name: str) -> Entries:
    path = root / f"{domain}_{name}.txt"
    if not path.is_file():
        raise UserError(
            f"official DomainNet list {path} not found: download {domain}_{name}.txt and the {domain} images "
            "from http://ai.bu.edu/M3SDA/ into --root"
        )
    paths, labels = read_split_list(path)
    return list(zip(paths, labels.tolist()))
