"""Embedded runner: a campaign on FireWorks' mongomock store, driven by one owner process.

FireWorks reads ``MONGOMOCK_SERVERSTORE_FILE`` when it is first imported, so :func:`use_store`
must run before anything imports ``fireworks`` (the CLI calls it first). The runner launches the
campaign's fireworks one after another in the process that owns the store, each in its own
launch directory, and snapshots the store after every firework: serialised, written to a
temporary file, fsynced and renamed, so a crash never leaves a truncated store.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable

from bson import ObjectId

STORE_FILE = "store.json"


def use_store(store_dir: str | Path) -> Path:
    """Point FireWorks' mongomock mode at ``store_dir`` (created if needed); call before importing fireworks."""
    store_dir = Path(store_dir).resolve()
    store_dir.mkdir(parents=True, exist_ok=True)
    path = store_dir / STORE_FILE
    if not path.exists():
        path.write_text("{}")
    if "fireworks" in sys.modules and os.environ.get("MONGOMOCK_SERVERSTORE_FILE") != str(path):
        raise RuntimeError("the embedded store must be selected before FireWorks is imported")
    os.environ["MONGOMOCK_SERVERSTORE_FILE"] = str(path)
    return path


def snapshot(launchpad, path: Path) -> None:
    """Write the whole mongomock store atomically (temp file, fsync, rename, fsync the directory)."""
    from bson import json_util

    # what mongomock's own persistence writes (json_util's format), with the C JSON encoder doing
    # the walk: json_util.dumps converts the whole tree in Python first, ~5x slower (measured)
    text = json.dumps(launchpad.connection._store.to_dict(), default=json_util.default)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".store-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


_SCALARS = (str, int, float, ObjectId)
_MISSING = object()


def _scalar(v) -> bool:
    return type(v) in _SCALARS and v == v  # not bool (Python has True == 1), not NaN (NaN != NaN)


def _may_match(filter_: dict):
    """A cheap necessary condition for ``filter_``: its top-level ``{key: scalar}``,
    ``{key: {"$eq": scalar}}`` and ``{key: {"$in": [scalars]}}`` conditions, or None if it has none.

    A document is rejected only when the field is missing or holds a scalar outside the allowed
    values; a list or sub-document (where MongoDB equality means "contains" or a deeper match) is
    left to the full filter. Python ``==`` on str/int/float/ObjectId agrees with MongoDB's equality.
    """
    allowed = []
    for key, cond in filter_.items():
        if key.startswith("$") or "." in key:
            continue
        if isinstance(cond, dict) and len(cond) == 1:
            (op, value), = cond.items()
            values = [value] if op == "$eq" else value if op == "$in" and isinstance(value, list) else None
        else:
            values = [cond]
        if values is not None and all(_scalar(v) for v in values):
            allowed.append((key, values))
    if not allowed:
        return None

    def may(document) -> bool:
        for key, values in allowed:
            have = document.get(key, _MISSING)
            if have is _MISSING or (type(have) in _SCALARS and have not in values):
                return False
        return True

    return may


def embedded_queries() -> None:
    """Speed up mongomock's scans for the queries FireWorks makes by id and state.

    mongomock answers every query by running its full filter on every document; at 1,000 fireworks
    that is most of an AL round's bookkeeping (measured with cProfile: its ``filter_applies`` under
    FireWorks' ``checkout_fw``, ``_refresh_wf``, ``complete_launch``). The documents that a query's
    top-level equalities (``{"fw_id": 12}``, ``{"state": "READY", …}``, ``{"launch_id": {"$in":
    […]}}``) rule out are skipped before the full filter, which still decides every match, so the
    answers are unchanged (tested against the plain scan). A MongoDB server uses its indexes instead.
    """
    from mongomock import collection

    if getattr(collection.Collection, "_alflow_prescreen", False):
        return
    plain = collection.Collection._iter_documents

    def _iter_documents(self, filter):
        may = _may_match(filter) if isinstance(filter, dict) else None
        store = self._store
        documents = getattr(store, "_documents", None)  # mongomock 4's storage; else its own scan
        if may is None or documents is None or store.is_empty or getattr(store, "_ttl_indexes", True):
            return plain(self, filter)
        # what store.documents yields, without its generator and reader lock (the embedded runner
        # is one thread: see embedded_rockets)
        return (d for d in list(documents.values()) if may(d) and collection.filter_applies(filter, d))

    collection.Collection._iter_documents = _iter_documents
    collection.Collection._alflow_prescreen = True


