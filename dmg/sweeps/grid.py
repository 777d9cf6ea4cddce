"""Grids of runs (leave-one-domain-out x seeds x methods) with Hydra's basic sweeper, where one failed job does not
stop the others: every failure is reported on one line at the end and the sweep exits with status 1."""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence

from hydra.core.utils import JobReturn, JobStatus

from dmg.errors import UserError

log = logging.getLogger(__name__)


class FailureCollector:
    """Wraps a Hydra launcher: failed jobs are remembered and handed on as completed, so the sweep goes on."""

    def __init__(self, launcher):
        self.launcher = launcher
        self.failures: list[tuple[Sequence[str], BaseException]] = []

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        returns = self.launcher.launch(job_overrides, initial_job_idx=initial_job_idx)
        return [self._recorded(job) for job in returns]

    def _recorded(self, job: JobReturn) -> JobReturn:
        if job.status != JobStatus.FAILED:
            return job
        self.failures.append((job.overrides, job._return_value))
        return dataclasses.replace(job, status=JobStatus.COMPLETED, _return_value=None)

    def __getattr__(self, name: str):
        return getattr(self.launcher, name)


def report_failures(failures: list[tuple[Sequence[str], BaseException]], jobs: int) -> None:
    """One line per failed job (a traceback too for errors that are not bad input); exit 1 if any failed."""
    for overrides, error in failures:
        details = None if isinstance(error, UserError) else error
        log.error("job %s failed: %s", " ".join(overrides), error, exc_info=details)
    if failures:
        log.error(
            "%d of %d jobs failed; rerun the same command once fixed: finished jobs are skipped", len(failures), jobs
        )
        sys.exit(1)
