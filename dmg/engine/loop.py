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

from dmg.data.loading import OnDevice
from dmg.data.seeding import epoch_seed
from dmg.engine import distributed
from dmg.engine.averaging import NoAveraging
from dmg.engine.checkpoints import Checkpointer
from dmg.errors import NonFiniteLossError
from dmg.methods.base import Method

log = logging.getLogger(__name__)

SELECTION_METRIC = "val/acc_mean"
PROGRESS_EVERY = 25  # steps between updates of the progress bar's running loss (each one reads the device)
Metrics = dict[str, float]


@dataclass(frozen=True)
class EvaluationPart:
    """One evaluated domain: a source's validation split (in-domain) or a target's test split (out-of-domain)."""

    name: str
    in_domain: bool
    size: int


@dataclass
class Loaders:
    """Batches ``(x, y, d)`` already on the training device."""

    train: OnDevice  # every source domain, shuffled or balanced (``sampler``)
    evaluation: OnDevice  # every part in turn, sources' val then targets' test; no batch straddles two parts
    parts: list[EvaluationPart]
    batch_parts: list[int]  # the part of each evaluation batch


def fit(
    method: Method,
    loaders: Loaders,
    epochs: int,
    seed: int,
    checkpoints: Checkpointer,
    log_metrics: Callable[[Metrics, int], Metrics],
    progress: bool = True,
    averaging: NoAveraging | None = None,
    history: list[Metrics] | None = None,
) -> list[Metrics]:
    """Train for ``epochs`` epochs (continuing from the last checkpoint if there is one); returns every epoch's metrics.

    ``averaging`` (default: none) sees every step and every epoch's validation loss, and is checkpointed.
    ``history``: the metrics of the epochs the caller already restored from ``checkpoints``; None: restored here.
    """
    averaging = averaging or NoAveraging()
    if history is None:
        history = checkpoints.restore(method, averaging)
    loaders.evaluation.set_epoch(seed, 0)  # every epoch evaluates the same images
    for epoch in range(len(history), epochs):
        start_epoch(loaders.train, seed, epoch)
        trained = train_epoch(method, loaders.train, f"epoch {epoch + 1}/{epochs}", progress, averaging)
        method.end_epoch()
        metrics = {**trained, **evaluate(method, loaders), **method.epoch_metrics()}
        # MLflow step = 1-based epoch; an epoch recomputed after a resume keeps the values logged the first time
        metrics = log_metrics(metrics, epoch + 1)
        averaging.end_epoch(metrics["val/loss_mean"])
        history.append(metrics)
        log.info("epoch %d: %s", epoch + 1, _headline(metrics))
        checkpoints.save(method, history, is_best=selected_epoch(history) == epoch, averaging=averaging)
    return history


def start_epoch(train: OnDevice, seed: int, epoch: int) -> None:
    """Batch order and augmentation ((seed, epoch, sample)) and the steps' own random draws (DMG's mask samples,
    (seed, epoch)) of an epoch depend on the seed and epoch only."""
    torch.manual_seed(epoch_seed(seed, epoch))
    train.set_epoch(seed, epoch)


def train_epoch(
    method: Method, loader: OnDevice, label: str, progress: bool, averaging: NoAveraging | None = None
) -> Metrics:
    """One pass over the training data; returns the mean of each loss term (``train/<term>``) and the learning
    rates the epoch's last step used (``lr/<optimiser>``: a per-step schedule has moved on after it).

    The loss terms are summed on the device, so the steps never wait for it; the sums are read, and checked
    for a non-finite loss, at the end of the epoch (and every ``PROGRESS_EVERY`` steps while a progress bar
    shows them). A non-finite loss ends the run before the epoch's checkpoint is written. Under DDP each rank sums
    its terms weighted by its share of each batch, and the ranks' sums are added up at the end of the epoch: the
    means of the global batches, on every rank.
    """
    method.train()
    averaging = averaging or NoAveraging()
    totals = LossTotals(first_step=method.steps + 1)
    show = progress and distributed.current().is_writer
    bar = tqdm(loader, desc=label, leave=False, disable=None if show else True, dynamic_ncols=True)
    rates = method.learning_rates()
    for x, y, d in bar:
        rates = method.learning_rates()  # read from the optimisers: no device access
        totals.add(method.update(x, y, d), distributed.batch_shard(len(y)).weight)
        averaging.after_step(method)
        if not bar.disable and totals.steps % PROGRESS_EVERY == 0:
            bar.set_postfix(loss=f"{totals.means()['loss']:.3f}", refresh=False)  # rank 0's shards only
    totals.combine_ranks()
    losses = {f"train/{name}": mean for name, mean in totals.means().items()}
    return losses | {f"lr/{name}": rate for name, rate in rates.items()}


