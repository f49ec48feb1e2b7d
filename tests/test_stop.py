"""Stop criteria: convergence on oracle-verified quantities, budgets with exactly n rounds."""

from __future__ import annotations

import numpy as np
import pytest

from alflow.stop import StopCriteria, StopState, evaluate, max_force


# ----------------------------------------------------------------------------- max_force


def test_max_force_is_per_atom_norm_not_component():
    forces = np.array([[0.03, 0.03, 0.0], [0.01, 0.0, 0.0]])
    assert max_force(forces) == pytest.approx(0.03 * np.sqrt(2))
    assert np.abs(forces).max() < 0.04 < max_force(forces)  # the original code's test would pass


def test_max_force_ignores_fixed_atoms():
    forces = np.array([[1.0, 0.0, 0.0], [0.0, 0.02, 0.0]])
    assert max_force(forces, np.array([False, True])) == pytest.approx(0.02)
    assert max_force(forces, np.array([False, False])) == 0.0
    with pytest.raises(ValueError):
        max_force(forces, np.array([1, 0]))
    with pytest.raises(ValueError):
        max_force(np.zeros(3))


# ----------------------------------------------------------------------------- relax


def test_relax_converges_on_oracle_fmax_norm():
    crit = StopCriteria.from_dict({"fmax": 0.04, "max_iterations": 50})
    fmax_norm = max_force(np.array([[0.03, 0.03, 0.0]]))
    d = evaluate(crit, StopState(iteration=3, kind="relax", oracle_calls=10, final_fmax_oracle=fmax_norm))
    assert not d.done and not d.converged
    d = evaluate(crit, StopState(iteration=3, kind="relax", oracle_calls=10, final_fmax_oracle=0.021))
    assert d.done and d.converged
    assert "0.021" in d.reason and "0.04" in d.reason and "predicted minimum" in d.reason


def test_relax_boundary_is_inclusive():
    crit = StopCriteria(fmax=0.03)
    assert evaluate(crit, StopState(0, "relax", 1, final_fmax_oracle=0.03)).converged


def test_relax_without_oracle_label_is_not_converged():
    crit = StopCriteria(fmax=0.05)
    d = evaluate(crit, StopState(iteration=0, kind="relax", oracle_calls=3, final_fmax_oracle=None))
    assert not d.done and not d.converged
    d = evaluate(crit, StopState(iteration=0, kind="relax", oracle_calls=3, final_fmax_oracle=float("nan")))
    assert not d.done


# ----------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_max_iterations_gives_exactly_n_query_rounds(n):
    crit = StopCriteria.from_dict({"max_iterations": n, "fmax": 0.03})
    rounds, iteration = 0, 0
    while True:
        rounds += 1  # train → simulate → query → label → merge
        d = evaluate(crit, StopState(iteration=iteration, kind="relax", oracle_calls=2 * rounds, final_fmax_oracle=1.0))
        if d.done:
            break
        iteration += 1
        assert rounds < 100
    assert rounds == n
    assert not d.converged
    assert f"max_iterations = {n}" in d.reason and "oracle fmax 1 > 0.03" in d.reason


def test_oracle_call_budget_stops_without_converging():
    crit = StopCriteria(max_oracle_calls=20, fmax=0.03)
    assert not evaluate(crit, StopState(4, "relax", 19, final_fmax_oracle=0.1)).done
    d = evaluate(crit, StopState(5, "relax", 21, final_fmax_oracle=0.1))
    assert d.done and not d.converged
    assert "max_oracle_calls = 20" in d.reason and "21" in d.reason


def test_convergence_wins_over_budget():
    crit = StopCriteria(max_iterations=1, fmax=0.03)
    d = evaluate(crit, StopState(0, "relax", 5, final_fmax_oracle=0.01))
    assert d.done and d.converged


# ----------------------------------------------------------------------------- neb, md


def test_neb_saddle_energy_tolerance():
    crit = StopCriteria.from_dict({"energy_tol": 0.05}, kind="neb")
    assert not evaluate(crit, StopState(1, "neb", 8, saddle_energy_error=0.08)).done
    assert not evaluate(crit, StopState(1, "neb", 8)).done
    d = evaluate(crit, StopState(2, "neb", 11, saddle_energy_error=0.02))
    assert d.converged and "saddle" in d.reason


def test_neb_barrier_tolerance_needs_both_errors_when_both_are_given():
    crit = StopCriteria.from_dict({"energy_tol": 0.01, "barrier_tol": 0.01}, kind="neb")
    assert not evaluate(crit, StopState(1, "neb", 8, saddle_energy_error=0.005, barrier_error=0.026)).done
    assert not evaluate(crit, StopState(1, "neb", 8, saddle_energy_error=0.005)).done  # no initial-state label
    d = evaluate(crit, StopState(2, "neb", 11, saddle_energy_error=0.004, barrier_error=-0.009))
    assert d.converged and "barrier error 0.009" in d.reason
    with pytest.raises(ValueError, match="barrier_tol.*neb"):
        StopCriteria.from_dict({"barrier_tol": 0.01}, kind="relax")


def test_neb_saddle_fmax_is_the_oracles_force_at_the_predicted_saddle():
    """Matched energies can agree with the oracle's on a climbing image off its saddle: the oracle's
    own forces there tell."""
    crit = StopCriteria.from_dict({"energy_tol": 0.01, "saddle_fmax": 0.1}, kind="neb")
    assert not evaluate(crit, StopState(1, "neb", 8, saddle_energy_error=0.001, saddle_fmax_oracle=0.3)).done
    assert not evaluate(crit, StopState(1, "neb", 8, saddle_energy_error=0.001)).done
    assert not evaluate(crit, StopState(1, "neb", 8, saddle_energy_error=0.02, saddle_fmax_oracle=0.05)).done
    d = evaluate(crit, StopState(2, "neb", 11, saddle_energy_error=0.004, saddle_fmax_oracle=0.1))
    assert d.converged and "oracle fmax at the saddle 0.1 ≤ 0.1 eV/Å" in d.reason
    with pytest.raises(ValueError, match="saddle_fmax.*neb"):
        StopCriteria.from_dict({"saddle_fmax": 0.1}, kind="relax")


