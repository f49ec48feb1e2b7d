"""alflow's collections in the FireWorks database: campaigns, configurations, labels, models, iterations.

``Store(lp.db)`` works on any pymongo-compatible ``Database``: a MongoDB server (pymongo) or
FireWorks' embedded mongomock(-persistence) mode. Every document is checked against the server's
rules before it is written (:func:`alflow.store.documents.check_document`): a refused document
leaves the store untouched. Indexes are (re)created each time a Store is opened, because
mongomock-persistence does not persist them (``create_index`` is idempotent).

Large data (model weights, trajectories) goes to the GridFS bucket ``alflow``
(collections ``alflow.files`` / ``alflow.chunks``). GridFS on mongomock needs
``mongomock.gridfs.enable_gridfs_integration()``: FireWorks' mongomock mode calls it (when
``GRIDFS_FALLBACK_COLLECTION`` is set, the default), and the Store calls it itself when it is
handed a mongomock database and it has not been called.

See docs/schema.md for the document forms and ready queries.
"""

from __future__ import annotations

import io
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import ase.io
import bson
import gridfs
import numpy as np
from ase import Atoms
from ase.calculators.calculator import all_properties
from ase.calculators.singlepoint import SinglePointCalculator
from bson import ObjectId
from pymongo import ASCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError

from alflow.store.documents import (
    DocumentRejected,
    apply_set,
    atoms_from_document,
    check_document,
    check_keys,
    configuration_document,
    plain,
    utcnow,
    voigt,
)

BUCKET = "alflow"  # GridFS bucket: alflow.files + alflow.chunks
STATUSES = ("ok", "failed", "rejected")
COUNTERS = ("oracle_calls", "failed_labels", "reused_labels")
ROUND_COUNTS = {"oracle_calls": "oracle_calls", "failed": "failed_labels", "reused": "reused_labels"}  # round metric → counter
MODEL_METADATA_MAX_BYTES = 64 * 1024  # metadata fields larger than this stay only in the weights file

# collection -> [(keys, options)]; create_index is idempotent, so opening a Store (re)creates them
INDEXES: dict[str, list[tuple[list[tuple[str, int]], dict]]] = {
    "campaigns": [([("name", ASCENDING)], {"unique": True})],
    "configurations": [
        ([("hash", ASCENDING)], {"unique": True}),
        ([("seen.campaign", ASCENDING)], {}),
    ],
    "labels": [
        ([("structure_hash", ASCENDING), ("oracle_hash", ASCENDING)], {"unique": True}),
        ([("campaign", ASCENDING), ("iteration", ASCENDING)], {}),
        ([("campaign", ASCENDING), ("status", ASCENDING)], {}),
        ([("status", ASCENDING)], {}),
    ],
    "models": [([("campaign", ASCENDING), ("iteration", ASCENDING)], {})],
    "iterations": [([("campaign", ASCENDING), ("iteration", ASCENDING)], {"unique": True})],
    # the same specs pymongo's GridFS creates on its first write, plus campaign/iteration
    f"{BUCKET}.files": [
        ([("filename", ASCENDING), ("uploadDate", ASCENDING)], {}),
        ([("metadata.campaign", ASCENDING), ("metadata.iteration", ASCENDING)], {}),
    ],
    f"{BUCKET}.chunks": [([("files_id", ASCENDING), ("n", ASCENDING)], {"unique": True})],
}

_RESULT_KEYS = {"status", "energy", "forces", "stress", "reason", "failure_class", "seconds"}


def _gridfs(db) -> gridfs.GridFS:
    try:
        return gridfs.GridFS(db, collection=BUCKET)
    except TypeError:
        if not type(db).__module__.startswith("mongomock"):
            raise
        import mongomock.gridfs

        mongomock.gridfs.enable_gridfs_integration()
        return gridfs.GridFS(db, collection=BUCKET)


def _size(value) -> int:
    """BSON size of one value (bytes)."""
    return len(bson.encode({"v": value}))


def _extxyz_frame(atoms: Atoms) -> Atoms:
    """A copy of ``atoms`` whose calculator results all survive an extxyz round trip."""
    out = atoms.copy()
    calc = atoms.calc
    results = dict(getattr(calc, "results", None) or {}) if calc is not None else {}
    if not results:
        return out
    standard = {k: v for k, v in results.items() if k in all_properties}
    for key, value in results.items():
        if key in standard:
            continue
        arr = np.asarray(value)
        if arr.ndim and arr.shape[0] == len(out) and arr.dtype.kind in "biuf":
            out.arrays[key] = arr.copy()
        elif arr.ndim == 0 and arr.dtype.kind in "biuf":
            out.info[key] = arr.item()
    out.calc = SinglePointCalculator(out, **standard)
    return out


