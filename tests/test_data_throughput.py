"""The loader benchmark measures a real training loader of generated PACS-shaped files."""

import argparse

from dmg.data import throughput


def test_loader_throughput_on_generated_pacs(tmp_path):
    throughput.write_synthetic_pacs(tmp_path, per_domain=12)
    loader = throughput.train_loader("pacs", str(tmp_path), 0, 4, ["dataset.image_size=32"])
    x, y, d = next(iter(loader))
    assert x.shape == (4, 3, 32, 32) and set(d.tolist()) <= {0, 1, 2} and int(y.max()) < 7
    assert throughput.images_per_second(loader, batches=3, warmup=1) > 0


def test_cli_registers_as_a_sub_command():
    commands = argparse.ArgumentParser().add_subparsers()
    throughput.add_parser(commands)
    args = commands.choices["loader"].parse_args(["--workers", "0", "8", "--batches", "5"])
    assert args.workers == [0, 8] and args.func is throughput.run and args.dataset == "pacs"
