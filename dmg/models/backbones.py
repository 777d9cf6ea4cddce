"""Backbones as :class:`StagedNetwork`: a small CNN for the embedded data, torchvision AlexNet and ResNets.

Every builder takes the dataset's ``num_classes`` and ``in_channels`` and ends in a fresh linear
classifier. Pretrained ImageNet weights come through torchvision's weights API (downloaded once into
torch's cache) or from a local file.
"""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import torch
import torchvision
from torch import nn

from dmg.errors import UserError
from dmg.models.staged import StagedNetwork


def small_cnn(num_classes: int, in_channels: int = 1, width: int = 32, freeze_bn: bool = False) -> StagedNetwork:
    """Three conv-BN-ReLU blocks with max-pooling between them, global pooling and a linear classifier.

    ``freeze_bn``: BatchNorm held in eval mode (see :class:`StagedNetwork`); likewise for every builder here.
    """

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    return StagedNetwork(
        [
            ("conv1", block(in_channels, width)),
            ("pool1", nn.MaxPool2d(2)),
            ("conv2", block(width, 2 * width)),
            ("pool2", nn.MaxPool2d(2)),
            ("conv3", block(2 * width, 4 * width)),
            ("avgpool", nn.AdaptiveAvgPool2d(1)),
            ("flatten", nn.Flatten(1)),
            ("fc", nn.Linear(4 * width, num_classes)),
        ],
        freeze_bn,
    )


def alexnet(
    num_classes: int,
    in_channels: int = 3,
    pretrained: bool = False,
    weights: str | None = None,
    freeze_bn: bool = False,
) -> StagedNetwork:
    """torchvision AlexNet; every layer of ``features`` and ``classifier`` is a stage (``classifier.6`` is new).

    AlexNet has no BatchNorm: ``freeze_bn`` changes nothing (accepted so that every backbone takes the key).
    """
    model = _torchvision_model("alexnet", pretrained, weights)
    model.features[0] = _adapt_input_channels(model.features[0], in_channels)
    model.classifier[6] = nn.Linear(model.classifier[6].in_features, num_classes)
    return StagedNetwork(
        [(f"features.{i}", layer) for i, layer in enumerate(model.features)]
        + [("avgpool", model.avgpool), ("flatten", nn.Flatten(1))]
        + [(f"classifier.{i}", layer) for i, layer in enumerate(model.classifier)],
        freeze_bn,
    )


def resnet(
    depth: int,
    num_classes: int,
    in_channels: int = 3,
    pretrained: bool = False,
    weights: str | None = None,
    freeze_bn: bool = False,
) -> StagedNetwork:
    """torchvision ResNet-``depth``; its top-level modules are the stages, ``fc`` is new."""
    model = _torchvision_model(f"resnet{depth}", pretrained, weights)
    model.conv1 = _adapt_input_channels(model.conv1, in_channels)
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
    stages = [(name, getattr(model, name)) for name in names]
    classifier = [("flatten", nn.Flatten(1)), ("fc", nn.Linear(model.fc.in_features, num_classes))]
    return StagedNetwork(stages + classifier, freeze_bn)


def _torchvision_model(name: str, pretrained: bool, weights_file: str | None) -> nn.Module:
    """A torchvision model with random, ImageNet (``pretrained``) or file (``weights_file``) weights."""
    model = torchvision.models.get_model(name, weights=None)
    if weights_file:
        load_weights(model, _read_weights_file(weights_file, name), name, weights_file)
    elif pretrained:
        model.load_state_dict(_download_imagenet_weights(name))
    return model


def _read_weights_file(path: str, name: str) -> dict[str, torch.Tensor]:
    file = Path(os.path.expanduser(path))
    if file.is_dir():
        raise UserError(
            f"backbone.weights={path}: {file} is a folder; name the {name} state_dict file (.pth) inside it"
        )
    if not file.is_file():
        raise UserError(
            f"backbone weights file {file} not found: backbone.weights must name a {name} state_dict (.pth)"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file
        reason = str(error).strip().splitlines()[0]
        raise UserError(f"backbone weights file {file} could not be read as a PyTorch state_dict: {reason}") from None
    return state.get("state_dict", state.get("model", state))


KNOWN_ARCHITECTURES = ("alexnet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16", "densenet121")


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], name: str, file: str) -> None:
    """Load a state_dict; one that does not fit says how far off it is and which architecture it looks like."""
    expected = {key: value.shape for key, value in model.state_dict().items()}
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong = [key for key in expected if key in state and state[key].shape != expected[key]]
    if missing or unexpected or wrong:
        raise UserError(
            f"backbone.weights file {file} does not fit {name}: {len(missing)} of the {len(expected)} keys it needs are "
            f"missing, {len(unexpected)} unexpected, {len(wrong)} of another shape; {_resemblance(state)}"
        )
    model.load_state_dict(state)


def _resemblance(state: dict[str, torch.Tensor]) -> str:
    """Which torchvision architecture a state_dict looks like, as a hint (candidates built on the meta device)."""
    shapes = {key: tuple(value.shape) for key, value in state.items() if hasattr(value, "shape")}
    scores = {}
    for candidate in KNOWN_ARCHITECTURES:
        with torch.device("meta"):
            reference = torchvision.models.get_model(candidate, weights=None).state_dict()
        matching = sum(shapes.get(key) == tuple(value.shape) for key, value in reference.items())
        scores[candidate] = (matching, max(len(reference), len(shapes)))
    best, (matching, total) = max(scores.items(), key=lambda item: item[1][0] / item[1][1])
    if matching / total < 0.9:
        return f"it looks like none of {', '.join(KNOWN_ARCHITECTURES)}"
    return f"it looks like a {best} state_dict ({matching} of {total} tensors match)"


def _download_imagenet_weights(name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights (the V1 set the paper used), from torch's cache or downloaded once."""
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, OSError) as error:
        raise UserError(
            f"cannot download ImageNet weights for {name} ({error}): put {weights.url} at {cached}, "
            f"or pass backbone.weights=/path/to/{cached.name}"
        ) from None


def _adapt_input_channels(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """The stem convolution for ``in_channels`` inputs; RGB filters are averaged into the new channels."""
    if in_channels == conv.in_channels:
        return conv
    new = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight.mean(1, keepdim=True).expand_as(new.weight) * (conv.in_channels / in_channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new
