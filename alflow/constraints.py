"""Which atoms are free: the one place that reads FixAtoms constraints (forces, fmax, hashing)."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.constraints import FixAtoms


def free_mask(atoms: Atoms) -> np.ndarray:
    """True for atoms that no FixAtoms constraint holds: [N] bool."""
    free = np.ones(len(atoms), dtype=bool)
    for c in atoms.constraints:
        if isinstance(c, FixAtoms):
            free[c.index] = False
    return free
