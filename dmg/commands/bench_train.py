"""End-to-end training throughput: real epochs from image files, next to the same steps on batches already on the device.

    python -m dmg bench train                                    # ResNet-18 and -50, every method, 224 px
    python -m dmg bench train --backbones resnet18 --methods dmg --workers 16 --batch-size 128

The data is a generated PACS-shaped folder (PACS's official kfold layout: 4 domains, 7 classes, 227 x 227
JPEGs), or yours with ``--root`` (any ``--dataset``). Every part is built as ``launch.py`` builds it, from the
same configs. Per backbone and method it reports:

- end-to-end images/s: training images of an epoch / the epoch's wall time (loading, transfers, steps);
- compute-only images/s: the same number of steps on batches already on the device;
- their ratio (1.0: the loader never holds the steps up) and the seconds per epoch outside the steps
  (end-to-end time minus compute time: waiting for batches, loop overhead);
- the evaluation pass per epoch, the processes started after the first epoch (0: workers persist), and the
  peak GPU memory.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing.process
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dmg.data import choose_domains
from dmg.data.synthetic import write_pacs_kfold
from dmg.engine.loop import LossTotals, evaluate, train_epoch
from dmg.runs.experiment import build_loaders, build_method, configure_compute, resolve_device

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
PACS_DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]
PACS_CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
METHODS = sorted(path.stem for path in (CONF_DIR / "method").glob("*.yaml"))


@dataclass
class Result:
    """One backbone and method: the measured epochs (after the first) and the compute-only steps."""

    backbone: str
    method: str
    images: int  # training images per epoch
    epoch_seconds: float  # mean wall time of a training epoch
    compute_seconds: float  # the same steps on batches already on the device
    eval_seconds: float
    starts_after_first_epoch: int
    peak_memory_mib: float | None

    @property
    def end_to_end(self) -> float:
        return self.images / self.epoch_seconds

    @property
    def compute_only(self) -> float:
        return self.images / self.compute_seconds


@contextlib.contextmanager
def counting_process_starts() -> Iterator[list[str]]:
    """The names of the processes started in this block (loader workers)."""
    started, start = [], multiprocessing.process.BaseProcess.start

    def counted(process):
        started.append(process.name)
        return start(process)

    multiprocessing.process.BaseProcess.start = counted
    try:
        yield started
    finally:
        multiprocessing.process.BaseProcess.start = start


def timed(work: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``work()``, waiting for the device before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def configure(args: argparse.Namespace, root: str, backbone: str, method: str) -> DictConfig:
    """The config ``launch.py`` would compose for this benchmark's run."""
    overrides = [
        f"dataset={args.dataset}",
        f"dataset.root={root}",
        f"dataset.image_size={args.image_size}",
        f"backbone={backbone}",
        f"method={method}",
        f"batch_size={args.batch_size}",
        f"eval_batch_size={args.eval_batch_size}",
        f"num_workers={args.workers}",
        f"precision={args.precision}",
        f"channels_last={args.channels_last}",
        f"compile={args.compile}",
        f"device={args.device}",
        "drop_last=true",
        "++backbone.pretrained=false",  # speed does not depend on the weights; nothing is downloaded
        *args.override,
    ]
    if args.root is None:
        overrides += ["dataset.format=kfold", f"dataset.decode={args.decode}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def with_domain_passes(cfg: DictConfig, sources: int) -> DictConfig:
    """A method with ``method.forward=per_domain`` (CORAL, MMD, Mixup, GroupDRO by default) trains on balanced batches
    of a multiple of the number of sources, as ``launch.py`` requires of it (the batch rounded down)."""
    if cfg.method.get("forward") != "per_domain":
        return cfg
    balanced = {"sampler": "balanced", "batch_size": max(cfg.batch_size // sources, 1) * sources}
    return OmegaConf.merge(cfg, balanced)


def measure(cfg: DictConfig, epochs: int, compute_batches: int) -> Result:
    """Train ``epochs`` real epochs (the first one warms up), then time the compute-only steps."""
    device = resolve_device(cfg.device)
    data = instantiate(cfg.dataset.builder)
    sources, targets = choose_domains(data.domains, cfg.target, cfg.sources)
    splits = data.build(sources, targets)
    cfg = with_domain_passes(cfg, len(sources))
    torch.manual_seed(cfg.seed)
    method = build_method(cfg, sources).to(device)
    compute = configure_compute(method, cfg, device)
    loaders = build_loaders(splits, cfg, device, compute.channels_last)
    loaders.evaluation.set_epoch(cfg.seed, 0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    epoch_seconds, eval_seconds, starts = [], [], []
    with counting_process_starts() as started:
        for epoch in range(epochs):
            loaders.train.set_epoch(cfg.seed, epoch)
            epoch_seconds.append(timed(lambda: train_epoch(method, loaders.train, "bench", False), device))
            eval_seconds.append(timed(lambda: evaluate(method, loaders), device))
            starts.append(len(started))
    steps = len(loaders.train)
    compute_seconds = timed(lambda: compute_only(method, loaders.train, steps, compute_batches), device)
    measured = slice(1, None) if epochs > 1 else slice(None)
    return Result(
        backbone=cfg.backbone.name,
        method=cfg.method.name,
        images=steps * cfg.batch_size,
        epoch_seconds=_mean(epoch_seconds[measured]),
        compute_seconds=compute_seconds,
        eval_seconds=_mean(eval_seconds[measured]),
        starts_after_first_epoch=starts[-1] - starts[0],
        peak_memory_mib=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    )


def compute_only(method, loader, steps: int, keep: int) -> None:
    """``steps`` training steps on ``keep`` batches taken from ``loader`` beforehand (already on the device)."""
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == keep:
            break
    method.train()
    totals = LossTotals(first_step=method.steps + 1)
    for step in range(steps):
        totals.add(method.update(*batches[step % len(batches)]))
    totals.means()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def run(args: argparse.Namespace) -> list[Result]:
    """Measure every backbone and method of ``args``; prints a table and returns the results."""
    with tempfile.TemporaryDirectory() as scratch:
        root = args.root
        if root is None:
            root = scratch
            per_class = -(-args.images_per_domain // len(PACS_CLASSES))
            write_pacs_kfold(Path(root), PACS_DOMAINS, PACS_CLASSES, per_class, size=227, detail=16)
        results = []
        for backbone in args.backbones:
            for method in args.methods:
                result = measure(configure(args, root, backbone, method), args.epochs, args.compute_batches)
                results.append(result)
                print(_row(result), flush=True)
    return results


HEADER = (
    f"{'backbone':<10} {'method':<10} {'e2e img/s':>10} {'compute img/s':>14} {'ratio':>6} "
    f"{'outside s/ep':>13} {'eval s/ep':>10} {'starts>ep1':>10} {'peak MiB':>9}"
)


def _row(result: Result) -> str:
    memory = "n/a" if result.peak_memory_mib is None else f"{result.peak_memory_mib:.0f}"
    outside = result.epoch_seconds - result.compute_seconds
    return (
        f"{result.backbone:<10} {result.method:<10} {result.end_to_end:>10.1f} {result.compute_only:>14.1f} "
        f"{result.end_to_end / result.compute_only:>6.2f} {outside:>13.2f} {result.eval_seconds:>10.2f} "
        f"{result.starts_after_first_epoch:>10d} {memory:>9}"
    )


def report_header(args: argparse.Namespace) -> None:
    source = args.root or f"generated PACS-shaped JPEGs, {args.images_per_domain} per domain"
    print(
        f"train: {source}; {args.image_size}px, batch {args.batch_size}, {args.workers} workers, "
        f"precision={args.precision} channels_last={args.channels_last} compile={args.compile} "
        f"decode={args.decode}, {args.epochs} epochs (the first warms up)"
    )
    print(HEADER)


def main(args: argparse.Namespace) -> list[Result]:
    report_header(args)
    return run(args)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``train`` command on an ``argparse`` sub-command set."""
    parser = subparsers.add_parser(
        "train",
        help="end-to-end vs compute-only training images/s from image files",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--dataset", default="pacs", help="a conf/dataset option, for --root (default pacs)")
    parser.add_argument("--root", help="your data; default: a generated PACS-shaped kfold folder")
    parser.add_argument("--images-per-domain", type=int, default=2000, help="generated images per domain")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="loader workers (default: every core)")
    parser.add_argument(
        "--epochs", type=int, default=3, help="real epochs; the first (worker start, autotuning) is not timed"
    )
    parser.add_argument(
        "--compute-batches", type=int, default=8, help="device-resident batches the compute-only steps cycle through"
    )
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--channels-last", default=True, action=argparse.BooleanOptionalAction)
    parser.add_argument("--compile", default=False, action=argparse.BooleanOptionalAction)
    parser.add_argument("--decode", default="cpu", choices=["cpu", "gpu"], help="where JPEGs are decoded")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--override", nargs="*", default=[], help="more config overrides, e.g. optim.lr=1e-4")
    parser.set_defaults(func=main)
    return parser
