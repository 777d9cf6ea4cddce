"""The DomainBed-class baselines: each loss term against a direct, per-domain computation written as DomainBed
writes it (loops over domains and pairs), on a small fixed batch; hooks of the shared step; one-epoch runs."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dmg.errors import UserError
from dmg.methods.alignment import CORAL, DOMAINBED_GAMMAS, MMD
from dmg.methods.dann import DANN
from dmg.methods.groupdro import GroupDRO
from dmg.methods.invariance import IRM, VREx
from dmg.methods.mixstyle import MixStyle, mix_style
from dmg.methods.mixup import Mixup, beta_samples
from dmg.models import backbones
from dmg.models.staged import StagedNetwork
from dmg.runs.experiment import run
from tests.conftest import QUICK, compose_config

DOMAINS = ["a", "b", "c"]
FEATURES, CLASSES = 6, 4
adam = partial(torch.optim.Adam, lr=1e-2)


def linear_network() -> StagedNetwork:
    """A network whose features are its input: the penalties can be checked on known features.

    Double precision: MMD's widest kernel (gamma 1000) magnifies float32 rounding of squared distances.
    """
    return StagedNetwork([("flatten", nn.Flatten(1)), ("fc", nn.Linear(FEATURES, CLASSES))]).double()


def fixed_batch(per_domain=(4, 5, 3), seed=0):
    generator = torch.Generator().manual_seed(seed)
    d = torch.cat([torch.full((n,), k) for k, n in enumerate(per_domain)])
    d = d[torch.randperm(len(d), generator=generator)]  # domains interleaved, as in a shuffled batch
    x = torch.randn(len(d), FEATURES, generator=generator, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (len(d),), generator=generator)
    return x, y, d


def build(cls, **options):
    """These tests check the loss terms on unequal, interleaved domains: one forward pass on the whole batch
    (forward=joint); tests/test_domain_passes.py checks the per-domain passes."""
    if issubclass(cls, (CORAL, MMD, GroupDRO, Mixup)):
        options.setdefault("forward", "joint")
    torch.manual_seed(0)
    return cls(linear_network(), DOMAINS, optimizer=adam, classifier_init_std=None, **options).double()


def minibatches(x, y, d):
    """DomainBed's input: one (x, y) per domain present, samples in batch order."""
    return [(x[d == k], y[d == k]) for k in range(len(DOMAINS)) if (d == k).any()]


# Direct computations, as DomainBed's algorithms.py computes them (loops over domains and pairs).


def coral_distance(a, b):
    mean_a, mean_b = a.mean(0, keepdim=True), b.mean(0, keepdim=True)
    cov_a = (a - mean_a).t() @ (a - mean_a) / (len(a) - 1)
    cov_b = (b - mean_b).t() @ (b - mean_b) / (len(b) - 1)
    return (mean_a - mean_b).pow(2).mean() + (cov_a - cov_b).pow(2).mean()


def mmd_distance(a, b):
    def kernel(u, v):
        squared = u.pow(2).sum(1, keepdim=True) - 2 * u @ v.t() + v.pow(2).sum(1, keepdim=True).t()
        squared = squared.clamp_min(1e-30)
        return sum(torch.exp(-gamma * squared) for gamma in DOMAINBED_GAMMAS)

    return kernel(a, a).mean() + kernel(b, b).mean() - 2 * kernel(a, b).mean()


def alignment_by_hand(method, distance, x, y, d):
    batches = minibatches(x, y, d)
    features = [method.network.features(xi) for xi, _ in batches]
    ce = sum(F.cross_entropy(method.network.classifier(f), yi) for f, (_, yi) in zip(features, batches)) / len(batches)
    pairs = [(i, j) for i in range(len(batches)) for j in range(i + 1, len(batches))]
    penalty = sum(distance(features[i], features[j]) for i, j in pairs) / len(pairs)
    return ce, penalty


@pytest.mark.parametrize("cls, distance", [(CORAL, coral_distance), (MMD, mmd_distance)], ids=["coral", "mmd"])
def test_feature_alignment_terms_match_domainbed(cls, distance):
    method = build(cls, penalty_weight=0.7)
    x, y, d = fixed_batch()
    terms = method.objective(x, y, d)
    ce, penalty = alignment_by_hand(method, distance, x, y, d)
    assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert terms["penalty"].item() == pytest.approx(penalty.item(), rel=1e-4, abs=1e-6)
    assert terms["penalty"].item() > 1e-3  # the domains' features differ: the check is not 0 == 0
    assert terms["loss"].item() == pytest.approx((ce + 0.7 * penalty).item(), rel=1e-5)


