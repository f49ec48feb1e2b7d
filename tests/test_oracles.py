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


def test_merge_counts_a_rejected_structure_as_failed_not_paid(tmp_path):
    mongomock = pytest.importorskip("mongomock")
    from ase.io import write

    from alflow import campaign as steps
    from alflow.spec import load_spec
    from alflow.store import Store

    write(tmp_path / "start.traj", c_cu100())
    (tmp_path / "spec.yaml").write_text(
        "name: reject\nsystem: {structure: start.traj}\nsimulation: {kind: relax}\noracle: {kind: emt}\n"
        "learner: {stop: {fmax: 0.05, max_iterations: 2}}\n")
    spec = load_spec(tmp_path / "spec.yaml")
    store = Store(mongomock.MongoClient()["alflow"])
    campaign = steps.start(store, spec)
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
