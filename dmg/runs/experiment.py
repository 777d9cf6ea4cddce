"""Builds an experiment's parts from the config and runs it: the only code that sees the whole config."""

from __future__ import annotations

import hashlib
import json
import logging
import traceback
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
from dmg.engine import distributed, signals
from dmg.engine.averaging import NoAveraging
from dmg.engine.checkpoints import Checkpointer
from dmg.engine.compute import Compute, configure_determinism, is_convolutional, resolve_precision
from dmg.engine.distributed import ProcessGroup, Ranks, RankZeroCheckpoints, ranks_from_environment
from dmg.engine.loop import EvaluationPart, Loaders, evaluation_keys, finish_average, fit
from dmg.engine.signals import sigterm_raises
from dmg.errors import BadValue, Terminated, UserError, check_number
from dmg.methods.base import Method
from dmg.models.staged import InputTooSmall, StagedNetwork
from dmg.runs.settings import check_settings
from dmg.runs.summary import (
    active_units_figure,
    check_optimized_metric,
    mask_overlap_figure,
    print_summary,
    summarize,
    summary_by_step,
    summary_keys,
)
from dmg.runs.tracking import NoTracker, RunFinished, Tracker, finished_run, flatten, git_commit
from dmg.runs.windows import window
from dmg.sweeps.callbacks import sweep_tags

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> float:
    """Train and evaluate one configuration; returns the value of ``cfg.optimized_metric``.

    Started by torchrun or srun, every process runs this as one rank of the job (``dmg.engine.distributed``).
    """
    check_settings(cfg)
    configure_determinism(bool(cfg.get("deterministic", False)))  # before CUDA starts (cuBLAS reads its setting then)
    ranks = ranks_from_environment()
    device = resolve_device(cfg.device, ranks)
    check_world_size(cfg, ranks)
    backend = distributed.backend_for(cfg.distributed.backend, device)
    with ProcessGroup(ranks, backend, device, cfg.distributed.timeout_s):
        check_same_config(cfg)
        return run_on_device(cfg, device, ranks)


def run_on_device(cfg: DictConfig, device: torch.device, ranks: Ranks) -> float:
    """The run of this rank (of all of it in one process), once the process group is up."""
    finished = distributed.broadcast(distributed.on_writer(lambda: finished_result(cfg)))
    if finished:
        return report_finished(*finished)
    window("skip_finished")  # checked, not yet locked: Tracker.start checks again under the config's lock
    distributed.on_writer(lambda: Tracker.check_not_in_progress(cfg, Path(cfg.checkpoint_dir)))  # before the data
    dataset = build(cfg.dataset.builder, "dataset.builder")
    sources, targets = choose_domains(dataset.domains, cfg.target, cfg.sources)
    splits = dataset.build(sources, targets)  # checks the data before any weights are fetched
    window("in_progress")  # data built, no live process held the run: Tracker.start checks again under the lock
    check_last_batch(len(splits.train), cfg, ranks)
    torch.manual_seed(cfg.seed)  # initial weights and masks
    method = build_method(cfg, sources).to(device)
    check_domain_passes(cfg, len(sources), ranks)
    if ranks.distributed and cfg.distributed.sync_batch_norm:
        distributed.convert_batch_norm(method)
    averaging = build_averaging(cfg)
    check_optimized_metric(cfg.optimized_metric, reported_metrics(splits, method, averaging))
    compute = configure_compute(method, cfg, device)
    loaders = build_loaders(splits, cfg, device, compute.channels_last)
    with sigterm_raises():
        try:
            summary = train_and_track(cfg, method, averaging, loaders, splits, compute.tags() | world_tags(ranks))
        except RunFinished as finished:
            return report_finished(*result_of(finished.run, cfg.optimized_metric))
    if ranks.is_writer:
        title = f"{method_label(cfg)} on {cfg.dataset.name} ({cfg.backbone.name}), MLflow run {summary['run_id']}"
        print_summary(summary, sources, targets, title)
    return summary[cfg.optimized_metric]