def test_neb_initial_fmax_is_the_oracles_force_at_the_bands_initial_state():
    """The barrier is measured from the band's initial state: with ``initial_fmax`` the oracle must
    find it relaxed too, and a round without its label cannot converge."""
    crit = StopCriteria.from_dict({"energy_tol": 0.01, "saddle_fmax": 0.1, "initial_fmax": 0.05}, kind="neb")
    good = dict(saddle_energy_error=0.002, saddle_fmax_oracle=0.04)
    assert not evaluate(crit, StopState(3, "neb", 9, **good, initial_fmax_oracle=0.2)).done
    assert not evaluate(crit, StopState(3, "neb", 9, **good)).done
    d = evaluate(crit, StopState(3, "neb", 9, **good, initial_fmax_oracle=0.03))
    assert d.converged and "oracle fmax at the initial state 0.03 ≤ 0.05 eV/Å" in d.reason
    with pytest.raises(ValueError, match="initial_fmax.*neb"):
        StopCriteria.from_dict({"initial_fmax": 0.1}, kind="md")


def test_neb_endpoint_gap_holds_back_a_band_running_downhill():
    """Equivalent endpoints (the final state never labelled): every oracle test can pass at a
    'saddle' next to the initial state on a band that runs 1.4 eV downhill into a spurious well
    at the final state (measured); the model's endpoint energies must then agree too."""
    crit = StopCriteria.from_dict({"energy_tol": 0.01, "barrier_tol": 0.01, "saddle_fmax": 0.1,
                                   "endpoint_gap": 0.01}, kind="neb")
    good = dict(saddle_energy_error=0.0017, barrier_error=0.0006, saddle_fmax_oracle=0.069)
    d = evaluate(crit, StopState(11, "neb", 25, **good, endpoint_gap=1.406))
    assert not d.done and "model's final state below its initial state by 1.406 > 0.01 eV" in d.reason
    assert not evaluate(crit, StopState(11, "neb", 25, **good)).done  # not known: not converged
    assert evaluate(crit, StopState(11, "neb", 25, **good, endpoint_gap=0.004)).converged
    with pytest.raises(ValueError, match="endpoint_gap.*neb"):
        StopCriteria.from_dict({"endpoint_gap": 0.01}, kind="relax")


def test_md_validation_needs_every_given_threshold():
    crit = StopCriteria(energy_mae=0.05, force_mae=0.04)
    ok = {"energy_mae": 0.05, "force_mae": 0.039}
    assert evaluate(crit, StopState(5, "md", 300, validation=ok)).converged
    assert not evaluate(crit, StopState(5, "md", 300, validation={"energy_mae": 0.01, "force_mae": 0.06})).done
    assert not evaluate(crit, StopState(5, "md", 300)).done
    only_f = StopCriteria(force_mae=0.04)
    assert evaluate(only_f, StopState(5, "md", 300, validation={"force_mae": 0.03})).converged
    with pytest.raises(ValueError, match="energy_mae"):
        evaluate(crit, StopState(5, "md", 300, validation={"force_mae": 0.03}))


# ----------------------------------------------------------------------------- spec validation


def test_unknown_key_rejected_naming_it_and_allowed_keys():
    with pytest.raises(ValueError, match="fmx") as err:
        StopCriteria.from_dict({"fmx": 0.03})
    assert "fmax" in str(err.value) and "max_oracle_calls" in str(err.value)


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"fmax": 0.0}, "fmax"),
        ({"fmax": -0.1}, "fmax"),
        ({"energy_tol": float("nan")}, "energy_tol"),
        ({"max_iterations": 0}, "max_iterations"),
        ({"max_iterations": 2.5}, "max_iterations"),
        ({"max_oracle_calls": -3}, "max_oracle_calls"),
        ({"force_mae": True}, "force_mae"),
    ],
)
def test_bad_values_rejected_naming_the_field(spec, field):
    with pytest.raises(ValueError, match=field):
        StopCriteria.from_dict(spec)


def test_at_least_one_criterion_and_kind_match():
    with pytest.raises(ValueError, match="at least one"):
        StopCriteria.from_dict({})
    with pytest.raises(ValueError, match="fmax"):
        StopCriteria.from_dict({"fmax": 0.03}, kind="md")
    crit = StopCriteria.from_dict({"max_iterations": 3}, kind="md")
    assert crit.max_iterations == 3
    with pytest.raises(ValueError, match="relax"):
        evaluate(StopCriteria(fmax=0.03), StopState(0, "neb", 1))


def test_state_validation():
    with pytest.raises(ValueError, match="kind"):
        StopState(0, "relaxation", 0)
    with pytest.raises(ValueError, match="iteration"):
        StopState(-1, "relax", 0)


def test_md_validation_counts_only_when_the_ml_md_ran_all_steps():
    crit = StopCriteria(energy_mae=0.05, force_mae=0.04)
    ok = {"energy_mae": 0.01, "force_mae": 0.01}
    d = evaluate(crit, StopState(5, "md", 300, validation=ok, simulation_complete=False))
    assert not d.done and "stopped before its last step" in d.reason
    assert evaluate(crit, StopState(5, "md", 300, validation=ok, simulation_complete=True)).converged
    assert evaluate(crit, StopState(5, "md", 300, validation=ok)).converged  # not known: the errors decide
