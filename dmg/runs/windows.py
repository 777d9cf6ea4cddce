"""Named race windows: the places where two processes sharing a study or a store could interleave badly.

Code calls :func:`window` at each such place. Normally it does nothing. A test that sets ``DMG_RACE_WINDOW`` to
windows' names (``count,ask:5``; and ``DMG_RACE_DIR`` to a folder) makes every process that reaches one of them
wait there until ``DMG_RACE_PARTIES`` processes have arrived (default 2), the file ``go`` appears in the folder, or
the seconds after the name pass (default 300, a hang): so two workers go through the window at the same instant,
deterministically, instead of by the luck of start-up jitter. A fixed window admits one process at a time: there,
a short wait lets the second arrive if it can. Each arrival is a file ``<window>.<pid>`` there,
which a test can wait for (to kill a process inside the window, say).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

POLL_SECONDS = 0.02


def window(name: str) -> None:
    """Pause here if a test forces the race window ``name`` (see the module's docstring)."""
    forced = dict(f"{entry}:300".split(":")[:2] for entry in os.environ.get("DMG_RACE_WINDOW", "").split(",") if entry)
    if name not in forced:
        return
    folder = Path(os.environ["DMG_RACE_DIR"])
    (folder / f"{name}.{os.getpid()}.{threading.get_ident()}").touch()
    parties = int(os.environ.get("DMG_RACE_PARTIES", "2"))
    deadline = time.monotonic() + float(forced[name])
    while len(list(folder.glob(f"{name}.*"))) < parties and not (folder / "go").exists():
        if time.monotonic() > deadline:
            return
        time.sleep(POLL_SECONDS)