@pytest.mark.parametrize("cls, distance", [(CORAL, coral_distance), (MMD, mmd_distance)], ids=["coral", "mmd"])
def test_feature_alignment_over_the_domains_a_batch_has(cls, distance):
    method = build(cls)
    x, y, d = fixed_batch(per_domain=(4, 0, 5))  # domain b absent
    terms = method.objective(x, y, d)
    ce, penalty = alignment_by_hand(method, distance, x, y, d)  # one pair: a, c
    assert terms["penalty"].item() == pytest.approx(penalty.item(), rel=1e-4)
    assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-5)


def test_coral_leaves_out_a_domain_with_one_sample():
    method = build(CORAL)
    x, y, d = fixed_batch(per_domain=(4, 1, 5))
    terms = method.objective(x, y, d)
    features = method.network.features(x)
    assert terms["penalty"].item() == pytest.approx(coral_distance(features[d == 0], features[d == 2]).item(), rel=1e-4)


def dann(**options):
    torch.manual_seed(0)
    return DANN(
        linear_network(),
        DOMAINS,
        optimizer=adam,
        discriminator_optimizer=adam,
        discriminator_width=8,
        classifier_init_std=None,
        **options,
    ).double()


@pytest.mark.parametrize("grad_penalty", [0.0, 0.5])
def test_dann_terms_match_domainbed(grad_penalty):
    method = dann(adversarial_weight=0.3, grad_penalty=grad_penalty)
    x, y, d = fixed_batch()
    x.requires_grad_()  # the features are the input here; in a real backbone they depend on its weights
    features = x.clone().requires_grad_()
    disc_out = method.discriminator(features)
    disc_loss = F.cross_entropy(disc_out, d)
    input_grad = torch.autograd.grad(F.cross_entropy(disc_out, d, reduction="sum"), [features], create_graph=True)[0]
    disc_loss = disc_loss + grad_penalty * (input_grad**2).sum(dim=1).mean(dim=0)
    gen_loss = F.cross_entropy(method.network.classifier(features), y) - 0.3 * disc_loss
    assert method.steps == 0 and not method.discriminators_turn()  # DomainBed: update_count 1 -> generator
    assert method.objective(x, y, d)["loss"].item() == pytest.approx(gen_loss.item(), rel=1e-5)
    method.steps = 1
    method.step_count.fill_(1)  # the objective reads the step count on the device
    assert method.objective(x, y, d)["loss"].item() == pytest.approx(disc_loss.item(), rel=1e-5)


def test_dann_players_take_turns_and_only_the_player_on_turn_moves():
    method = dann(discriminator_steps=2)
    x, y, d = fixed_batch()
    turns = []
    for _ in range(6):
        network = method.network.classifier.weight.clone()
        discriminator = method.discriminator[0].weight.clone()
        method.update(x, y, d)
        moved_network = not torch.equal(network, method.network.classifier.weight)
        moved_discriminator = not torch.equal(discriminator, method.discriminator[0].weight)
        assert moved_network != moved_discriminator
        turns.append("d" if moved_discriminator else "g")
    assert "".join(turns) == "dgddgd"  # (update_count % 3 < 2): discriminator, as DomainBed's counter 1, 2, 3, ...


def test_dann_discriminator_is_domainbeds_mlp():
    method = dann(discriminator_depth=3, discriminator_dropout=0.1)
    linear = [m for m in method.discriminator if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(FEATURES, 8), (8, 8), (8, len(DOMAINS))]
    assert sum(isinstance(m, nn.Dropout) for m in method.discriminator) == 2
    assert set(method.optimizers) == {"network", "discriminator"}


def mixup_by_hand(method, x, y, d, cycle, lam):
    """DomainBed's Mixup.update with its random permutation fixed to ``cycle`` and its draws of lam to ``lam``."""
    batches = [(x[d == k], y[d == k]) for k in range(len(DOMAINS))]
    objective = 0.0
    for i in range(len(cycle)):
        a, b = cycle[i], cycle[(i + 1) % len(cycle)]
        n = min(len(batches[a][0]), len(batches[b][0]))
        (xi, yi), (xj, yj) = (batches[a][0][:n], batches[a][1][:n]), (batches[b][0][:n], batches[b][1][:n])
        predictions = method.network(lam[a] * xi + (1 - lam[a]) * xj)
        objective = objective + lam[a] * F.cross_entropy(predictions, yi)
        objective = objective + (1 - lam[a]) * F.cross_entropy(predictions, yj)
    return objective / len(cycle)


