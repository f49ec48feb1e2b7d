"""Oracle-matched refinement (alflow.refine): exact at the anchor, conservative, and it turns an
accurate-but-not-exact model into a step that converges on the oracle."""

from __future__ import annotations

import numpy as np
import pytest
from ase.calculators.calculator import all_changes
from ase.calculators.emt import EMT

from alflow import simulate
from alflow.demo import emt_labelled as labelled
from alflow.refine import AnchoredCalculator, best_anchor, oracle_fmax
from alflow.systems import c_cu100


def rattled(atoms, amplitude, seed):
    out = atoms.copy()
    out.rattle(amplitude, seed=seed)
    return out


class Biased(EMT):
    """A model that is EMT plus a smooth error: a constant force error and a harmonic energy error."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        x = self.atoms.positions
        self.results["energy"] += 0.02 * x[:, 0].sum() + 0.01 * ((x - x.mean(0)) ** 2).sum() * 1e-3
        self.results["forces"] = self.results["forces"] - 0.02 * np.array([1.0, 0, 0]) - 2e-5 * (x - x.mean(0))
        self.results["free_energy"] = self.results["energy"]


@pytest.fixture(scope="module")
def slab():
    return c_cu100()


def test_matches_the_oracle_at_the_anchor(slab):
    anchor = labelled(rattled(slab, 0.05, seed=1))
    calc = AnchoredCalculator(Biased(), anchor)
    probe = anchor.copy()
    probe.calc = calc
    assert probe.get_potential_energy() == pytest.approx(anchor.get_potential_energy(), abs=1e-10)
    np.testing.assert_allclose(probe.get_forces(apply_constraint=False), anchor.get_forces(apply_constraint=False),
                               atol=1e-10)


def test_forces_are_minus_the_energy_gradient(slab):
    anchor = labelled(rattled(slab, 0.05, seed=2))
    atoms = rattled(slab, 0.05, seed=3)
    atoms.calc = AnchoredCalculator(Biased(), anchor)
    forces = atoms.get_forces(apply_constraint=False)
    h = 1e-5
    for i, k in ((len(atoms) - 1, 2), (9, 0), (10, 1)):
        shifted = []
        for sign in (1, -1):
            moved = atoms.copy()
            moved.positions[i, k] += sign * h
            moved.calc = atoms.calc
            shifted.append(moved.get_potential_energy())
        assert -(shifted[0] - shifted[1]) / (2 * h) == pytest.approx(forces[i, k], abs=1e-5)


def test_refining_a_biased_model_converges_on_the_oracle(slab):
    """Relaxed with the biased model alone, the minimum is off (oracle fmax ~ the 0.02 eV/Å bias
    on every atom); anchored on a near-minimum label, the same model lands on the oracle's minimum."""
    near = simulate.relax(slab, EMT(), simulate.RelaxSettings(fmax=0.2)).final
    anchor = labelled(near)
    assert 0.03 < oracle_fmax(anchor) < 0.2

    def oracle_fmax_at(atoms):
        return oracle_fmax(labelled(atoms))

    plain = simulate.relax(near, Biased(), simulate.RelaxSettings(fmax=0.005)).final
    refined = simulate.relax(near, AnchoredCalculator(Biased(), anchor), simulate.RelaxSettings(fmax=0.005)).final
    assert oracle_fmax_at(plain) > 0.015
    assert oracle_fmax_at(refined) < 0.5 * oracle_fmax_at(plain)
    assert oracle_fmax_at(refined) < 0.03


def test_best_anchor_is_the_lowest_oracle_fmax_below_the_threshold(slab):
    labels = [labelled(rattled(slab, s, seed=4)) for s in (0.2, 0.02, 0.1)]
    fmax = [oracle_fmax(a) for a in labels]
    assert best_anchor(labels, below=10.0) is labels[int(np.argmin(fmax))]
    assert best_anchor(labels, below=min(fmax) * 0.99) is None
    assert best_anchor([], below=1.0) is None
