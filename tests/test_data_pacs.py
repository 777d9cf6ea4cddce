"""PACS in its two official formats (HDF5, kfold images + lists) and DomainBed's copy: reading, protocol, errors."""

import h5py
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient

from dmg.data.images import BadImageError
from dmg.data.lists import read_split_list
from dmg.data.synthetic import write_image_tree, write_pacs_hdf5, write_pacs_kfold
from dmg.errors import UserError
from dmg.runs.experiment import run
from tests.conftest import compose_config

DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]
CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
TINY = ["backbone=small_cnn", "backbone.network.width=4", "dataset.image_size=32", "num_workers=0", "progress=false"]


def pacs(root, *overrides):
    """The composed PACS config reading ``root``, with tiny images and a tiny backbone."""
    return compose_config(["dataset=pacs", f"dataset.root={root}", *TINY, *overrides])


def builder(root, *overrides):
    return instantiate(pacs(root, *overrides).dataset.builder)


@pytest.fixture
def hdf5_root(tmp_path):
    root = tmp_path / "PACS"
    write_pacs_hdf5(root, DOMAINS, {"train": 9, "val": 3, "test": 5}, size=40)
    return root


def test_hdf5_pixels_become_rgb_and_labels_start_at_zero(hdf5_root):
    written = write_pacs_hdf5(hdf5_root, ["sketch"], {"test": 8}, size=40, seed=5)["sketch_test"]
    data = builder(hdf5_root).open("sketch", "test", -1)
    item = data.read(3)
    assert np.array_equal(np.asarray(item), written[3])  # file holds BGR, we read RGB
    assert data.labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 0]  # file holds 1..7 (as floats)
    x, y, d = data[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and int(y) == 3 and d == -1


def test_hdf5_protocol_train_val_of_sources_test_of_target(hdf5_root):
    splits = builder(hdf5_root).build(["art_painting", "photo"], ["sketch"])
    assert (
        len(splits.train) == 18 and [len(v) for v in splits.val.values()] == [3, 3] and len(splits.test["sketch"]) == 5
    )
    assert sorted({int(splits.train[i][2]) for i in range(18)}) == [0, 1]
    assert splits.val["photo"][0][2] == 1 and splits.num_classes == 7


def test_hdf5_handle_is_opened_lazily_and_not_pickled(hdf5_root):
    import pickle

    data = builder(hdf5_root).open("photo", "train", 0)
    assert data._images is None  # nothing open in the parent
    data[0]
    assert data._images is not None
    assert pickle.loads(pickle.dumps(data))._images is None


def test_hdf5_train_transform_augments_and_eval_resizes(hdf5_root):
    data = builder(hdf5_root, "dataset.image_size=24")
    train, val = data.open("photo", "train", 0), data.open("photo", "val", 0)
    torch.manual_seed(0)
    assert train[0][0].shape == (3, 24, 24) and not torch.equal(train[0][0], train[0][0])  # random crops
    assert torch.equal(val[0][0], val[0][0]) and val[0][0].dtype == torch.uint8  # deterministic; normalised per batch


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: (root / "sketch_test.hdf5").unlink(), "folder .*PACS lacks sketch_test.hdf5; download the PACS"),
        (
            lambda root: (root / "photo_val.hdf5").write_bytes((root / "photo_val.hdf5").read_bytes()[:3000]),
            "truncated",
        ),
        (lambda root: _rewrite(root / "photo_train.hdf5", labels=None), "lacks the dataset.s. labels"),
        (
            lambda root: _rewrite(root / "photo_train.hdf5", labels=np.array([1, 2, 8] * 3)),
            "label 8 .* outside the class range 1..7",
        ),
        (
            lambda root: _rewrite(
                root / "photo_train.hdf5", images=np.zeros((0, 40, 40, 3), np.uint8), labels=np.zeros(0)
            ),
            "no images: domain photo",
        ),
    ],
    ids=["file-missing", "truncated", "no-labels", "label-range", "empty-domain"],
)
def test_hdf5_bad_inputs_give_one_line_errors(hdf5_root, damage, message):
    damage(hdf5_root)
    with pytest.raises(UserError, match=message) as error:
        builder(hdf5_root).build(["art_painting", "cartoon", "photo"], ["sketch"])
    assert "\n" not in str(error.value)


def test_missing_data_root_says_what_was_expected_and_how_to_get_it(tmp_path):
    with pytest.raises(
        UserError, match=r"folder .*nowhere not found: expected art_painting_train.hdf5.*PACS project page"
    ):
        builder(tmp_path / "nowhere").build(DOMAINS[:3], ["sketch"])


def _rewrite(path, **datasets):
    with h5py.File(path, "a") as file:
        for key, value in datasets.items():
            del file[key]
            if value is not None:
                file[key] = value


@pytest.fixture
def kfold_root(tmp_path):
    root = tmp_path / "PACS"
    write_pacs_kfold(root, DOMAINS, CLASSES, per_class=3)
    return root


