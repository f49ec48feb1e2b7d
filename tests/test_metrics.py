"""The paper's metrics, on structures with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms

from alflow.metrics import barrier, structure_error


def test_structure_error_is_the_mean_l1_displacement():
    a = Atoms("CuCuC", positions=[[0, 0, 0], [2.5, 0, 0], [1.2, 1.2, 2.0]])
    b = a.copy()
    b.positions[0] += [0.1, -0.2, 0.0]  # |Δ|₁ = 0.3
    b.positions[2] += [0.0, 0.0, -0.6]  # |Δ|₁ = 0.6
    assert structure_error(a, b) == pytest.approx(0.3)
    assert structure_error(b, a) == structure_error(a, b) and structure_error(a, a) == 0.0
    with pytest.raises(ValueError, match="differ in atoms"):
        structure_error(a, Atoms("CuCuO", positions=a.positions))


def test_barrier_from_the_initial_state():
    assert barrier([-1.0, -0.8, -0.87, -1.1]) == pytest.approx(0.2)
    assert barrier(np.array([0.0, -0.1])) == 0.0  # downhill: the initial state is the maximum
