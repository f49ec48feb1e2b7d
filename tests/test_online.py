"""Online learning: the oracle answers where the ensemble is unsure, the model learns from it,
failures fall back to the model, and the call budget holds.

(How many oracle calls it saves depends on the ensemble's uncertainty calibration; that is
measured by the campaign benchmarks, not asserted here.)"""

from __future__ import annotations

import numpy as np
import pytest

from alflow.demo import emt_labelled
from alflow.model import DeltaPotential, TrainingSettings
from alflow.online import OnlineLearner
from alflow.systems import c_cu100


def learner(threshold=0.05, oracle=emt_labelled, **kwargs) -> OnlineLearner:
    pot = DeltaPotential(["Cu", "C"], ensemble=3, seed=0, training=TrainingSettings(epochs=40, warm_epochs=15))
    return OnlineLearner(pot, [], oracle, threshold=threshold, **kwargs)


def test_oracle_failures_fall_back_to_the_model_and_are_recorded():
    calls = []

    def flaky(atoms):
        calls.append(1)
        return None if len(calls) == 3 else emt_labelled(atoms)

    calc = learner(threshold=1e-6, oracle=flaky, max_oracle_calls=4)  # unsure everywhere
    atoms = c_cu100()
    atoms.calc = calc
    for step in range(6):
        atoms.positions[12, 2] -= 0.05
        atoms.get_forces()
    assert calc.oracle_calls == 4 == len(calls)  # the budget is respected
    assert len(calc.failures) == 1 and len(calc.training) == 3
    assert np.isfinite(atoms.calc.results["uncertainty"])  # later steps answered by the model


def test_first_structure_needs_the_oracle():
    calc = learner(oracle=lambda atoms: None)
    atoms = c_cu100()
    atoms.calc = calc
    with pytest.raises(RuntimeError, match="oracle failed on the first structure"):
        atoms.get_potential_energy()


def test_oracle_answers_where_unsure_and_the_model_learns():
    calc = learner(threshold=0.05)
    atoms = c_cu100()
    atoms.calc = calc
    first = atoms.get_forces(apply_constraint=False).copy()  # no model yet: the oracle answers
    reference = emt_labelled(atoms).calc.results["forces"]
    assert calc.oracle_calls == 1 and np.allclose(first, reference)
    assert calc.potential.is_trained and len(calc.training) == 1
    atoms.positions[12, 2] -= 0.3  # far from the single label: unsure, the oracle answers again
    atoms.get_forces()
    assert calc.oracle_calls == 2 and len(calc.training) == 2


def test_a_labelled_structure_is_answered_by_its_label_and_images_share_the_learner():
    calc = learner(threshold=1e3)  # sure everywhere once trained
    atoms = c_cu100()
    atoms.calc = calc
    atoms.get_forces()  # no model yet: the oracle answers and the model is trained
    moved = atoms.copy()
    moved.positions[12, 2] -= 0.2
    moved.calc = calc.fork()
    ml = moved.get_forces(apply_constraint=False).copy()
    assert calc.oracle_calls == 1  # the fork asked the shared learner, which was sure
    assert not np.allclose(ml, emt_labelled(moved).calc.results["forces"], atol=1e-3)
    again = c_cu100()  # the labelled structure itself: its label, exactly, with no new call
    again.calc = calc.fork()
    assert np.allclose(again.get_forces(apply_constraint=False), emt_labelled(again).calc.results["forces"])
    assert calc.oracle_calls == 1 and again.calc.results["uncertainty"] == 0.0


