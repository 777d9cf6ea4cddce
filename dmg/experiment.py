"""Builds an experiment's parts from the config and runs it: the only code that sees the whole config."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from dmg.callbacks import sweep_tags
from dmg.checkpoints import Checkpointer
from dmg.data import DomainSplits, choose_domains
from dmg.data.loading import OnDevice, make_loader
from dmg.errors import UserError
from dmg.loop import Loaders, fit
from dmg.methods.base import Method
from dmg.models.staged import StagedNetwork
from dmg.summary import (
    active_units_figure,
    mask_overlap_figure,
    print_summary,
    summarize,
)
from dmg.tracking import Tracker, finished_run, git_commit

log = logging.getLogger(__name__)

RESUME_MODES = ("auto", "skip_finished", "never")


def run(cfg: DictConfig) -> float:
    """Train and evaluate one configuration; returns the value of ``cfg.optimized_metric``."""
    check_settings(cfg)
    if cfg.resume == "skip_finished" and (done := finished_run(cfg)):
        log.info("run %s already finished with this config: reporting its result", done.info.run_id)
        return done.data.metrics[cfg.optimized_metric]
    device = resolve_device(cfg.device)
    torch.backends.cudnn.benchmark = True  # fixed input sizes: cuDNN may pick its fastest kernels (GPU only)
    dataset = build(cfg.dataset.builder, "dataset")
    sources, targets = choose_domains(dataset.domains, cfg.target, cfg.sources)
    splits = dataset.build(sources, targets)  # checks the data before any weights are fetched
    torch.manual_seed(cfg.seed)  # initial weights and masks
    method = build_method(cfg, sources).to(device)
    loaders = build_loaders(splits, cfg, device)
    tracker = Tracker.start(cfg, run_tags(cfg, targets), Path(cfg.checkpoint_dir))
    log.info(
        "%s run %s: sources %s, targets %s",
        "continuing" if tracker.resumed else "starting",
        tracker.run_id,
        sources,
        targets,
    )
    checkpoints = Checkpointer(tracker.directory)
    try:
        history = fit(method, loaders, cfg.epochs, cfg.seed, checkpoints, tracker.log_metrics, cfg.progress)
        summary = summarize(history)
        finish_run(tracker, method, checkpoints, summary, history, sources)
    except BaseException as error:
        tracker.finish("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    title = f"{cfg.method.name} on {cfg.dataset.name} ({cfg.backbone.name}), MLflow run {tracker.run_id}"
    print_summary(summary, sources, targets, title)
    return summary[cfg.optimized_metric]


def check_settings(cfg: DictConfig) -> None:
    for key, least in (("epochs", 1), ("batch_size", 1), ("eval_batch_size", 1), ("seed", 0), ("num_workers", 0)):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < least:
            raise UserError(f"{key} must be an integer >= {least}, got {cfg[key]!r}")
    if cfg.resume not in RESUME_MODES:
        raise UserError(f"resume must be one of {', '.join(RESUME_MODES)}, got {cfg.resume!r}")


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, otherwise the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but PyTorch sees no CUDA GPU here: use device=auto or device=cpu")
    return device


def build(node: DictConfig, group: str, **kwargs):
    """``instantiate`` with errors reported as one line naming the config group."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__ or error
        if isinstance(cause, UserError):
            raise cause from None
        raise UserError(f"bad {group} config: {cause}") from None


def build_method(cfg: DictConfig, sources: list[str]) -> Method:
    """The backbone, then the method around it (method options come from the ``method/`` group)."""
    network: StagedNetwork = build(cfg.backbone.network, "backbone")
    options = OmegaConf.to_container(cfg.method, resolve=True)
    del options["name"]
    return build(options, "method", network=network, domains=sources)


def build_loaders(splits: DomainSplits, cfg: DictConfig, device: torch.device) -> Loaders:
    """Loaders of every split, delivering batches on ``device`` through the dataset's batch transforms."""
    train_batch = build(cfg.dataset.transforms.train_batch, "dataset")
    eval_batch = build(cfg.dataset.transforms.eval_batch, "dataset")

    def evaluation(dataset: Dataset) -> OnDevice:
        return OnDevice(make_loader(dataset, cfg.eval_batch_size, False, cfg.num_workers), device, eval_batch)

    train = make_loader(splits.train, cfg.batch_size, True, cfg.num_workers, drop_last=cfg.drop_last)
    return Loaders(
        train=OnDevice(train, device, train_batch),
        val={name: evaluation(dataset) for name, dataset in splits.val.items()},
        test={name: evaluation(dataset) for name, dataset in splits.test.items()},
    )


def run_tags(cfg: DictConfig, targets: list[str]) -> dict[str, str]:
    tags = {
        "method": cfg.method.name,
        "dataset": cfg.dataset.name,
        "target": "+".join(targets),
        "backbone": cfg.backbone.name,
        "seed": str(cfg.seed),
    }
    commit = git_commit()
    return tags | ({"mlflow.source.git.commit": commit} if commit else {}) | sweep_tags(cfg.tracking)


def finish_run(
    tracker: Tracker, method: Method, checkpoints: Checkpointer, summary: dict, history: list[dict], sources: list[str]
) -> None:
    """Log the summary, the mask plots (selected model's overlaps, active units over epochs) and both checkpoints."""
    tracker.log_dict(summary, "summary.json")
    tracker.log_metrics({key: value for key, value in summary.items() if "/" in key}, summary["selected_epoch"])
    checkpoints.load_best(method)
    for layer, iou in method.mask_overlaps().items():
        tracker.log_figure(mask_overlap_figure(iou, sources, layer), f"masks/iou_{layer}.png")
        tracker.log_figure(active_units_figure(history, sources, layer), f"masks/active_{layer}.png")
    tracker.log_artifact(checkpoints.best, "checkpoints")
    tracker.log_artifact(checkpoints.last, "checkpoints")
    tracker.finish()