def finished_result(cfg: DictConfig) -> tuple[str, float] | None:
    """``resume=skip_finished``: the id and result of a finished run of this config, if there is one."""
    done = finished_run(cfg) if cfg.resume == "skip_finished" else None
    return result_of(done, cfg.optimized_metric) if done else None


def result_of(done, metric: str) -> tuple[str, float]:
    """The id of a finished run and its value of ``metric`` (checked: it must be one the run logged)."""
    check_optimized_metric(metric, sorted(done.data.metrics))
    return done.info.run_id, done.data.metrics[metric]


def report_finished(run_id: str, result: float) -> float:
    log.info("run %s already finished with this config: reporting its result", run_id)
    return result


def check_world_size(cfg: DictConfig, ranks: Ranks) -> None:
    """``batch_size`` is the global batch: it must split evenly among the ranks."""
    check_number("distributed.timeout_s", cfg.distributed.timeout_s, above=0)
    if cfg.batch_size % ranks.world_size:
        raise UserError(
            f"batch_size={cfg.batch_size} is the global batch, split among {ranks.world_size} processes: "
            f"it must be a multiple of {ranks.world_size}"
        )


def check_last_batch(samples: int, cfg: DictConfig, ranks: Ranks) -> None:
    """Every rank needs a sample of every training batch, the last, shorter one included."""
    last = 0 if cfg.drop_last or cfg.sampler != "shuffled" else samples % cfg.batch_size
    if 0 < last < ranks.world_size:
        raise UserError(
            f"the last training batch has {last} of the {samples} training samples, fewer than the "
            f"{ranks.world_size} processes: set drop_last=true or another batch_size"
        )


def check_same_config(cfg: DictConfig) -> None:
    """Every rank must have composed the same resolved config (same command line, same environment)."""
    keys = distributed.differing_keys(dict(flatten(OmegaConf.to_container(cfg, resolve=True))))
    if keys:
        raise UserError(
            f"the {distributed.current().world_size} processes composed different configs (differing keys: "
            f"{', '.join(keys)}): start every rank with the same command line and environment"
        )


def world_tags(ranks: Ranks) -> dict[str, str]:
    """The number of processes the run computed on (results equal those of one process: not in the config hash)."""
    return {"world_size": str(ranks.world_size)}


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
    curated = curated_params(cfg, splits)
    tracker = start_tracker(cfg, tags, splits, curated)
    checkpoints = RankZeroCheckpoints(Checkpointer(tracker.directory) if isinstance(tracker, Tracker) else None)
    try:
        history = checkpoints.restore(method, averaging)
        if isinstance(tracker, Tracker):
            log.info("%s: sources %s, targets %s", start_line(tracker, len(history), cfg.epochs), splits.sources,
                     splits.targets)  # fmt: skip
        history = fit(
            method, loaders, cfg.epochs, cfg.seed, checkpoints, shared_log(tracker), cfg.progress, averaging, history
        )
        averaged = finish_average(method, averaging, loaders, checkpoints, cfg.seed, len(history))
        summary = summarize(history, averaged)
        if checkpoints.files:
            finish_run(tracker, method, checkpoints.files, summary, history, splits.sources, cfg.keep_checkpoints)
    except BaseException as error:
        end_interrupted(tracker, error)
        if isinstance(error, UserError):
            error.run_id = tracker.run_id  # the run records it: the process's log is kept
        raise
    finally:
        tracker.release()
    checkpoints.remove()
    return summary | {"run_id": tracker.run_id}


def shared_log(tracker: Tracker | NoTracker):
    """``log_metrics`` for :func:`~dmg.engine.loop.fit` on every rank: rank 0 logs, and every rank goes on with the
    values the store holds (the first ones logged, for an epoch recomputed after a resume)."""
    return lambda metrics, step: distributed.broadcast(
        distributed.on_writer(lambda: tracker.log_metrics(metrics, step))
    )


