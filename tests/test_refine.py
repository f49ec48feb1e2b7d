"""Oracle-matched refinement (alflow.refine): exact at the anchor, conservative, and it turns an
accurate-but-not-exact model into a step that converges on the oracle."""

from __future__ import annotations

import numpy as np
import pytest
from ase.calculators.calculator import all_changes
from ase.calculators.emt import EMT
from ase.calculators.fd import calculate_numerical_forces

from alflow import simulate
from alflow.demo import emt_labelled as labelled
from alflow.refine import AnchoredCalculator, MatchedCalculator, best_anchors, oracle_fmax
from alflow.systems import c_cu100, o_cu100_neb_endpoints


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


def assert_forces_are_minus_the_energy_gradient(atoms):
    """Central differences (ASE's, 1e-5 Å) against the calculator's forces on the carbon and two
    free copper atoms, every Cartesian component."""
    sites = [len(atoms) - 1, 9, 10]
    forces = atoms.get_forces(apply_constraint=False)[sites]
    np.testing.assert_allclose(calculate_numerical_forces(atoms, eps=1e-5, iatoms=sites), forces, atol=1e-5)


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
    assert_forces_are_minus_the_energy_gradient(atoms)


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


def test_best_anchors_are_the_lowest_oracle_fmax_below_the_threshold(slab):
    labels = [labelled(rattled(slab, s, seed=4)) for s in (0.2, 0.02, 0.1)]
    fmax = [oracle_fmax(a) for a in labels]
    order = [labels[k] for k in np.argsort(fmax)]
    assert best_anchors(labels, below=10.0) == order[:1]
    assert best_anchors(labels, below=10.0, n=2) == order[:2]
    assert best_anchors(labels, below=sorted(fmax)[1] * 0.99, n=3) == order[:1]
    assert best_anchors(labels, below=min(fmax) * 0.99) == []
    assert best_anchors([], below=1.0) == []


class Stiff(EMT):
    """EMT plus a curvature error on the carbon: a harmonic well of 3 eV/Å² around ``centre``."""

    def __init__(self, centre, **kwargs):
        super().__init__(**kwargs)
        self.centre = np.asarray(centre, dtype=float)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        d = self.atoms.positions[-1] - self.centre
        self.results["energy"] += 1.5 * float(d @ d)
        self.results["forces"] = self.results["forces"].copy()
        self.results["forces"][-1] -= 3.0 * d
        self.results["free_energy"] = self.results["energy"]


def test_a_partner_is_matched_exactly_and_the_anchor_still_is(slab):
    a, b = labelled(rattled(slab, 0.05, seed=1)), labelled(rattled(slab, 0.05, seed=5))
    fixed = np.abs(a.positions - b.positions).sum(1) == 0
    assert fixed.sum() == 4  # the bottom layer never moves: its force errors are left alone
    calc = AnchoredCalculator(Biased(), a, partners=[b])
    for label in (a, b):
        probe = label.copy()
        probe.calc = calc
        np.testing.assert_allclose(probe.get_forces(apply_constraint=False)[~fixed],
                                   label.get_forces(apply_constraint=False)[~fixed], atol=1e-10)
    probe = a.copy()
    probe.calc = calc
    assert probe.get_potential_energy() == pytest.approx(a.get_potential_energy(), abs=1e-10)
    three = AnchoredCalculator(Biased(), a, partners=[b, labelled(rattled(slab, 0.05, seed=6))])
    probe.positions = b.positions  # with two partners, the first is the exact one
    probe.calc = three
    np.testing.assert_allclose(probe.get_forces(apply_constraint=False)[~fixed],
                               b.get_forces(apply_constraint=False)[~fixed], atol=1e-10)


def test_the_secant_term_keeps_forces_minus_the_energy_gradient(slab):
    a = labelled(rattled(slab, 0.05, seed=2))
    partners = [labelled(rattled(slab, 0.05, seed=k)) for k in (7, 8)]
    atoms = rattled(slab, 0.05, seed=3)
    atoms.calc = AnchoredCalculator(Stiff(slab.positions[-1]), a, partners=partners)
    assert_forces_are_minus_the_energy_gradient(atoms)


