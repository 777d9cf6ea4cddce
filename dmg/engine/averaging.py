"""Weight averaging over training, for any method: ``averaging=none`` or ``averaging=swad`` (conf/averaging/).

SWAD (Cha et al., "SWAD: Domain Generalization by Seeking Flat Minima", NeurIPS 2021) averages the weights
densely, after every step, over a range of steps it finds from the in-domain validation loss. Here a segment
is one epoch (the loop evaluates once per epoch): the steps of each epoch are averaged into a segment, whose
validation loss is that of the online model at the epoch's end. Then, as the official ``LossValley``:

- the average starts at the first segment ``s`` whose loss is the lowest of the ``n_converge`` segments from
  ``s`` on; the tolerance is ``(1 + tolerance_ratio)`` x the mean loss of those segments, and the average also
  takes up to ``n_tolerance - n_converge`` segments before ``s`` whose losses stay within it;
- every later segment joins while the lowest loss among it and the ``n_tolerance - 1`` segments after it stays
  within the tolerance; the first that fails ends the average (the loss valley is left);
- at the end of training, the last segments are judged on the segments there are; without a start the average
  is the last segment.

Each segment counts once (the official code adds the start segment twice and, when the average begins before
``s``, overwrites its first segment; we average each chosen segment once). Every parameter of the method is
averaged (DMG's mask logits too); BatchNorm statistics are then recomputed for the averaged weights with the
training forward of the in-domain prediction over ``bn_batches`` training batches, and the averaged model is
evaluated and reported. Training runs all its epochs (the official code stops when the valley is left), so the
online model's results are those of a run without averaging.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from dmg.errors import check_count, check_number

Weights = list[torch.Tensor]


class NoAveraging:
    """``averaging=none``: the online model is the one reported."""

    bn_batches = 0
    summary_keys: tuple[str, ...] = ()  # what ``summary`` returns; none: the online model is reported

    def after_step(self, method: nn.Module) -> None:
        pass

    def end_epoch(self, validation_loss: float) -> None:
        pass

    def final_weights(self) -> Weights | None:
        return None

    def summary(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class LossValley:
    """Which segments SWAD averages, decided from the segments' validation losses as they arrive."""

    n_converge: int = 3
    n_tolerance: int = 6
    tolerance_ratio: float = 0.3
    losses: list[float] = field(default_factory=list)
    start: int | None = None  # the first averaged segment
    threshold: float | None = None
    next: int | None = None  # the first segment not decided yet (after the start)
    included: list[int] = field(default_factory=list)
    ended: bool = False  # the valley was left: nothing joins any more

    def add(self, loss: float) -> list[int]:
        """Record the next segment's loss; returns the segments that join the average now."""
        self.losses.append(loss)
        if self.ended:
            return []
        return self._extend(final=False) if self.start is not None else self._find_start()

    def finish(self) -> list[int]:
        """At the end of training: the undecided segments that join, judged on the segments there are."""
        return self._extend(final=True) if self.start is not None and not self.ended else []

    def keeps(self, segment: int) -> bool:
        """Whether a segment not yet averaged may still join."""
        if self.ended:
            return False
        if self.start is None:
            return segment > len(self.losses) - 1 - max(self.n_tolerance, self.n_converge)
        return segment >= self.next

    def _find_start(self) -> list[int]:
        first = len(self.losses) - self.n_converge
        if first < 0:
            return []
        window = self.losses[first:]
        if window[0] > min(window):  # still descending
            return []
        self.threshold = (1 + self.tolerance_ratio) * sum(window) / len(window)
        self.start = first
        while self.start > max(first - (self.n_tolerance - self.n_converge), 0):
            if self.losses[self.start - 1] > self.threshold:
                break
            self.start -= 1
        self.next = first + 1
        return self._join(range(self.start, first + 1)) + self._extend(final=False)

    def _extend(self, final: bool) -> list[int]:
        joined = []
        while self.next < len(self.losses):
            window = self.losses[self.next : self.next + self.n_tolerance]
            if len(window) < self.n_tolerance and not final:
                break
            if min(window) > self.threshold:
                self.ended = True
                break
            joined += self._join([self.next])
            self.next += 1
        return joined

    def _join(self, segments) -> list[int]:
        self.included += list(segments)
        return list(segments)


