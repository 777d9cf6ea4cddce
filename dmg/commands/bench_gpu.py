"""The GPU acceptance check: one command, one JSON of numbers.

    python -m dmg bench gpu                          # on a GPU machine: every part at full size
    python -m dmg bench gpu --output gpu.json --train-methods aggregate dmg coral

Three parts (docs/gpu.md says how to read each number):

- ``syncs``: whole training steps of every method and option (tests/test_host_sync.py's cases), counted with
  :class:`dmg.engine.syncs.SyncCounter`, and, with CUDA, run under ``torch.cuda.set_sync_debug_mode("error")``;
- ``train``: the training benchmark (``python -m dmg bench train``: ResNet-18 and ResNet-50, bf16, channels-last,
  16 loader workers by default);
- ``ddp``: ``torchrun --nproc_per_node=<visible GPUs> launch.py ...``, a short run on every visible GPU, as a
  subprocess: its exit code and wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from dmg.commands import bench_train
from dmg.engine.averaging import SWAD
from dmg.engine.compute import resolve_precision
from dmg.engine.syncs import cuda_sync_errors, step_syncs
from dmg.runs.experiment import build_method, resolve_device

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"
METHODS = sorted(path.stem for path in (CONF_DIR / "method").glob("*.yaml"))
# Every method, plus the options that change what a step computes (as tests/test_host_sync.py).
SYNC_CASES = [[f"method={name}"] for name in METHODS] + [
    ["method=dmg", "mask.granularity=element"],
    ["method=dann", "method.grad_penalty=0.1", "method.discriminator_steps=2"],
]
DOMAINS = ["a", "b", "c"]


def sync_checks(device: torch.device, precision: str) -> dict[str, dict]:
    """Per case: the syncing operators of a training step (with SWAD), and CUDA's own verdict."""
    results = {}
    for overrides in SYNC_CASES:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, "backbone.network.width=8"])
        torch.manual_seed(0)
        method = build_method(cfg, DOMAINS).to(device)
        method.configure_compute(resolve_precision(precision, device))
        batches = _sync_batches(device)
        if getattr(method, "forward_mode", "joint") == "per_domain":
            batches = batches[:1]  # per-domain passes take batches with every domain in equal parts
        per_step = step_syncs(method, SWAD(), batches)
        kinds = sum((counter.counts() for counter in per_step), start=type(per_step[0].counts())())
        results[" ".join(overrides)] = {
            "syncs_per_step": sum(kinds.values()) / len(per_step),
            "kinds": dict(kinds),
            "cuda_sync_debug": _cuda_verdict(method, batches, device),
        }
    return results


def _sync_batches(device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(1)
    x, y, d = torch.randn(12, 1, 28, 28, generator=generator), torch.arange(12) % 10, torch.arange(12) % 3
    return [tuple(t.to(device) for t in batch) for batch in [(x, y, d), (x, y, torch.zeros_like(d))]]


def _cuda_verdict(method, batches, device: torch.device) -> str:
    """``ok``, the error that CUDA's sync debug mode raised, or why it was not run."""
    if device.type != "cuda":
        return "not run: no CUDA device"
    try:
        with cuda_sync_errors():
            step_syncs(method, SWAD(), batches)
    except RuntimeError as error:
        return f"error: {str(error).splitlines()[0]}"
    return "ok"


def train_benchmark(args: argparse.Namespace) -> list[dict]:
    """``python -m dmg bench train`` with this command's settings; one record per backbone and method."""
    train_args = argparse.Namespace(
        backbones=args.train_backbones,
        methods=args.train_methods,
        dataset="pacs",
        root=None,
        images_per_domain=args.images_per_domain,
        image_size=args.image_size,
        batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        workers=args.workers,
        epochs=args.epochs,
        compute_batches=4,
        precision=args.precision,
        channels_last=True,
        compile=False,
        decode="cpu",
        device=args.device,
        override=args.override,
    )
    bench_train.report_header(train_args)
    return [_train_record(result) for result in bench_train.run(train_args)]


def _train_record(result: bench_train.Result) -> dict:
    return dataclasses.asdict(result) | {
        "end_to_end_images_per_second": result.end_to_end,
        "compute_only_images_per_second": result.compute_only,
        "loader_ratio": result.end_to_end / result.compute_only,
        "seconds_outside_steps": result.epoch_seconds - result.compute_seconds,
    }


def ddp_run(args: argparse.Namespace, processes: int, scratch: Path) -> dict:
    """A short run of ``launch.py`` under torchrun on ``processes`` processes: its exit code and wall time."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
        str(ROOT / "launch.py"),
        f"device={args.device}", f"precision={args.precision}", f"batch_size={8 * processes}",
        f"epochs={args.ddp_epochs}", f"dataset.max_images={args.ddp_images}", "progress=false",
        f"tracking.uri=sqlite:///{scratch}/mlflow.db", f"checkpoint_dir={scratch}/checkpoints",
        f"hydra.run.dir={scratch}/outputs", *args.ddp_override,
    ]  # fmt: skip
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=args.ddp_timeout)
        exit_code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        exit_code, output = None, f"timed out after {args.ddp_timeout} s: {expired.stderr or ''}"
    return {
        "processes": processes,
        "command": " ".join(command[1:]).replace(str(scratch), "<scratch>"),
        "exit_code": exit_code,
        "seconds": time.perf_counter() - start,
        "output_tail": str(output)[-2000:].replace(str(scratch), "<scratch>"),
    }


def machine(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    return {
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
    }


def main(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    visible = torch.cuda.device_count() if device.type == "cuda" else args.ddp_processes
    report = {"machine": machine(device), "syncs": sync_checks(device, args.precision)}
    print(f"syncs: {sum(case['syncs_per_step'] for case in report['syncs'].values())} per step over every case")
    report["train"] = train_benchmark(args)
    with tempfile.TemporaryDirectory() as scratch:
        report["ddp"] = ddp_run(args, visible, Path(scratch))
    print(f"ddp: {report['ddp']['processes']} processes, exit code {report['ddp']['exit_code']}")
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"written: {args.output}")
    return report


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``gpu`` command on an ``argparse`` sub-command set."""
    parser = subparsers.add_parser(
        "gpu", help="the GPU acceptance check: syncs, training speed, DDP; one JSON", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--output", default="bench-gpu.json", help="the JSON written")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (tiny CPU settings make a smoke test)")
    parser.add_argument("--precision", default="bf16", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--train-backbones", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--train-methods", nargs="+", default=["aggregate", "dmg"], choices=METHODS)
    parser.add_argument("--images-per-domain", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3, help="training benchmark epochs (the first warms up)")
    parser.add_argument("--override", nargs="*", default=[], help="more config overrides for the training benchmark")
    parser.add_argument("--ddp-processes", type=int, default=2, help="without CUDA (with it: every visible GPU)")
    parser.add_argument("--ddp-epochs", type=int, default=2)
    parser.add_argument("--ddp-images", type=int, default=6000, help="Rotated MNIST images of the DDP run")
    parser.add_argument("--ddp-timeout", type=int, default=600)
    parser.add_argument("--ddp-override", nargs="*", default=[], help="more launch.py overrides for the DDP run")
    parser.set_defaults(func=main)
    return parser
