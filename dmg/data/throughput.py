"""Loader throughput: images per second of a dataset's training loader (train transforms, N workers).

    python -m dmg.data.throughput --workers 0 2 8                  # a generated PACS-shaped HDF5 folder
    python -m dmg.data.throughput --root data/PACS --workers 8     # real data (any dataset=...)

``add_parser`` registers the same command in another CLI (``python -m dmg bench loader``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from dmg.data import choose_domains
from dmg.data.loading import EpochLoader, make_loader
from dmg.data.synthetic import write_pacs_hdf5

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def images_per_second(loader: EpochLoader, batches: int, warmup: int = 2) -> float:
    """Images per second over ``batches`` batches, after ``warmup`` batches (worker start-up excluded)."""
    iterator, seen = iter(loader), 0
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        seen += len(next(iterator)[0])
    return seen / (time.perf_counter() - start)


def train_loader(dataset: str, root: str, num_workers: int, batch_size: int, overrides: list[str]) -> EpochLoader:
    """The training loader a run of ``dataset`` (read from ``root``) would use."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"dataset={dataset}", f"dataset.root={root}", *overrides])
    data = instantiate(cfg.dataset.builder)
    sources, targets = choose_domains(data.domains, cfg.target, cfg.sources)
    return make_loader(data.build(sources, targets).train, batch_size, True, num_workers, drop_last=True)


def write_synthetic_pacs(root: Path, per_domain: int) -> None:
    """A PACS-shaped HDF5 folder: 227 x 227 x 3 uint8 BGR images, ``per_domain`` training images per domain."""
    write_pacs_hdf5(root, ["art_painting", "cartoon", "photo", "sketch"], {"train": per_domain, "val": 1, "test": 1})


def run(args: argparse.Namespace) -> dict[int, float]:
    """Measure every worker count of ``args.workers``; prints one line each and returns ``{workers: img/s}``."""
    with tempfile.TemporaryDirectory() as scratch:
        root = args.root
        if root is None:
            root = scratch
            write_synthetic_pacs(Path(root), per_domain=(args.batches + 3) * args.batch_size // 3 + args.batch_size)
        results = {}
        for workers in args.workers:
            loader = train_loader(args.dataset, root, workers, args.batch_size, args.override)
            results[workers] = images_per_second(loader, args.batches)
            source = "generated PACS-shaped HDF5" if args.root is None else args.root
            print(
                f"{args.dataset} train loader ({source}), {workers} workers, batch {args.batch_size}: {results[workers]:.0f} img/s"
            )
            del loader
    return results


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``loader`` command on an ``argparse`` sub-command set."""
    parser = subparsers.add_parser("loader", help="images/second of a dataset's training loader", description=__doc__)
    parser.add_argument("--dataset", default="pacs", help="a config of conf/dataset/ (default pacs)")
    parser.add_argument("--root", help="the dataset's folder; default: generate a PACS-shaped HDF5 folder")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to measure")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--batches", type=int, default=20, help="batches timed per worker count (after 2 warm-up batches)"
    )
    parser.add_argument("--override", nargs="*", default=[], help="more config overrides, e.g. dataset.format=kfold")
    parser.set_defaults(func=run)
    return parser


if __name__ == "__main__":
    commands = argparse.ArgumentParser(prog="python -m dmg.data.throughput").add_subparsers()
    arguments = add_parser(commands).parse_args()
    arguments.func(arguments)
