"""Storage of configurations, labels and model artifacts in the FireWorks MongoDB database.

``alflow.store.hashing`` (the label-cache keys) needs only numpy and ASE; :class:`Store` and
:class:`DocumentRejected` (which need pymongo) are imported on first use.
"""

from __future__ import annotations

__all__ = ["DocumentRejected", "Store", "check_document", "settings_hash", "structure_hash"]

from alflow.store.hashing import settings_hash, structure_hash


def __getattr__(name):
    if name == "Store":
        from alflow.store.store import Store

        return Store
    if name in ("DocumentRejected", "check_document"):
        from alflow.store import documents

        return getattr(documents, name)
    raise AttributeError(f"module 'alflow.store' has no attribute {name!r}")
