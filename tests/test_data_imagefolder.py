"""DomainBed-style ImageFolder datasets: seeded per-domain holdout, class agreement, errors, one-epoch run."""

import pytest
import torch
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient

from dmg.data.synthetic import write_image_tree
from dmg.errors import UserError
from dmg.runs.experiment import run
from tests.conftest import compose_config

TINY = ["backbone=small_cnn", "backbone.network.width=4", "dataset.image_size=16", "num_workers=0", "progress=false"]


def folder(root, *overrides):
    cfg = compose_config(["dataset=imagefolder", f"dataset.root={root}", "dataset.num_classes=2", *TINY, *overrides])
    return cfg, instantiate(cfg.dataset.builder)


@pytest.fixture
def root(tmp_path):
    write_image_tree(tmp_path / "mine", ["b_dom", "a_dom", "c dom"], ["cat", "dog"], per_class=10, suffix=".png")
    return tmp_path / "mine"


def test_domains_are_the_sorted_subfolders_and_a_mapping_renames_them(root):
    assert folder(root)[1].domains == ["a_dom", "b_dom", "c dom"]
    assert folder(root, "+dataset.domains={c: 'c dom', a: a_dom}")[1].folders["c"] == root / "c dom"


def test_holdout_is_seeded_per_domain_disjoint_and_twenty_percent(root):
    data = folder(root)[1]
    train, val = data.open("a_dom", "train", 0), data.open("a_dom", "val", 0)
    assert (len(train), len(val)) == (16, 4) and not set(train.paths) & set(val.paths)
    assert set(folder(root)[1].open("a_dom", "val", 0).paths) == set(val.paths)  # same seed, same holdout
    assert set(folder(root, "dataset.split_seed=1")[1].open("a_dom", "val", 0).paths) != set(val.paths)
    assert len(data.open("c dom", "test", -1)) == 20  # a target is evaluated whole
    b_only = folder(root, "dataset.domains=[b_dom]")[1].open("b_dom", "val", 0).paths
    assert set(b_only) == set(data.open("b_dom", "val", 1).paths)  # independent of the other domains


def test_labels_follow_the_class_folders(root):
    test = folder(root)[1].open("a_dom", "test", -1)
    assert all(f"/{['cat', 'dog'][int(label)]}/" in path for path, label in zip(test.paths, test.labels))


def test_class_folders_must_agree_across_domains(root):
    (root / "b_dom" / "dog").rename(root / "b_dom" / "wolf")
    with pytest.raises(
        UserError,
        match=r"class folders differ between domains: b_dom lacks \['dog'\] and has extra \['wolf'\] compared with a_dom",
    ):
        folder(root)[1].build(["a_dom", "b_dom"], ["c dom"])


def test_wrong_num_classes_says_the_right_value(root):
    with pytest.raises(UserError, match="has 2 class folders but dataset.num_classes is 5: set dataset.num_classes=2"):
        folder(root, "dataset.num_classes=5")[1].build(["a_dom", "b_dom"], ["c dom"])


def test_a_domain_with_no_images_is_named(root):
    for image in (root / "b_dom").rglob("*.png"):
        image.unlink()
    with pytest.raises(UserError, match=r"domain folder .*b_dom holds no images"):
        folder(root)[1].build(["a_dom", "b_dom"], ["c dom"])


def test_missing_root_and_missing_target_are_clear(tmp_path):
    with pytest.raises(
        UserError, match=r"data folder .*absent not found: expected .*<domain>/<class>/<image>; put the images"
    ):
        folder(tmp_path / "absent")[1].domains
    cfg = compose_config(["dataset=officehome", f"dataset.root={tmp_path}", *TINY])
    with pytest.raises(UserError, match=r"folder .* lacks Art, Clipart, Product, Real World; put the images"):
        instantiate(cfg.dataset.builder).build(["art", "clipart", "product"], ["real_world"])


@pytest.mark.parametrize(
    "name, classes, target",
    [("officehome", 65, "art"), ("vlcs", 5, "Caltech101"), ("terraincognita", 10, "location_100")],
)
def test_named_configs(name, classes, target):
    cfg = compose_config([f"dataset={name}"])
    assert cfg.dataset.num_classes == classes and cfg.target == target and cfg.dataset.builder.holdout_fraction == 0.2
    assert target in instantiate(cfg.dataset.builder).domains


@pytest.mark.slow
def test_one_epoch_end_to_end(root, tmp_path):
    cfg, _ = folder(
        root,
        "target=c dom",
        "method=aggregate",
        "epochs=1",
        "batch_size=8",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"checkpoint_dir={tmp_path}/ckpt",
    )
    value = run(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (record,) = client.search_runs([client.get_experiment_by_name("imagefolder").experiment_id])
    metrics = record.data.metrics
    assert record.info.status == "FINISHED" and value == metrics["selected/val/acc_mean"]
    assert round(metrics["val/acc/a_dom"] * 4, 6) % 1 == 0 and round(metrics["test/acc/c dom"] * 20, 6) % 1 == 0
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
