"""The folder Hydra makes for a single run (``outputs/<date>/<time>/``): removed again when the run is refused
before it started, so that bad input leaves nothing behind, but never while another run started in the same second
shares it, nor when it holds anything but Hydra's own files."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from hydra.types import RunMode
from omegaconf import DictConfig

HYDRA_FILES = ("config", "hydra", "overrides")  # what Hydra saves in a run's .hydra/ folder
_output_folder_lock: int | None = None  # a descriptor of the output folder, locked shared while the process lives


def output_folder(job: DictConfig) -> Path | None:
    """The folder Hydra made for this run inside the working directory; None where it is the working directory (the
    ranks other than 0 of a DDP job write there) or outside it."""
    start, folder = Path(job.runtime.cwd).resolve(), Path(job.runtime.output_dir).resolve()
    return folder if start in folder.parents else None


def share_output_folder(job: DictConfig) -> None:
    """Hold a shared lock on the output folder while this process lives: runs started in the same second share
    ``outputs/<date>/<time>/``, and one of them must not remove what the others write there."""
    global _output_folder_lock
    folder = output_folder(job)
    if folder is not None and job.mode == RunMode.RUN and _output_folder_lock is None:
        _output_folder_lock = os.open(folder, os.O_RDONLY)
        fcntl.flock(_output_folder_lock, fcntl.LOCK_SH)


def alone_in_output_folder() -> bool:
    """Whether no other live process shares this run's output folder (its lock taken exclusive, if it can be)."""
    if _output_folder_lock is None:
        return False
    try:
        fcntl.flock(_output_folder_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def remove_output_folder(job: DictConfig) -> None:
    """Remove the folder Hydra made for this single run (``outputs/<date>/<time>/``), and the date folder above it if
    that is left empty, when it holds nothing but Hydra's own files (``.hydra/*.yaml``, the job's log).

    Never the working directory, nor a folder holding anything else (a file the run wrote) or shared with another
    live run (started in the same second).
    """
    folder, start = output_folder(job), Path(job.runtime.cwd).resolve()
    if folder is None or not alone_in_output_folder():
        return
    saved = folder / job.output_subdir if job.output_subdir is not None else None
    own = {folder / f"{job.job.name}.log"} | ({saved / f"{name}.yaml" for name in HYDRA_FILES} if saved else set())
    found = set(folder.rglob("*"))
    if found - own - {saved}:
        return
    for path in found & own:
        path.unlink()
    for empty in (saved, folder, folder.parent):
        if empty and empty != start and empty.is_dir() and not any(empty.iterdir()):
            empty.rmdir()
