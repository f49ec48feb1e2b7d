"""The paper's accuracy metrics of a campaign against the direct oracle run."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ase import Atoms


def structure_error(a: Atoms, b: Atoms) -> float:
    """Mean over atoms of |Δx| + |Δy| + |Δz| between two structures of the same atoms (Å).

    The paper's structure error between the AL-relaxed and the oracle-relaxed structure; positions
    are compared as stored (same cell, no wrapping).
    """
    if len(a) != len(b) or not np.array_equal(a.numbers, b.numbers):
        raise ValueError(f"structures differ in atoms: {a.get_chemical_formula()} vs {b.get_chemical_formula()}")
    return float(np.abs(a.positions - b.positions).sum(axis=1).mean())


def barrier(energies: Sequence[float]) -> float:
    """Forward barrier of a band (eV): its highest energy minus its initial state's."""
    return float(max(energies) - energies[0])
