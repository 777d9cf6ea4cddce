"""Builds an experiment's parts from the config and runs it: the only code that sees the whole config."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from mlflow.entities import Dataset as MlflowDataset
from mlflow.entities import DatasetInput, InputTag
from omegaconf import DictConfig, OmegaConf
from torch.optim import Optimizer
from torch.utils.data import Dataset

from dmg.data import DomainSplits, choose_domains
from dmg.data.decode import EncodedBatchDecoder
from dmg.data.loading import OnDevice, PartBatches, concatenate, make_loader
from dmg.data.sampling import BATCH_SAMPLERS
from dmg.engine.averaging import NoAveraging
from dmg.engine.checkpoints import Checkpointer
from dmg.engine.compute import Compute, is_convolutional, resolve_precision
from dmg.engine.loop import EvaluationPart, Loaders, finish_average, fit
from dmg.engine.signals import sigterm_raises
from dmg.errors import BadValue, Terminated, UserError
from dmg.methods.base import Method
from dmg.models.staged import InputTooSmall, StagedNetwork
from dmg.runs.settings import check_settings
from dmg.runs.summary import (
    active_units_figure,
    mask_overlap_figure,
    print_summary,
    summarize,
)
from dmg.runs.tracking import Tracker, finished_run, git_commit
from dmg.sweeps.callbacks import sweep_tags

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> float:
    """Train and evaluate one configuration; returns the value of ``cfg.optimized_metric``."""
    check_settings(cfg)
    if cfg.resume == "skip_finished" and (done := finished_run(cfg)):
        log.info("run %s already finished with this config: reporting its result", done.info.run_id)
        return done.data.metrics[cfg.optimized_metric]
    device = resolve_device(cfg.device)
    torch.backends.cudnn.benchmark = True  # fixed input sizes: cuDNN may pick its fastest kernels (GPU only)
    dataset = build(cfg.dataset.builder, "dataset.builder")
    sources, targets = choose_domains(dataset.domains, cfg.target, cfg.sources)
    splits = dataset.build(sources, targets)  # checks the data before any weights are fetched
    torch.manual_seed(cfg.seed)  # initial weights and masks
    method = build_method(cfg, sources).to(device)
    check_domain_passes(cfg, len(sources))
    averaging = build_averaging(cfg)
    compute = configure_compute(method, cfg, device)
    loaders = build_loaders(splits, cfg, device, compute.channels_last)
    with sigterm_raises():
        summary = train_and_track(cfg, method, averaging, loaders, splits, compute.tags())
    title = f"{method_label(cfg)} on {cfg.dataset.name} ({cfg.backbone.name}), MLflow run {summary['run_id']}"
    print_summary(summary, sources, targets, title)
    return summary[cfg.optimized_metric]


def train_and_track(
    cfg: DictConfig,
    method: Method,
    averaging: NoAveraging,
    loaders: Loaders,
    splits: DomainSplits,
    compute_tags: dict[str, str],
) -> dict:
    """Train in the MLflow run of this config (continued if it was interrupted); returns the run's summary.

    ``compute_tags``: the resolved precision, memory format and compilation, recorded as tags of a new run.

    However the process stops, the run does not stay RUNNING: Ctrl-C and SIGTERM mark it KILLED, any error FAILED,
    and rerunning the command continues it from its last checkpoint.
    """
    tags = run_tags(cfg, splits.targets) | compute_tags
    tracker = Tracker.start(cfg, tags, Path(cfg.checkpoint_dir), dataset_input(cfg, splits))
    log.info("%s run %s: sources %s, targets %s", "continuing" if tracker.resumed else "starting",
             tracker.run_id, splits.sources, splits.targets)  # fmt: skip
    checkpoints = Checkpointer(tracker.directory)
    try:
        history = fit(method, loaders, cfg.epochs, cfg.seed, checkpoints, tracker.log_metrics, cfg.progress, averaging)
        averaged = finish_average(method, averaging, loaders, checkpoints, cfg.seed, len(history))
        summary = summarize(history, averaged)
        finish_run(tracker, method, checkpoints, summary, history, splits.sources, cfg.keep_checkpoints)
    except BaseException as error:
        end_interrupted(tracker, error)
        raise
    finally:
        tracker.release()
    checkpoints.remove()
    return summary | {"run_id": tracker.run_id}


def end_interrupted(tracker: Tracker, error: BaseException) -> None:
    """Mark the run KILLED (Ctrl-C, SIGTERM, a scheduler's exit) or FAILED, without hiding ``error``."""
    stopped = isinstance(error, (KeyboardInterrupt, Terminated, SystemExit))
    try:
        tracker.finish("KILLED" if stopped else "FAILED")
    except Exception as problem:  # noqa: BLE001 - the store may be what failed; the original error matters
        log.warning("could not mark run %s as ended: %s", tracker.run_id, problem)
    if stopped:
        log.warning("run %s interrupted: rerun the same command to continue it", tracker.run_id)


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, otherwise the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise BadValue("device", "auto, cpu, cuda or cuda:N", name) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but PyTorch sees no CUDA GPU here: use device=auto or device=cpu")
    return device


def build(node: DictConfig, key: str, **kwargs):
    """``instantiate`` with errors reported as one line naming the config node ``key``."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__ or error
        if isinstance(cause, BadValue):
            raise cause.under(key) from None
        if isinstance(cause, UserError):
            raise cause from None
        raise UserError(f"bad {key} setting: {str(cause).splitlines()[0]}") from None


def build_method(cfg: DictConfig, sources: list[str]) -> Method:
    """The backbone, then the method around it (method options come from the ``method/`` group)."""
    network: StagedNetwork = build(cfg.backbone.network, "backbone.network")
    check_input_size(network, cfg)
    check_optimizers(cfg.optim)
    return build(group_options(cfg.method), "method", network=network, domains=sources)


def check_domain_passes(cfg: DictConfig, sources: int) -> None:
    """``method.forward=per_domain`` cuts every training batch into equal per-domain blocks: balanced batches only."""
    if cfg.method.get("forward", "joint") != "per_domain" or (
        cfg.sampler == "balanced" and not cfg.batch_size % sources
    ):
        return
    fit = cfg.batch_size // sources * sources or sources
    raise UserError(
        f"method.forward=per_domain (one forward pass per source domain, as DomainBed) needs sampler=balanced and a "
        f"batch_size that is a multiple of the {sources} source domains, got sampler={cfg.sampler} "
        f"batch_size={cfg.batch_size}: use sampler=balanced batch_size={fit}, or method.forward=joint"
    )


def build_averaging(cfg: DictConfig) -> NoAveraging:
    """The weight averaging of the ``averaging/`` group (``none`` or ``swad``)."""
    return build(group_options(cfg.averaging), "averaging")


def group_options(group: DictConfig) -> dict:
    """A config group's options for ``instantiate``: everything but its ``name`` (a label for runs and tables)."""
    options = OmegaConf.to_container(group, resolve=True)
    del options["name"]
    return options


def method_label(cfg: DictConfig) -> str:
    """The method as runs and tables name it: ``dmg``, or ``dmg+swad`` with weight averaging."""
    return cfg.method.name if cfg.averaging.name == "none" else f"{cfg.method.name}+{cfg.averaging.name}"


def check_optimizers(optim: DictConfig) -> None:
    """Build every optimiser of the ``optim`` group on a dummy parameter: torch checks lr, betas, weight decay."""
    for name, node in optim.items():
        if not _is_optimizer(node):
            continue
        try:
            build(node, f"optim.{name}")([torch.zeros(1, requires_grad=True)])
        except (ValueError, TypeError) as error:
            raise UserError(f"bad optim.{name} setting ({node._target_}): {error}") from None


def _is_optimizer(node) -> bool:
    try:
        return isinstance(node, DictConfig) and issubclass(get_class(node.get("_target_")), Optimizer)
    except Exception:  # noqa: BLE001 - no or an unknown target: not an optimiser (its builder reports it)
        return False


def check_input_size(network: StagedNetwork, cfg: DictConfig) -> None:
    """A backbone too deep for the images gets the smallest image size it takes, as a setting to use."""
    try:
        network.stage_input_shapes(cfg.dataset.input_shape)
    except InputTooSmall as error:
        raise UserError(
            f"backbone {cfg.backbone.name} cannot take {error.size}x{error.size} images (the smallest it takes is "
            f"{error.smallest} px): set dataset.image_size={error.smallest} or more"
        ) from None


def configure_compute(method: Method, cfg: DictConfig, device: torch.device) -> Compute:
    """Precision, memory format and compilation of ``method`` (already on ``device``) from the top-level keys."""
    precision = resolve_precision(cfg.precision, device)
    channels_last = bool(cfg.channels_last) and is_convolutional(method)
    if channels_last:
        method.to(memory_format=torch.channels_last)
    method.configure_compute(precision, compile=bool(cfg.compile))
    return Compute(precision, channels_last, bool(cfg.compile))


def build_loaders(splits: DomainSplits, cfg: DictConfig, device: torch.device, channels_last: bool = False) -> Loaders:
    """The training loader and one evaluation loader over every evaluated domain, batches on ``device``.

    Batches pass through the dataset's batch transforms there; with ``dataset.decode=gpu`` they are decoded
    there first, each image through the dataset's per-image transform.
    """
    encoded = cfg.dataset.get("decode", "cpu") == "gpu"

    def on_device(dataset: Dataset, role: str, batch_size: int, **options) -> OnDevice:
        workers = {"num_workers": cfg.num_workers, "pin_memory": device.type == "cuda"}
        loader = make_loader(dataset, batch_size, encoded=encoded, **workers, **options)
        decoder = (
            EncodedBatchDecoder(build(cfg.dataset.transforms[role], f"dataset.transforms.{role}")) if encoded else None
        )
        batch_transform = build(cfg.dataset.transforms[f"{role}_batch"], f"dataset.transforms.{role}_batch")
        return OnDevice(loader, device, batch_transform, channels_last, decoder)

    parts = [EvaluationPart(name, True, len(data)) for name, data in splits.val.items()]
    parts += [EvaluationPart(name, False, len(data)) for name, data in splits.test.items()]
    batches = PartBatches([part.size for part in parts], cfg.eval_batch_size)
    evaluation = concatenate([*splits.val.values(), *splits.test.values()])
    return Loaders(
        train=on_device(
            splits.train,
            "train",
            cfg.batch_size,
            shuffle=True,
            drop_last=cfg.drop_last,
            batch_sampler=BATCH_SAMPLERS[cfg.sampler],
        ),
        evaluation=on_device(evaluation, "eval", cfg.eval_batch_size, shuffle=False, batch_sampler=lambda **_: batches),
        parts=parts,
        batch_parts=batches.owners,
    )


def run_tags(cfg: DictConfig, targets: list[str]) -> dict[str, str]:
    tags = {
        "method": method_label(cfg),
        "averaging": cfg.averaging.name,
        "dataset": cfg.dataset.name,
        "target": "+".join(targets),
        "backbone": cfg.backbone.name,
        "seed": str(cfg.seed),
    }
    commit = git_commit()
    return tags | ({"mlflow.source.git.commit": commit} if commit else {}) | sweep_tags(cfg.tracking)


def dataset_input(cfg: DictConfig, splits: DomainSplits) -> DatasetInput:
    """The run's data as an MLflow dataset input: name, domains and split sizes, and a digest of the split recipe."""
    sizes = {"train": len(splits.train)} | {
        f"{role}/{name}": len(part) for role, parts in (("val", splits.val), ("test", splits.test))
        for name, part in parts.items()
    }  # fmt: skip
    recipe = OmegaConf.to_container(cfg.dataset.builder, resolve=True)
    profile = {"sources": splits.sources, "targets": splits.targets, "sizes": sizes}
    digest = hashlib.sha1(json.dumps([recipe, profile], sort_keys=True, default=str).encode()).hexdigest()[:8]
    source = str(recipe.get("root") or cfg.dataset.get("root") or recipe.get("_target_"))
    dataset = MlflowDataset(cfg.dataset.name, digest, "local", source, None, json.dumps(profile))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])


def finish_run(
    tracker: Tracker,
    method: Method,
    checkpoints: Checkpointer,
    summary: dict,
    history: list[dict],
    sources: list[str],
    keep: str,
) -> None:
    """Log the summary, the mask plots (selected model's overlaps, active units over epochs) and the kept models.

    ``keep``: ``selected`` logs the selected epoch's weights, ``all`` also the last epoch's training state, ``none``
    neither. The local checkpoints are deleted afterwards: a finished run's models live in MLflow only.
    """
    tracker.log_dict(summary, "summary.json")
    tracker.log_metrics({key: value for key, value in summary.items() if "/" in key}, summary["selected_epoch"])
    checkpoints.load_best(method)
    for layer, iou in method.mask_overlaps().items():
        tracker.log_figure(mask_overlap_figure(iou, sources, layer), f"masks/iou_{layer}.png")
        tracker.log_figure(active_units_figure(history, sources, layer), f"masks/active_{layer}.png")
    kept = {"selected": [checkpoints.best], "all": [checkpoints.best, checkpoints.last], "none": []}[keep]
    for path in kept:
        tracker.log_artifact(path, "checkpoints")
    tracker.finish()
