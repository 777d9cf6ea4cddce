"""How a method computes: numeric precision (autocast), memory format, compilation.

``precision``: ``fp32``; ``bf16`` or ``fp16`` autocast (convolutions and matrix products in half precision,
fp16 with a gradient scaler); ``auto`` = bf16 on a GPU that supports it, fp32 otherwise. Parameters, mask
logits, their sigmoid, DMG's penalties and the loss stay fp32 whatever the precision, so checkpoints load
across precisions. ``channels_last``: convolutional backbones compute in NHWC memory format (faster with
tensor cores, and with oneDNN on CPUs). ``compile``: ``torch.compile`` the loss and the prediction.
``deterministic``: deterministic algorithms (:func:`configure_determinism`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from dmg.errors import BadValue, UserError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
Function = TypeVar("Function", bound=Callable)


@dataclass(frozen=True)
class Precision:
    """A resolved precision (``fp32``, ``bf16`` or ``fp16``) on a device type (``cpu``, ``cuda``)."""

    name: str = "fp32"
    device_type: str = "cpu"

    def autocast(self) -> AbstractContextManager:
        """The context the forward passes run in."""
        dtype = AUTOCAST_DTYPES.get(self.name)
        return torch.autocast(self.device_type, dtype=dtype, enabled=dtype is not None)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 (gradients would underflow otherwise); a pass-through otherwise."""
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")


CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs for reproducible results (CUDA's documentation)


def configure_determinism(deterministic: bool) -> None:
    """``True``: deterministic algorithms (a GPU run repeats itself bit for bit); ``False``: the fastest ones.

    True turns on ``torch.use_deterministic_algorithms`` (float atomics such as ``index_add`` on CUDA and the
    backward of indexing take their deterministic paths; an operator without one stops the run with PyTorch's
    error naming it), turns off cuDNN's benchmark (its choice of kernels varies between runs) and sets cuBLAS's
    workspace (``CUBLAS_WORKSPACE_CONFIG``, read when CUDA starts: call this before any CUDA work). False: cuDNN
    benchmarks its kernels for the run's fixed input sizes, and atomics add in any order.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic


def resolve_precision(name: str, device: torch.device) -> Precision:
    """The precision ``name`` asks for on ``device``; ``auto``: bf16 on a GPU that has it natively, else fp32."""
    if name not in PRECISIONS:
        raise BadValue("precision", f"one of {', '.join(PRECISIONS)}", name)
    native_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    if name == "auto":
        name = "bf16" if native_bf16 else "fp32"
    if name == "bf16" and device.type == "cuda" and not native_bf16:
        raise UserError("precision=bf16 asked for, but this GPU has no bf16 support: use precision=fp16 or fp32")
    return Precision(name, device.type)


def in_fp32(function: Function) -> Function:
    """``function`` run with autocast off and its half-precision tensor arguments in fp32.

    For the methods' penalties (covariances, kernels, gradient products), which half precision would round
    away, whatever the run's precision.
    """

    @functools.wraps(function)
    def fp32(*args, **kwargs):
        tensors = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
        with torch.autocast(tensors[0].device.type if tensors else "cpu", enabled=False):
            return function(*map(_fp32, args), **{key: _fp32(value) for key, value in kwargs.items()})

    return fp32


def _fp32(value):
    half = isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16)
    return value.float() if half else value


def is_convolutional(module: nn.Module) -> bool:
    """Whether ``module`` has 2-D convolutions: the networks that channels-last memory format speeds up."""
    return any(isinstance(layer, nn.Conv2d) for layer in module.modules())


@dataclass(frozen=True)
class Compute:
    """The resolved settings of a run, recorded as run tags."""

    precision: Precision
    channels_last: bool
    compile: bool
    deterministic: bool = False

    def tags(self) -> dict[str, str]:
        return {
            "precision": self.precision.name,
            "channels_last": str(self.channels_last).lower(),
            "compile": str(self.compile).lower(),
            "deterministic": str(self.deterministic).lower(),
        }
