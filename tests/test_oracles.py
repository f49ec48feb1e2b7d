"""Oracle labels: results, recorded failures, and unphysical structures refused before paying."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from ase.calculators.emt import EMT

from alflow.oracles import compute_label
from alflow.overlaps import OverlappingAtomsError, find_overlap
from alflow.systems import c_cu100

sys.path.insert(0, str(Path(__file__).parent))  # flaky_oracle


def fused(gap: float = 0.6):
    """C/Cu(100) with the carbon pushed onto the Cu atom below it (``gap`` Å apart)."""
    atoms = c_cu100()
    c = atoms.get_chemical_symbols().index("C")
    cu = np.argmin([atoms.get_distance(c, k) if k != c else np.inf for k in range(len(atoms))])
    atoms.positions[c] = atoms.positions[cu] + [0.0, 0.0, gap]
    return atoms, c, cu


def test_label_matches_emt():
    atoms = c_cu100()
    result = compute_label(atoms, {"kind": "emt"})
    ref = atoms.copy()
    ref.calc = EMT()
    assert result["status"] == "ok"
    assert result["energy"] == pytest.approx(ref.get_potential_energy(), abs=1e-12)
    np.testing.assert_allclose(result["forces"], ref.get_forces(apply_constraint=False), atol=1e-12)


def test_a_stress_the_oracle_computed_is_kept():
    from ase.build import bulk

    atoms = bulk("Cu", cubic=True) * (2, 2, 2)
    atoms.rattle(0.05, seed=1)
    atoms.cell *= 1.02
    ref = atoms.copy()
    ref.calc = EMT()
    result = compute_label(atoms, {"kind": "emt"})  # EMT computes it with the forces of a periodic cell
    np.testing.assert_allclose(result["stress"], ref.get_stress(), atol=1e-12)


def test_forces_of_the_wrong_shape_are_a_failed_label_not_a_crash_at_the_merge():
    result = compute_label(c_cu100(), {"kind": "python", "callable": "flaky_oracle:misshapen_emt"})
    assert result["status"] == "failed" and result["failure_class"] == "exception"
    assert result["reason"] == "ValueError: the oracle returned forces of shape (9, 3) for 13 atoms"


def test_overlapping_structure_is_rejected_without_calling_the_oracle(tmp_path):
    atoms, c, cu = fused()
    counter = tmp_path / "calls.txt"
    oracle = {"kind": "python", "callable": "flaky_oracle:counting_emt", "kwargs": {"counter": str(counter)}}
    result = compute_label(atoms, oracle)
    assert result["status"] == "rejected" and result["failure_class"] == "unphysical"
    assert f"atoms {min(c, cu)}" in result["reason"] and "0.600 Å apart" in result["reason"]
    assert not counter.exists()  # nothing was paid
    atoms.positions[c, 2] += 1.2  # 1.8 Å: a real (if strained) contact is labelled
    assert find_overlap(atoms) is None
    assert compute_label(atoms, oracle)["status"] == "ok" and counter.exists()


def test_an_atom_on_its_own_periodic_image_or_a_periodic_axis_without_cell_is_rejected():
    from ase import Atoms

    assert "overlapping" in find_overlap(Atoms("Cu", cell=[0.3, 3.0, 3.0], pbc=True))
    assert "without a cell vector" in find_overlap(Atoms("H2", positions=[[0, 0, 0], [0.74, 0, 0]], pbc=True))
    assert find_overlap(Atoms("Cu", cell=[2.6, 2.6, 2.6], pbc=True)) is None


def test_find_overlap_sees_periodic_images_and_isolated_molecules():
    from ase.build import molecule

    co = molecule("CO")
    assert find_overlap(co) is None
    co.positions[1] = co.positions[0] + [0.0, 0.0, 0.5]
    assert "0.500 Å apart" in find_overlap(co)
    atoms = c_cu100()  # two Cu atoms 0.5 Å apart only across the periodic cell edge
    a = atoms.cell.array[0]
    atoms.positions[1] = atoms.positions[0] + a - 0.5 * a / np.linalg.norm(a)
    assert "0.500 Å apart" in find_overlap(atoms)


def test_calculator_refuses_atoms_that_close_in_within_the_skin(trained):
    atoms, c, cu = fused(gap=1.1)  # above the limit 0.5 x (r_C + r_Cu) = 1.04 Å: the graph is built here
    atoms.calc = trained.calculator(skin=0.3)
    atoms.get_potential_energy()
    atoms.positions[c, 2] -= 0.1  # 1.0 Å after moving less than skin / 2: the kept graph is reused
    with pytest.raises(OverlappingAtomsError, match="overlapping atoms"):
        atoms.get_potential_energy()


def new_campaign(tmp_path, name: str, learner: str = ""):
    """A relax campaign on C/Cu(100) with the EMT oracle in a fresh mongomock store: (store, spec)."""
    mongomock = pytest.importorskip("mongomock")
    from ase.io import write

    from alflow import campaign as steps
    from alflow.spec import load_spec
    from alflow.store import Store

    write(tmp_path / "start.traj", c_cu100())
    (tmp_path / "spec.yaml").write_text(
        f"name: {name}\nsystem: {{structure: start.traj}}\nsimulation: {{kind: relax}}\noracle: {{kind: emt}}\n"
        f"learner: {{stop: {{fmax: 0.05, max_iterations: 5}}{learner}}}\n")
    spec = load_spec(tmp_path / "spec.yaml")
    store = Store(mongomock.MongoClient()["alflow"])
    steps.start(store, spec)
    return store, spec


def test_merge_counts_a_rejected_structure_as_failed_not_paid(tmp_path):
    from alflow import campaign as steps

    store, spec = new_campaign(tmp_path, "reject")
    campaign = store.campaign("reject")
    computed = []
    for atoms, role in ((c_cu100(), "seed"), (fused()[0], "query")):
        cand = steps.Candidate.of(atoms, role)
        computed.append({"candidate": cand.to_dict(), "result": compute_label(atoms, spec.oracle)})
    outcome = steps.merge(store, campaign, 0, computed, [])
    assert (outcome.paid, outcome.failed) == (1, 1)
    assert store.campaign("reject")["counters"]["oracle_calls"] == 1
    statuses = sorted(d["status"] for d in store.labels(campaign="reject"))
    assert statuses == ["ok", "rejected"]
    assert len(steps.training_images(store, store.campaign("reject"))) == 1  # never trained on


def test_too_many_failures_in_a_round_stop_the_campaign(tmp_path):
    from alflow import campaign as steps

    store, spec = new_campaign(tmp_path, "broken", ", max_failures_per_iteration: 1")

    def round_of(iteration, n_failed, n_rejected=0):
        computed = []
        for k in range(n_failed + n_rejected + 1):
            atoms = c_cu100()
            atoms.rattle(0.05, seed=100 * iteration + k)
            result = compute_label(atoms, spec.oracle)
            if k < n_failed:
                result = {"status": "failed", "failure_class": "scf", "reason": "SCF not converged", "seconds": 1.0}
            elif k < n_failed + n_rejected:
                atoms = fused()[0]
                atoms.rattle(0.01, seed=k)
                result = compute_label(atoms, spec.oracle)
            computed.append({"candidate": steps.Candidate.of(atoms, "query").to_dict(), "result": result})
        return steps.merge(store, store.campaign("broken"), iteration, computed, [])

    round_of(0, 0)
    assert not round_of(1, 1, n_rejected=2).decision.done  # 1 failure (rejections are not the oracle's)
    outcome = round_of(2, 2)
    assert outcome.decision.done and not outcome.decision.converged
    assert "2 oracle calls failed in round 2" in outcome.decision.reason
    assert "max_failures_per_iteration = 1" in outcome.decision.reason
