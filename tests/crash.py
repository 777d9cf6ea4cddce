"""``python tests/crash.py MODULE:ATTRIBUTE:N [overrides...]``: run ``launch.py`` and die by SIGKILL at a chosen point.

The N-th call of ``MODULE.ATTRIBUTE`` (e.g. ``dmg.engine.checkpoints:Checkpointer.save:2``) kills this process with
SIGKILL before the call runs: a real ``kill -9`` at an exact point of a run, for the fault-injection tests.
"""

import importlib
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def die_at(target: str) -> None:
    module_name, attribute, count = target.split(":")
    owner_path, _, name = attribute.rpartition(".")
    owner = importlib.import_module(module_name)
    for part in filter(None, owner_path.split(".")):
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = []

    def dying(*args, **kwargs):
        calls.append(None)
        if len(calls) == int(count):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, dying)


if __name__ == "__main__":
    die_at(sys.argv[1])
    sys.argv = ["launch.py", *sys.argv[2:]]
    import launch

    launch.main()