@pytest.mark.parametrize("per_domain", [(4, 4, 4), (4, 5, 3)], ids=["balanced", "unequal"])
def test_mixup_loss_matches_domainbed(per_domain):
    method = build(Mixup)
    method.eval()  # the linear network has no batch statistics, so unpaired samples in the batch change nothing
    x, y, d = fixed_batch(per_domain)
    cycle, lam = [2, 0, 1], torch.tensor([0.3, 0.8, 0.1], dtype=torch.float64)
    terms = method.mixed_objective(x, y, d, torch.tensor(cycle), lam)
    assert terms["loss"].item() == pytest.approx(mixup_by_hand(method, x, y, d, cycle, lam).item(), rel=1e-5)


def test_mixup_cycles_over_the_domains_present():
    method = build(Mixup)
    x, y, d = fixed_batch((4, 0, 4))
    partner, paired = method.partners(d, torch.tensor([1, 2, 0]))  # cycle b -> c -> a; b is absent
    assert paired.all()
    assert torch.equal(d[partner], 2 - d)  # a pairs with c and c with a
    assert method.objective(x, y, d)["loss"].isfinite()


def test_groupdro_weights_and_loss_match_domainbed_over_two_steps():
    method = build(GroupDRO, eta=0.5)
    x, y, d = fixed_batch()
    q = torch.ones(len(DOMAINS), dtype=torch.float64)
    for _ in range(2):
        with torch.no_grad():
            losses = torch.stack([F.cross_entropy(method.network(xi), yi) for xi, yi in minibatches(x, y, d)])
        q = q * torch.exp(0.5 * losses)
        q = q / q.sum()
        terms = method.update(x, y, d)
        assert terms["loss"] == pytest.approx(torch.dot(losses, q).item(), rel=1e-5)
        assert torch.allclose(method.domain_weights, q, rtol=1e-5)
    assert method.epoch_metrics()["groupdro/weight/a"] == pytest.approx(q[0].item(), rel=1e-5)


def test_groupdro_keeps_the_weight_of_an_absent_domain():
    method = build(GroupDRO, eta=0.5)
    x, y, d = fixed_batch((4, 0, 4))
    method.update(x, y, d)
    weights = method.domain_weights
    ratio = weights[1] / weights.sum()
    assert weights.sum().item() == pytest.approx(1.0) and ratio < 1 / 3  # b did not grow; a and c did


def irm_by_hand(method, x, y, d):
    """DomainBed's IRM.update loss terms (autograd through a scale on the logits)."""
    nll, penalty = 0.0, 0.0
    batches = minibatches(x, y, d)
    for xi, yi in batches:
        logits = method.network(xi)
        scale = torch.tensor(1.0, dtype=torch.float64).requires_grad_()
        loss_1 = F.cross_entropy(logits[::2] * scale, yi[::2])
        loss_2 = F.cross_entropy(logits[1::2] * scale, yi[1::2])
        grad_1 = torch.autograd.grad(loss_1, [scale], create_graph=True)[0]
        grad_2 = torch.autograd.grad(loss_2, [scale], create_graph=True)[0]
        nll = nll + F.cross_entropy(logits, yi)
        penalty = penalty + torch.sum(grad_1 * grad_2)
    return nll / len(batches), penalty / len(batches)


def test_irm_penalty_and_its_gradient_match_domainbed():
    method = build(IRM, penalty_weight=100.0, anneal_steps=0)
    x, y, d = fixed_batch()
    terms = method.objective(x, y, d)
    nll, penalty = irm_by_hand(method, x, y, d)
    assert terms["ce"].item() == pytest.approx(nll.item(), rel=1e-5)
    assert terms["penalty"].item() == pytest.approx(penalty.item(), rel=1e-4, abs=1e-7)
    assert abs(penalty.item()) > 1e-4
    ours = torch.autograd.grad(terms["loss"], list(method.network.parameters()))
    theirs = torch.autograd.grad(nll + 100.0 * penalty, list(method.network.parameters()))
    for mine, reference in zip(ours, theirs):
        assert torch.allclose(mine, reference, rtol=1e-4, atol=1e-6)