def test_a_second_anchor_corrects_the_models_curvature(slab):
    """A model whose curvature is wrong (a 3 eV/Å² well on the carbon, centred on its start 3 Å
    above the surface, far from the minimum), matched at a near-minimum label ``a``: its relaxation
    lands closer to the oracle's minimum when it is also matched at ``b``, the label one oracle BFGS
    step earlier. Three near-minimum labels (oracle fmax 0.15, 0.13, 0.04 eV/Å)."""
    model = Stiff(slab.positions[-1])
    ratios = []
    for fmax in (0.3, 0.15, 0.08):
        steps = simulate.relax(slab, EMT(), simulate.RelaxSettings(fmax=fmax)).frames
        b, a = labelled(steps[-2]), labelled(steps[-1])

        def landing(partners):
            r = simulate.relax(a, AnchoredCalculator(model, a, partners=partners), simulate.RelaxSettings(fmax=0.005))
            return oracle_fmax(labelled(r.final))

        ratios.append(landing([b]) / landing([]))
    assert max(ratios) < 0.9 and min(ratios) < 0.5, ratios


# ---------------------------------------------------------------------------------------------
# MatchedCalculator: a NEB band's model matched to the oracle near every label


def test_matched_model_is_the_oracle_at_every_label_and_the_model_far_away(slab):
    labels = [labelled(rattled(slab, 0.05, seed=k)) for k in (11, 12, 13)]
    calc = MatchedCalculator(Biased(), labels, within=0.5)
    for label in labels:
        probe = label.copy()
        probe.calc = calc
        assert probe.get_potential_energy() == pytest.approx(label.get_potential_energy(), abs=1e-10)
        np.testing.assert_allclose(probe.get_forces(apply_constraint=False), label.get_forces(apply_constraint=False),
                                   atol=1e-10)
    far = slab.copy()
    far.positions[-1, 2] += 1.0  # the carbon 1 Å higher: > 0.5 Å from every label
    far.calc = calc
    model = far.copy()
    model.calc = Biased()
    assert far.get_potential_energy() == model.get_potential_energy()
    np.testing.assert_array_equal(far.get_forces(apply_constraint=False), model.get_forces(apply_constraint=False))


def test_matched_forces_are_minus_the_energy_gradient_between_labels(slab):
    a, b = labelled(rattled(slab, 0.05, seed=14)), labelled(rattled(slab, 0.05, seed=15))
    atoms = slab.copy()
    atoms.positions = 0.6 * a.positions + 0.4 * b.positions
    calc = MatchedCalculator(Biased(), [a, b], within=1.0)
    delta, _ = calc.correction(atoms)
    assert abs(delta) > 1e-3  # both labels weigh in here
    atoms.calc = calc
    assert_forces_are_minus_the_energy_gradient(atoms)


class Lifted(EMT):
    """EMT plus a curvature error in the adsorbate's height: ½ k (z − z0)² on the last atom."""

    def __init__(self, z0, k=0.3, **kwargs):
        super().__init__(**kwargs)
        self.z0, self.k = z0, k

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        dz = self.atoms.positions[-1, 2] - self.z0
        self.results["energy"] += 0.5 * self.k * dz * dz
        self.results["forces"] = self.results["forces"].copy()
        self.results["forces"][-1, 2] -= self.k * dz
        self.results["free_energy"] = self.results["energy"]


