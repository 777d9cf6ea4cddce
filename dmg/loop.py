"""The training loop: train an epoch, evaluate in and out of domain, checkpoint, repeat.

Model selection follows the paper: the epoch with the best mean in-domain (source validation)
accuracy is selected, and the out-of-domain accuracy reported is the one at that epoch. With weight
averaging (``averaging=swad``) the averaged model is reported instead, and the online model's results
are kept beside it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dmg.averaging import NoAveraging
from dmg.checkpoints import Checkpointer
from dmg.data.loading import OnDevice
from dmg.methods.base import Method

log = logging.getLogger(__name__)

SELECTION_METRIC = "val/acc_mean"
Metrics = dict[str, float]


@dataclass
class Loaders:
    """Batches ``(x, y, d)`` already on the training device."""

    train: OnDevice  # every source domain, shuffled
    val: dict[str, OnDevice]  # per source domain: in-domain evaluation
    test: dict[str, OnDevice]  # per target domain: out-of-domain evaluation


def fit(
    method: Method,
    loaders: Loaders,
    epochs: int,
    seed: int,
    checkpoints: Checkpointer,
    log_metrics: Callable[[Metrics, int], None],
    progress: bool = True,
    averaging: NoAveraging | None = None,
) -> list[Metrics]:
    """Train for ``epochs`` epochs (continuing from the last checkpoint if there is one); returns every epoch's metrics.

    ``averaging`` (default: none) sees every step and every epoch's validation loss, and is checkpointed.
    """
    averaging = averaging or NoAveraging()
    history = checkpoints.restore(method, averaging)
    if history:
        log.info("resuming after epoch %d of %d", len(history), epochs)
    for epoch in range(len(history), epochs):
        reseed(loaders.train, seed, epoch)
        losses = train_epoch(method, loaders.train, f"epoch {epoch + 1}/{epochs}", progress, averaging)
        learning_rates = {f"lr/{name}": lr for name, lr in method.learning_rates().items()}  # the ones just used
        method.end_epoch()
        metrics = {**losses, **learning_rates, **evaluate(method, loaders), **method.epoch_metrics()}
        averaging.end_epoch(metrics["val/loss_mean"])
        history.append(metrics)
        log.info("epoch %d: %s", epoch + 1, _headline(metrics))
        log_metrics(metrics, epoch + 1)  # MLflow step = 1-based epoch
        checkpoints.save(method, history, is_best=selected_epoch(history) == epoch, averaging=averaging)
    return history


def reseed(train: OnDevice, seed: int, epoch: int) -> None:
    """Batch order, augmentation and random draws of an epoch depend on (seed, epoch) only."""
    epoch_seed = seed * 100_003 + epoch
    torch.manual_seed(epoch_seed)
    train.generator.manual_seed(epoch_seed)


def train_epoch(
    method: Method, loader: OnDevice, label: str, progress: bool, averaging: NoAveraging | None = None
) -> Metrics:
    """One pass over the training data; returns the mean of each loss term."""
    method.train()
    averaging = averaging or NoAveraging()
    totals: Metrics = {}
    bar = tqdm(loader, desc=label, leave=False, disable=None if progress else True, dynamic_ncols=True)
    for x, y, d in bar:
        terms = method.update(x, y, d)
        averaging.after_step(method)
        for name, value in terms.items():
            totals[name] = totals.get(name, 0.0) + value
        bar.set_postfix(loss=f"{terms['loss']:.3f}", refresh=False)
    return {f"train/{name}": total / len(loader) for name, total in totals.items()}


@torch.no_grad()
def evaluate(method: Method, loaders: Loaders) -> Metrics:
    """In-domain accuracy and cross-entropy per source (own-domain prediction), out-of-domain accuracy per target,
    and their means."""
    method.eval()
    val = {name: accuracy_and_loss(method, loader, in_domain=True) for name, loader in loaders.val.items()}
    test = {name: accuracy_and_loss(method, loader, in_domain=False)[0] for name, loader in loaders.test.items()}
    metrics = {f"val/acc/{name}": value for name, (value, _) in val.items()}
    metrics.update({f"val/loss/{name}": loss for name, (_, loss) in val.items()})
    metrics.update({f"test/acc/{name}": value for name, value in test.items()})
    metrics["val/acc_mean"] = sum(value for value, _ in val.values()) / len(val)
    metrics["val/loss_mean"] = sum(loss for _, loss in val.values()) / len(val)
    metrics["test/acc_mean"] = sum(test.values()) / len(test)
    return metrics


def accuracy_and_loss(method: Method, loader: OnDevice, in_domain: bool) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of the predictions (the loss is meaningful for logits only)."""
    correct = torch.zeros((), dtype=torch.long, device=loader.device)
    loss = torch.zeros((), device=loader.device)
    total = 0
    for x, y, d in loader:
        scores = method.predict(x, d if in_domain else None)
        correct += (scores.argmax(1) == y).sum()
        loss += F.cross_entropy(scores, y, reduction="sum")
        total += len(y)
    return correct.item() / max(total, 1), loss.item() / max(total, 1)


def finish_average(
    method: Method, averaging: NoAveraging, loaders: Loaders, checkpoints: Checkpointer, seed: int, epochs: int
) -> Metrics:
    """Load the averaged weights into ``method``, recompute its BatchNorm statistics, evaluate it and save it as the
    selected model; returns its metrics (empty without averaging)."""
    weights = averaging.final_weights()
    if weights is None:
        return {}
    with torch.no_grad():
        for parameter, averaged in zip(method.parameters(), weights):
            parameter.copy_(averaged)
    reseed(loaders.train, seed, epochs)  # the batches of the epoch after the last
    recompute_batch_norm(method, loaders.train, averaging.bn_batches)
    metrics = {**evaluate(method, loaders), **method.epoch_metrics(), **averaging.summary()}
    checkpoints.save_best(method, epochs - 1)
    return metrics


@torch.no_grad()
def recompute_batch_norm(method: Method, loader: OnDevice, batches: int) -> None:
    """BatchNorm running statistics as the plain average over ``batches`` training batches (SWAD's ``update_bn``),
    computed with the in-domain prediction in training mode."""
    norms = [module for module in method.modules() if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or not len(loader):
        return
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average
    method.train()
    for x, _, d in itertools.islice(_forever(loader), batches):
        method.predict(x, d)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum


def _forever(loader: OnDevice):
    while True:
        yield from loader


def selected_epoch(history: list[Metrics]) -> int:
    """The epoch (0-based) with the best mean in-domain validation accuracy; the earliest on ties."""
    scores = [metrics[SELECTION_METRIC] for metrics in history]
    return scores.index(max(scores))


def _headline(metrics: Metrics) -> str:
    keys = ["train/loss", "val/acc_mean", "test/acc_mean"]
    return "  ".join(f"{key}={metrics[key]:.4f}" for key in keys if key in metrics)
