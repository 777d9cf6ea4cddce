"""What makes a CUDA device wait for the host, seen at the ATen operator level on any device.

A training step should only queue work on the device. Some operators make the host wait for the device to
finish before they return: those whose output size depends on device values (``nonzero``, boolean-mask
indexing, ``masked_select``, ``unique``, ``bincount``, ``repeat_interleave`` without ``output_size``), those that
copy a value to the host (``.item()``, ``bool(tensor)``, ``int(tensor)``, ``equal``, ``allclose``: all
``_local_scalar_dense`` or ``equal``), ``one_hot``, which checks its range on the host, and ``torch.tensor`` of Python
values (``lift_fresh``), a blocking copy from pageable host memory when made on a GPU. On the CPU they cost
nothing, so :class:`SyncCounter` records them as they run: what a CUDA run would wait for, found without a GPU.
With CUDA present, ``torch.cuda.set_sync_debug_mode("error")`` is the device's own check (:func:`cuda_sync_errors`).

``tolist()``, ``numpy()`` and ``cpu()`` of a CPU tensor reach no operator; :class:`SyncCounter` also patches
them at the Python level.
"""

from __future__ import annotations

import contextlib
import traceback
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Operators that wait for the device whatever their arguments (overload packets: every overload counts).
SYNCING_OPERATORS = {
    aten._local_scalar_dense: "item",  # .item(), bool(), int(), float(), is_nonzero, allclose
    aten.nonzero: "nonzero",
    aten.argwhere: "nonzero",
    aten.bincount: "bincount",
    aten._unique: "unique",
    aten._unique2: "unique",
    aten.unique_dim: "unique",
    aten.unique_consecutive: "unique",
    aten.masked_select: "masked_select",
    aten.equal: "equal",
    aten.allclose: "allclose",
    aten.is_nonzero: "item",
    aten.one_hot: "one_hot",
    aten.histc: "histc",
    aten.lift_fresh: "tensor from host data",  # torch.tensor(values, device=cuda): a blocking copy from the host
}
INDEXING_OPERATORS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
PYTHON_READS = ("tolist", "numpy", "cpu")


class SyncCounter(TorchDispatchMode):
    """Records every operator that would make a CUDA device wait: ``self.calls`` is a list of ``(what, where)``.

    ``exempt``: ids of tensors whose reads wait for nothing (torch.optim's step counters, kept on the host by
    design when the optimiser is neither fused nor capturable).
    """

    def __init__(self, exempt: set[int] = frozenset()):
        super().__init__()
        self.exempt = exempt
        self.calls: list[tuple[str, str]] = []
        self._patches = contextlib.ExitStack()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = syncing(func, args, kwargs)
        if what and not (what == "item" and id(args[0]) in self.exempt):
            self._record(what)
        return func(*args, **kwargs)

    def _record(self, what: str) -> None:
        frames = [frame for frame in traceback.extract_stack()[:-2] if not _internal(frame.filename)]
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        self.calls.append((what, where))

    def counts(self) -> Counter:
        """How many times each kind of syncing operator ran."""
        return Counter(what for what, _ in self.calls)

    def __enter__(self):
        for name in PYTHON_READS:
            original = getattr(torch.Tensor, name)
            self._patches.enter_context(_patched(name, self._python_read(name, original)))
        return super().__enter__()

    def __exit__(self, *exc):
        self._patches.close()
        return super().__exit__(*exc)

    def _python_read(self, name, original):
        def read(tensor, *args, **kwargs):
            if id(tensor) not in self.exempt:
                self._record(name)
            return original(tensor, *args, **kwargs)

        return read


def syncing(func, args, kwargs) -> str | None:
    """The kind of host sync operator ``func`` makes with these arguments, or None."""
    packet = func.overloadpacket
    if packet in SYNCING_OPERATORS:
        return SYNCING_OPERATORS[packet]
    if packet in INDEXING_OPERATORS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return "boolean-mask indexing"
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave"
    return None


@contextlib.contextmanager
def _patched(name: str, replacement):
    original = getattr(torch.Tensor, name)
    setattr(torch.Tensor, name, replacement)
    try:
        yield
    finally:
        setattr(torch.Tensor, name, original)


def _internal(filename: str) -> bool:
    return "/torch/" in filename or filename.endswith("syncs.py") or "/contextlib.py" in filename


def optimizer_step_counters(optimizers) -> set[int]:
    """Ids of torch.optim's per-parameter step counters: host tensors unless the optimiser is fused or capturable,
    so reading them waits for nothing."""
    ids = set()
    for optimizer in optimizers:
        if optimizer.defaults.get("fused") or optimizer.defaults.get("capturable"):
            continue
        ids.update(id(state["step"]) for state in optimizer.state.values() if "step" in state)
    return ids


@contextlib.contextmanager
def cuda_sync_errors():
    """``torch.cuda.set_sync_debug_mode("error")`` for the block: any synchronising CUDA call raises."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def step_syncs(method, averaging, batches) -> list[Counter]:
    """The syncing operators of each whole training step (the method's update, the weight averaging, the loss
    totals) over ``batches`` of ``(x, y, d)``, after one warm-up pass that creates the optimisers' state."""
    from dmg.engine.loop import LossTotals

    method.train()
    totals = LossTotals(first_step=method.steps + 1)
    for x, y, d in batches:  # warm-up: every optimiser steps and creates its state (DANN's players take turns)
        totals.add(method.update(x, y, d))
        averaging.after_step(method)
    per_step = []
    for x, y, d in batches:
        with SyncCounter(optimizer_step_counters(method.optimizers.values())) as counter:
            totals.add(method.update(x, y, d))
            averaging.after_step(method)
        per_step.append(counter)
    return per_step
