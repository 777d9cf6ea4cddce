"""``method.forward`` and ``backbone.freeze_bn`` on a BatchNorm network in training mode.

``per_domain``: every loss term, penalty, gradient and BatchNorm running statistic equals a direct computation that
calls the network once per domain (Mixup: once per pair, in the cycle's order), written as DomainBed's
``algorithms.py`` writes it. ``joint``: the same terms from one call on the whole batch (the behaviour before
per-domain passes existed). The batches here interleave the domains, as a shuffled batch would.
"""

from __future__ import annotations

import copy
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dmg.engine.averaging import NoAveraging
from dmg.engine.ranks import Ranks
from dmg.engine.syncs import step_syncs
from dmg.errors import UserError
from dmg.methods.alignment import CORAL, MMD
from dmg.methods.domain_passes import domain_blocks
from dmg.methods.groupdro import GroupDRO
from dmg.methods.mixup import Mixup, beta_samples
from dmg.models import backbones
from dmg.runs.experiment import build_method, check_domain_passes
from tests.conftest import compose_config
from tests.test_baselines import coral_distance, mixup_by_hand, mmd_distance

DOMAINS = ["a", "b", "c"]
PER_DOMAIN, CLASSES, SIZE = 4, 5, 8
sgd = partial(torch.optim.SGD, lr=0.1)


def bn_network() -> nn.Module:
    """Conv-BN-ReLU blocks (BatchNorm in training mode), double precision: exact comparisons of sums in any order."""
    return backbones.small_cnn(CLASSES, in_channels=1, width=4).double()


def build(cls, forward, **options):
    torch.manual_seed(0)
    method = cls(bn_network(), DOMAINS, optimizer=sgd, classifier_init_std=None, forward=forward, **options)
    return method.double().train()


def interleaved_batch(seed=0):
    """Four samples of each of three domains in a random order; inputs shifted per domain (distinct statistics)."""
    generator = torch.Generator().manual_seed(seed)
    d = torch.arange(len(DOMAINS)).repeat(PER_DOMAIN)[torch.randperm(PER_DOMAIN * len(DOMAINS), generator=generator)]
    x = torch.randn(len(d), 1, SIZE, SIZE, generator=generator, dtype=torch.float64) * (1 + d.view(-1, 1, 1, 1))
    y = torch.randint(0, CLASSES, (len(d),), generator=generator)
    return x + d.view(-1, 1, 1, 1), y, d


def minibatches(x, y, d):
    """DomainBed's input: one (x, y) per domain, samples in batch order."""
    return [(x[d == k], y[d == k]) for k in range(len(DOMAINS))]


def gradients(loss, network):
    return torch.autograd.grad(loss, list(network.parameters()))


def batch_statistics(network):
    return [buffer.clone() for name, buffer in network.named_buffers() if "running" in name]


def assert_all_close(actual, expected):
    assert len(actual) == len(expected)
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# DomainBed's computations (AbstractMMD.update, GroupDRO.update); Mixup's is tests.test_baselines.mixup_by_hand.


def alignment_by_domainbed(network, distance, batches):
    features = [network.features(xi) for xi, _ in batches]
    classifs = [network.classifier(fi) for fi in features]
    objective = sum(F.cross_entropy(c, yi) for c, (_, yi) in zip(classifs, batches)) / len(batches)
    pairs = [(i, j) for i in range(len(batches)) for j in range(i + 1, len(batches))]
    penalty = sum(distance(features[i], features[j]) for i, j in pairs) / len(pairs)
    return objective, penalty


def groupdro_by_domainbed(network, batches, q, eta):
    losses = torch.stack([F.cross_entropy(network(xi), yi) for xi, yi in batches])
    q = q * torch.exp(eta * losses.detach())
    q = q / q.sum()
    return torch.dot(losses, q), q


ALIGNMENT = [(CORAL, coral_distance), (MMD, mmd_distance)]


