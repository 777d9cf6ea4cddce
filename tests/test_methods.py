"""Every method x backbone builds, updates and predicts; multi-head and DMG keep the paper's semantics."""

from functools import partial

import pytest
import torch
from torch import nn

from dmg.methods.aggregate import Aggregate
from dmg.methods.dmg import DMG
from dmg.methods.multihead import MultiHead
from dmg.models import backbones

DOMAINS = ["a", "b", "c"]
BACKBONES = {
    "small_cnn": (partial(backbones.small_cnn, 5, 1, width=4), (1, 28, 28), ["conv3", "fc"], "fc"),
    "alexnet": (
        partial(backbones.alexnet, 5),
        (3, 64, 64),
        ["classifier.1", "classifier.4", "classifier.6"],
        "classifier.6",
    ),
    "resnet18": (partial(backbones.resnet, 18, 5), (3, 32, 32), ["layer3", "layer4", "fc"], "fc"),
    "resnet50": (partial(backbones.resnet, 50, 5), (3, 32, 32), ["layer3", "layer4", "fc"], "fc"),
}
adam = partial(torch.optim.Adam, lr=1e-3)


def make_method(name: str, backbone: str, **options):
    make_network, shape, mask_layers, split_layer = BACKBONES[backbone]
    common = dict(network=make_network(), domains=DOMAINS, optimizer=adam)
    if name == "aggregate":
        return Aggregate(**common, **options)
    if name == "multihead":
        return MultiHead(**common, split_layer=split_layer, **options)
    return DMG(
        **common, mask_layers=mask_layers, mask_init=nn.init.ones_, input_shape=shape, mask_optimizer=adam, **options
    )


def batch(backbone: str, size: int = 6):
    shape = BACKBONES[backbone][1]
    return torch.randn(size, *shape), torch.randint(0, 5, (size,)), torch.arange(size) % len(DOMAINS)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("name", ["aggregate", "multihead", "dmg"])
def test_method_updates_parameters_and_predicts_with_right_shapes(name, backbone):
    torch.manual_seed(0)
    method = make_method(name, backbone)
    x, y, d = batch(backbone)
    before = {key: value.clone() for key, value in method.state_dict().items() if value.is_floating_point()}
    method.train()
    terms = method.update(x, y, d)
    assert terms["loss"] > 0
    changed = [
        key for key, value in method.state_dict().items() if key in before and not torch.equal(before[key], value)
    ]
    assert any(key.endswith(("fc.weight", "classifier_6.weight")) for key in changed)
    method.eval()
    with torch.no_grad():
        assert method.predict(x, d).shape == (6, 5)
        assert method.predict(x).shape == (6, 5)


def test_multihead_heads_share_no_parameters_and_train_only_on_own_domain():
    method = make_method("multihead", "alexnet")
    head_params = [{p.data_ptr() for p in head.parameters()} for head in method.heads]
    trunk_params = {p.data_ptr() for p in method.trunk.parameters()}
    for i, params in enumerate(head_params):
        assert not params & trunk_params
        assert all(not params & other for j, other in enumerate(head_params) if j != i)
    x, y, _ = batch("alexnet")
    before = [head.classifier.weight.clone() for head in method.heads]
    method.update(x, y, torch.zeros(6, dtype=torch.long))  # only domain 0 in the batch
    assert not torch.equal(method.heads[0].classifier.weight, before[0])
    assert torch.equal(method.heads[1].classifier.weight, before[1])
    assert torch.equal(method.heads[2].classifier.weight, before[2])


def test_multihead_predictions_use_own_head_in_domain_and_mean_of_heads_out_of_domain():
    torch.manual_seed(0)
    method = make_method("multihead", "small_cnn").eval()
    x, _, d = batch("small_cnn")
    with torch.no_grad():
        features = method.trunk(x)
        per_head = torch.stack([head(features) for head in method.heads])  # (heads, B, classes)
        assert torch.allclose(method.predict(x, d), per_head[d, torch.arange(6)], atol=1e-6)
        assert torch.allclose(method.predict(x), per_head.mean(0), atol=1e-6)


