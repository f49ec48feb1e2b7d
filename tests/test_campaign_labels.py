"""A round's label bookkeeping: which cached failures are paid again, what a round counts as paid,
reused and failed, one label per structure, the key always labelled, the training set recorded."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from alflow import campaign as steps
from alflow.online import StoreOracle
from alflow.oracles import compute_label, failures
from alflow.simulate import SimulationResult
from alflow.spec import load_spec
from alflow.store import Store
from alflow.systems import c_cu100

mongomock = pytest.importorskip("mongomock")

TIMEOUT = {"status": "failed", "failure_class": "timeout", "reason": "past timeout_s = 10", "seconds": 10.0}
SCF = {"status": "failed", "failure_class": "scf", "reason": "SCF did not converge", "seconds": 40.0}


def relax_campaign(tmp_path, name: str, store=None, learner: dict | None = None, model: dict | None = None):
    """A started C/Cu(100) relax campaign (EMT) on ``store`` (a new embedded one if None), not seeded."""
    write(tmp_path / "start.traj", c_cu100())
    learner = learner or {"query": {"strategy": "relax_final", "samples": 0}, "stop": {"fmax": 0.03, "max_iterations": 5}}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({
        "name": name, "system": {"structure": "start.traj"}, "simulation": {"kind": "relax"},
        "oracle": {"kind": "emt"}, "model": model or {"epochs": 3}, "learner": learner}))
    store = store or Store(mongomock.MongoClient()["alflow"])
    steps.start(store, load_spec(tmp_path / f"{name}.yaml"))
    return store, store.campaign(name)


def seed_with(store, campaign, result: dict | None = None):
    """Round 0 with ``result`` for every start (None: the oracle's own) through split_cached and merge."""
    to_compute, reused = steps.split_cached(store, campaign, steps.seed_candidates(campaign))
    computed = [{"candidate": c.to_dict(), "result": result or compute_label(
        steps.structure_from_dict(c.structure), campaign["spec"]["oracle"])} for c in to_compute]
    return to_compute, reused, steps.merge(store, campaign, 0, computed, reused)


@pytest.mark.parametrize("cls, retried", [("crash", True), ("timeout", True), ("exception", True),
                                          ("scf", False), ("nonfinite", False)])
def test_only_failures_another_attempt_may_pass_are_retried_and_at_most_three_times(cls, retried):
    failed = {"status": "failed", "failure_class": cls}
    assert failures.worth_retrying(failed) is retried
    assert not failures.worth_retrying({**failed, "history": [{}, {}]})  # three attempts paid
    assert not failures.worth_retrying({"status": "rejected", "failure_class": "unphysical"})
    assert not failures.worth_retrying({"status": "ok"})


def test_a_timed_out_label_is_paid_again_by_the_next_campaign_and_the_attempt_kept(tmp_path):
    store, a = relax_campaign(tmp_path, "a")
    _, _, outcome = seed_with(store, a, TIMEOUT)
    assert outcome.decision.done and not outcome.decision.converged  # nothing to train on
    _, b = relax_campaign(tmp_path, "b", store)
    to_compute, reused, outcome = seed_with(store, b)
    assert len(to_compute) == 1 and reused == []
    assert outcome.decision.reason == "seed labels stored" and outcome.paid == 1
    label = store.label(to_compute[0].hash, b["oracle_hash"])
    assert label["status"] == "ok" and [h["failure_class"] for h in label["history"]] == ["timeout"]
    assert failures.attempts(label) == 2


def test_a_failure_that_would_fail_again_is_reused_and_not_counted_as_this_rounds_failure(tmp_path):
    store, a = relax_campaign(tmp_path, "a")
    seed_with(store, a, SCF)
    learner = {"query": {"strategy": "relax_final", "samples": 0}, "max_failures_per_iteration": 0,
               "stop": {"fmax": 0.03, "max_iterations": 5}}
    _, b = relax_campaign(tmp_path, "b", store, learner)
    to_compute, reused, outcome = seed_with(store, b)
    assert to_compute == [] and len(reused) == 1
    # reused, not paid: no oracle call failed in this round, so the failure limit (0) does not stop it;
    # the campaign ends because its start has no label
    assert (outcome.paid, outcome.reused, outcome.failed) == (0, 1, 0)
    assert outcome.decision.reason == "no starting structure could be labelled by the oracle"
    assert store.campaign("b")["counters"]["failed_labels"] == 0


def test_a_structure_asked_for_twice_in_a_round_is_one_label(tmp_path):
    store, a = relax_campaign(tmp_path, "a")
    seed_with(store, a)
    _, b = relax_campaign(tmp_path, "b", store)
    seed_with(store, b)  # reuses a's label of the start
    b = store.campaign("b")
    x = steps.structure_from_dict(b["start_structures"][0])
    x.positions[-1, 2] -= 0.4
    steps.store_label(store, a, 1, x, steps.Candidate.of(x, "query").to_dict(), compute_label(x, a["spec"]["oracle"]))
    oracle = StoreOracle(store, b, 1)  # online: asked inline, then as the relaxation's end (the key)
    oracle.label(steps.Candidate.of(x, "online"), x)
    key = steps.Candidate.of(x.copy(), "final")
    oracle.label(key, x)
    assert len(oracle.reused) == 1
    outcome = steps.merge(store, b, 1, [], oracle.reused + oracle.reused, key.to_dict(), stored=oracle.stored)
    b = store.campaign("b")
    assert len(b["label_ids"]) == len(set(b["label_ids"])) == 2
    assert outcome.reused == 1 and b["counters"]["reused_labels"] == 2  # the start's (round 0) and x
    assert len(steps.training_images(store, b)) == 2


def fake_relaxation(campaign, uncertainties) -> SimulationResult:
    """An ML relaxation whose uncertainty falls as the carbon goes down 0.2 Å per frame."""
    frames = []
    for k, u in enumerate(uncertainties):
        atoms = steps.structure_from_dict(campaign["start_structures"][0])
        atoms.positions[-1, 2] -= 0.2 * k
        atoms.calc = SinglePointCalculator(atoms, energy=-float(k), forces=np.zeros((len(atoms), 3)))
        atoms.calc.results["uncertainty"] = u
        frames.append(atoms)
    return SimulationResult(frames=frames, final=frames[-1], converged=True, steps=len(frames) - 1)


def test_the_predicted_minimum_is_labelled_whatever_the_strategy_picks(tmp_path):
    learner = {"query": {"strategy": "max_uncertainty", "samples": 1}, "stop": {"fmax": 0.03, "max_iterations": 5}}
    store, c = relax_campaign(tmp_path, "u", learner=learner)
    seed_with(store, c)
    c = store.campaign("u")
    candidates, key = steps.choose(store, c, fake_relaxation(c, [0.5, 0.9, 0.2, 0.1, 0.05]), 1)
    assert [x.frame for x in candidates if x.role == "query"] == [1]  # the most uncertain frame
    assert [x.hash for x in candidates if x.role == "final"] == [key.hash]  # and the minimum, for the stop test
    computed = [{"candidate": x.to_dict(), "result": compute_label(steps.structure_from_dict(x.structure),
                                                                   c["spec"]["oracle"])} for x in candidates]
    outcome = steps.merge(store, c, 1, computed, [], key.to_dict())
    assert outcome.metrics["final_fmax_oracle"] > 0.03 and "no oracle label" not in outcome.decision.reason
    # relax_final picks the minimum itself: nothing added
    (tmp_path / "f").mkdir()
    store, c = relax_campaign(tmp_path / "f", "f")
    seed_with(store, c)
    c = store.campaign("f")
    candidates, key = steps.choose(store, c, fake_relaxation(c, [0.5, 0.9, 0.2]), 1)
    assert [x.hash for x in candidates] == [key.hash] and candidates[0].role == "query"


def test_a_model_records_the_labels_it_was_trained_on(tmp_path):
    store, c = relax_campaign(tmp_path, "t")
    seed_with(store, c)
    c = store.campaign("t")
    x = steps.structure_from_dict(c["start_structures"][0])
    x.positions[-1, 2] -= 0.3
    cand = steps.Candidate.of(x, "query").to_dict()
    steps.merge(store, c, 1, [{"candidate": cand, "result": SCF}], [])
    c = store.campaign("t")
    assert len(c["label_ids"]) == 2
    _, model_id = steps.train(store, c, 2)
    doc = store.db.models.find_one({"_id": model_id})
    assert doc["training_labels"] == [store.label(steps.seed_candidates(c)[0].hash, c["oracle_hash"])["_id"]]
    assert doc["n_training_labels"] == 1


def test_an_online_rerun_goes_on_after_the_last_merged_round(tmp_path):
    from alflow.online import run_online

    learner = {"kind": "online", "threshold": 0.3, "stop": {"fmax": 0.05, "max_iterations": 3}}
    store, c = relax_campaign(tmp_path, "o", learner=learner, model={"ensemble": 2, "epochs": 3, "warm_epochs": 3})
    seed_with(store, c)
    for it in (1, 2):  # two rounds merged before the learner's process was killed in round 3
        steps.merge(store, store.campaign("o"), it, [], [])
    outcome, _, _ = run_online(store, store.campaign("o"), 1)  # the firework's own iteration: 1
    iterations = {d["iteration"]: d for d in store.db.iterations.find({"campaign": "o"})}
    assert sorted(iterations) == [0, 1, 2, 3]
    assert iterations[1]["metrics"]["oracle_calls"] == iterations[2]["metrics"]["oracle_calls"] == 0  # not rewritten
    assert iterations[3]["metrics"]["oracle_calls"] >= 1 and outcome.decision.done


def test_a_merge_run_twice_counts_its_round_once(tmp_path):
    store, c = relax_campaign(tmp_path, "m")
    to_compute, _, _ = seed_with(store, c)
    computed = [{"candidate": x.to_dict(), "result": compute_label(steps.structure_from_dict(x.structure),
                                                                   c["spec"]["oracle"])} for x in to_compute]
    again = steps.merge(store, store.campaign("m"), 0, computed, [])  # e.g. the merge firework rerun
    assert again.paid == 1 and store.campaign("m")["counters"]["oracle_calls"] == 1
    assert len(store.campaign("m")["label_ids"]) == 1


def test_a_round_with_nothing_new_to_label_stops_the_campaign(tmp_path):
    """A round whose query finds every structure labelled (e.g. an ML MD whose atoms fused right
    after its labelled first frame) gives the next round the same training set: the campaign stops
    (it ran such empty rounds up to max_iterations)."""
    store, c = relax_campaign(tmp_path, "m")
    seed_with(store, c)
    empty = steps.merge(store, store.campaign("m"), 1, [], [])
    assert empty.decision.done and not empty.decision.converged
    assert "round 1 had nothing new to label" in empty.decision.reason
    assert store.campaign("m")["counters"]["oracle_calls"] == 1


def test_a_merge_rerun_does_not_add_an_attempt_to_a_failed_label(tmp_path):
    """Its round's failed result stored again is the same attempt: the label stays worth retrying."""
    store, c = relax_campaign(tmp_path, "m")
    to_compute, _, _ = seed_with(store, c, TIMEOUT)
    label = store.label(to_compute[0].hash, c["oracle_hash"])
    assert failures.attempts(label) == 1
    for _ in range(2):  # the merge firework rerun twice
        steps.merge(store, store.campaign("m"), 0, [{"candidate": to_compute[0].to_dict(), "result": TIMEOUT}], [])
    label = store.label(to_compute[0].hash, c["oracle_hash"])
    assert failures.attempts(label) == 1 and failures.worth_retrying(label)
    assert store.campaign("m")["counters"]["oracle_calls"] == 1


@pytest.mark.parametrize("failure, offered", [(TIMEOUT, True), (SCF, False)])
def test_a_campaign_asks_again_for_its_own_structure_whose_label_may_pass_another_attempt(tmp_path, failure, offered):
    """Its timed-out start is a frame to query again (and so its NEB barrier reference, or its
    relax minimum, can still get a label); its start whose SCF did not converge is not."""
    learner = {"query": {"strategy": "max_uncertainty", "samples": 1}, "stop": {"fmax": 0.03, "max_iterations": 5}}
    store, c = relax_campaign(tmp_path, "t", learner=learner)
    seed_with(store, c, failure)
    c = store.campaign("t")
    candidates, _ = steps.choose(store, c, fake_relaxation(c, [0.9, 0.5, 0.1]), 1)
    assert [x.frame for x in candidates if x.role == "query"] == ([0] if offered else [1])
    to_compute, reused = steps.split_cached(store, c, candidates)
    assert (to_compute[0].frame == 0) is offered and reused == []
