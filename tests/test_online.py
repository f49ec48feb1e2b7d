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
