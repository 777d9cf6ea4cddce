"""Dataset preparation commands.

python -m dmg prepare domainnet --root data/DomainNet                 # 90/10 split lists
python -m dmg prepare domainnet --root data/DomainNet --pack encoded  # ... and packed HDF5 files
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dmg.data.domainnet import prepare_splits
from dmg.data.packing import pack_list
from dmg.errors import UserError

DOMAINNET_DOMAINS = ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]


def domainnet(args: argparse.Namespace) -> None:
    """Split every domain's official train list 90/10 (deterministically), then optionally pack every split."""
    root = Path(args.root).expanduser()
    split_dir = Path(args.split_dir).expanduser() if args.split_dir else root / "dmg_split"
    counts = prepare_splits(root, split_dir, args.domains, args.val_fraction, args.seed)
    for domain, sizes in counts.items():
        print(f"{domain}: " + ", ".join(f"{name} {count}" for name, count in sizes.items()) + f" -> {split_dir}")
    if not args.pack:
        return
    packed_dir = Path(args.packed_dir).expanduser() if args.packed_dir else root / "packed"
    packed_dir.mkdir(parents=True, exist_ok=True)
    for domain in args.domains:
        for split in ("train", "val", "test"):
            result = pack_list(
                split_dir / f"{domain}_{split}.txt",
                root,
                packed_dir / f"{domain}_{split}.hdf5",
                args.pack,
                args.size,
                args.skip_bad_images,
            )
            note = f", skipped {len(result.skipped)} undecodable" if result.skipped else ""
            print(f"{result.path}: {result.stored} images{note}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dmg prepare", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    dn = commands.add_parser("domainnet", help="split DomainNet's official train lists 90/10 and optionally pack HDF5")
    dn.add_argument("--root", required=True, help="folder with {domain}/{class}/{file} and {domain}_{train,test}.txt")
    dn.add_argument("--domains", nargs="+", default=DOMAINNET_DOMAINS)
    dn.add_argument("--val-fraction", type=float, default=0.1, help="share of each class held out for validation")
    dn.add_argument("--seed", type=int, default=0, help="the split is a function of this seed and the image paths")
    dn.add_argument("--split-dir", help="where the lists go (default ROOT/dmg_split)")
    dn.add_argument(
        "--pack", choices=["encoded", "rgb"], help="also pack each split into HDF5: file bytes or uint8 pixels"
    )
    dn.add_argument("--packed-dir", help="where packed files go (default ROOT/packed)")
    dn.add_argument("--size", type=int, default=256, help="side of the stored images with --pack rgb")
    dn.add_argument(
        "--skip-bad-images", action="store_true", help="skip and count undecodable images instead of stopping"
    )
    dn.set_defaults(func=domainnet)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