def test_kfold_list_lines_are_parsed(tmp_path):
    path = tmp_path / "sketch_train_kfold.txt"
    path.write_text("sketch/dog/n02103406_343-1.png 1\n\nsketch/house/a b.png 6\n")
    names, labels = read_split_list(path)
    assert names == ["sketch/dog/n02103406_343-1.png", "sketch/house/a b.png"] and labels.tolist() == [1, 6]
    path.write_text("sketch/dog/x.png one\n")
    with pytest.raises(UserError, match="line 1 of .*expected 'relative/path/to/image integer-label'"):
        read_split_list(path)


def test_kfold_images_follow_the_official_lists(kfold_root):
    splits = builder(kfold_root, "dataset.format=kfold").build(DOMAINS[:3], ["sketch"])
    assert len(splits.train) == 3 * 14 and len(splits.val["cartoon"]) == 7 and len(splits.test["sketch"]) == 21
    assert splits.val["cartoon"].labels.tolist() == list(range(7))  # 1..7 in the list
    assert splits.val["cartoon"].paths[0].endswith("kfold/cartoon/dog/dog_000.jpg")


def test_kfold_missing_split_file_is_named(kfold_root):
    (kfold_root / "photo_crossval_kfold.txt").unlink()
    with pytest.raises(UserError, match=r"folder .*PACS lacks photo_crossval_kfold.txt; download PACS's kfold"):
        builder(kfold_root, "dataset.format=kfold").build(DOMAINS[:3], ["sketch"])


def test_undecodable_image_is_named_or_skipped(kfold_root):
    bad = kfold_root / "kfold/sketch/dog/dog_000.jpg"
    bad.write_bytes(b"not a jpeg")
    test = builder(kfold_root, "dataset.format=kfold").open("sketch", "test", -1)
    with pytest.raises(BadImageError, match=f"cannot decode image {bad}"):
        test[0]
    skipping = builder(kfold_root, "dataset.format=kfold", "dataset.skip_bad_images=true").open("sketch", "test", -1)
    x, y, _ = skipping[0]
    assert int(y) == skipping.labels[1] and skipping.skipped == 1  # the next image stands in, with its own label


def test_bad_image_error_stays_one_line_through_a_worker(kfold_root):
    from torch.utils.data import DataLoader

    (kfold_root / "kfold/sketch/dog/dog_000.jpg").write_bytes(b"not a jpeg")
    test = builder(kfold_root, "dataset.format=kfold").open("sketch", "test", -1)
    with pytest.raises(BadImageError) as error:
        next(iter(DataLoader(test, batch_size=4, num_workers=1)))
    assert str(error.value).startswith("cannot decode image") and "\n" not in str(error.value)


def test_domainbed_copy_reads_as_imagefolder(tmp_path):
    write_image_tree(tmp_path / "PACS", DOMAINS, CLASSES, per_class=5)
    splits = builder(tmp_path / "PACS", "dataset.format=imagefolder").build(DOMAINS[:3], ["sketch"])
    assert len(splits.train) == 3 * 28 and len(splits.val["photo"]) == 7 and len(splits.test["sketch"]) == 35


def test_unknown_format_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="unknown dataset.format 'zip': expected one of hdf5, kfold, imagefolder"):
        builder(tmp_path, "dataset.format=zip")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["hdf5", "kfold"])
def test_one_epoch_end_to_end(tmp_path, hdf5_root, fmt):
    if fmt == "kfold":
        write_pacs_kfold(hdf5_root, DOMAINS, CLASSES, per_class=2)
    cfg = pacs(
        hdf5_root,
        f"dataset.format={fmt}",
        "method=dmg",
        "target=sketch",
        "epochs=1",
        "batch_size=8",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"checkpoint_dir={tmp_path}/ckpt",
    )
    assert cfg.backbone.name == "small_cnn" and cfg.optim.lr == 1e-4
    value = run(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (record,) = client.search_runs([client.get_experiment_by_name("pacs").experiment_id])
    assert record.info.status == "FINISHED" and record.data.tags["target"] == "sketch"
    metrics = record.data.metrics
    assert value == metrics["selected/val/acc_mean"]
    test_size = 5 if fmt == "hdf5" else 14  # the whole target domain is evaluated
    assert round(metrics["test/acc/sketch"] * test_size, 6) % 1 == 0
    assert {f"val/acc/{d}" for d in DOMAINS[:3]} <= set(metrics)


def test_augmented_batches_with_workers_depend_only_on_the_epoch_seed(hdf5_root):
    """What makes a resumed run match: setting the loader's (seed, epoch) replays an epoch's crops exactly."""
    from dmg.data.loading import make_loader

    train = builder(hdf5_root, "dataset.image_size=24").build(DOMAINS[:3], DOMAINS[3:]).train
    loader = make_loader(train, batch_size=8, shuffle=True, num_workers=2)

    def epoch(seed):
        loader.set_epoch(seed, 0)
        return [x for x, _, _ in loader]

    first, other, again = epoch(7), epoch(8), epoch(7)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
