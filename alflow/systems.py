"""The paper's example systems (Yang et al. 2021), built with ASE.

Cu lattice constant 3.63 Å (the paper's EOS value); bottom slab layer fixed; pbc (T, T, F).
"""

from __future__ import annotations

from ase import Atoms
from ase.build import add_adsorbate, fcc100, molecule
from ase.constraints import FixAtoms

CU_LATTICE = 3.63


def _fix_bottom(slab: Atoms, layers: int) -> Atoms:
    slab.set_constraint(FixAtoms(indices=[a.index for a in slab if a.tag == layers]))
    slab.pbc = (True, True, False)
    return slab


def c_cu100(height: float = 3.0, vacuum: float = 13.0) -> Atoms:
    """C/Cu(100) relax: 2×2×3 Cu slab, C ``height`` Å above the (1, 1) site; 13 atoms.

    ``vacuum``: the gap between periodic images along z, half below the slab and half above the
    C (the original code's ``center(vacuum=13)`` leaves 13 Å on each side, twice the gap a
    periodic DFT oracle pays plane waves for).
    """
    slab = fcc100("Cu", size=(2, 2, 3), a=CU_LATTICE, vacuum=vacuum / 2)
    add_adsorbate(slab, "C", height, offset=(1, 1))
    slab.center(vacuum=vacuum / 2, axis=2)
    return _fix_bottom(slab, 3)


def o_cu100_neb_endpoints(height: float = 1.7, vacuum: float = 4.0) -> tuple[Atoms, Atoms]:
    """O/Cu(100) NEB: O in a hollow site, and shifted by a/3 of the cell to the neighbouring hollow.

    Returned unrelaxed (the NEB job relaxes both endpoints); layers below the top are fixed.
    ``vacuum`` Å below the slab and above the O, as the original code centres it (a periodic DFT
    oracle then sees 2 × ``vacuum`` between the O and the next image's slab).
    """
    slab = fcc100("Cu", size=(2, 2, 3), a=CU_LATTICE)
    add_adsorbate(slab, "O", height, "hollow")
    slab.center(vacuum=vacuum, axis=2)
    slab.set_constraint(FixAtoms(indices=[a.index for a in slab if a.tag > 1]))
    slab.pbc = (True, True, False)
    final = slab.copy()
    final.positions[-1, 0] += final.cell[0, 0] / 3
    return slab, final


def co_cu100(height: float = 3.0, vacuum: float = 13.0) -> Atoms:
    """CO/Cu(100) MD: 3×3×3 Cu slab, CO ``height`` Å above the (1, 1) site; 29 atoms."""
    slab = fcc100("Cu", size=(3, 3, 3), a=CU_LATTICE, vacuum=vacuum / 2)
    add_adsorbate(slab, molecule("CO"), height, offset=(1, 1))
    slab.center(vacuum=vacuum / 2, axis=2)
    return _fix_bottom(slab, 3)
