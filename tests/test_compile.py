"""``compile=true``: after the first epoch (training steps and both kinds of prediction), no method recompiles.

Dynamo specialises on Python ints it reads; a count that changes every step (IRM's and VREx's annealing, DANN's
turns) would recompile every step until the recompile limit, then silently run eagerly. The backend here is
``aot_eager`` (Dynamo's guards, and so its recompiles, are the same as with inductor; it needs no C++ compiler).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from dmg.engine.compute import Precision
from dmg.runs.experiment import build_method
from tests.conftest import CONF_DIR, compose_config

DOMAINS = ["a", "b", "c"]
METHODS = sorted(path.stem for path in (CONF_DIR / "method").glob("*.yaml"))
# IRM and VREx switch to the full penalty weight, and DANN's players alternate, during the epochs checked.
OPTIONS = {
    "irm": ["method.anneal_steps=4"],
    "vrex": ["method.anneal_steps=4"],
    "dann": ["method.discriminator_steps=2"],
}
# The epoch below has a one-domain batch and a short last batch: per-domain passes (the default of these four)
# take only batches with every domain in equal parts, so they compile their joint pass here.
OPTIONS |= {name: ["method.forward=joint"] for name in ("coral", "mmd", "groupdro", "mixup")}


def batches():
    """An epoch: a full batch, a batch of one domain, a smaller last batch."""
    generator = torch.Generator().manual_seed(1)
    x, y, d = torch.randn(8, 1, 28, 28, generator=generator), torch.arange(8) % 10, torch.arange(8) % 3
    return [(x, y, d), (x, y, torch.zeros_like(d)), (x[:5], y[:5], d[:5])]


def epoch(method) -> None:
    method.train()
    for x, y, d in batches():
        method.update(x, y, d)
    method.eval()
    with torch.no_grad():
        for x, _, d in batches():
            method.predict(x, d), method.predict(x)


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_no_method_recompiles_after_the_first_epoch(name, monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    method = build_method(
        compose_config([f"method={name}", "backbone.network.width=4", *OPTIONS.get(name, [])]), DOMAINS
    )
    method.configure_compute(Precision("fp32", "cpu"), compile=True)
    epoch(method)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # the objective and the predictions were compiled
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    epoch(method), epoch(method)
    assert counters["stats"]["unique_graphs"] == graphs
    assert method.steps == 9


def test_the_traceable_beta_draws_follow_beta_alpha_alpha():
    """Mixup's and MixStyle's weights: mean 1/2, variance 1 / (4 (2 alpha + 1)), within (0, 1)."""
    from dmg.methods.mixup import beta_samples

    torch.manual_seed(0)
    for alpha in (0.1, 0.2, 2.0):
        draws = beta_samples(alpha, 200_000, torch.device("cpu")).double()
        assert ((draws >= 0) & (draws <= 1)).all()
        assert draws.mean().item() == pytest.approx(0.5, abs=0.005)
        assert draws.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.02)
    counters.clear()
    compiled = torch.compile(lambda x: x * beta_samples(0.2, len(x), x.device), backend="aot_eager", fullgraph=True)
    compiled(torch.ones(4))  # fullgraph: no graph break
