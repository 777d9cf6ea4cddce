"""The speed benchmark builds every method from the configs and reports throughput and DMG's ratios."""

import re

from dmg.commands.bench import main


def test_bench_reports_every_method_and_the_dmg_ratios(capsys):
    main(
        [
            "--backbone",
            "small_cnn",
            "--image-size",
            "28",
            "--channels",
            "1",
            "--classes",
            "10",
            "--batch-size",
            "16",
            "--warmup",
            "1",
            "--repeats",
            "2",
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out
    for method in ["aggregate", "multihead", "dmg"]:
        numbers = re.search(rf"^{method}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
        assert numbers and all(float(value) > 0 for value in numbers.groups())
    ratios = dict(re.findall(r"^  (train step|in-domain eval|out-of-domain eval)\s+([\d.]+)$", out, re.M))
    assert set(ratios) == {"train step", "in-domain eval", "out-of-domain eval"}
    assert all(float(value) > 0 for value in ratios.values())


def test_train_bench_runs_real_epochs_from_files_and_reports_every_column(capsys):
    """The CI setting: a tiny generated PACS-shaped folder, small images, two persistent workers."""
    argv = ["train", "--backbones", "small_cnn", "--methods", "aggregate", "dmg", "--image-size", "32"]
    argv += ["--images-per-domain", "21", "--batch-size", "8", "--eval-batch-size", "16", "--workers", "2"]
    argv += ["--epochs", "2", "--compute-batches", "2", "--device", "cpu"]
    main(argv)
    out = capsys.readouterr().out
    assert "32px, batch 8, 2 workers" in out
    for method in ["aggregate", "dmg"]:
        row = re.search(
            rf"^small_cnn\s+{method}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(-?[\d.]+)\s+([\d.]+)\s+(\d+)\s+n/a$", out, re.M
        )
        assert row, out
        end_to_end, compute, ratio, _, evaluation, starts = map(float, row.groups())
        assert end_to_end > 0 and compute > 0 and evaluation > 0
        # the printed numbers are rounded (img/s to 0.1, the ratio to 0.01): the ratio must lie within what they allow
        lowest, highest = (end_to_end - 0.05) / (compute + 0.05), (end_to_end + 0.05) / max(compute - 0.05, 1e-9)
        assert lowest - 0.005 <= ratio <= highest + 0.005, (ratio, end_to_end, compute)
        assert starts == 0  # the workers of the first epoch serve every later one
