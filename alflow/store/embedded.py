"""The embedded store: FireWorks' mongomock mode, written to one JSON file by its owner process.

FireWorks reads ``MONGOMOCK_SERVERSTORE_FILE`` when it is first imported, so :func:`use_store`
must run before anything imports ``fireworks``. The store is written by :func:`snapshot` only:
serialised, written to a temporary file, fsynced and renamed, so a crash never leaves a truncated
store (mongomock-persistence's own write at exit is switched off by :func:`no_write_at_exit`).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

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
    write_atomically(path, json.dumps(launchpad.connection._store.to_dict(), default=json_util.default))


def write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path``: temp file, fsync, rename, fsync the directory; a crash leaves the old
    file or the new one, never a torn one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
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


def no_write_at_exit(launchpad) -> None:
    """Switch off mongomock-persistence's rewrite of the store file when the process exits: it is
    not atomic (a kill during exit left a 0-byte store) and the owner has snapshotted already."""
    finalizer = getattr(getattr(launchpad.connection, "_store", None), "_finalizer", None)
    if finalizer is not None:
        finalizer.detach()
