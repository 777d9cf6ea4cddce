"""``python -m dmg bench gpu`` on the CPU with tiny settings: the JSON's structure and values."""

from __future__ import annotations

import json

import pytest

from dmg.commands.bench import main
from dmg.commands.bench_gpu import SYNC_CASES


@pytest.mark.slow
def test_bench_gpu_writes_one_json_of_every_part(tmp_path, capsys):
    output = tmp_path / "gpu.json"
    argv = ["gpu", "--device", "cpu", "--output", str(output), "--train-backbones", "small_cnn"]
    argv += ["--train-methods", "aggregate", "--images-per-domain", "14", "--image-size", "32", "--batch-size", "8"]
    argv += ["--workers", "0", "--epochs", "2", "--ddp-processes", "1", "--ddp-epochs", "1", "--ddp-images", "300"]
    argv += ["--ddp-override", "backbone.network.width=4"]
    main(argv)
    report = json.loads(output.read_text())
    assert set(report) == {"machine", "syncs", "train", "ddp"}
    assert report["machine"]["device"] == "cpu" and report["machine"]["gpus"] == []
    assert sorted(report["syncs"]) == sorted(" ".join(case) for case in SYNC_CASES)
    for case in report["syncs"].values():
        assert case == {"syncs_per_step": 0, "kinds": {}, "cuda_sync_debug": "not run: no CUDA device"}
    (train,) = report["train"]
    assert (train["backbone"], train["method"]) == ("small_cnn", "aggregate")
    assert train["images"] > 0 and train["images"] % 8 == 0  # whole batches (drop_last)
    assert train["end_to_end_images_per_second"] == pytest.approx(train["images"] / train["epoch_seconds"])
    assert train["loader_ratio"] == pytest.approx(
        train["end_to_end_images_per_second"] / train["compute_only_images_per_second"]
    )
    assert train["peak_memory_mib"] is None and train["starts_after_first_epoch"] == 0
    ddp = report["ddp"]
    assert ddp["processes"] == 1 and "--nproc_per_node=1" in ddp["command"] and "launch.py" in ddp["command"]
    assert ddp["exit_code"] == 0, ddp["output_tail"]
    assert ddp["seconds"] > 0 and "<scratch>/mlflow.db" in ddp["command"]
    assert f"written: {output}" in capsys.readouterr().out
