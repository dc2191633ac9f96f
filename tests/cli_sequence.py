"""Run several ``retroact`` commands in one process: ``cli_sequence.py "il --data D ..." "rl ..."``.

For the launched tests: one ``accelerate launch`` of this script pays the start-up of the launcher
and both ranks (most of a small launch's time) once for all its commands. Each command goes
through the CLI as from a shell; the first that fails ends the sequence with its exit code.
"""

from __future__ import annotations

import shlex
import sys

from retroact.cli import app

if __name__ == "__main__":
    for command in sys.argv[1:]:
        code = app(shlex.split(command), standalone_mode=False)
        if code:
            sys.exit(code)
