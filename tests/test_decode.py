"""dataset.decode=gpu: encoded batches decoded on the device give the same crops, flips and pixels as the workers.

On the CPU the device path decodes with the same libjpeg as PIL, so the batches are bit-identical; on a GPU
(nvJPEG) the geometry is the same and the pixels differ by the decoders' rounding.
"""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from dmg.commands import prepare
from dmg.data.images import BadImageError
from dmg.data.synthetic import write_domainnet, write_image_tree, write_pacs_hdf5, write_pacs_kfold
from dmg.errors import UserError
from dmg.runs.experiment import build, build_loaders
from tests.conftest import compose_config

PACS = ["art_painting", "cartoon", "photo", "sketch"]
CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]


def batches(cfg, device="cpu", epoch=1):
    """Every training batch of ``epoch`` and every evaluation batch, as the training loop gets them."""
    data = instantiate(cfg.dataset.builder)
    splits = data.build(data.domains[:-1], data.domains[-1:])
    loaders = build_loaders(splits, cfg, torch.device(device))
    loaders.train.set_epoch(0, epoch)
    loaders.evaluation.set_epoch(0, 0)
    return [x for x, _, _ in loaders.train] + [x for x, _, _ in loaders.evaluation]


def assert_same_batches(cfg_of, tolerance=0.0, device="cpu"):
    on_cpu, on_device = batches(cfg_of("cpu")), batches(cfg_of("gpu"), device)
    assert len(on_cpu) == len(on_device) > 2
    for a, b in zip(on_cpu, on_device):
        assert a.shape == b.shape and (a - b.cpu()).abs().max().item() <= tolerance


def pacs_kfold(root, decode, *overrides):
    return compose_config(
        [
            "dataset=pacs",
            f"dataset.root={root}",
            "dataset.format=kfold",
            "dataset.image_size=32",
            f"dataset.decode={decode}",
            "batch_size=8",
            "num_workers=0",
            *overrides,
        ]
    )


@pytest.fixture(scope="module")
def kfold_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("PACS")
    write_pacs_kfold(root, PACS, CLASSES, per_class=3, size=40)
    return root


def test_kfold_jpegs_decoded_on_the_device_match_the_workers_bit_for_bit(kfold_root):
    assert_same_batches(lambda decode: pacs_kfold(kfold_root, decode))


def test_worker_count_does_not_change_device_decoded_batches(kfold_root):
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            batches(pacs_kfold(kfold_root, "gpu", "num_workers=0")),
            batches(pacs_kfold(kfold_root, "gpu", "num_workers=2")),
        )
    )


def test_png_images_in_an_image_folder_are_decoded_too(tmp_path):
    write_image_tree(tmp_path, ["a", "b", "c"], ["cat", "dog"], per_class=6, size=30, suffix=".png")
    assert_same_batches(
        lambda decode: compose_config(
            [
                "dataset=imagefolder",
                f"dataset.root={tmp_path}",
                "dataset.num_classes=2",
                "dataset.image_size=16",
                f"dataset.decode={decode}",
                "batch_size=5",
                "num_workers=0",
            ]
        )
    )


def test_packed_encoded_hdf5_decoded_on_the_device_matches_the_workers(tmp_path):
    domains, classes = ["real", "sketch"], ["airplane", "alarm_clock"]
    write_domainnet(tmp_path, domains, classes, per_class=11, size=30)
    assert prepare.main(["domainnet", "--root", str(tmp_path), "--domains", *domains, "--pack", "encoded"]) == 0
    common = ["dataset=domainnet", f"dataset.root={tmp_path}", "dataset.num_classes=2", f"dataset.domains={domains}"]
    sizes = ["dataset.image_size=16", "dataset.resize_size=20", "dataset.format=packed", "num_workers=0"]
    assert_same_batches(lambda decode: compose_config([*common, *sizes, f"dataset.decode={decode}", "batch_size=6"]))


def test_decoded_pixels_need_no_device_decode(tmp_path):
    write_pacs_hdf5(tmp_path, PACS, {"train": 3, "val": 2, "test": 2}, size=40)
    cfg = compose_config(["dataset=pacs", f"dataset.root={tmp_path}", "dataset.decode=gpu"])
    with pytest.raises(UserError, match="dataset.decode=gpu needs encoded images, but .*stores decoded bgr pixels"):
        instantiate(cfg.dataset.builder).build(PACS[:3], PACS[3:])
    with pytest.raises(UserError, match="dataset.decode must be one of cpu, gpu, got 'tpu'"):
        build(compose_config(["dataset=pacs", "dataset.decode=tpu"]).dataset.builder, "dataset")


def test_an_undecodable_image_is_a_clear_error(tmp_path):
    write_pacs_kfold(tmp_path, PACS, CLASSES, per_class=2, size=40)
    (tmp_path / "kfold/sketch/dog/dog_000.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(
        BadImageError, match="cannot decode image 0 of a batch on the device .*dataset.decode=cpu names"
    ):
        batches(pacs_kfold(tmp_path, "gpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: JPEG decoding with nvJPEG")
def test_jpegs_decoded_on_the_gpu_get_the_same_crops_and_flips(kfold_root):
    # Same crop boxes and flips; nvJPEG's IDCT and chroma upsampling round differently from libjpeg's.
    on_cpu, on_gpu = batches(pacs_kfold(kfold_root, "cpu")), batches(pacs_kfold(kfold_root, "gpu"), "cuda")
    for a, b in zip(on_cpu, on_gpu):
        assert a.shape == b.shape and (a - b.cpu()).abs().mean().item() < 0.05  # normalised units: ~3/255
