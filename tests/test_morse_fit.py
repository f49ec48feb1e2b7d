"""Tests of the Morse fitter, the oracle factories, the fit-morse CLI and the shipped table."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.calculators.morse import MorsePotential

from alflow import oracles
from alflow.cli import main
from alflow.model.morse import MissingMorseParameters, lookup, shipped_table
from alflow.model.morse_fit import atom_energy, dimer_energy, fit_morse, fit_table, morse_energy


def morse_factory(De: float, re: float, a: float):
    # ASE's V = ε e^{ρ0(1−r/r0)} (e^{ρ0(1−r/r0)} − 2) is De[(1 − e^{−a(r−re)})² − 1] with ρ0 = a re;
    # its cutoffs are in units of r0, put far outside the dimer scan (≤ 4 Å)
    return lambda: MorsePotential(epsilon=De, r0=re, rho0=a * re, rcut1=20.0, rcut2=21.0)


@pytest.mark.parametrize("element, De, re, a", [("Cu", 2.0, 2.3, 1.5), ("C", 5.0, 1.2, 2.1)])
def test_recovers_synthetic_morse(element, De, re, a):
    p = fit_morse(element, morse_factory(De, re, a), source="synthetic")
    assert p.De == pytest.approx(De, rel=0.01)
    assert p.re == pytest.approx(re, rel=0.01)
    assert p.a == pytest.approx(a, rel=0.01)
    assert p.source == "synthetic"


class MinimumAboveAtoms(Calculator):
    """Dimer energy 1 + (r − 2)² eV with a minimum at 2 Å, isolated atom 0 eV: not bound."""

    implemented_properties = ["energy"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        n = len(self.atoms)
        self.results["energy"] = 0.0 if n == 1 else 1.0 + (self.atoms.get_distance(0, 1) - 2.0) ** 2


def test_unbound_dimer_raises_naming_element():
    with pytest.raises(ValueError, match="dimer of Cu is not bound"):
        fit_morse("Cu", MinimumAboveAtoms, source="unbound")


def test_no_minimum_in_scan_raises():
    # ε < 0 inverts the well: the energy falls without bound as r → 0
    collapsing = lambda: MorsePotential(epsilon=-1.0, r0=2.0, rho0=3.0, rcut1=20.0, rcut2=21.0)
    with pytest.raises(ValueError, match="no minimum of the Cu2 dimer"):
        fit_morse("Cu", collapsing, source="collapsing")


def test_unknown_element_raises():
    with pytest.raises(ValueError, match="Xx"):
        fit_morse("Xx", EMT, source="emt")


@pytest.mark.parametrize("element", ["Cu", "C", "O"])
def test_emt_dimers(element):
    p = fit_morse(element, EMT, source="emt")
    assert p.De > 0 and 0.8 < p.re < 3.0 and p.a > 0
    r = 1.1 * p.re
    reference = dimer_energy(element, r, EMT()) - 2 * atom_energy(element, EMT())
    assert morse_energy(np.array(r), p.De, p.re, p.a) == pytest.approx(reference, abs=0.05 * p.De)


def test_fit_table_keys_and_source():
    table = fit_table(["H", "Cu"], EMT, "emt test")
    assert list(table) == ["H", "Cu"]
    assert {p.source for p in table.values()} == {"emt test"}


def test_oracle_factories():
    assert isinstance(oracles.calculator_factory("emt")(), EMT)
    factory = oracles.calculator_factory("python", {"callable": "ase.calculators.emt:EMT", "kwargs": {"asap_cutoff": True}})
    calc = factory()
    assert isinstance(calc, EMT) and calc.parameters["asap_cutoff"] is True and factory() is not calc
    assert oracles.describe("emt").startswith("EMT (ASE ")
    with pytest.raises(ValueError, match="unknown oracle kind 'gaussian'"):
        oracles.calculator_factory("gaussian")
    with pytest.raises(ValueError, match="incar: required"):  # a DFT kind names its missing setting
        oracles.calculator_factory("vasp")
    for bad in ["ase.calculators.emt", "no_such_module_xyz:f", "ase.calculators.emt:NoSuch"]:
        with pytest.raises(ValueError, match=bad):
            oracles.calculator_factory("python", {"callable": bad})


def test_cli_writes_table_lookup_accepts(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["fit-morse", "Cu", "--oracle", "emt", "--output", str(out)]) == 0
    assert "Cu" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["format"] == "alflow-morse-table" and data["version"] == 1
    p = lookup(["Cu"], overrides=data["elements"])["Cu"]
    assert p.De > 0 and "EMT" in p.source and p != shipped_table()["Cu"]


@pytest.mark.parametrize(
    "argv, name",
    [
        (["fit-morse", "Xx", "--oracle", "emt"], "Xx"),
        (["fit-morse", "Cu", "--oracle", "nosuchoracle"], "nosuchoracle"),
        (["fit-morse", "Fe", "--oracle", "emt"], "Fe"),
        (["fit-morse", "Cu", "--oracle", "emt", "--output", "/nonexistent_dir_xyz/t.json"], "nonexistent_dir_xyz"),
    ],
)
def test_cli_errors_one_line(argv, name, capsys):
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("alflow: error: ") and name in err


def test_shipped_table_complete():
    table = shipped_table()
    assert set(table) >= {"H", "C", "N", "O", "Al", "Ni", "Cu", "Pd", "Ag", "Pt", "Au"}
    assert all(p.source and p.De > 0 and p.re > 0 and p.a > 0 for p in table.values())
    with pytest.raises(MissingMorseParameters, match="Zr"):
        lookup(["Cu", "Zr"])


def test_the_dimer_scan_pays_no_pair_a_campaign_would_reject():
    from ase import Atoms

    from alflow.model.morse_fit import scan
    from alflow.overlaps import find_overlap

    for element in ("H", "C", "O", "Cu", "Ag", "Cs"):
        grid = scan(element)
        assert np.allclose(np.diff(grid), 0.1) and grid[-1] >= 4.0
        first = Atoms(2 * element, positions=[[0, 0, 0], [grid[0], 0, 0]])
        assert find_overlap(first) is None  # the shortest dimer is accepted, the step below it is not
        assert grid[0] == 0.5 or find_overlap(Atoms(2 * element, positions=[[0, 0, 0], [grid[0] - 0.1, 0, 0]]))


def test_an_oracle_that_fails_is_one_error_naming_the_structure():
    class Broken(Calculator):
        implemented_properties = ["energy"]

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            raise KeyError("scf did not converge")

    with pytest.raises(RuntimeError, match=r"the oracle failed on Cu: KeyError: 'scf did not converge'"):
        fit_morse("Cu", Broken, source="broken")
