"""DomainNet: official lists, the deterministic 90/10 split, the prepare command, packed HDF5, both training formats."""

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient

from dmg.commands import prepare
from dmg.data import packing
from dmg.data.domainnet import split_train_list
from dmg.data.images import read_image
from dmg.data.lists import read_split_list
from dmg.data.synthetic import write_domainnet
from dmg.errors import UserError
from dmg.runs.experiment import run
from tests.conftest import compose_config

DOMAINS = ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]
CLASSES = ["aircraft_carrier", "airplane", "alarm_clock"]
TINY = [
    "backbone=small_cnn",
    "backbone.network.width=4",
    "dataset.image_size=16",
    "dataset.resize_size=16",
    "num_workers=0",
    "progress=false",
]
ROOT = Path(__file__).resolve().parents[1]


def domainnet(root, *overrides):
    return compose_config(["dataset=domainnet", f"dataset.root={root}", "dataset.num_classes=3", *TINY, *overrides])


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "DomainNet"
    write_domainnet(root, DOMAINS, CLASSES, per_class=11)  # per class: 10 train, 1 test
    return root


def test_official_list_lines_are_parsed(tree):
    names, labels = read_split_list(tree / "real_train.txt")
    assert len(names) == 30 and names[0] == "real/aircraft_carrier/aircraft_carrier_000.jpg"
    assert labels.tolist() == [0] * 10 + [1] * 10 + [2] * 10  # 0-based as in the file


def test_split_is_stratified_disjoint_and_keeps_list_order():
    entries = [(f"real/c{label}/img_{i:03d}.jpg", label) for label in range(3) for i in range(20)]
    train, val = split_train_list(entries, 0.1, seed=0)
    assert len(val) == 6 and sorted(label for _, label in val) == [0, 0, 1, 1, 2, 2]
    assert sorted(train + val) == sorted(entries) and not set(train) & set(val)
    assert val == [entry for entry in entries if entry in val]


def test_split_depends_only_on_seed_and_paths():
    entries = [(f"real/c{label}/img_{i:03d}.jpg", label) for label in range(3) for i in range(20)]
    _, val = split_train_list(entries, 0.1, seed=0)
    _, val_shuffled = split_train_list(entries[::-1], 0.1, seed=0)
    assert sorted(val) == sorted(val_shuffled)
    assert sorted(split_train_list(entries, 0.1, seed=1)[1]) != sorted(val)
    # pinned: the same on every machine, Python and torch version (SHA-256 of "seed:path")
    assert [path for path, _ in val] == [
        "real/c0/img_008.jpg",
        "real/c0/img_018.jpg",
        "real/c1/img_008.jpg",
        "real/c1/img_012.jpg",
        "real/c2/img_004.jpg",
        "real/c2/img_015.jpg",
    ]


def test_prepare_command_writes_the_same_split_twice(tree, tmp_path):
    command = [sys.executable, "-m", "dmg", "prepare", "domainnet", "--root", str(tree)]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=120, env={"PYTHONHASHSEED": "1", "PATH": ""}
    )
    assert result.returncode == 0, result.stderr
    first = {path.name: path.read_text() for path in (tree / "dmg_split").glob("*.txt")}
    assert prepare.main(["domainnet", "--root", str(tree)]) == 0  # another process, another hash seed
    assert first == {path.name: path.read_text() for path in (tree / "dmg_split").glob("*.txt")}
    assert len(first) == 18 and len(read_split_list(tree / "dmg_split/real_val.txt")[0]) == 3
    assert first["real_test.txt"] == (tree / "real_test.txt").read_text()


def test_prepare_without_official_lists_says_where_to_get_them(tmp_path, capsys):
    assert prepare.main(["domainnet", "--root", str(tmp_path), "--domains", "real"]) == 1
    assert "real_train.txt not found: download" in capsys.readouterr().err


def test_training_without_prepared_split_names_the_missing_file_and_the_command(tree):
    with pytest.raises(
        UserError,
        match=r"folder .*dmg_split not found: expected clipart_train.txt, .*python -m dmg prepare domainnet --root",
    ):
        instantiate(domainnet(tree).dataset.builder).build(DOMAINS[:5], ["sketch"])