def start_line(tracker: Tracker, done: int, epochs: int) -> str:
    """What this attempt does with the run: start it, continue it from its checkpoint, or train it again from
    epoch 1 (its checkpoint is not here: another machine's ``checkpoint_dir``, or killed before epoch 1 ended)."""
    run = f"run {tracker.run_id}"
    if not tracker.resumed:
        return f"starting {run}"
    if not done:
        return f"no checkpoint of {run} here ({tracker.directory}): training it again from epoch 1"
    if done >= epochs:
        return f"continuing {run} after its last epoch ({done} of {epochs}): finishing it"
    return f"continuing {run} from epoch {done + 1} of {epochs} (its checkpoint holds epochs 1-{done})"


def start_tracker(cfg: DictConfig, tags: dict[str, str], splits: DomainSplits, curated: dict) -> Tracker | NoTracker:
    """The run's MLflow tracker on rank 0 (the one writer); the other ranks get its run id and write nothing."""
    tracker = distributed.on_writer(
        lambda: Tracker.start(cfg, tags, Path(cfg.checkpoint_dir), dataset_input(cfg, splits), curated),
        shared=(UserError, RunFinished),
    )
    run_id = distributed.broadcast(tracker.run_id if tracker else None)
    return tracker if tracker is not None else NoTracker(run_id)


def end_interrupted(tracker: Tracker, error: BaseException) -> None:
    """Mark the run KILLED (Ctrl-C, SIGTERM, a scheduler's exit) or FAILED, without hiding ``error``; a signal that
    arrives meanwhile does not cut the marking short (launch.py then raises the stop)."""
    stopped = isinstance(error, (KeyboardInterrupt, Terminated, SystemExit)) or signals.stop_requested()
    try:
        with signals.not_interrupted():
            tracker.finish("KILLED" if stopped else "FAILED")
    except Exception as problem:  # noqa: BLE001 - the store may be what failed; the original error matters
        log.warning("could not mark run %s as ended: %s", tracker.run_id, problem)
    if stopped:
        log.warning("run %s interrupted: rerun the same command to continue it", tracker.run_id)


def resolve_device(name: str, ranks: Ranks | None = None) -> torch.device:
    """``auto``: CUDA when present, otherwise the CPU; under DDP ``auto`` and ``cuda`` mean ``cuda:<local rank>``."""
    try:
        device = torch.device(distributed.device_for(name, ranks or Ranks()))
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
        if not _is_config_error(cause):
            raise cause  # a bug in the component: its traceback, and a sweep re-queues the trial instead of FAIL
        raise UserError(f"bad {key} setting: {str(cause).splitlines()[0]}") from None


def _is_config_error(cause: BaseException) -> bool:
    """Whether ``instantiate`` failed on the config itself (an unknown ``_target_``, a key the constructor does not
    take, a missing argument, a value the constructor rejects with ``ValueError``) rather than by a bug inside the
    constructor's code."""
    if cause.__traceback__ is None or isinstance(cause, (InstantiationException, ValueError)):
        return True
    frames = traceback.extract_tb(cause.__traceback__)
    return isinstance(cause, (TypeError, ImportError, AttributeError)) and "hydra" in Path(frames[-1].filename).parts


def build_method(cfg: DictConfig, sources: list[str]) -> Method:
    """The backbone, then the method around it (method options come from the ``method/`` group)."""
    network: StagedNetwork = build(cfg.backbone.network, "backbone.network")
    check_input_size(network, cfg)
    check_optimizers(cfg.optim)
    return build(group_options(cfg.method), "method", network=network, domains=sources)


def check_domain_passes(cfg: DictConfig, sources: int, ranks: Ranks) -> None:
    """``method.forward=per_domain`` cuts every training batch into equal per-domain blocks: balanced batches only,
    in one process (a rank's shard of a balanced batch does not hold every domain equally)."""
    per_domain = cfg.method.get("forward", "joint") == "per_domain"
    if per_domain and ranks.distributed:
        raise UserError(
            f"method.forward=per_domain (one forward pass per source domain) runs in one process only, not on "
            f"{ranks.world_size} ranks: use method.forward=joint under torchrun or srun"
        )
    if not per_domain or (cfg.sampler == "balanced" and not cfg.batch_size % sources):
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
    return Compute(precision, channels_last, bool(cfg.compile), bool(cfg.get("deterministic", False)))