@pytest.mark.parametrize("cls, distance", ALIGNMENT, ids=["coral", "mmd"])
def test_feature_alignment_per_domain_equals_domainbeds_passes(cls, distance):
    method = build(cls, "per_domain", penalty_weight=0.7)
    reference = copy.deepcopy(method.network)
    x, y, d = interleaved_batch()
    terms = method.objective(x, y, d)
    ce, penalty = alignment_by_domainbed(reference, distance, minibatches(x, y, d))
    torch.testing.assert_close(terms["ce"], ce, rtol=1e-9, atol=0)
    torch.testing.assert_close(terms["penalty"], penalty, rtol=1e-7, atol=1e-12)
    assert_all_close(gradients(terms["loss"], method.network), gradients(ce + 0.7 * penalty, reference))
    assert_all_close(batch_statistics(method.network), batch_statistics(reference))  # updated once per domain


@pytest.mark.parametrize("cls, distance", ALIGNMENT, ids=["coral", "mmd"])
def test_feature_alignment_joint_is_one_pass_over_the_batch(cls, distance):
    method = build(cls, "joint", penalty_weight=0.7)
    reference = copy.deepcopy(method.network)
    x, y, d = interleaved_batch()
    terms = method.objective(x, y, d)
    features = reference.features(x)  # one call: BatchNorm statistics of the whole batch
    split = [(features[d == k], y[d == k]) for k in range(len(DOMAINS))]
    ce = sum(F.cross_entropy(reference.classifier(f), yk) for f, yk in split) / len(DOMAINS)
    penalty = sum(distance(split[i][0], split[j][0]) for i, j in [(0, 1), (0, 2), (1, 2)]) / 3
    torch.testing.assert_close(terms["ce"], ce, rtol=1e-9, atol=0)
    torch.testing.assert_close(terms["penalty"], penalty, rtol=1e-7, atol=1e-12)
    assert_all_close(gradients(terms["loss"], method.network), gradients(ce + 0.7 * penalty, reference))
    assert_all_close(batch_statistics(method.network), batch_statistics(reference))
    per_domain = build(cls, "per_domain", penalty_weight=0.7).objective(x, y, d)
    assert not torch.isclose(per_domain["penalty"], terms["penalty"], rtol=1e-3)  # BatchNorm makes them differ


@pytest.mark.parametrize("forward", ["per_domain", "joint"])
def test_groupdro_loss_weights_and_gradients_equal_domainbeds(forward):
    method = build(GroupDRO, forward, eta=0.5)
    reference = copy.deepcopy(method.network)
    x, y, d = interleaved_batch()
    terms = method.objective(x, y, d)
    q = torch.ones(len(DOMAINS), dtype=torch.float64)
    if forward == "per_domain":
        loss, q = groupdro_by_domainbed(reference, minibatches(x, y, d), q, 0.5)
    else:  # one call on the batch, each domain's risk from its own samples
        logits = reference(x)
        loss, q = groupdro_by_domainbed(lambda k: logits[d == k], [(k, y[d == k]) for k in range(3)], q, 0.5)
    torch.testing.assert_close(terms["loss"], loss, rtol=1e-9, atol=0)
    assert_all_close(gradients(terms["loss"], method.network), gradients(loss, reference))
    assert_all_close(batch_statistics(method.network), batch_statistics(reference))
    method.after_step()
    torch.testing.assert_close(method.domain_weights, q, rtol=1e-9, atol=0)
    other = build(GroupDRO, "joint" if forward == "per_domain" else "per_domain", eta=0.5).objective(x, y, d)
    assert not torch.isclose(other["loss"], terms["loss"], rtol=1e-4)  # BatchNorm makes the two differ


def test_mixup_per_domain_calls_the_network_once_per_pair_in_the_cycles_order():
    method = build(Mixup, "per_domain")
    reference = copy.deepcopy(method.network)
    x, y, d = interleaved_batch()
    cycle, lam = [2, 0, 1], torch.tensor([0.3, 0.8, 0.1], dtype=torch.float64)
    terms = method.pairwise_objective(x, y, d, torch.tensor(cycle), lam)
    loss = mixup_by_hand(SimpleNamespace(network=reference), x, y, d, cycle, lam)
    torch.testing.assert_close(terms["loss"], loss, rtol=1e-9, atol=0)
    assert_all_close(gradients(terms["loss"], method.network), gradients(loss, reference))
    assert_all_close(batch_statistics(method.network), batch_statistics(reference))  # updated in the cycle's order


