"""Overlapping atoms: two atoms closer than half the sum of their covalent radii.

Such a structure is unphysical (a model drove atoms into each other): the descriptors refuse it,
ML simulations stop at it, and the oracle rejects it before paying for a calculation.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.data import covalent_radii
from ase.neighborlist import neighbor_list

#: Atoms closer than this fraction of the sum of their covalent radii are "overlapping".
OVERLAP_FRACTION = 0.5


class OverlappingAtomsError(ValueError):
    """Two atoms sit unphysically close together (fusion, a broken structure)."""


def check_overlaps(atoms: Atoms, i: np.ndarray, j: np.ndarray, d: np.ndarray, where: str) -> None:
    """Raise :class:`OverlappingAtomsError` if two atoms are closer than half their covalent radii."""
    if len(d) == 0:
        return
    limit = OVERLAP_FRACTION * (covalent_radii[atoms.numbers[i]] + covalent_radii[atoms.numbers[j]])
    bad = np.flatnonzero(d < limit)
    if bad.size:
        k = bad[np.argmin(d[bad] / limit[bad])]
        sym = atoms.get_chemical_symbols()
        raise OverlappingAtomsError(
            f"{where}: atoms {i[k]} ({sym[i[k]]}) and {j[k]} ({sym[j[k]]}) are {d[k]:.3f} Å apart, "
            f"closer than {OVERLAP_FRACTION} x their covalent radii ({limit[k]:.3f} Å): overlapping atoms"
        )


def find_overlap(atoms: Atoms, where: str = "structure") -> str | None:
    """Why ``atoms`` has overlapping atoms (the closest such pair), or None if it has none."""
    if len(atoms) < 2 and not atoms.pbc.any():  # a periodic atom can overlap its own image
        return None
    if atoms.pbc.any() and abs(atoms.cell.volume) < 1e-9 and (atoms.cell.lengths()[atoms.pbc] < 1e-9).any():
        return f"{where}: periodic along an axis without a cell vector; set the cell"
    reach = 2.0 * OVERLAP_FRACTION * float(covalent_radii[np.unique(atoms.numbers)].max())
    i, j, d = neighbor_list("ijd", atoms, reach)
    try:
        check_overlaps(atoms, i, j, d, where)
    except OverlappingAtomsError as exc:
        return str(exc)
    return None
