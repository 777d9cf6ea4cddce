"""Seeds of an epoch, of one sample's random transforms and of one batch's: functions of (seed, epoch, position).

What makes the images a model sees independent of loader workers, their scheduling and resumes: no random
transform draws from a stream shared across samples, each draws from its own seed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

SAMPLE, BATCH = 0, 1  # what a derived seed is for: one sample's transforms, or one batch's


def epoch_seed(seed: int, epoch: int) -> int:
    """Seeds an epoch's batch order and the training step's own randomness (e.g. DMG's mask samples)."""
    return seed * 100_003 + epoch


def derived_seed(seed: int, epoch: int, position: int, purpose: int) -> int:
    """A 63-bit seed for one sample (``position`` = dataset index) or one batch (``position`` = step) of an epoch."""
    state = np.random.SeedSequence([seed, epoch, position], spawn_key=[purpose]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of every random transform of dataset item ``index`` in ``epoch``."""
    return derived_seed(seed, epoch, index, SAMPLE)


def batch_seed(seed: int, epoch: int, step: int) -> int:
    """The seed of the batch-level random transforms (colour jitter) of training step ``step`` of ``epoch``."""
    return derived_seed(seed, epoch, step, BATCH)


def with_seed(seed: int, function: Callable, *args):
    """``function(*args)`` with torch's CPU generator seeded by ``seed``; the generator's state is restored after.

    torchvision's and kornia's random transforms draw their parameters from that generator.
    """
    generator = torch.default_generator
    saved = generator.get_state()
    generator.manual_seed(seed)
    try:
        return function(*args)
    finally:
        generator.set_state(saved)
