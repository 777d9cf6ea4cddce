"""Domain masks: straight-through gradients, greedy and softscale semantics, penalties, shared-trunk ensemble."""

from functools import partial

import pytest
import torch
from torch import nn

from dmg.errors import UserError
from dmg.models.backbones import alexnet, small_cnn
from dmg.models.masks import (
    DomainMask,
    MaskedNetwork,
    greedy,
    mean_over_pairs,
    sample_straight_through,
    soft_iou,
)
from dmg.models.staged import StagedNetwork


def set_logits(mask: DomainMask, logits):
    with torch.no_grad():
        mask.logits.copy_(torch.as_tensor(logits, dtype=torch.float32))


def test_straight_through_value_is_hard_and_gradient_reaches_logits():
    mask = DomainMask(2, 5, partial(nn.init.uniform_, a=-2.0, b=2.0))
    x = torch.randn(8, 5)
    d = torch.tensor([0, 1] * 4)
    out = mask(x, d, "sample")
    kept = out / x
    assert set(kept.detach().round().unique().tolist()) <= {0.0, 1.0}  # forward value: the hard sample
    out.sum().backward()
    p = mask.probabilities().detach()
    sig_grad = p * (1 - p)  # d sigmoid / d logit
    expected = torch.zeros(2, 5)
    expected.index_add_(0, d, x * sig_grad[d])  # d out / d p = x for every sample, whatever was sampled
    assert torch.allclose(mask.logits.grad, expected, atol=1e-6)


def test_greedy_keeps_units_above_one_half_of_own_domain():
    mask = DomainMask(2, 3, nn.init.zeros_)
    set_logits(mask, [[1.0, -1.0, 0.5], [-3.0, 2.0, -0.1]])
    x = torch.ones(2, 3)
    out = mask(x, torch.tensor([1, 0]), "greedy")
    assert out.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]


def test_soft_mask_scales_conv_channels_by_probability():
    mask = DomainMask(2, 3, nn.init.zeros_)
    set_logits(mask, [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    x = torch.randn(2, 3, 4, 4)
    d = torch.tensor([1, 0])
    p = torch.sigmoid(mask.logits.detach())[d]
    assert torch.allclose(mask(x, d, "soft"), x * p[:, :, None, None])
    assert torch.allclose(mask(x, None, "soft"), x * torch.sigmoid(mask.logits.detach()).mean(0)[None, :, None, None])


def test_soft_iou_and_mean_over_pairs_match_hand_computation():
    p = torch.tensor([[1.0, 0.5, 0.0], [0.5, 0.5, 1.0], [0.0, 0.0, 0.0]])
    iou = soft_iou(p)
    # (a.b + eps) / (sum(a + b - ab) + eps)
    assert iou[0, 1].item() == pytest.approx((0.5 + 0.25 + 1e-6) / (1.5 + 2.0 - 0.75 + 1e-6))
    assert iou[0, 2].item() == pytest.approx(1e-6 / (1.5 + 1e-6))
    assert iou[1, 2].item() == pytest.approx(1e-6 / (2.0 + 1e-6))
    assert mean_over_pairs(iou).item() == pytest.approx((iou[0, 1] + iou[0, 2] + iou[1, 2]).item() / 3)
    assert mean_over_pairs(soft_iou(p[:1])).item() == 0.0


def test_greedy_threshold_helper():
    assert greedy(torch.tensor([0.2, 0.5, 0.51])).tolist() == [0.0, 0.0, 1.0]
    samples = sample_straight_through(torch.full((10000,), 0.3))
    assert samples.mean().item() == pytest.approx(0.3, abs=0.03)


@pytest.mark.parametrize(
    "make, layers, shape",
    [
        (lambda: small_cnn(10, 1, width=4), ["conv3", "fc"], (1, 28, 28)),
        (lambda: alexnet(7), ["classifier.1", "classifier.4", "classifier.6"], (3, 64, 64)),
    ],
)
def test_shared_trunk_ensemble_equals_one_full_pass_per_source_mask(make, layers, shape):
    torch.manual_seed(0)
    masked = MaskedNetwork(make(), layers, 3, partial(nn.init.uniform_, a=-1.0, b=2.0), shape).eval()
    x = torch.randn(5, *shape)
    with torch.no_grad():
        ensemble = masked.forward_ensemble(x)
        per_domain = [masked(x, torch.full((5,), k), "soft") for k in range(3)]
    assert torch.allclose(ensemble, torch.stack(per_domain).mean(0), atol=1e-5)


def test_mask_sizes_are_inferred_from_layer_inputs():
    masked = MaskedNetwork(alexnet(7), ["classifier.1", "classifier.6"], 2, nn.init.zeros_, (3, 64, 64))
    assert {name: p.shape for name, p in masked.probabilities().items()} == {
        "classifier.1": (2, 9216),
        "classifier.6": (2, 4096),
    }
    cnn = MaskedNetwork(small_cnn(10, 1, width=4), ["conv2", "conv3"], 2, nn.init.zeros_, (1, 28, 28))
    assert [p.shape[1] for p in cnn.probabilities().values()] == [4, 8]  # channels, not C*H*W


def test_unknown_layer_error_lists_valid_names():
    with pytest.raises(UserError, match="unknown layer 'fc7'.*conv1, pool1, conv2"):
        MaskedNetwork(small_cnn(10, 1, width=4), ["fc7"], 2, nn.init.zeros_, (1, 28, 28))


def test_masking_a_layer_with_unsupported_input_rank_is_refused():
    network = StagedNetwork([("seq", nn.Identity()), ("fc", nn.Linear(4, 2))])
    with pytest.raises(UserError, match="cannot mask layer 'seq'"):
        MaskedNetwork(network, ["seq"], 2, nn.init.zeros_, (3, 4))


def test_element_masks_have_one_entry_per_activation_of_a_conv_input():
    torch.manual_seed(0)
    masked = MaskedNetwork(small_cnn(10, 1, width=4), ["conv3", "fc"], 2, nn.init.normal_, (1, 28, 28), "element")
    assert {name: p.shape for name, p in masked.probabilities().items()} == {"conv3": (2, 8 * 7 * 7), "fc": (2, 16)}
    mask = masked.masks["conv3"]
    x = torch.randn(3, 8, 7, 7)
    d = torch.tensor([1, 0, 1])
    p = mask.probabilities().detach()
    assert torch.allclose(mask(x, d, "soft"), x * p[d].view(3, 8, 7, 7))
    assert torch.equal(mask(x, d, "greedy"), x * (p[d] > 0.5).float().view(3, 8, 7, 7))
    with torch.no_grad():
        assert masked.eval().forward_ensemble(torch.randn(5, 1, 28, 28)).shape == (5, 10)


def test_element_mask_ensemble_equals_one_full_pass_per_source_mask():
    torch.manual_seed(0)
    masked = MaskedNetwork(
        small_cnn(10, 1, width=4),
        ["conv2", "conv3"],
        3,
        partial(nn.init.uniform_, a=-1.0, b=2.0),
        (1, 28, 28),
        "element",
    ).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        per_domain = [masked(x, torch.full((4,), k), "soft") for k in range(3)]
        assert torch.allclose(masked.forward_ensemble(x), torch.stack(per_domain).mean(0), atol=1e-5)


def test_unknown_granularity_is_refused():
    with pytest.raises(UserError, match="mask.granularity must be one of channel, element, got 'pixel'"):
        MaskedNetwork(small_cnn(10, 1, width=4), ["conv3"], 2, nn.init.zeros_, (1, 28, 28), "pixel")
