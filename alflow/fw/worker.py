"""``python -m alflow.fw.worker``: run the firework of the current launch directory offline.

The embedded runner reserves a ``dft`` firework, writes ``FW.json`` and ``FW_offline.json`` into a
fresh launch directory and starts this module there, without the store in the environment: the
worker never opens a database. FireWorks' offline Rocket runs the firework and writes its
FWAction into ``FW_offline.json``; the runner then calls ``LaunchPad.recover_offline``.

FireWorks' offline code paths call ``monty.io.zopen(path)`` without a mode, which the current
monty refuses ("Implicit text/binary mode is not allowed"); the worker gives those calls text mode.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PID_FILE = "worker.pid"


def _text_mode_zopen(zopen):
    def zopen_text(filename, mode="rt", **kwargs):
        return zopen(filename, mode, **kwargs)

    return zopen_text


def main() -> int:
    Path(PID_FILE).write_text(str(os.getpid()))
    if os.environ.pop("MONGOMOCK_SERVERSTORE_FILE", None):  # never open (and rewrite at exit) the store
        print("alflow worker: ignoring MONGOMOCK_SERVERSTORE_FILE (workers run offline)", file=sys.stderr)
    if not Path("FW.json").is_file():
        print(f"alflow worker: no FW.json in {os.getcwd()}", file=sys.stderr)
        return 1
    import fireworks.core.rocket as rocket
    from fireworks import FWorker
    from fireworks.core.rocket_launcher import launch_rocket

    rocket.zopen = _text_mode_zopen(rocket.zopen)
    ran = launch_rocket(None, FWorker(name=f"alflow-worker-{os.getpid()}", category="dft"), strm_lvl="ERROR")
    return 0 if ran else 1


if __name__ == "__main__":
    sys.exit(main())
