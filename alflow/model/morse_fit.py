"""Fit an element's Morse parameters to an oracle, following the paper's protocol.

E_X is the energy of the isolated atom; re minimises the X2 dimer energy; De = −(E_X2(re) − 2 E_X);
a is least-squares fitted to E(r) − 2 E_X on five points r = 0.7 … 1.2 re with De and re fixed.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.data import chemical_symbols, covalent_radii
from scipy.optimize import least_squares, minimize_scalar

from alflow.model.morse import MorseParameters
from alflow.overlaps import OVERLAP_FRACTION

SCAN_STEP = 0.1  # Å, the coarse dimer scan that brackets re
FIT_POINTS = np.linspace(0.7, 1.2, 5)  # points of the fit of a, in units of re


def check_element(element: str) -> str:
    """``element`` if it is a chemical symbol, else ValueError naming it."""
    if element not in chemical_symbols[1:]:
        raise ValueError(f"unknown element symbol '{element}'")
    return element


def scan(element: str) -> np.ndarray:
    """Dimer bond lengths (Å) that bracket re: from where alflow stops rejecting a pair as
    overlapping (half the sum of covalent radii: never a dimer a campaign would refuse unpaid) to
    4 Å or 1.5 × twice the covalent radius, on a 0.1 Å grid (multiples of the step)."""
    r_cov = 2.0 * float(covalent_radii[chemical_symbols.index(element)])
    start = max(0.5, np.ceil(OVERLAP_FRACTION * r_cov / SCAN_STEP + 1e-9) * SCAN_STEP)
    stop = max(4.0, 1.5 * r_cov)
    return np.round(np.arange(start, stop + SCAN_STEP / 2, SCAN_STEP), 10)


def _energy(atoms: Atoms, calculator: Calculator) -> float:
    """The oracle's energy; any failure of it (or a NaN) as a RuntimeError naming the structure."""
    what = f"{atoms.get_chemical_formula()}" + (f" at {atoms.get_distance(0, 1):.3f} Å" if len(atoms) == 2 else "")
    try:
        atoms.calc = calculator
        energy = float(atoms.get_potential_energy())
    except Exception as exc:  # a user's oracle can raise anything: one line, not a traceback
        raise RuntimeError(f"the oracle failed on {what}: {type(exc).__name__}: {exc}") from exc
    if not np.isfinite(energy):
        raise RuntimeError(f"the oracle gave a non-finite energy ({energy}) on {what}")
    return energy


def atom_energy(element: str, calculator: Calculator, box: float = 12.0) -> float:
    """Energy of one isolated atom centred in a non-periodic cubic box of side ``box`` (Å)."""
    atoms = Atoms(element, cell=[box] * 3, pbc=False)
    atoms.center()
    return _energy(atoms, calculator)


def dimer_energy(element: str, r: float, calculator: Calculator, box: float = 12.0) -> float:
    """Energy of the X2 dimer at bond length ``r`` (Å), centred in a non-periodic cubic box."""
    atoms = Atoms(2 * element, positions=[[0.0, 0.0, 0.0], [r, 0.0, 0.0]], cell=[box] * 3, pbc=False)
    atoms.center()
    return _energy(atoms, calculator)


def morse_energy(r: np.ndarray, De: float, re: float, a: float) -> np.ndarray:
    """Binding energy De [(1 − e^(−a (r − re)))² − 1] (eV)."""
    return De * ((1.0 - np.exp(-a * (r - re))) ** 2 - 1.0)


def _minimise(curve: Callable[[float], float], element: str) -> float:
    """Bond length minimising ``curve``: coarse :func:`scan`, then bounded minimisation."""
    grid = scan(element)
    energies = np.array([curve(r) for r in grid])
    i = int(np.argmin(energies))
    if i in (0, len(grid) - 1):
        raise ValueError(
            f"no minimum of the {element}2 dimer energy inside {grid[0]:g}–{grid[-1]:g} Å with this calculator"
        )
    result = minimize_scalar(curve, bounds=(grid[i - 1], grid[i + 1]), method="bounded", options={"xatol": 1e-6})
    return float(result.x)


def fit_morse(
    element: str, calculator_factory: Callable[[], Calculator], *, source: str, box: float = 12.0
) -> MorseParameters:
    """Morse parameters of ``element`` from the isolated atom and X2 dimer of the factory's calculator."""
    check_element(element)
    e_atom = atom_energy(element, calculator_factory(), box)
    calculator = calculator_factory()

    def binding(r: float) -> float:
        return dimer_energy(element, r, calculator, box) - 2.0 * e_atom

    re = _minimise(binding, element)
    De = -binding(re)
    if De <= 0.0:
        raise ValueError(f"dimer of {element} is not bound with this calculator (De = {De:.4g} eV)")
    r = FIT_POINTS * re
    target = np.array([binding(x) for x in r])
    fit = least_squares(lambda p: morse_energy(r, De, re, p[0]) - target, x0=[2.0 / re], bounds=(1e-6, np.inf))
    return MorseParameters(De=De, re=re, a=float(fit.x[0]), source=source)


def fit_table(
    elements: Iterable[str], calculator_factory: Callable[[], Calculator], source: str, *, box: float = 12.0
) -> dict[str, MorseParameters]:
    """``fit_morse`` for each of ``elements``, keyed by symbol."""
    return {el: fit_morse(el, calculator_factory, source=source, box=box) for el in elements}