def build_loaders(splits: DomainSplits, cfg: DictConfig, device: torch.device, channels_last: bool = False) -> Loaders:
    """The training loader and one evaluation loader over every evaluated domain, batches on ``device``.

    Batches pass through the dataset's batch transforms there; with ``dataset.decode=gpu`` they are decoded
    there first, each image through the dataset's per-image transform.
    """
    encoded = cfg.dataset.get("decode", "cpu") == "gpu"

    def on_device(dataset: Dataset, role: str, batch_size: int, **options) -> OnDevice:
        workers = {"num_workers": cfg.num_workers, "pin_memory": device.type == "cuda"}
        loader = make_loader(dataset, batch_size, encoded=encoded, **workers, **options)  # batch_size: global
        decoder = (
            EncodedBatchDecoder(build(cfg.dataset.transforms[role], f"dataset.transforms.{role}")) if encoded else None
        )
        batch_transform = build(cfg.dataset.transforms[f"{role}_batch"], f"dataset.transforms.{role}_batch")
        return OnDevice(loader, device, batch_transform, channels_last, decoder)

    parts = evaluation_parts(splits)
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
        evaluation=on_device(
            evaluation, "eval", cfg.eval_batch_size, shuffle=False, batch_sampler=lambda **_: batches, sharding="deal"
        ),
        parts=parts,
        batch_parts=batches.owners,
    )


def evaluation_parts(splits: DomainSplits) -> list[EvaluationPart]:
    """The evaluated domains in the order of the evaluation loader: the sources' validation splits, then the
    targets' test splits."""
    parts = [EvaluationPart(name, True, len(data)) for name, data in splits.val.items()]
    return parts + [EvaluationPart(name, False, len(data)) for name, data in splits.test.items()]


def reported_metrics(splits: DomainSplits, method: Method, averaging: NoAveraging) -> list[str]:
    """The summary metrics the run will log, known before it trains (what ``optimized_metric`` may name)."""
    evaluated = evaluation_keys(evaluation_parts(splits)) + list(method.epoch_metrics())
    averaged = evaluated + list(averaging.summary_keys) if averaging.summary_keys else None
    return summary_keys(evaluated, averaged)


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


def curated_params(cfg: DictConfig, splits: DomainSplits) -> dict[str, str]:
    """The short list of params to compare runs by, under ``hp/``: the data, the backbone, and the method's knobs as
    the method receives them (its own options, optimisers and schedule; DMG's mask initialisation), and the weight
    averaging's. The full config stays in the params and in ``config.yaml``."""
    data = {"dataset": cfg.dataset.name, "target": "+".join(splits.targets), "sources": "+".join(splits.sources)}
    data |= {key: cfg[key] for key in ("seed", "epochs", "batch_size", "sampler")}
    data |= {"backbone": cfg.backbone.name, "pretrained": cfg.backbone.get("pretrained", False)}
    data |= {"method": method_label(cfg)}
    knobs = {key: value for key, value in group_options(cfg.method).items() if key not in ("input_shape", "_target_")}
    averaging = {f"averaging.{key}": value for key, value in group_options(cfg.averaging).items() if key != "_target_"}
    return {f"hp/{key}": value for key, value in flatten(data | knobs | averaging) if not key.endswith(".partial")}


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
    for step, metrics in summary_by_step(summary).items():
        tracker.log_metrics(metrics, step)
    checkpoints.load_best(method)
    for layer, iou in method.mask_overlaps().items():
        tracker.log_figure(mask_overlap_figure(iou, sources, layer), f"masks/iou_{layer}.png")
        tracker.log_figure(active_units_figure(history, sources, layer), f"masks/active_{layer}.png")
    kept = {"selected": [checkpoints.best], "all": [checkpoints.best, checkpoints.last], "none": []}[keep]
    for path in kept:
        tracker.log_artifact(path, "checkpoints")
    tracker.finish()
