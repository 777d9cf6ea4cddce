"""Who this process is in a job of many (torchrun's or srun's variables): read before torch is imported, so that
``launch.py`` can tell the ranks apart while it still answers bad input in seconds."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from dmg.errors import UserError


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: global rank, rank on its node (its GPU), number of processes."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone writes: MLflow, checkpoints, summaries, plots, Hydra's output folder."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def ranks_from_environment(environ=None) -> Ranks:
    """The ranks torchrun (``RANK``...) or srun (``SLURM_PROCID``...) gave this process; one process without either.

    Under srun, ``MASTER_ADDR`` (the job's first node) and ``MASTER_PORT`` (derived from the job id) are set in
    ``environ`` when absent, so that every task of the job meets at the same address.
    """
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        return Ranks(rank, int(environ.get("LOCAL_RANK", rank)), world)
    tasks = environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS"))
    if "SLURM_PROCID" in environ and tasks and int(tasks) > 1:
        environ.setdefault("MASTER_ADDR", first_host(environ.get("SLURM_STEP_NODELIST", environ["SLURM_JOB_NODELIST"])))
        environ.setdefault("MASTER_PORT", str(20_000 + int(environ.get("SLURM_JOB_ID", "0")) % 20_000))
        return Ranks(int(environ["SLURM_PROCID"]), int(environ.get("SLURM_LOCALID", 0)), int(tasks))
    return Ranks()


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[07-09,12],cpu1`` -> ``gpu07``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise UserError(f"cannot read the SLURM node list {nodelist!r}: set MASTER_ADDR to the first node's address")
    prefix, ranges = match.groups()
    return prefix + (re.split(r"[-,]", ranges)[0] if ranges else "")
