"""``python -m alflow.fw.worker``: run the firework of the current launch directory offline.

The embedded runner reserves a ``dft`` firework, writes ``FW.json`` and ``FW_offline.json`` into a
fresh launch directory and starts this module there, without the store in the environment: the
worker never opens a database. FireWorks' offline Rocket runs the firework and writes its
FWAction into ``FW_offline.json``; the runner then calls ``LaunchPad.recover_offline``.

On a cluster, ``qlaunch -r`` starts it from the queue (``rocket_launch: python -m alflow.fw.worker
singleshot --offline``) and ``lpad recover_offline`` brings the result back.

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


def _arguments(argv: list[str]):
    """``[singleshot] [--offline] [--fw_id N]``: what ``qlaunch -r`` needs in ``rocket_launch``
    (it reserves only for a singleshot launcher, writes FW.json only with --offline, and appends
    --fw_id); the worker always runs the one firework of its launch directory, offline."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m alflow.fw.worker")
    parser.add_argument("mode", nargs="?", choices=["singleshot"], help="accepted for rlaunch compatibility")
    parser.add_argument("--offline", action="store_true", help="accepted: the worker always runs offline")
    parser.add_argument("--fw_id", type=int, help="the reserved firework (checked against FW.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(sys.argv[1:] if argv is None else argv)
    Path(PID_FILE).write_text(str(os.getpid()))
    if os.environ.pop("MONGOMOCK_SERVERSTORE_FILE", None):  # never open (and rewrite at exit) the store
        print("alflow worker: ignoring MONGOMOCK_SERVERSTORE_FILE (workers run offline)", file=sys.stderr)
    if not Path("FW.json").is_file():
        print(f"alflow worker: no FW.json in {os.getcwd()}", file=sys.stderr)
        return 1
    if args.fw_id is not None:
        import json

        found = json.loads(Path("FW.json").read_text()).get("fw_id")
        if found != args.fw_id:
            print(f"alflow worker: FW.json holds firework {found}, not the reserved {args.fw_id}", file=sys.stderr)
            return 1
    import fireworks.core.rocket as rocket
    from fireworks import FWorker
    from fireworks.core.rocket_launcher import launch_rocket

    rocket.zopen = _text_mode_zopen(rocket.zopen)
    ran = launch_rocket(None, FWorker(name=f"alflow-worker-{os.getpid()}", category="dft"), strm_lvl="ERROR")
    return 0 if ran else 1


if __name__ == "__main__":
    sys.exit(main())