def test_vrex_penalty_is_the_variance_of_domain_risks():
    method = build(VREx, penalty_weight=10.0, anneal_steps=0)
    x, y, d = fixed_batch()
    losses = torch.stack([F.cross_entropy(method.network(xi), yi) for xi, yi in minibatches(x, y, d)])
    terms = method.objective(x, y, d)
    assert terms["ce"].item() == pytest.approx(losses.mean().item(), rel=1e-5)
    assert terms["penalty"].item() == pytest.approx(((losses - losses.mean()) ** 2).mean().item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx((losses.mean() + 10 * terms["penalty"]).item(), rel=1e-5)


@pytest.mark.parametrize("cls", [IRM, VREx])
def test_penalty_weight_switches_after_annealing_and_resets_adam_then(cls):
    method = build(cls, penalty_weight=50.0, anneal_steps=2)
    x, y, d = fixed_batch()
    # Adam's step count after each update: reset once the annealing steps are done, so the third update starts a
    # fresh Adam (DomainBed resets at the start of that update: the same updates)
    for step, adam_steps in enumerate([{1}, set(), {1}, {2}]):
        terms = method.objective(x, y, d)
        weight = 50.0 if step >= 2 else 1.0
        assert terms["loss"].item() == pytest.approx((terms["ce"] + weight * terms["penalty"]).item(), rel=1e-5)
        method.update(x, y, d)
        assert {state["step"].item() for state in method.optimizers["network"].state.values()} == adam_steps


def test_mix_style_mixes_channel_statistics():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5) * 3 + 1
    lam = torch.tensor([0.2, 1.0, 0.5, 0.0])
    permutation = torch.tensor([1, 0, 3, 2])
    mixed = mix_style(x, lam, permutation, eps=1e-6)
    mean = x.mean((2, 3), keepdim=True)
    std = (x.var((2, 3), keepdim=True) + 1e-6).sqrt()
    for i in range(4):
        j = permutation[i]
        target_mean = lam[i] * mean[i] + (1 - lam[i]) * mean[j]
        target_std = lam[i] * std[i] + (1 - lam[i]) * std[j]
        assert torch.allclose(mixed[i], (x[i] - mean[i]) / std[i] * target_std + target_mean, atol=1e-5)
    assert torch.allclose(mixed[1], x[1], atol=1e-5)  # lam = 1: unchanged


def test_mixstyle_mixes_after_the_named_stages_only_in_training():
    torch.manual_seed(0)
    network = backbones.small_cnn(CLASSES, 1, width=4)
    method = MixStyle(network, DOMAINS, optimizer=adam, layers=["conv1"], p=1.0, alpha=0.1)
    x, y, d = torch.randn(6, 1, 12, 12), torch.randint(0, CLASSES, (6,)), torch.arange(6) % 3
    method.eval()
    torch.manual_seed(1)
    loss = method.objective(x, y, d)["loss"]
    torch.manual_seed(1)
    lam, permutation = beta_samples(0.1, 6, x.device), torch.randperm(6)  # then the draw deciding whether to mix
    features = mix_style(network.run(x, stop=1), lam, permutation)
    assert loss.item() == pytest.approx(F.cross_entropy(network.run(features, start=1), y).item(), rel=1e-5)
    never = MixStyle(network, DOMAINS, optimizer=adam, layers=["conv1"], p=0.0)
    assert never.objective(x, y, d)["loss"].item() == pytest.approx(F.cross_entropy(network(x), y).item(), rel=1e-6)
    assert torch.equal(method.predict(x), network(x))


def test_mixstyle_refuses_the_last_stage():
    with pytest.raises(UserError, match=r"layers must be a list of stages before the last one \(fc\), got \['fc'\]"):
        MixStyle(backbones.small_cnn(CLASSES, 1, width=4), DOMAINS, optimizer=adam, layers=["fc"])


NEW_METHODS = ["coral", "mmd", "dann", "mixup", "groupdro", "irm", "vrex", "mixstyle"]


