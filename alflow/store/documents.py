"""Document forms and the guard every document passes before it is written.

A real MongoDB server refuses documents over 16 MiB and keys that contain ``.`` or start with
``$``; mongomock (FireWorks' embedded mode) accepts both silently, so a campaign that works
on a laptop would fail on a server. :func:`check_document` applies the server's rules first.

Documents are kept readable in a MongoDB dashboard: plain lists of floats for positions, cell
and forces, ints for atomic numbers, bools for pbc, ``fixed`` as a list of atom indices.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Iterator, Mapping

import bson
import numpy as np
from ase import Atoms
from ase.constraints import FixAtoms

from alflow.constraints import free_mask
from alflow.store.hashing import structure_hash

BSON_LIMIT = 16 * 1024 * 1024  # bytes: MongoDB's maximum document size
MARGIN = 64 * 1024  # bytes kept free for later small updates ($addToSet, $set of a status, ...)
MAX_DOCUMENT_BYTES = BSON_LIMIT - MARGIN


class DocumentRejected(ValueError):
    """A document that a MongoDB server would refuse: too large, or a key with '.'/'$'."""


def utcnow() -> _dt.datetime:
    """Now in UTC, truncated to milliseconds (BSON dates hold milliseconds)."""
    now = _dt.datetime.now(_dt.timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


# ------------------------------------------------------------------------------------------
def plain(value: Any) -> Any:
    """``value`` with numpy arrays/scalars and tuples turned into BSON-friendly Python types."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _path(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _bad_keys(value: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(path, why) for every key a MongoDB server would refuse, depth first."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            path = _path(prefix, k)
            if not isinstance(k, str):
                yield path, f"key {k!r} is a {type(k).__name__}, not a string"
            elif "." in k:
                yield path, f"key {k!r} contains '.'"
            elif k.startswith("$"):
                yield path, f"key {k!r} starts with '$'"
            elif "\x00" in k:
                yield path, f"key {k!r} contains a NUL character"
            yield from _bad_keys(v, path)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _bad_keys(v, _path(prefix, i))


def _encoded_size(value: Any) -> int:
    return len(bson.encode({"v": value}))


def _largest_field(doc: Mapping, prefix: str = "") -> tuple[str, int]:
    """Path and encoded size of the largest field, descending into the dominant sub-document."""
    sizes = {k: _encoded_size(v) for k, v in doc.items()}
    key = max(sizes, key=sizes.get)
    value = doc[key]
    if isinstance(value, Mapping) and value:
        return _largest_field(value, _path(prefix, key))
    return _path(prefix, key), sizes[key]


def _unencodable(value: Any, prefix: str = "") -> str:
    """Path of the first value BSON cannot encode."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            try:
                bson.encode({"v": v})
            except (bson.errors.InvalidDocument, TypeError, OverflowError):
                return _unencodable(v, _path(prefix, k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            try:
                bson.encode({"v": v})
            except (bson.errors.InvalidDocument, TypeError, OverflowError):
                return _unencodable(v, _path(prefix, i))
    return prefix or "<document>"


def _mb(n: int) -> str:
    return f"{n / 1024**2:.2f} MiB"


def check_document(collection: str, doc: Mapping, limit: int = MAX_DOCUMENT_BYTES) -> int:
    """Refuse ``doc`` for ``collection`` as a MongoDB server would; returns its BSON size.

    Raises :class:`DocumentRejected` naming the collection and the offending key or size.
    """
    for path, why in _bad_keys(doc):
        raise DocumentRejected(
            f"{collection}: refused document: field '{path}': {why} (MongoDB does not allow "
            f"'.' in keys or a leading '$'; rename the key)"
        )
    try:
        size = len(bson.encode(doc))
    except (bson.errors.InvalidDocument, TypeError, OverflowError) as exc:
        path = _unencodable(doc)
        raise DocumentRejected(f"{collection}: refused document: field '{path}' cannot be stored in BSON ({exc})") from None
    if size > limit:
        path, field = _largest_field(doc)
        raise DocumentRejected(
            f"{collection}: refused document of {_mb(size)}: over the {_mb(limit)} allowed "
            f"(MongoDB's limit is {_mb(BSON_LIMIT)}); largest field '{path}' is {_mb(field)}. "
            f"Put large data (weights, trajectories) in GridFS (Store.put_file)"
        )
    return size


def check_keys(collection: str, names) -> None:
    """Field names given by a caller (e.g. ``**fields``): plain keys only."""
    check_document(collection, dict.fromkeys(names))


def apply_set(doc: dict, updates: Mapping[str, Any]) -> dict:
    """A copy of ``doc`` with a ``$set`` of dotted paths applied (to size-check an update)."""
    out = dict(doc)
    for path, value in updates.items():
        parts = path.split(".")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, Mapping) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return out


# ------------------------------------------------------------------------------------------
def configuration_document(atoms: Atoms) -> dict:
    """The ``configurations`` form of ``atoms`` (without provenance and timestamps)."""
    return {
        "hash": structure_hash(atoms),
        "formula": atoms.get_chemical_formula(),
        "natoms": len(atoms),
        "numbers": [int(z) for z in atoms.numbers],
        "positions": np.asarray(atoms.positions, dtype=float).tolist(),
        "cell": np.asarray(atoms.cell.array, dtype=float).tolist(),
        "pbc": [bool(p) for p in atoms.pbc],
        "fixed": [int(i) for i in np.flatnonzero(~free_mask(atoms))],
    }


def atoms_from_document(doc: Mapping) -> Atoms:
    """Atoms from a ``configurations`` document, with FixAtoms restored from ``fixed``."""
    atoms = Atoms(numbers=doc["numbers"], positions=doc["positions"], cell=doc["cell"], pbc=doc["pbc"])
    if doc.get("fixed"):
        atoms.set_constraint(FixAtoms(indices=list(doc["fixed"])))
    return atoms


def voigt(stress: Any) -> list[float]:
    """Stress as the 6-component Voigt list (xx, yy, zz, yz, xz, xy) that ASE uses, eV/Å³."""
    s = np.asarray(stress, dtype=float)
    if s.shape == (3, 3):
        s = s[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
    if s.shape != (6,):
        raise ValueError(f"stress must have 6 (Voigt) or 3×3 components, got shape {s.shape}")
    return s.tolist()