class LossTotals:
    """The sums of an epoch's loss terms, on the device, and the first step whose loss was not finite."""

    def __init__(self, first_step: int):
        self.first_step = first_step  # the method's step count at the first step summed
        self.steps = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.first_bad: torch.Tensor | None = None  # steps counted from 1; 0 while every loss was finite

    def add(self, terms: dict[str, torch.Tensor], weight: float = 1.0) -> None:
        """``weight``: this rank's share of the batch (1 in one process)."""
        self.steps += 1
        if weight != 1.0:
            terms = {name: value * weight for name, value in terms.items()}
        for name, value in terms.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        bad = ~torch.isfinite(terms["loss"])
        if self.first_bad is None:
            self.first_bad = torch.zeros((), dtype=torch.long, device=terms["loss"].device)
        self.first_bad = torch.where(bad & (self.first_bad == 0), self.steps, self.first_bad)

    def combine_ranks(self) -> None:
        """Add up the ranks' weighted sums; the first non-finite step is the earliest of any rank."""
        if not self.steps or not distributed.current().distributed:
            return
        names = list(self.sums)
        totals = distributed.sum_across_ranks(torch.stack([self.sums[name] for name in names]))
        self.sums = dict(zip(names, totals.unbind()))
        never = torch.full_like(self.first_bad, self.steps + 1)
        earliest = distributed.min_across_ranks(torch.where(self.first_bad > 0, self.first_bad, never))
        self.first_bad = torch.where(earliest > self.steps, 0, earliest)

    def means(self) -> Metrics:
        """The mean of each term so far: one read from the device; raises :class:`NonFiniteLossError`."""
        if not self.steps:
            return {}
        values = torch.stack([value.double() for value in [*self.sums.values(), self.first_bad]]).tolist()
        means = {name: total / self.steps for name, total in zip(self.sums, values)}
        if values[-1]:
            last = self.first_step + self.steps - 1
            raise NonFiniteLossError(self.first_step + int(values[-1]) - 1, means, (self.first_step, last))
        return means


@torch.no_grad()
def evaluate(method: Method, loaders: Loaders) -> Metrics:
    """In-domain accuracy and cross-entropy per source (own-domain prediction), out-of-domain accuracy per target,
    and their means.

    One pass over every evaluated domain; the sums stay on the device until the end. Under DDP the ranks take
    turns at the batches and their sums are added up.
    """
    method.eval()
    parts = loaders.parts
    device = loaders.evaluation.device
    correct = torch.zeros(len(parts), dtype=torch.long, device=device)
    losses = torch.zeros(len(parts), device=device)
    for part, (x, y, d) in zip(distributed.dealt(loaders.batch_parts), loaders.evaluation):
        with method.autocast():
            scores = method.predict(x, d if parts[part].in_domain else None)
        correct[part] += (scores.argmax(1) == y).sum()
        losses[part] += F.cross_entropy(scores.float(), y, reduction="sum")  # meaningful for logits only
    sizes = torch.tensor([max(part.size, 1) for part in parts], dtype=torch.float64)
    totals = distributed.sum_across_ranks(torch.stack([correct.double(), losses.double()]))
    accuracies, mean_losses = (totals.cpu() / sizes).tolist()  # one read
    val = {p.name: (acc, loss) for p, acc, loss in zip(parts, accuracies, mean_losses) if p.in_domain}
    test = {p.name: acc for p, acc in zip(parts, accuracies) if not p.in_domain}
    metrics = {f"val/acc/{name}": value for name, (value, _) in val.items()}
    metrics.update({f"val/loss/{name}": loss for name, (_, loss) in val.items()})
    metrics.update({f"test/acc/{name}": value for name, value in test.items()})
    metrics["val/acc_mean"] = sum(value for value, _ in val.values()) / len(val)
    metrics["val/loss_mean"] = sum(loss for _, loss in val.values()) / len(val)
    metrics["test/acc_mean"] = sum(test.values()) / len(test)
    return metrics


def evaluation_keys(parts: list[EvaluationPart]) -> list[str]:
    """The names of the metrics :func:`evaluate` returns for ``parts``."""
    sources = [part.name for part in parts if part.in_domain]
    targets = [part.name for part in parts if not part.in_domain]
    names = [f"val/acc/{name}" for name in sources] + [f"val/loss/{name}" for name in sources]
    return names + [f"test/acc/{name}" for name in targets] + ["val/acc_mean", "val/loss_mean", "test/acc_mean"]


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
    start_epoch(loaders.train, seed, epochs)  # the batches of the epoch after the last
    recompute_batch_norm(method, loaders.train, averaging.bn_batches)
    metrics = {**evaluate(method, loaders), **method.epoch_metrics(), **averaging.summary()}
    checkpoints.save_best(method, epochs)
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
        with method.autocast():
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