# Epoch means of the logged terms obey the loss's definition when its weights stay fixed over the epoch
# (IRM and VREx anneal after 500 steps; a quick epoch has 13).
LOSS_IS = {"coral": "ce + penalty", "mmd": "ce + penalty", "irm": "ce + penalty", "vrex": "ce + penalty"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module's runs (creating a store takes seconds); one experiment per test."""
    folder = tmp_path_factory.mktemp("store")
    return [f"tracking.uri=sqlite:///{folder}/mlflow.db", f"checkpoint_dir={folder}/checkpoints"]


@pytest.mark.parametrize("method", NEW_METHODS)
def test_one_epoch_run_finishes_and_logs_its_loss_terms(store, method):
    from mlflow.tracking import MlflowClient

    overrides = [f"tracking.experiment={method}", f"method={method}", "epochs=1", "sampler=balanced"]
    overrides.append("batch_size=60")  # per-domain passes (CORAL, MMD, GroupDRO, Mixup): equal shares of 5 sources
    cfg = compose_config([*QUICK, *store, *overrides])
    result = run(cfg)
    client = MlflowClient(cfg.tracking.uri)
    (finished,) = client.search_runs([client.get_experiment_by_name(method).experiment_id])
    metrics = finished.data.metrics
    assert finished.data.tags["method"] == method and finished.info.status == "FINISHED"
    assert result == metrics["selected/val/acc_mean"] == metrics["val/acc_mean"]
    assert {"train/loss", "val/loss_mean", "test/acc_mean", "lr/network"} <= set(metrics)
    terms = {key.removeprefix("train/"): value for key, value in metrics.items() if key.startswith("train/")}
    assert all(math.isfinite(value) for value in terms.values())
    if method in LOSS_IS:
        assert terms["loss"] == pytest.approx(eval(LOSS_IS[method], {}, terms), rel=1e-5)
    if method == "dann":
        assert {"ce", "domain_ce"} <= set(terms) and "lr/discriminator" in metrics
    if method == "groupdro":
        assert sum(value for key, value in metrics.items() if key.startswith("groupdro/weight/")) == pytest.approx(1.0)


def test_dmg_with_element_masks_runs_and_plots_its_masks(store):
    from mlflow.tracking import MlflowClient

    cfg = compose_config([*QUICK, *store, "tracking.experiment=element", "mask.granularity=element", "epochs=1"])
    run(cfg)
    client = MlflowClient(cfg.tracking.uri)
    (finished,) = client.search_runs([client.get_experiment_by_name("element").experiment_id])
    assert finished.data.params["mask.granularity"] == "element"
    assert 0.0 <= finished.data.metrics["mask/conv3/iou_mean"] <= 1.0
    assert {"masks/iou_conv3.png", "masks/active_conv3.png"} <= {
        a.path for a in client.list_artifacts(finished.info.run_id, "masks")
    }


# Every method on every backbone family: the small CNN quickly; ResNet-18 (BatchNorm, 512 features), AlexNet (4096
# features, dropout) and ResNet-50 as slow tests (the latter two with the methods that depend on feature size or
# stage names).
COMBINATIONS = [(method, "small_cnn") for method in NEW_METHODS]
COMBINATIONS += [pytest.param(method, "resnet18", marks=pytest.mark.slow) for method in NEW_METHODS]
COMBINATIONS += [
    pytest.param(method, backbone, marks=pytest.mark.slow)
    for backbone in ("alexnet", "resnet50")
    for method in ("dann", "mixstyle", "mmd")
]


@pytest.mark.parametrize("method, backbone", COMBINATIONS)
def test_every_baseline_trains_on_every_backbone(method, backbone):
    """Built from the configs as launch.py builds it (features, MixStyle stages, discriminator size per backbone)."""
    from dmg.runs.experiment import build_method

    size = 64 if backbone == "alexnet" else 32
    always_mix = ["method.p=1.0"] if method == "mixstyle" else []  # the mixing path runs at every step
    cfg = compose_config([f"method={method}", f"backbone={backbone}", f"dataset.image_size={size}", *always_mix])
    torch.manual_seed(0)
    sources = ["rot0", "rot15", "rot45"]
    model = build_method(cfg, sources)
    x, y, d = torch.randn(6, 1, size, size), torch.randint(0, 10, (6,)), torch.arange(6) % len(sources)
    before = [parameter.clone() for parameter in model.parameters()]
    model.train()
    for _ in range(2):  # DANN: one step of each player
        terms = model.update(x, y, d)
    assert all(torch.isfinite(value) for value in terms.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model.eval()
    with torch.no_grad():
        assert model.predict(x, d).shape == model.predict(x).shape == (6, 10)
