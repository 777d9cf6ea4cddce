"""The speed benchmark builds every method from the configs and reports throughput and DMG's ratios."""

import re

from dmg.bench import main


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