class SWAD(NoAveraging):
    """Dense weight averaging over the loss valley of the in-domain validation loss (see the module docstring)."""

    summary_keys = ("first_epoch", "last_epoch", "epochs", "converged")

    def __init__(self, n_converge: int = 3, n_tolerance: int = 6, tolerance_ratio: float = 0.3, bn_batches: int = 500):
        for key, value in (("n_converge", n_converge), ("n_tolerance", n_tolerance), ("bn_batches", bn_batches)):
            check_count(key, value, 1)
        check_number("tolerance_ratio", tolerance_ratio, least=0)
        self.valley = LossValley(n_converge, n_tolerance, tolerance_ratio)
        self.bn_batches = bn_batches
        self.segment: Weights | None = None  # running mean of this epoch's steps, on the training device
        self.segment_steps = 0
        self.pending: dict[int, Weights] = {}  # closed segments that may still join (CPU)
        self.average: Weights | None = None  # mean of the segments joined so far (CPU)
        self.averaged_segments = 0

    @torch.no_grad()
    def after_step(self, method: nn.Module) -> None:
        if not getattr(method, "last_step_taken", True):  # an fp16 step the gradient scaler skipped is no step
            return
        parameters = [parameter.detach() for parameter in method.parameters()]
        self.segment_steps += 1
        if self.segment is None:
            self.segment = [parameter.clone() for parameter in parameters]
        else:
            torch._foreach_lerp_(self.segment, parameters, 1.0 / self.segment_steps)

    def end_epoch(self, validation_loss: float) -> None:
        """Close the epoch's segment with the online model's in-domain validation loss."""
        index = len(self.valley.losses)
        self.pending[index] = [tensor.cpu() for tensor in self.segment]
        self.segment, self.segment_steps = None, 0
        for joined in self.valley.add(validation_loss):
            self.average, self.averaged_segments = _joined(self.average, self.averaged_segments, self.pending[joined])
        self.pending = {index: weights for index, weights in self.pending.items() if self.valley.keeps(index)}

    def final_weights(self) -> Weights | None:
        """The averaged weights at the end of training (this object's state is left as it is)."""
        valley = copy.deepcopy(self.valley)
        average, count = self.average, self.averaged_segments
        for joined in valley.finish():
            average, count = _joined(average, count, self.pending[joined])
        if average is None and self.pending:  # no valley found: the last segment, as the official code
            return self.pending[max(self.pending)]
        return average

    def summary(self) -> dict[str, float]:
        """The averaged range as 1-based epochs, how many there are, and whether a start was found."""
        valley = copy.deepcopy(self.valley)
        segments = valley.included + valley.finish() or [len(valley.losses) - 1]
        return {
            "first_epoch": min(segments) + 1,
            "last_epoch": max(segments) + 1,
            "epochs": len(segments),
            "converged": float(valley.start is not None),
        }

    def state_dict(self) -> dict:
        return {
            "valley": copy.deepcopy(vars(self.valley)),
            "segment": self.segment,
            "segment_steps": self.segment_steps,
            "pending": self.pending,
            "average": self.average,
            "averaged_segments": self.averaged_segments,
        }

    def load_state_dict(self, state: dict) -> None:
        self.valley = LossValley(**state["valley"])
        self.segment, self.segment_steps = state["segment"], state["segment_steps"]
        self.pending, self.average = state["pending"], state["average"]
        self.averaged_segments = state["averaged_segments"]


def _joined(average: Weights | None, count: int, segment: Weights) -> tuple[Weights, int]:
    """The running mean of ``count`` segments with one more."""
    if average is None:
        return [tensor.clone() for tensor in segment], 1
    average = [tensor.clone() for tensor in average]
    torch._foreach_lerp_(average, segment, 1.0 / (count + 1))
    return average, count + 1
