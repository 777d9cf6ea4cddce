"""Prints, as JSON, how the sweeper identifies this process (dmg.sweeps.trials.this_process), then exits: a record of
a process that is dead once this one has ended."""

import json

from dmg.sweeps.trials import this_process

print(json.dumps(this_process()))