def embedded_rockets(rocket_module) -> None:
    """No ping thread for rockets launched here: its last ping writes to the launch while the rocket
    completes it, and mongomock is not thread-safe (measured: "OrderedDict mutated during
    iteration"). Pings detect lost remote workers; the embedded runner is one process."""
    rocket_module.start_ping_launch = lambda launchpad, launch_id: None


def run(spec, store_dir: str | Path, progress: Callable[[str], None] = print) -> Path:
    """Run the campaign of ``spec`` to completion on the embedded store; returns summary.json's path."""
    path = use_store(store_dir)
    import fireworks.core.rocket
    from fireworks import FWorker, LaunchPad
    from fireworks.core.rocket_launcher import launch_rocket

    # FireWorks' FW_config setting, read by each Rocket: errors only; progress is ours (below)
    fireworks.core.rocket.ROCKET_STREAM_LOGLEVEL = "ERROR"
    embedded_rockets(fireworks.core.rocket)
    embedded_queries()

    from alflow.campaign import start
    from alflow.fw.workflow import campaign_workflow
    from alflow.store import Store

    launchpad = LaunchPad(name="alflow", strm_lvl="ERROR")
    if launchpad.fw_id_assigner.count_documents({}) == 0:  # a new store: initialise FireWorks' counters
        launchpad.reset("", require_password=False, max_reset_wo_password=0)
    store = Store(launchpad.db)
    if store.campaign(spec.name) is not None:
        raise ValueError(f"campaign '{spec.name}' already exists in {path.parent} (use another name or store)")
    start(store, spec)
    launchpad.add_wf(campaign_workflow(spec.name))
    snapshot(launchpad, path)
    launches = path.parent / "launches"
    launches.mkdir(exist_ok=True)
    worker = FWorker(name="alflow-embedded")
    here = os.getcwd()
    try:
        while True:  # until no firework is ready (launch_rocket's answer spares a run_exists query)
            launch_dir = tempfile.mkdtemp(dir=launches, prefix="launch_")
            os.chdir(launch_dir)
            ran = launch_rocket(launchpad, worker, strm_lvl="ERROR")
            os.chdir(here)
            if not ran:
                with contextlib.suppress(OSError):  # nothing ran there: drop the empty folder
                    Path(launch_dir).rmdir()
                break
            snapshot(launchpad, path)
            progress(_progress_line(launchpad, store, spec.name, launch_dir))
    finally:
        os.chdir(here)
        snapshot(launchpad, path)
    campaign = store.campaign(spec.name)
    if campaign.get("summary") is None:
        raise RuntimeError(f"campaign '{spec.name}' stopped without a result: {_failure(launchpad, spec.name)}")
    return Path(campaign["spec"]["results"]) / "summary.json"


def _failure(launchpad, name: str) -> str:
    """One line on the campaign's first firework that fizzled: its name and the exception's last line."""
    mine = {"name": {"$regex": f"^{re.escape(name)}: "}}
    fw = launchpad.fireworks.find_one({**mine, "state": "FIZZLED"}, sort=[("updated_on", 1)])
    if fw is None:
        waiting = launchpad.fireworks.count_documents({**mine, "state": "WAITING"})
        return f"{waiting} fireworks are still waiting and none can run"
    launch = launchpad.launches.find_one({"fw_id": fw["fw_id"], "state": "FIZZLED"}, sort=[("time_end", -1)]) or {}
    trace = ((launch.get("action") or {}).get("stored_data") or {}).get("_exception", {}).get("_stacktrace", "")
    last = next((line.strip() for line in reversed(trace.splitlines()) if line.strip()), "no traceback recorded")
    return f"firework '{fw['name']}' failed: {last}"


def _progress_line(launchpad, store, name: str, launch_dir: str) -> str:
    """The firework that just ran in ``launch_dir`` and the campaign's counters (queries by key only)."""
    launch = launchpad.launches.find_one({"launch_dir": launch_dir}, {"fw_id": 1})
    last = launchpad.fireworks.find_one({"fw_id": launch["fw_id"]}, {"name": 1, "state": 1}) if launch else None
    c = store.campaign(name)
    counters = c["counters"]
    what = f"{last['name']} {last['state'].lower()}" if last else "started"
    return (
        f"{what:<40} oracle calls {counters['oracle_calls']:>4}  reused {counters['reused_labels']:>3}"
        f"  failed {counters['failed_labels']:>3}"
    )
