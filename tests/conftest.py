"""Shared fixtures: the paper's C/Cu(100) slab, EMT labelling and session-trained potentials."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import add_adsorbate, fcc100
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from alflow.constraints import free_mask
from alflow.model import DeltaPotential, TrainingSettings

CU_LATTICE = 3.63
CELL_Z = 20.0
N_TRAIN = 15


def make_slab() -> Atoms:
    """C on Cu(100): fcc100 2×2×3 (a = 3.63 Å), C 3.0 Å above the surface, bottom layer fixed."""
    slab = fcc100("Cu", (2, 2, 3), a=CU_LATTICE)
    add_adsorbate(slab, "C", 3.0, offset=(1, 1))
    cell = slab.cell.array.copy()
    cell[2, 2] = CELL_Z
    slab.set_cell(cell)
    slab.center(axis=2)
    slab.set_constraint(FixAtoms(mask=slab.get_tags() == 3))
    slab.pbc = (True, True, False)
    return slab


def label(atoms: Atoms) -> Atoms:
    """Attach EMT energy and raw (unconstrained) forces with a SinglePointCalculator."""
    atoms = atoms.copy()
    atoms.calc = EMT()
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces(apply_constraint=False)
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    return atoms


def rattled(seed: int, stdev: float = 0.1, labelled: bool = True) -> Atoms:
    """The slab rattled with a seeded Gaussian (fixed atoms stay put), EMT-labelled by default."""
    slab = make_slab()
    slab.rattle(stdev=stdev, seed=seed)
    return label(slab) if labelled else slab


free_atoms = free_mask  # the tests' name for it


def random_rotation(seed: int) -> np.ndarray:
    """A proper rotation matrix (det +1) drawn from ``seed``."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


@pytest.fixture
def slab() -> Atoms:
    return make_slab()


@pytest.fixture(scope="session")
def training_set() -> list[Atoms]:
    return [rattled(seed) for seed in range(N_TRAIN)]


@pytest.fixture(scope="session")
def trained(training_set) -> DeltaPotential:
    """The published setup: 5-member Morse Δ-potential on 15 structures rattled by 0.1 Å."""
    return DeltaPotential(elements=["Cu", "C"], prior="morse", ensemble=5, seed=0).fit(training_set)


@pytest.fixture(scope="session")
def small(training_set) -> DeltaPotential:
    """Trained but not accurate: 3 members, 30 epochs (for tests of structure, not accuracy)."""
    return DeltaPotential(
        elements=["Cu", "C"], prior="morse", ensemble=3, seed=1, training=TrainingSettings(epochs=30)
    ).fit(training_set)
