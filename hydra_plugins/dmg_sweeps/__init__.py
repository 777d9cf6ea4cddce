"""Hydra plugins of the DMG project: the ``sweeps/`` config folder, the resumable Optuna sweeper and the grid sweeper.

Hydra only instantiates plugins defined under the ``hydra_plugins`` namespace, so these are thin shells; the
sweeper's logic lives in ``dmg.sweeps.sweeper``. Found whenever the repository root is on ``sys.path`` (``python
launch.py`` puts it there; pytest through ``pythonpath = .`` in setup.cfg).
"""

from __future__ import annotations

from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin
from hydra.plugins.sweeper import Sweeper

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"


class SweepRecipes(SearchPathPlugin):
    """Adds ``sweeps/`` (recipes ``sweep/``, ``hydra/sweeper/``, ``hydra/launcher/``) to Hydra's config search path."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="dmg-sweeps", path=f"file://{SWEEPS}")


class ResumableOptunaSweeper(Sweeper):
    """Hydra's Optuna sweeper made resumable and failure-tolerant; see ``dmg.sweeps.sweeper.ResumableOptuna``."""

    def __init__(self, **options) -> None:
        from dmg.sweeps.sweeper import ResumableOptuna

        self.sweeper = ResumableOptuna(**options)

    def setup(self, **kwargs) -> None:
        self.sweeper.setup(**kwargs)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)


class KeepGoingSweeper(BasicSweeper):
    """Hydra's basic sweeper where a failed job does not stop the others; see ``dmg.sweeps.grid``."""

    def setup(self, **kwargs) -> None:
        from dmg.sweeps.grid import FailureCollector

        super().setup(**kwargs)
        self.launcher = FailureCollector(self.launcher)

    def sweep(self, arguments: list[str]):
        from dmg.sweeps.grid import report_failures

        returns = super().sweep(arguments)
        report_failures(self.launcher.failures, sum(len(batch) for batch in returns))
        return returns
