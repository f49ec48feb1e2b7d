"""The Explore step's choice of what to label: NEB rounds reuse a labelled initial state nearby."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from ase.calculators.emt import EMT
from ase.io import write

from alflow import campaign as steps
from alflow.constraints import free_mask
from alflow.oracles import compute_label
from alflow.simulate import SimulationResult, snapshot
from alflow.spec import load_spec
from alflow.store import Store
from alflow.systems import o_cu100_neb_endpoints

mongomock = pytest.importorskip("mongomock")


def seeded_neb(tmp_path, within: float | None, endpoint_gap: float | None = None):
    initial, final = o_cu100_neb_endpoints()
    write(tmp_path / "initial.traj", initial)
    write(tmp_path / "final.traj", final)
    learner = {"query": {"strategy": "neb", "samples": 1, "endpoints": "initial"},
               "stop": {"energy_tol": 0.01, "barrier_tol": 0.01, "max_iterations": 5}}
    if within is not None:
        learner["reuse_initial_within"] = within
    if endpoint_gap is not None:
        learner["stop"]["endpoint_gap"] = endpoint_gap
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "name": "neb", "system": {"initial": "initial.traj", "final": "final.traj"},
        "simulation": {"kind": "neb", "images": 1}, "oracle": {"kind": "emt"}, "learner": learner}))
    spec = load_spec(tmp_path / "spec.yaml")
    store = Store(mongomock.MongoClient()["alflow"])
    steps.start(store, spec)
    campaign = store.campaign("neb")
    seeds = [c.to_dict() for c in steps.seed_candidates(campaign)]
    steps.merge(store, campaign, 0, [{"candidate": c, "result": compute_label(steps.structure_from_dict(c["structure"]),
                                                                              spec.oracle)} for c in seeds], [])
    return store, store.campaign("neb"), initial, final


def band_from(initial, final, moved: float) -> SimulationResult:
    """A 3-structure band (EMT stands in for the model) whose initial state is the seed's, with
    the O atom moved by ``moved`` Å along z."""
    start = initial.copy()
    start.positions[-1, 2] += moved
    middle = initial.copy()
    middle.positions = 0.5 * (initial.positions + final.positions)
    band = []
    for atoms in (start, middle, final.copy()):
        atoms.calc = EMT()
        band.append(snapshot(atoms))
    return SimulationResult(frames=band, final=band[1], converged=True, steps=1, band=band)


def test_initial_state_within_tolerance_borrows_the_label_with_a_first_order_shift(tmp_path):
    store, campaign, initial, final = seeded_neb(tmp_path, within=0.01)
    seed_hash = steps.structure_hash(initial)
    result = band_from(initial, final, moved=0.004)
    picks, key = steps.choose(store, campaign, result, 1)
    assert [c.frame for c in picks] == [1]  # the saddle only: the initial state is not paid for
    ref = key.prediction["initial"]
    assert ref["hash"] == seed_hash and ref["reused_within"] == pytest.approx(0.004)
    # the shifted seed energy stands for the oracle at the band's own initial state
    exact = result.band[0].copy()
    exact.calc = EMT()
    seed = store.label(seed_hash, campaign["oracle_hash"])
    assert abs(seed["energy"] + ref["oracle_energy_shift"] - exact.get_potential_energy()) < 2e-4
    assert abs(ref["oracle_energy_shift"]) > 5e-4  # the correction mattered (seed not a minimum)
    # merged: the round's oracle barrier is the saddle's label minus the shifted seed energy
    saddle = picks[0]
    computed = [{"candidate": saddle.to_dict(),
                 "result": compute_label(steps.structure_from_dict(saddle.structure), {"kind": "emt"})}]
    outcome = steps.merge(store, campaign, 1, computed, [], key.to_dict())
    middle = result.band[1].copy()
    middle.calc = EMT()
    exact_barrier = middle.get_potential_energy() - exact.get_potential_energy()
    assert outcome.metrics["barrier_oracle"] == pytest.approx(exact_barrier, abs=2e-4)
    assert store.iterations("neb")[-1]["metrics"]["barrier_oracle"] == outcome.metrics["barrier_oracle"]
    # the oracle's fmax at the band's initial state: the borrowed label's (its forces, 0.004 Å away)
    free = free_mask(initial)
    assert outcome.metrics["initial_fmax_oracle"] == pytest.approx(np.linalg.norm(seed["forces"], axis=1)[free].max())
    campaign = store.campaign("neb")
    # beyond the tolerance, or without the option, the initial state is labelled
    picks, key = steps.choose(store, campaign, band_from(initial, final, moved=0.05), 1)
    assert [c.frame for c in picks] == [0] and key.prediction["initial"]["hash"] != seed_hash  # saddle labelled
    store, campaign, initial, final = seeded_neb(tmp_path, within=None)
    picks, _ = steps.choose(store, campaign, band_from(initial, final, moved=0.004), 1)
    assert [c.frame for c in picks] == [0, 1]


def test_reuse_initial_within_is_for_neb_only(tmp_path):
    from alflow.spec import SpecError
    from alflow.systems import c_cu100

    write(tmp_path / "start.traj", c_cu100())
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "name": "r", "system": {"structure": "start.traj"}, "simulation": {"kind": "relax"},
        "oracle": {"kind": "emt"}, "learner": {"reuse_initial_within": 0.01, "stop": {"fmax": 0.05}}}))
    with pytest.raises(SpecError, match=r"spec.yaml: learner.reuse_initial_within: NEB campaigns only"):
        load_spec(tmp_path / "spec.yaml")


def test_equivalent_endpoints_the_model_disagrees_on_are_both_labelled_and_hold_back_convergence(tmp_path):
    """``learner.stop.endpoint_gap`` with ``endpoints: initial``: a band whose endpoint energies
    differ by more than it labels the final state too, records the gap, and does not converge."""
    store, campaign, initial, final = seeded_neb(tmp_path, within=None, endpoint_gap=0.01)
    result = band_from(initial, final, moved=0.3)  # the initial state's O 0.3 Å up: energies apart
    moved_final = result.band[-1].copy()  # a final state not labelled yet (the seeds are)
    moved_final.positions[-1, 2] += 0.01
    moved_final.calc = EMT()
    result.band[-1] = result.frames[-1] = snapshot(moved_final)
    gap = abs(result.band[0].get_potential_energy() - result.band[-1].get_potential_energy())
    assert gap > 0.1
    picks, key = steps.choose(store, campaign, result, 1)
    assert sorted(c.frame for c in picks) == [0, 1, 2]  # the final state as well
    assert key.prediction["endpoint_gap"] == pytest.approx(gap)
    computed = [{"candidate": c.to_dict(), "result": compute_label(steps.structure_from_dict(c.structure),
                                                                     {"kind": "emt"})} for c in picks]
    outcome = steps.merge(store, campaign, 1, computed, [], key.to_dict())
    assert outcome.metrics["endpoint_gap"] == pytest.approx(gap)
    assert not outcome.decision.converged and "final state below its initial state" in outcome.decision.reason
    # endpoints the model agrees on (the O translated by a surface lattice vector, hollow to
    # hollow): the final state is left out, as before
    result = band_from(initial, final, moved=0.02)
    equivalent = result.band[0].copy()
    equivalent.positions[-1, 0] += equivalent.cell[0, 0] / 2
    equivalent.calc = EMT()
    result.band[-1] = result.frames[-1] = snapshot(equivalent)
    picks, key = steps.choose(store, store.campaign("neb"), result, 2)
    assert [c.frame for c in picks] == [0] and key.prediction["endpoint_gap"] < 1e-6  # the saddle: labelled above
    # a final state above the initial one (its relaxation stopped short, the O 0.3 Å up): no
    # well there, so it is left out and the gap is 0
    stalled = equivalent.copy()
    stalled.positions[-1, 2] += 0.3
    stalled.calc = EMT()
    assert stalled.get_potential_energy() > result.band[0].get_potential_energy() + 0.1
    result.band[-1] = result.frames[-1] = snapshot(stalled)
    picks, key = steps.choose(store, store.campaign("neb"), result, 2)
    assert [c.frame for c in picks] == [0] and key.prediction["endpoint_gap"] == 0.0
    # a final-state energy that is not a number: the final state is labelled and no gap recorded
    result.band[-1].calc.results["energy"] = float("nan")
    picks, key = steps.choose(store, store.campaign("neb"), result, 2)
    assert [c.frame for c in picks] == [0, 2] and "endpoint_gap" not in key.prediction


@pytest.mark.parametrize("learner, message", [
    ({"query": {"strategy": "neb", "samples": 1}}, "applies only to an offline NEB between equivalent endpoints"),
    ({"kind": "online", "query": {"strategy": "neb", "samples": 1, "endpoints": "initial"}}, "applies only to"),
])
def test_endpoint_gap_needs_equivalent_endpoints_offline(tmp_path, learner, message):
    from alflow.spec import SpecError

    initial, final = o_cu100_neb_endpoints()
    write(tmp_path / "initial.traj", initial)
    write(tmp_path / "final.traj", final)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "name": "neb", "system": {"initial": "initial.traj", "final": "final.traj"},
        "simulation": {"kind": "neb", "images": 1}, "oracle": {"kind": "emt"},
        "learner": {**learner, "stop": {"energy_tol": 0.01, "endpoint_gap": 0.01}}}))
    with pytest.raises(SpecError, match=rf"spec.yaml: learner.stop.endpoint_gap: {message}"):
        load_spec(tmp_path / "spec.yaml")


def test_a_round_s_calls_are_cut_to_the_budget_left_key_first(tmp_path):
    store, campaign, initial, final = seeded_neb(tmp_path, within=None)  # the seed paid 2
    band = band_from(initial, final, moved=0.2)
    candidates, key = steps.choose(store, campaign, band, 1)
    to_compute, _ = steps.split_cached(store, campaign, candidates)
    initial_hash = key.prediction["initial"]["hash"]
    assert {c.hash for c in to_compute} == {key.hash, initial_hash}
    everything = [c.hash for c in to_compute]
    for budget, kept in ((3, [key.hash]), (4, everything), (None, everything)):
        stop = dict(campaign["spec"]["learner"]["stop"])
        if budget is not None:
            stop["max_oracle_calls"] = budget
        limited = {**campaign, "spec": {**campaign["spec"], "learner": {**campaign["spec"]["learner"], "stop": stop}}}
        assert [c.hash for c in steps.within_budget(limited, to_compute, key)] == kept


def test_diversity_queries_frames_far_apart_in_the_model_s_descriptor_space(tmp_path):
    from alflow.simulate import RelaxSettings, relax
    from alflow.systems import c_cu100

    write(tmp_path / "start.traj", c_cu100())
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "name": "d", "system": {"structure": "start.traj"}, "simulation": {"kind": "relax"}, "oracle": {"kind": "emt"},
        "learner": {"query": {"strategy": "diversity", "samples": 2}, "stop": {"fmax": 0.03}}}))
    store = Store(mongomock.MongoClient()["alflow"])
    steps.start(store, load_spec(tmp_path / "spec.yaml"))
    result = relax(c_cu100(), EMT(), RelaxSettings(steps=12))  # EMT stands in for the model
    for frame in result.frames:
        frame.info["uncertainty"] = 0.1
    candidates, key = steps.choose(store, store.campaign("d"), result, 1)
    picks = [c.frame for c in candidates if c.role == "query"]
    assert len(picks) == 2 and len(set(picks)) == 2 and key.hash in {c.hash for c in candidates}
    # farthest-point: the second pick is the frame farthest from the first (equal uncertainties)
    x = steps.frame_features(result.frames, steps.SymmetryFunctions(["Cu", "C"]))
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    assert picks[1] == int(np.argmax(np.linalg.norm(x - x[picks[0]], axis=1)))


def test_the_seed_round_keeps_to_a_budget_below_its_structures(tmp_path):
    store, campaign, *_ = seeded_neb(tmp_path, within=None)
    seeds = steps.seed_candidates(campaign)
    stop = {**campaign["spec"]["learner"]["stop"], "max_oracle_calls": 1}
    fresh = {**campaign, "counters": {**campaign["counters"], "oracle_calls": 0},
             "spec": {**campaign["spec"], "learner": {**campaign["spec"]["learner"], "stop": stop}}}
    assert [c.hash for c in steps.within_budget(fresh, seeds, None)] == [seeds[0].hash]  # the initial state
