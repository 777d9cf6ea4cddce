"""Backbones: stage names, classifier sizes, weights from a file, a clear error when weights cannot be fetched."""

import pytest
import torch
import torchvision

from dmg.errors import UserError
from dmg.models import backbones


def test_stage_names_follow_torchvision_and_classifier_is_sized_to_dataset():
    alexnet = backbones.alexnet(7)
    assert alexnet.names[-7:] == [f"classifier.{i}" for i in range(7)]
    assert alexnet.classifier.out_features == 7
    resnet = backbones.resnet(18, 345)
    assert resnet.names[-5:] == ["layer3", "layer4", "avgpool", "flatten", "fc"]
    assert resnet.classifier.out_features == 345
    assert resnet(torch.zeros(2, 3, 32, 32)).shape == (2, 345)


def test_weights_file_is_loaded_into_the_backbone(tmp_path):
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    network = backbones.resnet(18, 7, weights=str(tmp_path / "resnet18.pth"))
    assert torch.equal(network.stages["layer3"][0].conv1.weight, reference.layer3[0].conv1.weight)
    assert network.classifier.out_features == 7  # the classifier is new


def test_corrupt_weights_file_gets_a_clear_error(tmp_path):
    (tmp_path / "alexnet.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not be read as a PyTorch state_dict"):
        backbones.alexnet(7, weights=str(tmp_path / "alexnet.pth"))


def test_pretrained_without_network_or_cache_names_the_file_and_the_alternative(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as error:
        backbones.resnet(50, 7, pretrained=True)
    message = str(error.value)
    assert "resnet50-0676ba61.pth" in message and str(tmp_path) in message and "backbone.weights=" in message


def test_single_channel_input_keeps_pretrained_stem_response():
    reference = torchvision.models.resnet18().conv1
    adapted = backbones._adapt_input_channels(reference, 1)
    gray = torch.randn(2, 1, 16, 16)
    assert torch.allclose(adapted(gray), reference(gray.repeat(1, 3, 1, 1)), atol=1e-5)
