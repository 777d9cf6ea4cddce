"""Speed of each method on random data: training and evaluation images per second, and DMG's cost ratios.

    python -m dmg bench --backbone alexnet --batch-size 64 --domains 3
    python -m dmg bench --backbone resnet18 --methods coral mixup --forward joint per_domain   # method.forward costs
    python -m dmg bench loader --workers 0 2   # data-loading throughput (dmg/data/throughput.py)
    python -m dmg bench train                  # real epochs from files: end to end vs compute only (dmg/commands/bench_train.py)
    python -m dmg bench gpu                    # the GPU acceptance check: syncs, training speed, DDP; one JSON (bench_gpu.py)

Methods are built exactly as ``launch.py`` builds them, from the same configs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig

from dmg.commands import bench_gpu, bench_train
from dmg.data import throughput
from dmg.methods.base import Method
from dmg.methods.domain_passes import FORWARDS
from dmg.runs.experiment import build_method, resolve_device

PHASES = ["train", "eval_in", "eval_out"]


CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
METHODS = ["aggregate", "multihead", "dmg"]  # the default: the paper's three and DMG's cost ratios
AVAILABLE = sorted(path.stem for path in (CONF_DIR / "method").glob("*.yaml"))


def compose(backbone: str, method: str, input_shape: list[int], num_classes: int) -> DictConfig:
    """The config ``launch.py backbone=... method=...`` would use, for random inputs of ``input_shape``."""
    overrides = [
        f"backbone={backbone}",
        f"method={method}",
        f"dataset.input_shape={input_shape}",
        f"dataset.num_classes={num_classes}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def timed(step: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``step`` (waiting for the GPU to finish)."""
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def phases(method: Method, batch: tuple[torch.Tensor, ...]) -> dict[str, Callable[[], object]]:
    """The three things a method does: a training step, in-domain and out-of-domain prediction."""
    x, y, d = batch

    def train():
        method.train()
        method.update(x, y, d)

    def predict(domains):
        method.eval()
        with torch.no_grad():
            method.predict(x, domains)

    return {"train": train, "eval_in": lambda: predict(d), "eval_out": lambda: predict(None)}


def measure(
    methods: dict[str, Method], batch, device: torch.device, warmup: int, repeats: int
) -> dict[str, dict[str, float]]:
    """Images per second of each method and phase: the median of ``repeats`` timings.

    The methods take turns within every round, so a change in machine load affects them alike.
    """
    steps = {name: phases(method, batch) for name, method in methods.items()}
    timings = {name: {phase: [] for phase in PHASES} for name in methods}
    for phase in PHASES:
        for round_ in range(warmup + repeats):
            for name in methods:
                seconds = timed(steps[name][phase], device)
                if round_ >= warmup:
                    timings[name][phase].append(seconds)
    size = len(batch[0])
    return {
        name: {phase: size / statistics.median(t) for phase, t in by_phase.items()}
        for name, by_phase in timings.items()
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.func(args)


def bench_methods(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    torch.manual_seed(0)
    shape = [args.channels, args.image_size, args.image_size]
    batch = (
        torch.randn(args.batch_size, *shape, device=device),
        torch.randint(0, args.classes, (args.batch_size,), device=device),
        torch.arange(args.batch_size, device=device) % args.domains,
    )
    domains = [f"domain{i}" for i in range(args.domains)]
    methods = {
        label: build_method(cfg, domains).to(device)
        for name in args.methods
        for label, cfg in variants(compose(args.backbone, name, shape, args.classes), args.forward)
    }
    report(measure(methods, batch, device, args.warmup, args.repeats), args, device)


def variants(cfg: DictConfig, forwards: list[str] | None) -> list[tuple[str, DictConfig]]:
    """The method's config once per ``method.forward`` in ``forwards`` (labelled ``coral/joint``...), or as it is
    when the method has no such key or ``forwards`` is None."""
    if not forwards or "forward" not in cfg.method:
        return [(cfg.method.name, cfg)]
    labelled = []
    for forward in forwards:
        variant = cfg.copy()
        variant.method.forward = forward
        labelled.append((f"{cfg.method.name}/{forward}", variant))
    return labelled


def parse_args(argv: list[str]) -> argparse.Namespace:
    """``methods`` (the default command), ``loader`` or ``train``."""
    parser = argparse.ArgumentParser(prog="python -m dmg bench", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers()
    methods = commands.add_parser("methods", help="train/eval images per second of every method (the default)")
    methods.add_argument("--backbone", default="alexnet", help="a conf/backbone option (default: alexnet)")
    methods.add_argument("--methods", nargs="+", default=METHODS, choices=AVAILABLE)
    methods.add_argument("--batch-size", type=int, default=64)
    methods.add_argument(
        "--forward",
        nargs="+",
        choices=FORWARDS,
        help="method.forward values to time for the methods that have the key (default: each method's own)",
    )
    methods.add_argument("--domains", type=int, default=3, help="number of source domains")
    methods.add_argument("--classes", type=int, default=7)
    methods.add_argument("--image-size", type=int, default=224)
    methods.add_argument("--channels", type=int, default=3)
    methods.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    methods.add_argument("--warmup", type=int, default=3)
    methods.add_argument("--repeats", type=int, default=10, help="timed steps per measurement (median reported)")
    methods.set_defaults(func=bench_methods)
    throughput.add_parser(commands)
    bench_train.add_parser(commands)
    bench_gpu.add_parser(commands)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["methods", *argv]
    return parser.parse_args(argv)


def report(results: dict[str, dict[str, float]], args: argparse.Namespace, device: torch.device) -> None:
    print(f"{args.backbone}, batch {args.batch_size}, {args.domains} source domains, {args.image_size}px, {device}")
    width = max(10, *map(len, results))
    print(f"{'method':<{width}} {'train img/s':>12} {'eval in img/s':>14} {'eval out img/s':>15}")
    for name, speed in results.items():
        print(f"{name:<{width}} {speed['train']:>12.1f} {speed['eval_in']:>14.1f} {speed['eval_out']:>15.1f}")
    if "dmg" in results and "aggregate" in results:
        dmg, base = results["dmg"], results["aggregate"]
        print("DMG / aggregate time ratios (lower is better; targets: train <= 1.05, out-of-domain eval <= 1.3):")
        for key, label in [("train", "train step"), ("eval_in", "in-domain eval"), ("eval_out", "out-of-domain eval")]:
            print(f"  {label:<20} {base[key] / dmg[key]:.3f}")


if __name__ == "__main__":
    main()
