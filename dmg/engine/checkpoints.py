"""Checkpoints of a run, written atomically at the end of every epoch so an interrupted run can continue.

Two generations of the training state are kept (``last.pt`` and ``previous.pt``): a checkpoint that cannot be read
(truncated by a full disk, damaged by a copy) is named in a warning and the run continues from the one before it,
or from scratch; it never blocks the config.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

from dmg.errors import SetupError
from dmg.methods.base import Method

log = logging.getLogger(__name__)
UMASK = os.umask(0o022)  # read once, at import: os.umask can only be read by setting it
os.umask(UMASK)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, quota exceeded, over the process's file-size limit


class Checkpointer:
    """``last.pt``/``previous.pt`` (everything needed to continue) and ``best.pt`` (the selected epoch's weights)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.last = self.directory / "last.pt"
        self.previous = self.directory / "previous.pt"
        self.best = self.directory / "best.pt"

    def save(self, method: Method, history: list[dict], is_best: bool, averaging=None) -> None:
        """``averaging``: a weight-averaging state (``state_dict``/``load_state_dict``) that continues on resume."""
        epoch = len(history)  # the epoch just ended, counted from 1
        if is_best:
            self.save_best(method, epoch)
        state = {"model": method.state_dict(), "training": method.training_state(), "history": history}
        state |= {"epoch": epoch, "epochs_from": 1}
        if averaging is not None:
            state["averaging"] = averaging.state_dict()
        _atomic_save(state, self.last, keep_as=self.previous)

    def save_best(self, method: Method, epoch: int) -> None:
        """The selected model's weights (the best epoch's, or the averaged ones); ``epoch`` counts from 1."""
        _atomic_save({"epoch": epoch, "epochs_from": 1, "model": method.state_dict()}, self.best)

    def restore(self, method: Method, averaging=None) -> list[dict]:
        """Load the newest readable checkpoint into ``method`` (and ``averaging``); returns the metrics history so far
        ([] if none)."""
        self.remove_partial_writes()
        state = next(filter(None, map(_read, (self.last, self.previous))), None)
        if state and self.best.exists() and _read(self.best) is None:
            state = None  # the selected model cannot be rebuilt without training again
        if state is None:
            if any(path.exists() for path in (self.last, self.previous, self.best)):
                log.warning("no usable checkpoint in %s: training starts from scratch", self.directory)
            return []
        method.load_state_dict(state["model"])
        method.load_training_state(state["training"])
        if averaging is not None and "averaging" in state:
            averaging.load_state_dict(state["averaging"])
        return state["history"]

    def load_best(self, method: Method) -> int:
        """Load the selected epoch's weights into ``method``; returns that epoch (counted from 1)."""
        state = one_based(torch.load(self.best, map_location="cpu", weights_only=True))
        method.load_state_dict(state["model"])
        return state["epoch"]

    def remove_partial_writes(self) -> None:
        """Delete temporary files of writes that a killed process left (call only while holding the run's lock)."""
        for leftover in self.directory.glob("*.tmp"):
            leftover.unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the run's local folder (a finished run's model lives in MLflow)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def one_based(state: dict) -> dict:
    """A checkpoint's ``epoch`` counted from 1, as every checkpoint since ``epochs_from`` was added; the ones
    written before it counted from 0."""
    if "epochs_from" not in state:
        state = state | {"epoch": state["epoch"] + 1, "epochs_from": 1}
    return state


def _read(path: Path) -> dict | None:
    """A checkpoint's content, or None (with a warning naming the file) if it is missing or damaged (truncated, not
    an archive, bad pickle data). Any other error (a class that no longer imports, a failing disk) is raised: the
    file may be sound, and training again from an older state would hide the problem."""
    if not path.exists():
        return None
    try:
        return one_based(torch.load(path, map_location="cpu", weights_only=False))
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError) as error:
        if isinstance(error, RuntimeError) and "PytorchStreamReader" not in str(error):
            raise  # not the archive's damage: a bug or the machine, with its traceback
        log.warning("checkpoint %s cannot be read (%s: %s)", path, type(error).__name__, str(error).splitlines()[0])
        return None


def _atomic_save(obj: dict, path: Path, keep_as: Path | None = None) -> None:
    """Write to a temporary file beside ``path`` and rename it: a crash never leaves a half-written checkpoint.

    With ``keep_as``, the file being replaced is kept under that name (one older generation).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.chmod(temporary, 0o666 & ~UMASK)  # mkstemp makes it private; a checkpoint is as readable as any file
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        if keep_as and path.exists():
            os.replace(path, keep_as)
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if full := _disk_full(error):
            raise SetupError(
                f"checkpoint_dir: no room to write {path} ({full}): free space there or set checkpoint_dir to "
                "another disk, then rerun the same command to continue"
            ) from None
        raise


def _disk_full(error: BaseException) -> str | None:
    """What the OS said if ``error`` (or the error it wraps: torch reports a failed write as a RuntimeError) is a
    full disk, an exhausted quota or a file-size limit; None for any other error."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            return os.strerror(error.errno)
        error = error.__cause__ or error.__context__
    return None