def _online_campaign(tmp_path, system: dict, simulation: dict, stop: dict):
    import mongomock
    import yaml

    from alflow import campaign as steps
    from alflow.oracles import compute_label
    from alflow.spec import load_spec
    from alflow.store import Store

    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "name": "o", "system": system, "simulation": simulation, "oracle": {"kind": "emt"},
        "model": {"ensemble": 2, "epochs": 10, "warm_epochs": 3},
        "learner": {"kind": "online", "threshold": 1e-6, "stop": stop}}))
    spec = load_spec(tmp_path / "spec.yaml")
    store = Store(mongomock.MongoClient()["alflow"])
    steps.start(store, spec)
    campaign = store.campaign("o")
    steps.merge(store, campaign, 0, [{"candidate": c.to_dict(), "result": compute_label(
        steps.structure_from_dict(c.structure), spec.oracle)} for c in steps.seed_candidates(campaign)], [])
    return store, store.campaign("o")


def test_online_checks_stay_within_max_oracle_calls(tmp_path):
    from ase.io import write

    from alflow.online import run_online

    write(tmp_path / "s.traj", c_cu100())
    store, campaign = _online_campaign(tmp_path, {"structure": "s.traj"}, {"kind": "relax", "steps": 15},
                                       {"fmax": 0.001, "max_oracle_calls": 4})
    outcome, _, _ = run_online(store, campaign, 1)  # a threshold that asks the oracle at every step
    assert store.campaign("o")["counters"]["oracle_calls"] == 4  # the learner left the key check its call
    assert "reached max_oracle_calls = 4 (4 oracle calls paid)" in outcome.decision.reason


def test_online_neb_checks_the_model_s_own_saddle_energy_and_the_barrier(tmp_path):
    from ase.io import write

    from alflow.online import run_online
    from alflow.systems import o_cu100_neb_endpoints

    initial, final = o_cu100_neb_endpoints()
    write(tmp_path / "i.traj", initial)
    write(tmp_path / "f.traj", final)
    store, campaign = _online_campaign(tmp_path, {"initial": "i.traj", "final": "f.traj"},
                                       {"kind": "neb", "images": 1, "steps": 3},
                                       {"barrier_tol": 0.5, "max_iterations": 2})
    outcome, key, _ = run_online(store, campaign, 1)
    label = store.label(key["hash"], campaign["oracle_hash"])
    # the saddle was labelled inline, so the learner's answer there is the oracle's; the check
    # takes the model's own prediction, which is not
    assert key["prediction"]["energy"] != label["energy"]
    assert outcome.metrics["saddle_energy_error"] == abs(key["prediction"]["energy"] - label["energy"]) > 0
    assert outcome.metrics["barrier_error"] >= 0 and "initial" in key["prediction"]


def test_a_nan_uncertainty_asks_the_oracle():
    """A diverged member makes the ensemble's spread NaN: that is not confidence."""
    calc = learner(threshold=0.05)
    atoms = c_cu100()
    atoms.calc = calc
    atoms.get_forces()  # no model yet: the oracle answers
    real = calc._ml_results
    calc._ml_results = lambda a: {**real(a), "uncertainty": float("nan")}
    atoms.positions[12, 2] -= 0.01
    atoms.get_forces()
    assert calc.oracle_calls == 2


def test_an_online_relaxation_goes_below_the_stop_fmax_whatever_simulation_fmax_says(tmp_path, monkeypatch):
    """Each round relaxes on from the last checked minimum, which the learner answers with its
    label: with simulation.fmax 0.05 a minimum checked at 0.04 (above the stop's 0.03) would end
    the next relaxation at once, and the campaign would stop having learned nothing."""
    from ase.io import write

    from alflow import simulate
    from alflow.online import run_online

    write(tmp_path / "s.traj", c_cu100())
    store, campaign = _online_campaign(tmp_path, {"structure": "s.traj"}, {"kind": "relax", "fmax": 0.05, "steps": 2},
                                       {"fmax": 0.03, "max_iterations": 1})
    used, relax = [], simulate.relax
    monkeypatch.setattr(simulate, "relax", lambda atoms, calc, settings: used.append(settings.fmax) or
                        relax(atoms, calc, settings))
    run_online(store, campaign, 1)
    assert used == [0.03]