def test_mixup_objective_takes_the_per_pair_path_with_its_own_draws():
    method, twin = build(Mixup, "per_domain"), build(Mixup, "per_domain")
    x, y, d = interleaved_batch()
    torch.manual_seed(5)
    terms = method.objective(x, y, d)
    torch.manual_seed(5)
    cycle, lam = torch.randperm(len(DOMAINS)), beta_samples(0.2, len(DOMAINS), x.device)
    torch.testing.assert_close(terms["loss"], twin.pairwise_objective(x, y, d, cycle, lam)["loss"], rtol=1e-12, atol=0)


def test_mixup_joint_is_one_pass_over_the_mixed_batch():
    method = build(Mixup, "joint")
    reference = copy.deepcopy(method.network)
    x, y, d = interleaved_batch()
    cycle, lam = [2, 0, 1], torch.tensor([0.3, 0.8, 0.1], dtype=torch.float64)
    terms = method.mixed_objective(x, y, d, torch.tensor(cycle), lam)
    per_pair = build(Mixup, "per_domain").pairwise_objective(x, y, d, torch.tensor(cycle), lam)
    assert not torch.isclose(per_pair["loss"], terms["loss"], rtol=1e-4)  # BatchNorm makes the two differ
    batches = minibatches(x, y, d)
    pairs = [(cycle[i], cycle[(i + 1) % 3]) for i in range(3)]
    mixed = torch.cat([lam[a] * batches[a][0] + (1 - lam[a]) * batches[b][0] for a, b in pairs])
    logits = reference(mixed).split(PER_DOMAIN)  # one call: BatchNorm statistics of the whole mixed batch
    loss = sum(
        lam[a] * F.cross_entropy(out, batches[a][1]) + (1 - lam[a]) * F.cross_entropy(out, batches[b][1])
        for out, (a, b) in zip(logits, pairs)
    ) / len(DOMAINS)
    torch.testing.assert_close(terms["loss"], loss, rtol=1e-9, atol=0)
    assert_all_close(gradients(terms["loss"], method.network), gradients(loss, reference))
    assert_all_close(batch_statistics(method.network), batch_statistics(reference))


def test_domain_blocks_sort_by_domain_keeping_batch_order_and_refuse_unbalanced_batches():
    x, y, d = interleaved_batch()
    x_blocks, y_blocks, d_blocks = domain_blocks(x, y, d, len(DOMAINS))
    assert x_blocks.shape == (3, PER_DOMAIN, 1, SIZE, SIZE) and torch.equal(
        d_blocks, torch.arange(3)[:, None].expand(3, 4)
    )
    for k, (xk, yk) in enumerate(minibatches(x, y, d)):
        assert torch.equal(x_blocks[k], xk) and torch.equal(y_blocks[k], yk)
    unbalanced = torch.tensor([0, 0, 0, 1, 1, 2])  # 6 samples, 3 domains, but not 2 each
    with pytest.raises(RuntimeError, match="forward=per_domain needs domain-balanced batches"):
        domain_blocks(torch.zeros(6, 2), torch.zeros(6), unbalanced, 3)


@pytest.mark.parametrize("name", ["coral", "mmd", "groupdro", "mixup"])
@pytest.mark.parametrize("forward", ["per_domain", "joint"])
def test_steps_never_wait_for_the_device(name, forward):
    cfg = compose_config([f"method={name}", f"method.forward={forward}", "backbone.network.width=4"])
    torch.manual_seed(0)
    method = build_method(cfg, DOMAINS).train()
    x, y, d = torch.randn(6, 1, 28, 28), torch.arange(6) % 10, torch.arange(6) % 3
    per_step = step_syncs(method, NoAveraging(), [(x, y, d)])  # operators a CUDA device would wait for
    assert [counter.calls for counter in per_step] == [[]]
    assert method.forward_mode == forward


