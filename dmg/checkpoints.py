"""Checkpoints of a run, written atomically at the end of every epoch so an interrupted run can continue."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from dmg.methods.base import Method


class Checkpointer:
    """``last.pt`` (everything needed to continue) and ``best.pt`` (weights of the selected epoch) in ``directory``."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.last = self.directory / "last.pt"
        self.best = self.directory / "best.pt"

    def save(self, method: Method, history: list[dict], is_best: bool) -> None:
        epoch = len(history) - 1
        if is_best:
            _atomic_save({"epoch": epoch, "model": method.state_dict()}, self.best)
        state = {"epoch": epoch, "model": method.state_dict(), "training": method.training_state(), "history": history}
        _atomic_save(state, self.last)

    def restore(self, method: Method) -> list[dict]:
        """Load the last checkpoint into ``method`` if there is one; returns the metrics history so far."""
        if not self.last.exists():
            return []
        state = torch.load(self.last, map_location="cpu", weights_only=False)
        method.load_state_dict(state["model"])
        method.load_training_state(state["training"])
        return state["history"]

    def load_best(self, method: Method) -> int:
        """Load the selected epoch's weights into ``method``; returns that epoch."""
        state = torch.load(self.best, map_location="cpu", weights_only=True)
        method.load_state_dict(state["model"])
        return state["epoch"]


def _atomic_save(obj: dict, path: Path) -> None:
    """Write to a temporary file beside ``path`` and rename it: a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
