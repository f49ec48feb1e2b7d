"""The embedded store's pre-screened scans answer every query exactly as mongomock's plain scan."""

from __future__ import annotations

import math

import mongomock
import mongomock.gridfs
import pytest
from bson import ObjectId

from alflow.store import embedded

OID = ObjectId()
DOCS = [
    {"fw_id": 1, "state": "READY", "spec": {"x": 1}},
    {"fw_id": 2, "state": "COMPLETED", "tags": ["a", "b"]},
    {"fw_id": [3, 4], "state": "READY"},  # an array: equality means "contains"
    {"fw_id": 5.0, "state": None},  # 5 == 5.0 in MongoDB too
    {"fw_id": True, "state": "READY"},  # a bool never equals the integer 1 in MongoDB
    {"state": "READY", "name": "no fw_id"},
    {"fw_id": 7, "state": {"nested": "READY"}, "ref": OID},
    {"fw_id": math.nan, "state": "WAITING"},
]
QUERIES = [
    {"fw_id": 1}, {"fw_id": 3}, {"fw_id": 5}, {"fw_id": 1.0}, {"fw_id": True}, {"fw_id": 99},
    {"state": "READY"}, {"state": "READY", "fw_id": 1}, {"state": None}, {"fw_id": None},
    {"tags": "a"}, {"ref": OID}, {"ref": ObjectId()}, {"fw_id": math.nan}, {"spec.x": 1},
    {"state": {"$in": ["READY", "COMPLETED"]}}, {"fw_id": {"$in": [1, 3, 5]}}, {"fw_id": {"$in": [None]}},
    {"fw_id": {"$in": [1, True]}}, {"fw_id": {"$eq": 7}}, {"fw_id": {"$eq": 7, "$gt": 1}}, {"$or": [{"fw_id": 1}, {"fw_id": 2}]}, {},
    {"fw_id": {"$gt": 1}, "state": "READY"},
]


def answers(collection) -> list[list]:
    return [sorted(str(d["_id"]) for d in collection.find(q)) for q in QUERIES]


@pytest.fixture
def plain_and_screened(monkeypatch):
    monkeypatch.setattr(mongomock.collection.Collection, "_iter_documents",
                        mongomock.collection.Collection._iter_documents)  # restored after the test
    monkeypatch.delattr(mongomock.collection.Collection, "_alflow_prescreen", raising=False)
    collection = mongomock.MongoClient().db.fireworks
    collection.insert_many([dict(d) for d in DOCS])
    plain = answers(collection)
    embedded.embedded_queries()
    assert mongomock.collection.Collection._alflow_prescreen
    return plain, answers(collection), collection


def test_prescreen_changes_no_answer(plain_and_screened):
    plain, screened, collection = plain_and_screened
    assert screened == plain
    assert all(plain[:5]) and not plain[5]  # the edge cases did match something
    # writes through find_one_and_update (FireWorks' checkout) see the same documents
    doc = collection.find_one_and_update({"state": "READY", "fw_id": 1}, {"$set": {"state": "RUNNING"}})
    assert doc["fw_id"] == 1 and collection.count_documents({"state": "RUNNING"}) == 1


def test_prescreen_skips_the_full_filter_for_ruled_out_documents(plain_and_screened, monkeypatch):
    _, _, collection = plain_and_screened
    calls = []
    full = mongomock.collection.filter_applies
    monkeypatch.setattr(mongomock.collection, "filter_applies", lambda f, d: calls.append(d) or full(f, d))
    assert len(list(collection.find({"fw_id": 1}))) == 2
    # left for the full filter: the match, the array and the bool; the rest are ruled out
    assert sorted(map(str, (d["fw_id"] for d in calls))) == ["1", "True", "[3, 4]"]


def test_snapshot_writes_what_mongomock_persistence_reads(tmp_path):
    import datetime

    import gridfs
    from bson import json_util

    import mongomock_persistence  # what FireWorks' mongomock mode uses; to_dict() is its addition

    mongomock.gridfs.enable_gridfs_integration()
    client = mongomock_persistence.MongoClient()
    db = client.alflow
    db.things.insert_one({"when": datetime.datetime(2026, 1, 2, 3, 4, 5, 678000), "blob": b"\x00\xff",
                          "ref": ObjectId(), "nested": [{"x": 1.5, "y": [None, True, "s"]}], "big": 2**40})
    gridfs.GridFS(db).put(b"weights" * 1000, filename="model.zip")

    class LaunchPadLike:
        connection = client

    path = tmp_path / "store.json"
    embedded.snapshot(LaunchPadLike, path)
    assert json_util.loads(path.read_text()) == json_util.loads(json_util.dumps(client._store.to_dict()))