@pytest.mark.parametrize("encoding", ["encoded", "rgb"])
def test_packed_file_round_trip(tree, tmp_path, encoding):
    prepare.main(["domainnet", "--root", str(tree), "--domains", "real"])
    out = tmp_path / "real_val.hdf5"
    result = packing.pack_list(tree / "dmg_split/real_val.txt", tree, out, encoding, size=16, progress=False)
    names, labels = read_split_list(tree / "dmg_split/real_val.txt")
    assert result.stored == 3 and not out.with_name(out.name + ".partial").exists()
    data = instantiate(domainnet(tree, "dataset.format=packed", f"dataset.packed_dir={tmp_path}").dataset.builder).open(
        "real", "val", 2
    )
    assert data.labels.tolist() == labels.tolist()
    for index, name in enumerate(names):
        original = np.asarray(read_image(str(tree / name)))
        assert np.array_equal(
            np.asarray(data.read(index)), original
        )  # 16x16 files: rgb packing stores them as they are
    with h5py.File(out) as file:
        assert file["images"].dtype != np.float32 and file.attrs["encoding"] == encoding
        assert [p.decode() for p in file["paths"][()]] == names


class Interrupted(Exception):
    """Stands for Ctrl-C or a lost machine in the middle of packing."""


def test_packing_resumes_after_an_interruption(tree, tmp_path, monkeypatch):
    prepare.main(["domainnet", "--root", str(tree), "--domains", "real"])
    reads, real_read, resumed = [], packing._read_encoded, False

    def flaky(path):
        reads.append(path.name)
        if len(reads) == 8 and not resumed:
            raise Interrupted
        return real_read(path)

    monkeypatch.setattr(packing, "_read_encoded", flaky)
    out = tmp_path / "real_train.hdf5"
    with pytest.raises(Interrupted):
        packing.pack_list(tree / "dmg_split/real_train.txt", tree, out, chunk=5, progress=False)
    assert not out.exists() and out.with_name(out.name + ".partial").exists()
    reads.clear()
    resumed = True
    result = packing.pack_list(tree / "dmg_split/real_train.txt", tree, out, chunk=5, progress=False)
    assert result.stored == 27 and len(reads) == 22  # continued after the 5 committed images
    with h5py.File(out) as file:
        names = read_split_list(tree / "dmg_split/real_train.txt")[0]
        assert [p.decode() for p in file["paths"][()]] == names and file.attrs["complete"]


def test_packing_names_or_skips_an_undecodable_image(tree, tmp_path):
    prepare.main(["domainnet", "--root", str(tree), "--domains", "real"])
    bad = tree / read_split_list(tree / "dmg_split/real_val.txt")[0][1]
    bad.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(UserError, match=f"cannot decode image {bad}"):
        packing.pack_list(tree / "dmg_split/real_val.txt", tree, tmp_path / "v.hdf5", progress=False)
    result = packing.pack_list(
        tree / "dmg_split/real_val.txt", tree, tmp_path / "w.hdf5", skip_bad_images=True, progress=False
    )
    assert result.stored == 2 and result.skipped == [str(bad.relative_to(tree))]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["tree", "packed"])
def test_one_epoch_end_to_end(tree, tmp_path, fmt):
    pack = ["--pack", "encoded"] if fmt == "packed" else []
    assert prepare.main(["domainnet", "--root", str(tree), *pack]) == 0
    cfg = domainnet(
        tree,
        f"dataset.format={fmt}",
        "method=multihead",
        "target=sketch",
        "epochs=1",
        "batch_size=16",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"checkpoint_dir={tmp_path}/ckpt",
    )
    assert cfg.optim.scheduler_interval == "step" and cfg.epochs == 1
    value = run(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (record,) = client.search_runs([client.get_experiment_by_name("domainnet").experiment_id])
    metrics = record.data.metrics
    assert record.info.status == "FINISHED" and value == metrics["selected/val/acc_mean"]
    assert round(metrics["test/acc/sketch"] * 3, 6) % 1 == 0  # 3 official test images of sketch
    steps = 5 * 27 // 16 + 1  # 5 sources x 27 training images, batches of 16
    # the rate the epoch's last step used: the schedule had stepped once after each of the steps before it
    assert metrics["lr/network"] == pytest.approx(1e-4 * (1 + 1e-4 * (steps - 1)) ** -0.75)
