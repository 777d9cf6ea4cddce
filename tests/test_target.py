"""``target=<domain>`` and ``target=[a,b]`` (and likewise ``sources``) work for every dataset of ``conf/dataset/``,
whatever the form of the dataset's ``default_target`` (a name, or ``[]`` for ``imagefolder``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from dmg.data import choose_domains
from dmg.data.synthetic import write_image_tree
from dmg.errors import UserError
from dmg.runs.settings import check_overrides
from tests.conftest import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
DATASETS = sorted(path.stem for path in (CONF_DIR / "dataset").glob("*.yaml"))


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder") / "mine"
    write_image_tree(root, ["a", "b", "c"], ["cat", "dog"], per_class=6, suffix=".png")
    return root


def checked(dataset: str, image_root: Path, *overrides: str):
    """The config ``launch.py`` composes for ``dataset`` with ``overrides``, after its command-line checks."""
    overrides = [f"dataset={dataset}", *overrides]
    if dataset == "imagefolder":
        overrides += [f"dataset.root={image_root}", "dataset.num_classes=2"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
        check_overrides(cfg, overrides)
    return cfg, instantiate(cfg.dataset.builder).domains


@pytest.mark.parametrize("dataset", DATASETS)
def test_a_single_name_and_a_list_are_both_accepted_as_target_and_sources(dataset, image_root):
    domains = checked(dataset, image_root)[1]
    first, last = domains[0], domains[-1]
    for target in (f"target={last}", f"target=[{last}]"):
        cfg, _ = checked(dataset, image_root, target)
        assert choose_domains(domains, cfg.target, cfg.sources) == (domains[:-1], [last])
    for sources in (f"sources={first}", f"sources=[{first}]"):
        cfg, _ = checked(dataset, image_root, f"target={last}", sources)
        assert choose_domains(domains, cfg.target, cfg.sources) == ([first], [last])


@pytest.mark.parametrize("dataset", DATASETS)
def test_a_mapping_is_still_refused_as_target(dataset, image_root):
    with pytest.raises(UserError, match=r"target must be one domain name or a list of names such as \[a,b\]"):
        checked(dataset, image_root, "target={a: 1}")


@pytest.mark.slow
def test_the_documented_imagefolder_command_trains(image_root, tmp_path):
    command = [
        sys.executable,
        str(ROOT / "launch.py"),
        "dataset=imagefolder",
        f"dataset.root={image_root}",
        "dataset.num_classes=2",
        "target=c",
        "backbone=small_cnn",
        "dataset.image_size=16",
        "method=aggregate",
        "epochs=1",
        "batch_size=8",
        "progress=false",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sources ['a', 'b'], targets ['c']" in result.stdout + result.stderr
