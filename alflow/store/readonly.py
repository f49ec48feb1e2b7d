"""Open an alflow database for reading only: ``alflow status`` and ``alflow report``.

The embedded store (``DIR/store.json``, the runner's snapshot) is loaded into an in-memory
mongomock client that is never written back: not mongomock-persistence, which rewrites its file
when the process exits. A MongoDB server is reached through a FireWorks LaunchPad file. Either way
the answer is a pymongo-compatible ``Database`` holding FireWorks' collections and alflow's; wrap
it with ``Store(db, create_indexes=False)`` so that not even an index is created.
"""

from __future__ import annotations

from pathlib import Path

DATABASE = "alflow"  # the embedded runner's LaunchPad(name="alflow")


def snapshot_path(store_dir: str | Path) -> Path:
    """``DIR/store.json``, or OSError when ``store_dir`` holds no alflow store."""
    from alflow.runner import STORE_FILE

    path = Path(store_dir) / STORE_FILE
    if not path.is_file():
        raise OSError(f"{path}: no alflow store here")
    return path


def load_snapshot(path: str | Path):
    """The database in the snapshot file ``path``, as an in-memory mongomock ``Database``."""
    from bson import json_util
    from mongomock import MongoClient
    from mongomock.store import ServerStore

    try:
        data = json_util.loads(Path(path).read_text() or "{}")
        if not isinstance(data, dict) or not all(isinstance(c, dict) for c in data.values()):
            raise ValueError("not a mapping of databases")
    except ValueError as exc:  # json's errors are ValueErrors
        raise ValueError(f"{path}: not an alflow store snapshot ({exc})") from None
    # ServerStore without its __init__: once mongomock-persistence is imported (FireWorks does in
    # its mongomock mode) that __init__ opens $MONGOMOCK_SERVERSTORE_FILE and writes it at exit
    server = ServerStore.__new__(ServerStore)
    server._databases = {}
    for db_name, collections in data.items():
        for name, collection in collections.items():
            documents = server[db_name][name]._documents
            for key, document in collection.get("documents", []):
                documents[key] = document
    return MongoClient(_store=server)[DATABASE]


def open_launchpad(path: str | Path):
    """The database of the LaunchPad file ``path`` (a MongoDB server; ``${VARIABLE}``s from the environment)."""
    from alflow.fw.launchpad import launchpad_from_file

    return launchpad_from_file(path).db


def open_readonly(store_dir: str | Path | None = None, launchpad: str | Path | None = None):
    """The database to read: a LaunchPad file's server if ``launchpad`` is given, else the
    embedded store in ``store_dir``."""
    if launchpad is not None:
        return open_launchpad(launchpad)
    return load_snapshot(snapshot_path(store_dir if store_dir is not None else "alflow-store"))
