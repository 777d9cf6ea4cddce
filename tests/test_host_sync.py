"""No training step waits for the device: every method, every option that changes its step, counted at the ATen
operator level on the CPU (what CUDA would wait for), and under CUDA's own sync debug mode where CUDA is present."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dmg.engine.averaging import SWAD, NoAveraging
from dmg.engine.compute import Precision
from dmg.engine.syncs import SyncCounter, cuda_sync_errors, step_syncs
from dmg.runs.experiment import build_method
from tests.conftest import CONF_DIR, compose_config

DOMAINS = ["a", "b", "c"]
METHODS = sorted(path.stem for path in (CONF_DIR / "method").glob("*.yaml"))
# Every method, plus the options that change what a step computes.
CASES = [[f"method={name}"] for name in METHODS] + [
    ["method=dmg", "mask.granularity=element"],
    ["method=dann", "method.grad_penalty=0.1", "method.discriminator_steps=2"],
]
AVERAGING = {"none": NoAveraging, "swad": SWAD}


def small_method(overrides: list[str], device: str = "cpu"):
    torch.manual_seed(0)
    return build_method(compose_config([*overrides, "backbone.network.width=4"]), DOMAINS).to(device)


def batches(device: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A batch with every domain, and one with a single domain (a shuffled batch may lack domains)."""
    generator = torch.Generator().manual_seed(1)
    x, y, d = torch.randn(6, 1, 28, 28, generator=generator), torch.arange(6) % 10, torch.arange(6) % 3
    return [(x.to(device), y.to(device), d.to(device)), (x.to(device), y.to(device), torch.zeros_like(d).to(device))]


@pytest.mark.parametrize("averaging", sorted(AVERAGING))
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("overrides", CASES, ids=" ".join)
def test_no_training_step_runs_an_operator_that_waits_for_the_device(overrides, precision, averaging):
    method = small_method(overrides)
    method.configure_compute(Precision(precision, "cpu"))
    usable = batches() if getattr(method, "forward_mode", "joint") == "joint" else batches()[:1]  # per_domain:
    per_step = step_syncs(method, AVERAGING[averaging](), usable)  # every batch holds every domain equally
    assert [counter.calls for counter in per_step] == [[]] * len(usable)


def test_under_fp16_the_only_reads_are_the_gradient_scalers_own():
    """torch's GradScaler reads each optimiser's overflow flag on the host before stepping it (non-fused
    optimisers): fp16 steps wait for the device there; the step then reads whether it was skipped, and nothing else."""
    method = small_method(["method=coral"])
    method.configure_compute(Precision("fp16", "cpu"))
    per_step = step_syncs(method, SWAD(), batches()[:1])
    for counter in per_step:
        assert counter.counts() == {"item": 2}  # the scaler's read for the one optimiser, and whether it skipped
        assert all(where.startswith(str(CONF_DIR.parent / "dmg/methods/base.py")) for _, where in counter.calls)


def test_the_counter_sees_every_kind_of_sync():
    t, repeats, indices, domains = torch.ones(3), torch.tensor([1, 2]), torch.tensor([0, 2]), torch.arange(3)
    with SyncCounter() as counter:
        t.sum().item()
        bool(t.sum())
        torch.nonzero(t)
        t[t > 0]
        t.masked_select(t > 0)
        torch.bincount(domains)
        torch.unique(t)
        torch.repeat_interleave(repeats)
        torch.equal(t, t)
        torch.allclose(t, t)
        t.tolist()
        torch.tensor([1.0, 2.0])
        F.one_hot(domains, 3)
        torch.repeat_interleave(repeats, output_size=3)  # fixed size: no sync
        t[indices], t.index_add(0, indices, t[:2])  # integer indices: no sync
    kinds = [what for what, _ in counter.calls]
    assert kinds[:-2] == [
        "item", "item", "nonzero", "boolean-mask indexing", "masked_select", "bincount", "unique",
        "repeat_interleave", "equal", "allclose", "tolist", "tensor from host data",
    ]  # fmt: skip
    assert kinds[-2:] == ["item", "item"]  # one_hot checks its range on the host
    assert all("test_host_sync.py:" in where for _, where in counter.calls)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.set_sync_debug_mode checks CUDA calls"
)
@pytest.mark.parametrize("overrides", CASES, ids=" ".join)
def test_on_cuda_no_training_step_synchronises(overrides):
    method = small_method(overrides, "cuda")
    method.configure_compute(Precision("bf16" if torch.cuda.is_bf16_supported() else "fp32", "cuda"))
    step_syncs(method, SWAD(), batches("cuda"))  # warms up outside the debug mode too
    with cuda_sync_errors():
        step_syncs(method, SWAD(), batches("cuda"))
