"""Every option of every config group composes and instantiates (enumerated from conf/, so new options are covered)."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from dmg.data import choose_domains
from dmg.runs.experiment import build_method
from dmg.runs.tracking import config_hash
from tests.conftest import CONF_DIR, compose_config

GROUPS = ["dataset", "backbone", "method", "mask", "optim", "averaging"]
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF_DIR / group).glob("*.yaml"))]


def extra_overrides(group: str, option: str) -> list[str]:
    """What a test run of an option needs besides it: no downloads, images AlexNet can take, named domains."""
    overrides = ["++backbone.pretrained=false"]  # recipes ask for ImageNet weights; tests never download
    if group != "dataset":
        overrides.append("dataset.image_size=64")  # on Rotated MNIST: AlexNet needs >= 63 pixels
    if (group, option) == ("dataset", "imagefolder"):
        overrides += ["dataset.domains=[a,b]", "target=a"]  # the generic folder dataset has no fixed domains
    return overrides


def test_every_group_has_options():
    assert {group for group, _ in OPTIONS} == set(GROUPS)


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_instantiates(group, option):
    cfg = compose_config([f"{group}={option}", *extra_overrides(group, option)])
    dataset = instantiate(cfg.dataset.builder)
    sources, _ = choose_domains(dataset.domains, cfg.target, cfg.sources)
    method = build_method(cfg, sources)
    assert method.predict(torch.zeros(2, *cfg.dataset.input_shape)).shape == (2, cfg.dataset.num_classes)
    assert callable(instantiate(cfg.mask.init)) and cfg.mask.granularity in ("channel", "element")
    assert cfg.optimized_metric and cfg.tracking.experiment == cfg.dataset.name


def test_config_defaults_name_the_documented_groups():
    cfg = compose_config()
    assert cfg.method.name == "dmg" and cfg.dataset.name == "rotated_mnist" and cfg.backbone.name == "small_cnn"
    assert cfg.target == "rot30"
    assert Path(CONF_DIR / "config.yaml").exists()


@pytest.mark.parametrize(
    "overrides, recorded",
    [
        ([], "886c65812fc2da30"),
        (["averaging=swad"], "5453c83088c06e4c"),
        (["optim=domainnet", "dataset=domainnet", "dataset.root=/data"], "971bd10f07c4a6fd"),
    ],
)
def test_config_hashes_of_earlier_releases_still_find_their_runs(overrides, recorded):
    """Hashes recorded before the package was regrouped (and before settings were added since, at their defaults):
    an interrupted run of an earlier release is found and continued by the same command."""
    assert config_hash(compose_config(overrides)) == recorded
