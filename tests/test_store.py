"""The storage layer: label cache, document guard, indexes, GridFS artifacts.

Every test that takes ``db`` runs on mongomock and, when ``ALFLOW_TEST_MONGODB_URI`` is set,
also on that MongoDB server (a fresh database per test, dropped afterwards).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import textwrap
import threading
import uuid

import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from bson import ObjectId

mongomock = pytest.importorskip("mongomock")
pymongo = pytest.importorskip("pymongo")

from alflow.model import DeltaPotential, TrainingSettings  # noqa: E402
from alflow.store import DocumentRejected, Store, settings_hash, structure_hash  # noqa: E402
from alflow.store.store import BUCKET, INDEXES  # noqa: E402
from alflow.systems import c_cu100  # noqa: E402

URI_VAR = "ALFLOW_TEST_MONGODB_URI"
ORACLE = {"kind": "emt"}
OH = settings_hash(ORACLE)
PROV = {"campaign": "c1", "iteration": 1, "role": "query"}


@pytest.fixture(scope="session", autouse=True)
def _mongomock_gridfs():
    # FireWorks' mongomock mode calls this too (fireworks.fw_config, with GRIDFS_FALLBACK_COLLECTION set)
    import mongomock.gridfs

    mongomock.gridfs.enable_gridfs_integration()


@pytest.fixture(params=["mongomock", "mongodb"])
def db(request):
    name = f"alflow_test_{uuid.uuid4().hex[:12]}"
    if request.param == "mongomock":
        client = mongomock.MongoClient()
    else:
        uri = os.environ.get(URI_VAR)
        if not uri:
            pytest.skip(f"real MongoDB: set {URI_VAR} (e.g. mongodb://localhost:27017) to run on a server")
        client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000)
    try:
        yield client[name]
    finally:
        client.drop_database(name)
        client.close()


@pytest.fixture
def store(db) -> Store:
    return Store(db)


def structure(seed: int = 0):
    atoms = c_cu100()
    atoms.rattle(0.05, seed=seed)
    return atoms


def emt_result(atoms) -> dict:
    a = atoms.copy()
    a.calc = EMT()
    return {
        "status": "ok",
        "energy": a.get_potential_energy(),
        "forces": a.get_forces(apply_constraint=False),
        "seconds": 0.01,
    }


FAILED = {"status": "failed", "reason": "SCF did not converge", "failure_class": "scf_convergence", "seconds": 3.0}


def index_specs(db, collection) -> dict:
    return {tuple(tuple(k) for k in v["key"]): bool(v.get("unique")) for v in db[collection].index_information().values()}


def assert_indexes(db):
    for collection, specs in INDEXES.items():
        have = index_specs(db, collection)
        for keys, options in specs:
            key = tuple((k, d) for k, d in keys)
            assert key in have, f"{collection}: index {keys} missing"
            assert have[key] == options.get("unique", False), f"{collection}: index {keys} uniqueness"


# ------------------------------------------------------------------------------------------
# label cache
def test_second_put_label_returns_existing(store, db):
    atoms = structure()
    first, inserted = store.put_label(atoms, OH, ORACLE, emt_result(atoms), PROV)
    assert inserted and first["status"] == "ok"
    result = emt_result(atoms)
    result["energy"] += 1.0  # a second writer with a different number must not win
    second, inserted2 = store.put_label(atoms, OH, ORACLE, result, {**PROV, "iteration": 2})
    assert not inserted2
    assert second["_id"] == first["_id"] and second["energy"] == pytest.approx(first["energy"])
    assert db.labels.count_documents({}) == 1
    assert db.configurations.count_documents({}) == 1


def test_labels_are_unique_under_concurrent_writers(store, db):
    atoms = structure()
    result = emt_result(atoms)
    outcomes = []
    barrier = threading.Barrier(8)

    def write():
        barrier.wait()
        outcomes.append(Store(db).put_label(atoms, OH, ORACLE, result, PROV)[1])

    threads = [threading.Thread(target=write) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == [False] * 7 + [True]
    assert db.labels.count_documents({}) == 1


def test_failed_label_is_replaced_by_ok(store, db):
    atoms = structure()
    failed, inserted = store.put_label(atoms, OH, ORACLE, FAILED, PROV)
    assert inserted and failed["status"] == "failed" and "energy" not in failed
    again, inserted = store.put_label(atoms, OH, ORACLE, {**FAILED, "reason": "again"}, PROV)
    # a second attempt's failure replaces the first, which is kept: the attempts are counted
    assert inserted and again["reason"] == "again" and again["_id"] == failed["_id"]
    assert [h["reason"] for h in again["history"]] == ["SCF did not converge"]
    ok, inserted = store.put_label(atoms, OH, ORACLE, emt_result(atoms), {**PROV, "iteration": 2})
    assert inserted and ok["status"] == "ok" and ok["_id"] == failed["_id"]
    stored = store.label(structure_hash(atoms), OH)
    assert stored["status"] == "ok" and stored["iteration"] == 2 and "reason" not in stored
    assert [h["reason"] for h in stored["history"]] == ["SCF did not converge", "again"]
    again, inserted = store.put_label(atoms, OH, ORACLE, FAILED, PROV)
    assert not inserted and again["status"] == "ok"  # an ok label is never replaced
    assert db.labels.count_documents({}) == 1


def test_ok_label_is_never_replaced(store, db):
    atoms = structure()
    ok, _ = store.put_label(atoms, OH, ORACLE, emt_result(atoms), PROV)
    for result in (FAILED, {"status": "rejected", "reason": "forces too large"}, {**emt_result(atoms), "energy": 99.0}):
        doc, inserted = store.put_label(atoms, OH, ORACLE, result, PROV)
        assert not inserted and doc["status"] == "ok" and doc["energy"] == pytest.approx(ok["energy"])
    assert store.label(structure_hash(atoms), OH)["energy"] == pytest.approx(ok["energy"])
    assert db.labels.count_documents({}) == 1


def test_float_noise_hits_the_same_label(store, db):
    atoms = structure()
    store.put_label(atoms, OH, ORACLE, emt_result(atoms), PROV)
    noisy = atoms.copy()
    noisy.positions += 1e-9
    assert structure_hash(noisy) == structure_hash(atoms)
    assert store.label(structure_hash(noisy), OH) is not None
    _, inserted = store.put_label(noisy, OH, ORACLE, emt_result(noisy), PROV)
    assert not inserted and db.labels.count_documents({}) == 1


def test_other_oracle_settings_or_structure_are_other_labels(store, db):
    atoms = structure()
    other_oracle = {"kind": "emt", "asap_cutoff": True}
    store.put_label(atoms, OH, ORACLE, emt_result(atoms), PROV)
    _, inserted = store.put_label(atoms, settings_hash(other_oracle), other_oracle, emt_result(atoms), PROV)
    assert inserted
    moved = structure(seed=1)
    _, inserted = store.put_label(moved, OH, ORACLE, emt_result(moved), PROV)
    assert inserted
    assert db.labels.count_documents({}) == 3
    assert db.configurations.count_documents({}) == 2
    assert len(store.labels(campaign="c1", status="ok")) == 3
    assert store.labels(campaign="other") == []


def test_label_atoms_restores_energy_forces_stress_and_constraints(store):
    atoms = structure()
    assert atoms.constraints  # bottom layer fixed
    result = {**emt_result(atoms), "stress": np.arange(6.0) * 1e-3}
    doc, _ = store.put_label(atoms, OH, ORACLE, result, PROV)
    back = store.label_atoms(doc)
    assert back.get_potential_energy() == pytest.approx(result["energy"], abs=0)
    np.testing.assert_array_equal(back.get_forces(apply_constraint=False), result["forces"])
    np.testing.assert_array_equal(back.get_stress(), result["stress"])
    np.testing.assert_array_equal(back.positions, atoms.positions)
    np.testing.assert_array_equal(back.cell.array, atoms.cell.array)
    assert list(back.pbc) == list(atoms.pbc) and list(back.numbers) == list(atoms.numbers)
    assert isinstance(back.constraints[0], FixAtoms)
    assert sorted(back.constraints[0].index.tolist()) == sorted(atoms.constraints[0].index.tolist())
    failed, _ = store.put_label(structure(3), OH, ORACLE, FAILED, PROV)
    with pytest.raises(ValueError, match="failed"):
        store.label_atoms(failed)


def test_bad_label_results_are_refused_before_writing(store, db):
    atoms = structure()
    with pytest.raises(ValueError, match="status"):
        store.put_label(atoms, OH, ORACLE, {"status": "done"}, PROV)
    with pytest.raises(ValueError, match="shape"):
        store.put_label(atoms, OH, ORACLE, {"status": "ok", "energy": 1.0, "forces": np.zeros((2, 3))}, PROV)
    with pytest.raises(ValueError, match="energy"):
        store.put_label(atoms, OH, ORACLE, {"status": "ok", "forces": np.zeros((len(atoms), 3))}, PROV)
    assert db.labels.count_documents({}) == 0 and db.configurations.count_documents({}) == 0


# ------------------------------------------------------------------------------------------
# document forms
def test_documents_are_plain_for_dashboards(store, db):
    atoms = structure()
    store.put_label(atoms, OH, ORACLE, emt_result(atoms), PROV)
    conf = db.configurations.find_one()
    assert conf["formula"] == atoms.get_chemical_formula() and conf["natoms"] == len(atoms)
    assert all(type(z) is int for z in conf["numbers"])
    assert all(type(x) is float for row in conf["positions"] + conf["cell"] for x in row)
    assert conf["pbc"] == [True, True, False]
    assert conf["fixed"] == [0, 1, 2, 3]
    assert isinstance(conf["created_on"], datetime.datetime)
    label = db.labels.find_one()
    assert type(label["energy"]) is float
    assert len(label["forces"]) == len(atoms) and all(type(x) is float for row in label["forces"] for x in row)
    assert (label["campaign"], label["iteration"], label["oracle"]) == ("c1", 1, ORACLE)
    assert isinstance(label["created_on"], datetime.datetime)


def test_configuration_keeps_first_provenance_and_collects_seen(store, db):
    atoms = structure()
    h = store.add_configuration(atoms, {"campaign": "a", "iteration": 0, "role": "initial", "note": "first"})
    assert h == structure_hash(atoms)
    store.add_configuration(atoms, {"campaign": "b", "iteration": 3, "role": "query"})
    store.add_configuration(atoms, {"campaign": "b", "iteration": 3, "role": "query"})
    doc = db.configurations.find_one({"hash": h})
    assert doc["provenance"]["note"] == "first"
    assert doc["seen"] == [
        {"campaign": "a", "iteration": 0, "role": "initial"},
        {"campaign": "b", "iteration": 3, "role": "query"},
    ]
    assert db.configurations.count_documents({}) == 1
    with pytest.raises(KeyError):
        store.configuration("0" * 64)


# ------------------------------------------------------------------------------------------
# what a MongoDB server refuses (and mongomock would accept)
def test_document_over_16_mb_is_refused_before_writing(store, db):
    atoms = structure()
    blob = "x" * (17 * 1024 * 1024)
    with pytest.raises(DocumentRejected, match=r"configurations: .*'provenance\.blob'.*MiB"):
        store.put_label(atoms, OH, ORACLE, emt_result(atoms), {**PROV, "blob": blob})
    with pytest.raises(DocumentRejected, match=r"labels: .*'extra\.blob'"):
        store.put_label(atoms, OH, ORACLE, {**emt_result(atoms), "blob": blob}, PROV)
    with pytest.raises(DocumentRejected, match=r"campaigns: .*'spec\.blob'"):
        store.create_campaign("big", {"blob": blob})
    assert db.labels.count_documents({}) == 0
    assert db.configurations.count_documents({}) == 0
    assert db.campaigns.count_documents({}) == 0

    store.create_campaign("c1", {})
    with pytest.raises(DocumentRejected, match=r"campaigns: .*'notes'"):
        store.update_campaign("c1", notes=blob)
    assert "notes" not in store.campaign("c1")
    with pytest.raises(DocumentRejected, match=r"iterations: .*'metrics\.log'"):
        store.record_iteration("c1", 1, {"log": blob})
    assert db.iterations.count_documents({}) == 0
    # under the limit is fine (a server takes it too)
    store.update_campaign("c1", notes="x" * (15 * 1024 * 1024))
    assert len(store.campaign("c1")["notes"]) == 15 * 1024 * 1024


@pytest.mark.parametrize(
    "provenance, path",
    [
        ({"a.b": 1}, "provenance.a.b"),
        ({"$set": 1}, "provenance.$set"),
        ({"nested": {"x.y": 1}}, "provenance.nested.x.y"),
        ({"items": [{"ok": 1}, {"$bad": 2}]}, "provenance.items.1.$bad"),
        ({1: "int key"}, "provenance.1"),
    ],
)
def test_bad_keys_are_refused_before_writing(store, db, provenance, path):
    atoms = structure()
    with pytest.raises(DocumentRejected, match=rf"configurations: .*'{path.replace('$', chr(92) + '$')}'"):
        store.put_label(atoms, OH, ORACLE, emt_result(atoms), {**PROV, **provenance})
    with pytest.raises(DocumentRejected, match="labels"):
        store.put_label(atoms, OH, {**ORACLE, **provenance}, emt_result(atoms), PROV)
    assert db.labels.count_documents({}) == 0 and db.configurations.count_documents({}) == 0


def test_bad_names_in_campaigns_iterations_files_are_refused(store, db):
    with pytest.raises(DocumentRejected, match=r"campaigns: .*'spec\.oracle\.pseudo\.Cu\.UPF'"):
        store.create_campaign("c", {"oracle": {"pseudo": {"Cu.UPF": 1}}})
    store.create_campaign("c", {})
    with pytest.raises(DocumentRejected, match="campaigns"):
        store.update_campaign("c", **{"$status": "x"})
    with pytest.raises(DocumentRejected, match="iterations"):
        store.record_iteration("c", 0, {"mae.energy": 1.0})
    with pytest.raises(DocumentRejected, match=f"{BUCKET}.files"):
        store.put_file(b"data", "f.txt", **{"a.b": 1})
    assert db.iterations.count_documents({}) == 0
    assert db[f"{BUCKET}.files"].count_documents({}) == 0


# ------------------------------------------------------------------------------------------
# indexes
def test_indexes_exist_on_a_fresh_database_and_after_reopening(db):
    Store(db)
    assert_indexes(db)
    for collection in INDEXES:  # what mongomock-persistence does on reload: documents, no indexes
        db[collection].drop_indexes()
    assert ("structure_hash", 1) not in {k[0] for k in index_specs(db, "labels")}
    Store(db)
    Store(db)  # opening twice is harmless
    assert_indexes(db)


def test_embedded_store_file_round_trip_recreates_indexes(tmp_path):
    """FireWorks' embedded mode: a mongomock-persistence file written, then reopened by a new process."""
    pytest.importorskip("mongomock_persistence")
    script = textwrap.dedent(
        """
        import json, sys
        import mongomock, mongomock.gridfs, mongomock_persistence
        from mongomock_persistence import ServerStore
        from alflow.store import Store, settings_hash
        from alflow.store.store import INDEXES
        from alflow.systems import c_cu100

        mongomock.gridfs.enable_gridfs_integration()
        path, phase = sys.argv[1], sys.argv[2]
        server = ServerStore(path)
        db = mongomock.MongoClient(_store=server)["fireworks"]
        atoms = c_cu100()
        oh = settings_hash({"kind": "emt"})
        out = {}
        if phase == "write":
            store = Store(db)
            store.put_label(atoms, oh, {"kind": "emt"}, {"status": "failed", "reason": "r"}, {"campaign": "c"})
            out["file"] = str(store.put_file(b"weights", "w.bin", campaign="c"))
        else:
            out["indexes_before"] = sorted(db.labels.index_information())
            store = Store(db)
            out["indexes_after"] = sorted(db.labels.index_information())
            out["file"] = store.get_file(sys.argv[3]).decode()
            doc, inserted = store.put_label(
                atoms, oh, {"kind": "emt"}, {"status": "failed", "reason": "again"}, {"campaign": "c"})
            out["inserted"] = inserted
            out["history"] = len(doc.get("history", []))
            out["labels"] = db.labels.count_documents({})
            out["created_on"] = type(doc["created_on"]).__name__
        server._to_file()
        print(json.dumps(out))
        """
    )
    path = tmp_path / "store.json"
    path.write_text("{}")
    env = {k: v for k, v in os.environ.items() if k != "MONGOMOCK_SERVERSTORE_FILE"}

    def run(*args):
        proc = subprocess.run([sys.executable, "-c", script, str(path), *args], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    written = run("write")
    reopened = run("read", written["file"])
    assert reopened["indexes_before"] == ["_id_"]  # the persisted file holds no indexes
    assert "structure_hash_1_oracle_hash_1" in reopened["indexes_after"]
    assert reopened["file"] == "weights"
    # the unique index holds: the second attempt's failure replaces the first in place, kept in history
    assert reopened["inserted"] is True and reopened["history"] == 1 and reopened["labels"] == 1
    assert reopened["created_on"] == "datetime"


# ------------------------------------------------------------------------------------------
# campaigns and iterations
def test_campaign_lifecycle_and_counters(store):
    doc = store.create_campaign("c1", {"oracle": {"kind": "emt"}, "learner": {"stop": {"fmax": 0.03}}})
    assert doc["status"] == "created" and doc["iteration"] == 0
    assert doc["counters"] == {"oracle_calls": 0, "failed_labels": 0, "reused_labels": 0}
    with pytest.raises(ValueError, match="'c1' already exists"):
        store.create_campaign("c1", {})
    store.record_iteration("c1", 0, {"oracle_calls": 2, "failed": 1})
    store.record_iteration("c1", 1, {"oracle_calls": 3, "reused": 4, "failed": 0})
    counters = store.tally_rounds("c1")
    assert counters == {"oracle_calls": 5, "failed_labels": 1, "reused_labels": 4}
    store.record_iteration("c1", 1, {"oracle_calls": 3, "reused": 4, "failed": 0})  # round 1 merged again
    assert store.tally_rounds("c1") == counters == store.campaign("c1")["counters"]
    updated = store.update_campaign("c1", status="running", iteration=1)
    assert (updated["status"], updated["iteration"]) == ("running", 1)
    assert store.campaign("c1")["spec"]["learner"]["stop"]["fmax"] == 0.03
    with pytest.raises(ValueError, match="no campaign named 'nope'"):
        store.tally_rounds("nope")
    with pytest.raises(ValueError, match="no campaign named 'nope'"):
        store.update_campaign("nope", status="x")
    assert store.campaign("nope") is None


def test_record_iteration_upserts_and_merges(store, db):
    traj = store.put_file(b"frames", "t.extxyz", campaign="c1", iteration=1)
    store.record_iteration("c1", 1, {"oracle_calls": 3, "force_mae": 0.05})
    store.record_iteration("c1", 1, {"max_uncertainty": np.float64(0.2)}, trajectory=traj)
    store.record_iteration("c1", 0, {"oracle_calls": 1})
    store.record_iteration("c2", 0, {"oracle_calls": 7})
    its = store.iterations("c1")
    assert [i["iteration"] for i in its] == [0, 1]
    assert its[1]["metrics"] == {"oracle_calls": 3, "force_mae": 0.05, "max_uncertainty": 0.2}
    assert its[1]["files"]["trajectory"] == traj
    assert isinstance(its[1]["created_on"], datetime.datetime)
    assert db.iterations.count_documents({}) == 3


# ------------------------------------------------------------------------------------------
# GridFS artifacts
def test_files_round_trip(store, db):
    data = bytes(range(256)) * 5000  # > one 255 kB chunk
    fid = store.put_file(data, "blob.bin", campaign="c1", kind="test")
    assert isinstance(fid, ObjectId)
    assert store.get_file(fid) == data and store.get_file(str(fid)) == data
    assert db[f"{BUCKET}.files"].find_one({"_id": fid})["metadata"] == {"campaign": "c1", "kind": "test"}
    with pytest.raises(KeyError):
        store.get_file(ObjectId())


@pytest.fixture(scope="module")
def tiny_potential():
    from alflow.demo import rattled

    images = rattled(c_cu100(), 0.1, range(2))
    pot = DeltaPotential(["Cu", "C"], ensemble=2, training=TrainingSettings(epochs=5)).fit(images)
    return pot, images


def test_model_round_trip_reproduces_predictions(store, db, tiny_potential):
    pot, images = tiny_potential
    labels = [store.put_label(a, OH, ORACLE, {"status": "ok", "energy": a.get_potential_energy(),
                                              "forces": a.get_forces(apply_constraint=False)}, PROV)[0]
              for a in images]
    model_id = store.save_model(pot, "c1", 1, labels, {"force_mae": 0.1})
    doc = db.models.find_one({"_id": model_id})
    assert (doc["campaign"], doc["iteration"], doc["metrics"]) == ("c1", 1, {"force_mae": 0.1})
    assert doc["training_labels"] == [l["_id"] for l in labels] and doc["n_training_labels"] == 2
    assert doc["descriptor"]["cutoff"] == 6.0 and set(doc["morse"]["params"]) == {"Cu", "C"}
    assert db[f"{BUCKET}.files"].find_one({"_id": doc["weights"]})["metadata"]["kind"] == "model"
    assert [m["_id"] for m in store.model_documents("c1")] == [model_id]

    loaded = store.load_model(model_id)
    probe = structure(seed=7)
    (want,), (got,) = pot.predict(probe), loaded.predict(probe)
    assert float(got.energy) == pytest.approx(float(want.energy), abs=1e-10)
    np.testing.assert_allclose(got.forces.numpy(), want.forces.numpy(), atol=1e-10)
    assert float(got.uncertainty) == pytest.approx(float(want.uncertainty), abs=1e-10)
    with pytest.raises(KeyError):
        store.load_model(ObjectId())


def test_trajectory_round_trip_keeps_positions_energies_forces(store, db):
    frames = []
    for seed in range(3):
        atoms = structure(seed)
        r = emt_result(atoms)
        atoms.calc = SinglePointCalculator(atoms, energy=r["energy"], forces=r["forces"])
        # what the ensemble calculator adds: kept as info / per-atom columns
        atoms.calc.results.update(uncertainty=0.1 * seed, forces_std=np.full((len(atoms), 3), 0.01 * seed))
        frames.append(atoms)
    fid = store.save_trajectory(frames + [structure(9)], "c1", 2, "relax")
    assert frames[0].calc.results["uncertainty"] == 0.0  # the caller's frames are untouched
    meta = db[f"{BUCKET}.files"].find_one({"_id": fid})
    assert meta["filename"] == "c1/002/relax.extxyz" and meta["metadata"]["frames"] == 4
    back = store.load_trajectory(fid)
    assert len(back) == 4 and back[3].calc is None
    for seed, (a, b) in enumerate(zip(frames, back)):
        assert b.info["uncertainty"] == pytest.approx(0.1 * seed)
        np.testing.assert_allclose(b.arrays["forces_std"], 0.01 * seed)
        np.testing.assert_allclose(b.positions, a.positions, atol=1e-8)  # extxyz keeps 8 decimals
        assert b.get_potential_energy() == pytest.approx(a.get_potential_energy(), abs=1e-8)
        np.testing.assert_allclose(b.get_forces(apply_constraint=False), a.get_forces(apply_constraint=False), atol=1e-8)
        assert list(b.numbers) == list(a.numbers)
        assert sorted(b.constraints[0].index.tolist()) == [0, 1, 2, 3]


def test_md_merge_reads_whether_the_rounds_ml_md_ran_to_its_end(store):
    from alflow.campaign import simulation_complete

    store.record_iteration("c", 1, {"simulation_converged": False, "simulation_steps": 37})
    store.record_iteration("c", 2, {"simulation_converged": True})
    store.record_iteration("c", 3, {"energy_mae": 0.1})  # merged, no simulation metrics
    assert simulation_complete(store, "c", 1) is False and simulation_complete(store, "c", 2) is True
    assert simulation_complete(store, "c", 3) is None and simulation_complete(store, "c", 4) is None


def test_a_campaign_whose_start_cannot_be_stored_leaves_nothing_behind(store, tmp_path, monkeypatch):
    """`alflow submit` on a server: the campaign document is created, then given its starting
    structures; when the second write is refused (here: as a structure too large for one document
    would be), the first is undone, so the name can be submitted again once the input is fixed."""
    import yaml
    from ase.io import write

    from alflow import campaign as steps
    from alflow.spec import load_spec

    write(tmp_path / "start.traj", c_cu100())
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "name": "big", "system": {"structure": "start.traj"}, "simulation": {"kind": "relax"},
        "oracle": {"kind": "emt"}, "learner": {"stop": {"fmax": 0.05, "max_iterations": 2}}}))
    spec = load_spec(tmp_path / "spec.yaml")

    def refuse(name, **fields):
        raise DocumentRejected("campaigns: refused document: 17.0 MiB is over MongoDB's 16 MiB limit")

    monkeypatch.setattr(store, "update_campaign", refuse)
    with pytest.raises(DocumentRejected):
        steps.start(store, spec)
    assert store.campaign("big") is None
    monkeypatch.undo()
    assert steps.start(store, spec)["status"] == "running" and store.campaign("big")["elements"] == ["C", "Cu"]
