"""``python -m dmg <command> [arguments]``: report, bench or prepare (each lives in ``dmg.commands``)."""

import importlib
import sys

COMMANDS = {
    "report": "results tables from an MLflow store",
    "bench": "speed of the methods, the data loader and whole training epochs",
    "prepare": "pack image folders into HDF5 files for fast loading",
}


def main(argv: list[str]) -> int:
    """Run the command named by ``argv[0]`` with the rest of the arguments; imports only that command."""
    if not argv or argv[0] not in COMMANDS:
        listing = "\n".join(f"  {name:<8} {summary}" for name, summary in COMMANDS.items())
        print(f"usage: python -m dmg <command> [arguments]\n\ncommands:\n{listing}", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    command = importlib.import_module(f"dmg.commands.{argv[0]}")
    return command.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
