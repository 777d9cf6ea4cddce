"""Errors that end a run with one clear line instead of a traceback, and how each is treated by sweeps.

``UserError`` derives from Hydra's ``CompactHydraException``, so wherever Hydra reports it (a single run, a job of a
multirun, a sweeper or a callback) it prints the message alone and exits with status 1.
"""

from __future__ import annotations

from typing import Any

from hydra.errors import CompactHydraException


class UserError(CompactHydraException):
    """Bad input (config value, domain name, file): the message says what was expected.

    In a sweep, a trial that ends with a ``UserError`` failed because of its own config or numerics.
    ``run_id`` names the MLflow run the error ended; None when it came before a run was started or continued.
    """

    run_id: str | None = None


class BadValue(UserError):
    """A setting out of its range; ``key`` is the config key (``method.overlap_lambda``) or a component's argument."""

    def __init__(self, key: str, expected: str, value: Any, fix: str = ""):
        self.key, self.expected, self.value, self.fix = key, expected, value, fix
        super().__init__(f"{key} must be {expected}, got {value!r}{'; ' + fix if fix else ''}")

    def under(self, prefix: str) -> BadValue:
        """The same error with the key qualified by the config node it was read from (``method`` + ``.key``)."""
        return BadValue(f"{prefix}.{self.key}", self.expected, self.value, self.fix)


class SetupError(UserError):
    """The machine or a store is not usable (unwritable folder, unreachable server, corrupt database).

    Not a property of a config: a sweep never counts a trial that hits one as failed, it queues it again.
    """


class RunInProgress(SetupError):
    """Another live process is running the run of this exact config."""


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite; the last good checkpoint is kept.

    ``step`` is the first non-finite one; ``checked``, the steps whose losses were read together (an epoch).
    """

    def __init__(self, step: int, losses: dict[str, float], checked: tuple[int, int] | None = None):
        terms = ", ".join(f"{name}={value}" for name, value in losses.items())
        detail = f"steps {checked[0]}-{checked[1]} checked, means: {terms}" if checked else terms
        super().__init__(
            f"non-finite loss at training step {step} ({detail}); "
            "the last good checkpoint is kept: lower the learning rate or check the data"
        )
        self.step = step


class Terminated(BaseException):
    """The process received SIGTERM (a scheduler's time limit or preemption): stop like Ctrl-C does."""


def check_number(key: str, value: Any, least: float | None = None, above: float | None = None) -> None:
    """Raise :class:`BadValue` unless ``value`` is a finite real number ``>= least`` (or ``> above``)."""
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    finite = finite and abs(value) != float("inf")
    if least is not None and not (finite and value >= least):
        raise BadValue(key, f"a finite number >= {least}", value)
    if above is not None and not (finite and value > above):
        raise BadValue(key, f"a finite number > {above}", value)
    if not finite:
        raise BadValue(key, "a finite number", value)


def check_count(key: str, value: Any, least: int) -> None:
    """Raise :class:`BadValue` unless ``value`` is an integer ``>= least`` (booleans are not integers here)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise BadValue(key, f"an integer >= {least}", value)