def test_matching_moves_a_biased_models_saddle_onto_the_oracles():
    """O hopping between hollow sites of Cu(100). A model that pulls the O towards 0.3 Å above the
    oracle's saddle height (0.3 eV/Å², the same on either bridge) lowers the barrier by ~0.04 eV
    and puts its climbing image off the oracle's saddle. Matched at the oracle's labels of a
    loosely converged band (NEB fmax 0.3 eV/Å: near the path, not on it), the same model's
    climbing image lands where the oracle's forces nearly vanish, and its barrier is the oracle's."""
    initial, final = o_cu100_neb_endpoints()
    settings = simulate.NEBSettings(images=3, climb=True, fmax=0.02)
    exact = simulate.neb(initial, final, EMT, settings)
    rough = simulate.neb(initial, final, EMT, simulate.NEBSettings(images=3, climb=True, fmax=0.3))
    labels = [labelled(image) for image in rough.band]
    z0 = exact.final.positions[-1, 2] + 0.3
    plain = simulate.neb(initial, final, lambda: Lifted(z0), settings)
    matched = simulate.neb(initial, final, lambda: MatchedCalculator(Lifted(z0), labels, within=0.5), settings)

    def barrier(result):
        return result.final.get_potential_energy() - result.band[0].get_potential_energy()

    reference = labelled(exact.final).get_potential_energy() - labelled(exact.band[0]).get_potential_energy()
    assert abs(barrier(plain) - reference) > 0.02
    assert oracle_fmax(labelled(plain.final)) > 0.05
    assert oracle_fmax(labelled(matched.final)) < 0.5 * oracle_fmax(labelled(plain.final))
    assert abs(barrier(matched) - reference) < 0.005


def test_a_refined_relaxation_that_runs_away_is_redone_at_the_best_label_alone(slab):
    """A secant term built from a partner whose force errors differ wildly from the anchor's over a
    short step (a model that fits neither label: the QE campaign that ran away from the same two
    anchors for 16 rounds) gives the matched surface no minimum; the round then relaxes matched
    at the best label alone, and says so."""
    from alflow import campaign as steps

    anchor = labelled(rattled(slab, 0.03, seed=21))
    partner = anchor.copy()
    partner.positions[-1] += (0.02, 0.0, 0.0)  # 0.02 Å apart, forces 5 eV/Å apart on every free atom
    probe = partner.copy()
    probe.calc = EMT()
    forces = probe.get_forces(apply_constraint=False) + np.array([0.0, 5.0, 0.0])
    partner.calc = type(anchor.calc)(partner, energy=probe.get_potential_energy(), forces=forces)
    campaign = {"kind": "relax", "start_structures": [steps.structure_to_dict(slab)],
                "spec": {"simulation": {"fmax": 0.03, "steps": 300}, "learner": {"refine_fmax": 0.01}}}
    settings = simulate.RelaxSettings(fmax=0.01, steps=300)
    wild = simulate.relax(anchor, AnchoredCalculator(EMT(), anchor, partners=[partner]), settings)
    assert not wild.converged  # the two-anchor surface has no minimum to reach
    result = steps.run_simulation(EMT, campaign, 3, anchors=[anchor, partner])
    assert result.converged and result.info["refinement_anchors"] == 1
    alone = simulate.relax(anchor, AnchoredCalculator(EMT(), anchor), settings)
    np.testing.assert_allclose(result.final.positions, alone.final.positions, atol=1e-8)
    assert oracle_fmax(labelled(result.final)) < 0.01 + 1e-9  # EMT is the model and the oracle here
    good = steps.run_simulation(EMT, campaign, 3, anchors=[anchor, labelled(rattled(slab, 0.03, seed=22))])
    assert good.converged and good.info["refinement_anchors"] == 2


def test_refining_relaxes_below_the_stop_fmax_whatever_simulation_fmax_says(slab):
    """A best label between the stop's fmax (0.03) and the relaxation's (0.05, no refine_fmax)
    would pass as relaxed at step 0 where the model is matched to it: the round would return the
    label itself, already paid, and the campaign would never get below the stop."""
    from alflow import campaign as steps

    loose = simulate.relax(slab, EMT(), simulate.RelaxSettings(fmax=0.045)).final
    anchor = labelled(loose)
    assert 0.03 < oracle_fmax(anchor) < 0.05
    campaign = {"kind": "relax", "start_structures": [steps.structure_to_dict(slab)],
                "spec": {"simulation": {"fmax": 0.05, "steps": 300},
                         "learner": {"refine_fmax": None, "stop": {"fmax": 0.03}}}}
    assert steps.refine_fmax(campaign["spec"]) == 0.03
    result = steps.run_simulation(EMT, campaign, 3, anchors=[anchor])
    assert result.steps > 0 and oracle_fmax(labelled(result.final)) <= 0.03