# backbone.freeze_bn


def batch_norms(network):
    return [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("backbone", ["small_cnn", "resnet18", "alexnet"])
def test_freeze_bn_holds_every_batchnorm_in_eval_mode_and_its_affine_weights_train(backbone):
    size = 64 if backbone == "alexnet" else 32
    cfg = compose_config(
        ["method=aggregate", f"backbone={backbone}", "backbone.freeze_bn=true", f"dataset.image_size={size}"]
    )
    torch.manual_seed(0)
    method = build_method(cfg, DOMAINS).train()
    norms = batch_norms(method.network)
    if backbone == "alexnet":
        assert norms == []  # nothing to freeze; the key is accepted
        return
    assert norms and not any(m.training for m in norms)
    assert method.network.stages["conv1"].training  # the other layers train
    before = batch_statistics(method.network)
    weights = [m.weight.clone() for m in norms]
    x = torch.randn(4, 1, size, size) * 3 + 1
    method.update(x, torch.arange(4) % 10, torch.arange(4) % 3)
    assert_all_close(batch_statistics(method.network), before)  # running statistics untouched
    assert any(not torch.equal(w, m.weight) for w, m in zip(weights, norms))  # the affine weights moved
    method.eval(), method.train()
    assert not any(m.training for m in batch_norms(method.network))  # still frozen after a train() call


def test_freeze_bn_makes_training_mode_use_the_running_statistics():
    frozen, free = backbones.small_cnn(CLASSES, 1, 4, freeze_bn=True), backbones.small_cnn(CLASSES, 1, 4)
    free.load_state_dict(frozen.state_dict())
    x = torch.randn(6, 1, SIZE, SIZE) * 2 + 1
    with torch.no_grad():
        assert torch.allclose(frozen.train()(x), free.eval()(x))
        assert not torch.allclose(free.train()(x), free.eval()(x), atol=1e-3)


def test_multihead_heads_keep_the_frozen_batchnorm():
    cfg = compose_config(["method=multihead", "backbone.split_layer=conv3", "backbone.freeze_bn=true"])
    method = build_method(cfg, DOMAINS).train()
    assert batch_norms(method.heads) and not any(m.training for m in batch_norms(method))


def test_bench_times_each_forward_of_the_methods_that_have_one(capsys):
    from dmg.commands.bench import main, variants

    cfg = compose_config(["method=coral"])
    labelled = dict(variants(cfg, ["joint", "per_domain"]))
    assert {label: c.method.forward for label, c in labelled.items()} == {
        "coral/joint": "joint",
        "coral/per_domain": "per_domain",
    }
    assert cfg.method.forward == "per_domain"  # the composed config is left as it was
    arguments = "--backbone small_cnn --image-size 16 --channels 1 --classes 10 --batch-size 6 --warmup 1 --repeats 1"
    main([*arguments.split(), "--device", "cpu", "--methods", "aggregate", "mixup", "--forward", "joint", "per_domain"])
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["aggregate", "mixup/joint", "mixup/per_domain"]


@pytest.mark.parametrize("name", ["coral", "mmd", "groupdro", "mixup"])
def test_per_domain_passes_are_refused_on_several_ranks_and_accepted_in_one_process(name):
    cfg = compose_config([f"method={name}", "sampler=balanced", "batch_size=60"])
    check_domain_passes(cfg, 5, Ranks())  # one process: balanced batches of 12 per source domain
    with pytest.raises(UserError, match="runs in one process only, not on 2 ranks: use method.forward=joint"):
        check_domain_passes(cfg, 5, Ranks(rank=1, local_rank=1, world_size=2))
    joint = compose_config([f"method={name}", "method.forward=joint", "batch_size=60"])
    check_domain_passes(joint, 5, Ranks(rank=1, local_rank=1, world_size=2))