def _object_id(value) -> ObjectId:
    if isinstance(value, ObjectId):
        return value
    if isinstance(value, Mapping):
        return value["_id"]
    return ObjectId(str(value))


def _same_attempt(existing: Mapping, doc: Mapping) -> bool:
    """Whether ``doc`` is the stored failed label again (a merge rerun after a crash stores its
    round's results a second time), not a new attempt: the same round and the same outcome."""
    return all(existing.get(k) == doc.get(k) for k in ("campaign", "iteration", "status", "reason", "failure_class", "seconds"))


def _finite_array(name: str, value, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(value, dtype=float)
    if arr.shape != shape:
        raise ValueError(f"label {name} must have shape {shape}, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"label {name} contains non-finite values")
    return arr


class Store:
    """alflow's collections in a pymongo-compatible Database (FireWorks' ``lp.db``)."""

    def __init__(self, db, create_indexes: bool = True, checkpoint=None):
        """``create_indexes=False``: touch nothing (a read-only view, e.g. ``alflow report``);
        ``checkpoint``: called after a paid label is stored mid-firework (the embedded runner
        snapshots its store then, so a crash of the online learner loses no oracle call)."""
        self.db = db
        self.checkpoint = checkpoint or (lambda: None)
        self.campaigns = db["campaigns"]
        self.configurations = db["configurations"]
        self.labels_collection = db["labels"]
        self.models = db["models"]
        self.iteration_collection = db["iterations"]
        if create_indexes:
            self.ensure_indexes()
        self._fs: gridfs.GridFS | None = None

    @classmethod
    def from_launchpad(cls, launchpad) -> "Store":
        """The store in a FireWorks LaunchPad's database (the same client FireWorks uses), with
        the runner's checkpoint if it set one on the LaunchPad (``alflow_checkpoint``)."""
        return cls(launchpad.db, checkpoint=getattr(launchpad, "alflow_checkpoint", None))

    def ensure_indexes(self) -> None:
        """Create every index of :data:`INDEXES` (idempotent; mongomock-persistence loses them)."""
        for name, specs in INDEXES.items():
            for keys, options in specs:
                self.db[name].create_index(keys, **options)

    @property
    def fs(self) -> gridfs.GridFS:
        if self._fs is None:
            self._fs = _gridfs(self.db)
        return self._fs

    # --------------------------------------------------------------------------------------
    # campaigns
    def create_campaign(self, name: str, spec: Mapping) -> dict:
        """A new campaign: status "created", iteration 0, zero counters. Duplicate names are refused."""
        now = utcnow()
        doc = {
            "name": str(name),
            "status": "created",
            "iteration": 0,
            "counters": {c: 0 for c in COUNTERS},
            "spec": plain(dict(spec)),
            "created_on": now,
            "updated_on": now,
        }
        check_document("campaigns", doc)
        try:
            self.campaigns.insert_one(doc)
        except DuplicateKeyError:
            raise ValueError(f"campaign {name!r} already exists (campaign names are unique)") from None
        return doc

    def campaign(self, name: str) -> dict | None:
        return self.campaigns.find_one({"name": name})

    def update_campaign(self, name: str, **fields) -> dict:
        """``$set`` ``fields`` (plain names) on campaign ``name``; returns the updated document."""
        check_keys("campaigns", fields)
        updates = {k: plain(v) for k, v in fields.items()}
        updates["updated_on"] = utcnow()
        current = self.campaign(name)
        if current is None:
            raise ValueError(f"no campaign named {name!r}")
        check_document("campaigns", apply_set(current, updates))
        doc = self.campaigns.find_one_and_update(
            {"name": name}, {"$set": updates}, return_document=ReturnDocument.AFTER
        )
        if doc is None:
            raise ValueError(f"no campaign named {name!r}")
        return doc

    def tally_rounds(self, name: str) -> dict:
        """Set the ``counters`` of campaign ``name`` to the sums of its rounds' ``oracle_calls``,
        ``failed`` and ``reused`` (iteration metrics); returns them. Idempotent: a merge run twice
        (a rerun firework) counts its round once."""
        totals = dict.fromkeys(COUNTERS, 0)
        for doc in self.iteration_collection.find({"campaign": name}, {"metrics": 1}):
            for key, counter in ROUND_COUNTS.items():
                totals[counter] += int(doc.get("metrics", {}).get(key) or 0)
        update = {"$set": {"counters": totals, "updated_on": utcnow()}}
        doc = self.campaigns.find_one_and_update({"name": name}, update, return_document=ReturnDocument.AFTER)
        if doc is None:
            raise ValueError(f"no campaign named {name!r}")
        return doc["counters"]

    # --------------------------------------------------------------------------------------
    # configurations
    def _configuration_insert(self, atoms: Atoms, provenance: Mapping, now) -> tuple[dict, dict | None]:
        doc = configuration_document(atoms)
        doc["provenance"] = plain(dict(provenance))
        seen = {k: plain(provenance.get(k)) for k in ("campaign", "iteration", "role")}
        seen = seen if any(v is not None for v in seen.values()) else None
        doc["seen"] = [seen] if seen else []
        doc["created_on"] = now
        return doc, seen

    def _write_configuration(self, doc: dict, seen: dict | None) -> None:
        on_insert = {k: v for k, v in doc.items() if k != "seen"}
        update: dict[str, Any] = {"$setOnInsert": on_insert}
        if seen:
            update["$addToSet"] = {"seen": seen}
        else:
            on_insert["seen"] = []
        try:
            self.configurations.update_one({"hash": doc["hash"]}, update, upsert=True)
        except DuplicateKeyError:  # a concurrent upsert inserted it first: now it matches
            self.configurations.update_one({"hash": doc["hash"]}, update, upsert=True)

    def add_configuration(self, atoms: Atoms, provenance: Mapping) -> str:
        """Store ``atoms`` once per structure hash; returns the hash.

        The first writer's ``provenance`` is kept; every writer's (campaign, iteration, role)
        is added to ``seen``.
        """
        doc, seen = self._configuration_insert(atoms, provenance, utcnow())
        check_document("configurations", doc)
        self._write_configuration(doc, seen)
        return doc["hash"]

    def configuration(self, structure_hash: str) -> Atoms:
        """The stored structure, with FixAtoms restored from its ``fixed`` indices."""
        doc = self.configurations.find_one({"hash": structure_hash})
        if doc is None:
            raise KeyError(f"no configuration with hash {structure_hash!r}")
        return atoms_from_document(doc)

    # --------------------------------------------------------------------------------------
    # labels
    def label(self, structure_hash: str, oracle_hash: str) -> dict | None:
        return self.labels_collection.find_one({"structure_hash": structure_hash, "oracle_hash": oracle_hash})

    def _label_document(self, atoms, shash, oracle_hash, oracle, result, provenance, now) -> dict:
        status = result.get("status")
        if status not in STATUSES:
            raise ValueError(f"label status must be one of {STATUSES}, got {status!r}")
        n = len(atoms)
        doc: dict[str, Any] = {
            "structure_hash": shash,
            "oracle_hash": str(oracle_hash),
            "status": status,
            "campaign": plain(provenance.get("campaign")),
            "iteration": plain(provenance.get("iteration")),
            "formula": atoms.get_chemical_formula(),
            "natoms": n,
        }
        if status == "ok" or result.get("energy") is not None:
            if result.get("energy") is None or result.get("forces") is None:
                raise ValueError(f"an {status!r} label needs 'energy' and 'forces'")
            energy = float(result["energy"])
            if not math.isfinite(energy):
                raise ValueError(f"label energy is not finite: {energy}")
            doc["energy"] = energy
            doc["forces"] = _finite_array("forces", result["forces"], (n, 3)).tolist()
            if result.get("stress") is not None:
                doc["stress"] = voigt(result["stress"])
        for key in ("reason", "failure_class", "seconds"):
            if result.get(key) is not None:
                doc[key] = plain(result[key])
        extra = {k: plain(v) for k, v in result.items() if k not in _RESULT_KEYS}
        if extra:
            doc["extra"] = extra
        doc["oracle"] = plain(dict(oracle))
        doc["provenance"] = plain(dict(provenance))
        doc["created_on"] = now
        return doc

    def put_label(
        self, atoms: Atoms, oracle_hash: str, oracle: Mapping, result: Mapping, provenance: Mapping
    ) -> tuple[dict, bool]:
        """Store the label of ``atoms`` under (structure hash, ``oracle_hash``) and the configuration.

        Returns (label document, inserted). An "ok" label is never overwritten: a second writer
        gets the existing document and ``inserted=False``. A "failed"/"rejected" label is replaced
        by any later result, a retry's (the replaced attempts are kept in ``history``, so
        :func:`alflow.oracles.failures.attempts` counts them). Race-safe through the unique index.
        """
        now = utcnow()
        # a model's prediction (provenance.prediction) belongs to the label, not to the structure
        structure_provenance = {k: v for k, v in provenance.items() if k != "prediction"}
        config, seen = self._configuration_insert(atoms, structure_provenance, now)
        doc = self._label_document(atoms, config["hash"], oracle_hash, oracle, result, provenance, now)
        check_document("configurations", config)
        check_document("labels", doc)
        self._write_configuration(config, seen)
        key = {"structure_hash": doc["structure_hash"], "oracle_hash": doc["oracle_hash"]}
        for _ in range(10):
            try:
                self.labels_collection.insert_one(doc)
                return doc, True
            except DuplicateKeyError:
                doc.pop("_id", None)
            existing = self.labels_collection.find_one(key)
            if existing is None:  # removed in between: try inserting again
                continue
            if existing["status"] == "ok" or _same_attempt(existing, doc):
                return existing, False
            replacement = dict(doc, _id=existing["_id"])
            replacement["history"] = list(existing.get("history", [])) + [
                {k: existing[k] for k in ("status", "reason", "failure_class", "seconds", "campaign", "iteration", "created_on") if k in existing}
            ]
            check_document("labels", replacement)
            # only the version read above: another writer's result in between is never lost
            earlier = len(existing.get("history", []))
            version = {"_id": existing["_id"], "created_on": existing["created_on"],
                       "history": {"$size": earlier} if earlier else {"$exists": False}}
            res = self.labels_collection.replace_one(version, replacement)
            if res.matched_count == 1:
                return replacement, True
            # another writer stored a result in between: loop and look again
        raise RuntimeError(f"labels: could not store label {key} (concurrent writers kept changing it)")

    def label_atoms(self, label_doc: Mapping) -> Atoms:
        """The labelled configuration with a SinglePointCalculator(energy, forces[, stress])."""
        if label_doc.get("energy") is None or label_doc.get("forces") is None:
            raise ValueError(
                f"label {label_doc.get('_id')} has status {label_doc.get('status')!r} and no energy/forces"
            )
        atoms = self.configuration(label_doc["structure_hash"])
        results = {"energy": label_doc["energy"], "forces": np.asarray(label_doc["forces"], dtype=float)}
        if label_doc.get("stress") is not None:
            results["stress"] = np.asarray(label_doc["stress"], dtype=float)
        atoms.calc = SinglePointCalculator(atoms, **results)
        return atoms

    def labels(self, **query) -> list[dict]:
        """Label documents matching ``query`` (e.g. ``campaign="x", status="ok"``), oldest first."""
        return list(self.labels_collection.find(query).sort("_id", ASCENDING))

    # --------------------------------------------------------------------------------------
    # GridFS
    def label_by_id(self, label_id) -> dict | None:
        """The label document with ``_id`` ``label_id`` (an ObjectId or its hex string)."""
        return self.labels_collection.find_one({"_id": _object_id(label_id)})

    def put_file(self, data: bytes, filename: str, **metadata) -> ObjectId:
        """Store ``data`` in the GridFS bucket ``alflow``; ``metadata`` goes to the file document."""
        return self._put_file(ObjectId(), data, filename, metadata)

    def _put_file(self, file_id: ObjectId, data: bytes, filename: str, metadata: Mapping) -> ObjectId:
        metadata = plain(dict(metadata))
        check_document(f"{BUCKET}.files", {"filename": filename, "metadata": metadata})
        return self.fs.put(bytes(data), _id=file_id, filename=filename, metadata=metadata)

    def get_file(self, file_id) -> bytes:
        try:
            return self.fs.get(_object_id(file_id)).read()
        except gridfs.errors.NoFile:
            raise KeyError(f"no file {file_id} in GridFS bucket {BUCKET!r}") from None

    def save_model(
        self, potential, campaign: str, iteration: int, training_labels: Sequence, metrics: Mapping
    ) -> ObjectId:
        """Weights (``potential.save``'s zip) to GridFS, a document in ``models``; returns its id."""
        with tempfile.TemporaryDirectory(prefix="alflow-model-") as tmp:
            data = Path(potential.save(Path(tmp) / "model.alflow")).read_bytes()
        meta = plain(potential.metadata())
        omitted = [k for k, v in meta.items() if _size(v) > MODEL_METADATA_MAX_BYTES]
        iteration = int(iteration)
        file_id = ObjectId()
        doc = {
            "campaign": campaign,
            "iteration": iteration,
            "weights": file_id,
            "weights_bytes": len(data),
            **{k: v for k, v in meta.items() if k not in omitted},
            "metrics": plain(dict(metrics)),
            "training_labels": [_object_id(x) if isinstance(x, Mapping) else plain(x) for x in training_labels],
            "n_training_labels": len(training_labels),
            "created_on": utcnow(),
        }
        if omitted:
            doc["omitted_metadata"] = omitted
        check_document("models", doc)
        self._put_file(file_id, data, f"{campaign}/{iteration:03d}/model.alflow",
                       {"kind": "model", "campaign": campaign, "iteration": iteration})
        self.models.insert_one(doc)
        return doc["_id"]

    def model(self, model_id) -> dict | None:
        return self.models.find_one({"_id": _object_id(model_id)})

    def model_documents(self, campaign: str) -> list[dict]:
        """Model documents of ``campaign`` by iteration (oldest first)."""
        return list(self.models.find({"campaign": campaign}).sort([("iteration", ASCENDING), ("_id", ASCENDING)]))

    def load_model(self, model_id):
        """The DeltaPotential of a ``models`` document (by id, or the document itself)."""
        from alflow.model.potential import DeltaPotential

        doc = model_id if isinstance(model_id, Mapping) else self.model(model_id)
        if doc is None:
            raise KeyError(f"no model {model_id} in 'models'")
        data = self.get_file(doc["weights"])
        with tempfile.TemporaryDirectory(prefix="alflow-model-") as tmp:
            path = Path(tmp) / "model.alflow"
            path.write_bytes(data)
            return DeltaPotential.load(path)

    def save_trajectory(self, frames: Sequence[Atoms], campaign: str, iteration: int, name: str) -> ObjectId:
        """``frames`` as extxyz in GridFS; returns the file id.

        Calculator results are kept: energy/forces/stress as extxyz results; other results (the
        ensemble's ``uncertainty``, ``energy_std``, ``forces_std``) as per-frame info / per-atom
        columns, which :meth:`load_trajectory` gives back in ``atoms.info`` / ``atoms.arrays``.
        """
        frames = [_extxyz_frame(a) for a in frames]
        buf = io.StringIO()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Skipping unhashable information")
            ase.io.write(buf, frames, format="extxyz")
        iteration = int(iteration)
        return self.put_file(
            buf.getvalue().encode(), f"{campaign}/{iteration:03d}/{name}.extxyz",
            kind="trajectory", campaign=campaign, iteration=iteration, name=name, frames=len(frames),
        )

    def load_trajectory(self, file_id) -> list[Atoms]:
        text = self.get_file(file_id).decode()
        return ase.io.read(io.StringIO(text), index=":", format="extxyz")

    # --------------------------------------------------------------------------------------
    # iterations
    def record_iteration(self, campaign: str, iteration: int, metrics: Mapping, **files) -> dict:
        """Upsert the (campaign, iteration) document: ``metrics`` merged key by key, ``files``
        (name → GridFS id) under ``files``. Returns the document after the update."""
        check_keys("iterations", list(metrics) + list(files))
        iteration = int(iteration)
        now = utcnow()
        updates = {f"metrics.{k}": plain(v) for k, v in metrics.items()}
        updates.update({f"files.{k}": plain(v) for k, v in files.items()})
        updates["updated_on"] = now
        key = {"campaign": campaign, "iteration": iteration}
        current = self.iteration_collection.find_one(key) or {**key, "created_on": now}
        check_document("iterations", apply_set(current, updates))
        update = {"$set": updates, "$setOnInsert": {"created_on": now}}
        kwargs = dict(upsert=True, return_document=ReturnDocument.AFTER)
        try:
            return self.iteration_collection.find_one_and_update(key, update, **kwargs)
        except DuplicateKeyError:  # a concurrent upsert inserted it first
            return self.iteration_collection.find_one_and_update(key, update, **kwargs)

    def iterations(self, campaign: str) -> list[dict]:
        return list(self.iteration_collection.find({"campaign": campaign}).sort("iteration", ASCENDING))


__all__ = ["BUCKET", "COUNTERS", "INDEXES", "STATUSES", "DocumentRejected", "Store"]
