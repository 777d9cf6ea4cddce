"""The training loop: train an epoch, evaluate in and out of domain, checkpoint, repeat.

Model selection follows the paper: the epoch with the best mean in-domain (source validation)
accuracy is selected, and the out-of-domain accuracy reported is the one at that epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

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
) -> list[Metrics]:
    """Train for ``epochs`` epochs (continuing from the last checkpoint if there is one); returns every epoch's metrics."""
    history = checkpoints.restore(method)
    if history:
        log.info("resuming after epoch %d of %d", len(history), epochs)
    for epoch in range(len(history), epochs):
        epoch_seed = seed * 100_003 + epoch  # batch order, augmentation and mask samples depend on (seed, epoch) only
        torch.manual_seed(epoch_seed)
        loaders.train.generator.manual_seed(epoch_seed)
        losses = train_epoch(method, loaders.train, f"epoch {epoch + 1}/{epochs}", progress)
        learning_rates = {f"lr/{name}": lr for name, lr in method.learning_rates().items()}  # the ones just used
        method.end_epoch()
        metrics = {**losses, **learning_rates, **evaluate(method, loaders), **method.epoch_metrics()}
        history.append(metrics)
        log.info("epoch %d: %s", epoch + 1, _headline(metrics))
        log_metrics(metrics, epoch + 1)  # MLflow step = 1-based epoch
        checkpoints.save(method, history, is_best=selected_epoch(history) == epoch)
    return history


def train_epoch(method: Method, loader: OnDevice, label: str, progress: bool) -> Metrics:
    """One pass over the training data; returns the mean of each loss term."""
    method.train()
    totals: Metrics = {}
    bar = tqdm(loader, desc=label, leave=False, disable=None if progress else True, dynamic_ncols=True)
    for x, y, d in bar:
        terms = method.update(x, y, d)
        for name, value in terms.items():
            totals[name] = totals.get(name, 0.0) + value
        bar.set_postfix(loss=f"{terms['loss']:.3f}", refresh=False)
    return {f"train/{name}": total / len(loader) for name, total in totals.items()}


@torch.no_grad()
def evaluate(method: Method, loaders: Loaders) -> Metrics:
    """In-domain accuracy per source (own-domain prediction), out-of-domain accuracy per target, and their means."""
    method.eval()
    val = {name: accuracy(method, loader, in_domain=True) for name, loader in loaders.val.items()}
    test = {name: accuracy(method, loader, in_domain=False) for name, loader in loaders.test.items()}
    metrics = {f"val/acc/{name}": value for name, value in val.items()}
    metrics.update({f"test/acc/{name}": value for name, value in test.items()})
    metrics["val/acc_mean"] = sum(val.values()) / len(val)
    metrics["test/acc_mean"] = sum(test.values()) / len(test)
    return metrics


def accuracy(method: Method, loader: OnDevice, in_domain: bool) -> float:
    correct = torch.zeros((), dtype=torch.long, device=loader.device)
    total = 0
    for x, y, d in loader:
        scores = method.predict(x, d if in_domain else None)
        correct += (scores.argmax(1) == y).sum()
        total += len(y)
    return correct.item() / max(total, 1)


def selected_epoch(history: list[Metrics]) -> int:
    """The epoch (0-based) with the best mean in-domain validation accuracy; the earliest on ties."""
    scores = [metrics[SELECTION_METRIC] for metrics in history]
    return scores.index(max(scores))


def _headline(metrics: Metrics) -> str:
    keys = ["train/loss", "val/acc_mean", "test/acc_mean"]
    return "  ".join(f"{key}={metrics[key]:.4f}" for key in keys if key in metrics)
