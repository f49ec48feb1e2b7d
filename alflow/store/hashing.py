"""Canonical hashes of structures and oracle settings: the keys of the label cache.

A label is identified by (structure hash, oracle-settings hash), so the same structure computed
with the same settings is never paid for twice, across iterations, reruns and campaigns.

Structure hash: SHA-256 over atomic numbers, positions (wrapped into the cell along periodic
directions), cell, pbc and the fixed-atom mask, with lengths quantised to ``RESOLUTION`` Å so
that float noise from file round trips or unit conversions does not change the key. Atom order
matters (labels carry per-atom forces).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import numpy as np
from ase import Atoms

from alflow.constraints import free_mask

RESOLUTION = 1e-5  # Å


def _quantised(x: np.ndarray) -> np.ndarray:
    q = np.rint(np.asarray(x, dtype=float) / RESOLUTION).astype(np.int64)
    return q + 0  # −0 → 0


def structure_hash(atoms: Atoms) -> str:
    """Hex SHA-256 of the canonical form of ``atoms`` (see module docstring)."""
    positions = atoms.positions
    if atoms.pbc.any():
        scaled = atoms.cell.scaled_positions(positions)
        scaled[:, atoms.pbc] %= 1.0
        # fractional coordinates within RESOLUTION of 1 wrap to 0, so x ≈ 0 and x ≈ L agree
        edge = np.isclose(scaled, 1.0, rtol=0, atol=RESOLUTION / max(atoms.cell.lengths().max(), 1.0))
        scaled[edge & atoms.pbc] = 0.0
        positions = atoms.cell.cartesian_positions(scaled)
    h = hashlib.sha256()
    for part in (
        np.asarray(atoms.numbers, dtype=np.int64),
        _quantised(positions),
        _quantised(atoms.cell.array),
        np.asarray(atoms.pbc, dtype=np.int8),
        (~free_mask(atoms)).astype(np.int8),
    ):
        h.update(np.ascontiguousarray(part).tobytes())
        h.update(b"|")
    return h.hexdigest()


def settings_hash(settings: Mapping[str, Any]) -> str:
    """Hex SHA-256 of JSON-canonical ``settings`` (sorted keys; floats as repr)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()
