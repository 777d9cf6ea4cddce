"""The paper's recipes: every {PACS, DomainNet} x {AlexNet, ResNet-18, ResNet-50} x method composes to its settings."""

import itertools

import pytest
import torch
from hydra.utils import instantiate

from dmg.engine.schedules import InverseDecay
from tests.conftest import compose_config

EPOCHS = {("pacs", "aggregate"): 100, ("pacs", "multihead"): 100, ("pacs", "dmg"): 150}
EPOCHS |= {("domainnet", method): 50 for method in ("aggregate", "multihead", "dmg")}
MASKED = {
    "alexnet": ["classifier.1", "classifier.4", "classifier.6"],
    "resnet18": ["layer3", "layer4", "fc"],
    "resnet50": ["layer3", "layer4", "fc"],
}
SPLIT = {"alexnet": "classifier.6", "resnet18": "fc", "resnet50": "fc"}
COMBOS = list(
    itertools.product(["pacs", "domainnet"], ["alexnet", "resnet18", "resnet50"], ["aggregate", "multihead", "dmg"])
)


@pytest.mark.parametrize("dataset, backbone, method", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_recipe(dataset, backbone, method):
    cfg = compose_config(
        [
            f"dataset={dataset}",
            f"backbone={backbone}",
            f"method={method}",
            "target=photo" if dataset == "pacs" else "target=real",
        ]
    )
    assert cfg.epochs == EPOCHS[dataset, method] and cfg.batch_size == 64 and cfg.backbone.pretrained is True
    assert (
        cfg.optim.lr == 1e-4
        and cfg.optim.mask_lr == 1e-4
        and cfg.optim.weight_decay == (1e-5 if dataset == "pacs" else 0.0)
    )
    assert cfg.optim.scheduler_interval == ("epoch" if dataset == "pacs" else "step")
    assert cfg.optim.schedule_masks == (dataset == "domainnet")  # the reference: mask schedule per iteration only
    assert cfg.backbone.mask_layers == MASKED[backbone] and cfg.backbone.split_layer == SPLIT[backbone]
    assert cfg.method.classifier_init_std == (None if method == "dmg" else 0.001)
    if method == "dmg":
        assert (
            cfg.method.overlap_lambda == 0.1
            and cfg.method.sparsity_lambda == 0.0
            and cfg.mask.init._target_ == "torch.nn.init.uniform_"
        )
    assert tuple(cfg.dataset.input_shape) == (3, 224, 224)


def test_the_documented_command_composes_with_resnet18():
    cfg = compose_config(["dataset=pacs", "method=dmg", "target=sketch"])
    assert (cfg.backbone.name, cfg.epochs, cfg.target, cfg.dataset.format) == ("resnet18", 150, "sketch", "hdf5")


def test_command_line_wins_over_recipe():
    cfg = compose_config(["dataset=pacs", "backbone=small_cnn", "optim=adam", "epochs=3", "num_workers=0"])
    assert (cfg.backbone.name, cfg.optim.lr, cfg.epochs, cfg.num_workers) == ("small_cnn", 1e-3, 3, 0)


def test_data_root_comes_from_dmg_data(monkeypatch):
    monkeypatch.setenv("DMG_DATA", "/datasets")
    assert compose_config(["dataset=pacs"]).dataset.root == "/datasets/PACS"
    assert compose_config(["dataset=domainnet"]).dataset.split_dir == "/datasets/DomainNet/dmg_split"


def test_schedules_step_as_the_paper():
    parameter = torch.nn.Parameter(torch.zeros(1))
    for dataset, steps, factor in [("pacs", 3, 0.99**3), ("domainnet", 1000, (1 + 0.1) ** -0.75)]:
        cfg = compose_config([f"dataset={dataset}"])
        optimizer = instantiate(cfg.optim.network)([parameter])
        scheduler = instantiate(cfg.optim.scheduler)(optimizer)
        for _ in range(steps):
            optimizer.step()
            scheduler.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * factor)
    assert InverseDecay()(0) == 1.0


@pytest.mark.parametrize("dataset", ["pacs", "domainnet"])
def test_transforms_give_normalised_224_images(dataset):
    from PIL import Image

    transforms = instantiate(compose_config([f"dataset={dataset}"]).dataset.transforms)
    image = Image.new("RGB", (300, 227), (124, 116, 104))  # about the ImageNet mean
    for name in ("train", "eval"):
        x = transforms[name](image)  # per image, in the loader: uint8 crops
        assert x.shape == (3, 224, 224) and x.dtype == torch.uint8
        batch = transforms[f"{name}_batch"](torch.stack([x, x]))  # per batch, on the device: float, normalised
        assert batch.shape == (2, 3, 224, 224) and batch.dtype == torch.float32
        assert batch.abs().max() < (1.0 if name == "eval" else 3.0)


def test_pacs_colour_jitter_is_drawn_per_image_and_evaluation_is_deterministic():
    transforms = instantiate(compose_config(["dataset=pacs"]).dataset.transforms)
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).repeat(4, 1, 1, 1)
    jittered = transforms.train_batch(images)
    assert all(not torch.allclose(jittered[0], jittered[i]) for i in range(1, 4))
    evaluated = transforms.eval_batch(images)
    assert all(torch.equal(evaluated[0], evaluated[i]) for i in range(1, 4))
