"""Errors caused by the user's input: they end a run with one clear line instead of a traceback."""


class UserError(Exception):
    """Bad input (config value, domain name, file): the message says what was expected."""


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""

    def __init__(self, step: int, losses: dict[str, float]):
        terms = ", ".join(f"{name}={value}" for name, value in losses.items())
        super().__init__(
            f"non-finite loss at training step {step} ({terms}); "
            "the last good checkpoint is kept: lower the learning rate or check the data"
        )
        self.step = step