def test_dmg_holds_dropout_in_eval_mode_and_has_two_optimisers():
    method = make_method("dmg", "alexnet").train()
    dropouts = [m for m in method.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and not any(m.training for m in dropouts)
    assert method.masked.network.training
    assert set(method.optimizers) == {"network", "masks"}
    mask_params = {p.data_ptr() for p in method.masked.masks.parameters()}
    network_params = {p.data_ptr() for group in method.optimizers["network"].param_groups for p in group["params"]}
    assert mask_params == {p.data_ptr() for g in method.optimizers["masks"].param_groups for p in g["params"]}
    assert not mask_params & network_params


def test_dmg_loss_terms_follow_the_paper():
    method = make_method("dmg", "small_cnn", overlap_lambda=0.5, sparsity_lambda=0.01)
    x, y, d = batch("small_cnn")
    terms = method.objective(x, y, d)
    p = {name: probs.detach() for name, probs in method.masked.probabilities().items()}
    # all logits are 1: every pair of domains has identical masks, soft IoU = sum(p^2)/sum(2p - p^2)
    s = torch.sigmoid(torch.tensor(1.0))
    assert terms["overlap"].item() == pytest.approx(len(p) * (s * s / (2 * s - s * s)).item(), rel=1e-5)
    assert terms["sparsity"].item() == pytest.approx(sum(v.sum().item() for v in p.values()), rel=1e-5)
    expected = terms["ce"] + 0.5 * terms["overlap"] + 0.01 * terms["sparsity"]
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_dmg_mask_metrics_name_layers_and_domains():
    method = make_method("dmg", "small_cnn")
    metrics = method.epoch_metrics()
    assert metrics["mask/fc/iou/a-b"] == 1.0  # identical all-ones masks
    assert metrics["mask/conv3/active/c"] == 1.0
    assert metrics["mask/fc/iou_mean"] == 1.0
    assert method.mask_overlaps()["fc"].shape == (3, 3)


def test_classifier_init_std_sets_a_small_normal_classifier():
    method = make_method("aggregate", "resnet18", classifier_init_std=0.001)
    weight = method.network.classifier.weight
    assert weight.std().item() == pytest.approx(0.001, rel=0.1)
    assert torch.count_nonzero(method.network.classifier.bias) == 0


def test_dmg_element_masks_give_overlaps_and_active_fractions_per_activation():
    torch.manual_seed(0)
    make_network, shape, mask_layers, _ = BACKBONES["small_cnn"]
    method = DMG(make_network(), DOMAINS, mask_layers, nn.init.normal_, shape, adam, adam, mask_granularity="element")
    p = method.masked.probabilities()["conv3"]  # (3 domains, 8 x 7 x 7)
    hard = (p > 0.5).float()
    intersection = (hard[0] * hard[1]).sum()
    union = hard[0].sum() + hard[1].sum() - intersection
    metrics = method.epoch_metrics()
    assert p.shape == (3, 8 * 7 * 7)
    assert metrics["mask/conv3/iou/a-b"] == pytest.approx((intersection / union).item())
    assert metrics["mask/conv3/active/c"] == pytest.approx(hard[2].mean().item())
    x, y, d = batch("small_cnn")
    expected = sum(v.sum().item() for v in method.masked.probabilities().values())
    assert method.update(x, y, d)["sparsity"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("schedule_masks", [False, True])
def test_schedule_masks_decides_whether_the_mask_learning_rate_follows_the_schedule(schedule_masks):
    halve = partial(torch.optim.lr_scheduler.ExponentialLR, gamma=0.5)
    method = make_method("dmg", "small_cnn", scheduler=halve, schedule_masks=schedule_masks)
    method.update(*batch("small_cnn"))
    method.end_epoch()
    method.end_epoch()
    assert method.learning_rates() == {"network": 1e-3 / 4, "masks": 1e-3 / 4 if schedule_masks else 1e-3}
    resumed = make_method("dmg", "small_cnn", scheduler=halve, schedule_masks=schedule_masks)
    resumed.load_training_state(method.training_state())
    resumed.end_epoch()
    assert resumed.learning_rates()["network"] == 1e-3 / 8


def test_multihead_heads_with_batch_norm_see_only_their_own_samples_in_training():
    torch.manual_seed(0)
    common = dict(network=backbones.resnet(18, 5), domains=DOMAINS, optimizer=adam)
    method = MultiHead(**common, split_layer="layer4").train()  # heads: layer4 (with BatchNorm) to fc
    assert method.heads_normalise_batches
    x, _, _ = batch("resnet18", 8)
    d = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0])
    features = method.trunk(x)
    logits = method._own_heads(features, d)
    for k, head in enumerate(method.heads):
        own = d == k
        assert torch.allclose(logits[own], head(features[own]), atol=1e-5)  # batch statistics of its own samples
