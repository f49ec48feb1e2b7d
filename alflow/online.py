"""Online active learning: an ASE calculator that learns while a simulation runs.

The ensemble answers while it is sure. When the uncertainty (max over free atoms of the per-atom
force standard deviation, eV/Å) exceeds ``threshold``, or while there is no model yet, the oracle
answers instead; its label joins the training set and the ensemble is refit, warm-started from
its current weights (not retrained from scratch). Any ASE simulation (relax, NEB, MD) can run
with it.

The threshold must sit above the ensemble's own spread on its training data: with the default
5-member ensemble that spread is ~0.1 eV/Å on the C/Cu(100) slab, so the paper's 0.05 eV/Å
calls the oracle at every step (measured; calibrating the uncertainty is open work).
"""

from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from alflow import campaign as steps
from alflow import stop
from alflow.model import DeltaPotential
from alflow.oracles import compute_label, failures
from alflow.store.hashing import structure_hash

#: Returns the structure with the oracle's energy and forces attached, or None if the oracle failed.
Oracle = Callable[[Atoms], Atoms | None]


class OnlineLearner(Calculator):
    """ML ensemble that calls the oracle where it is unsure (see module docstring).

    ``training``: labelled structures so far (grown in place). ``oracle_calls`` counts calls
    made here; ``failures`` lists the uncertainties at which the oracle failed (the ML answer is
    used then, and the simulation goes on). ``max_oracle_calls`` caps the calls (None: no cap).
    """

    implemented_properties = ["energy", "free_energy", "forces", "uncertainty"]

    def __init__(
        self,
        potential: DeltaPotential,
        training: Sequence[Atoms],
        oracle: Oracle,
        threshold: float = 0.05,
        max_oracle_calls: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if threshold <= 0:
            raise ValueError(f"threshold must be positive (eV/Å), got {threshold}")
        self.potential = potential
        self.training = list(training)
        self.oracle = oracle
        self.threshold = float(threshold)
        self.max_oracle_calls = max_oracle_calls
        self.oracle_calls = 0
        self.failures: list[float] = []
        self._ml = potential.calculator() if potential.is_trained else None
        self._labelled: dict[str, Atoms] = {}
        for atoms in self.training:
            self._labelled[structure_hash(atoms)] = atoms

    def labelled_hashes(self) -> set[str]:
        """Structure hashes of every labelled structure the learner holds."""
        return set(self._labelled)

    def _add(self, labelled: Atoms) -> None:
        self.training.append(labelled)
        self._labelled[structure_hash(labelled)] = labelled

    @staticmethod
    def _label_results(labelled: Atoms, uncertainty: float) -> dict:
        energy = labelled.get_potential_energy()
        forces = np.array(labelled.get_forces(apply_constraint=False))
        return {"energy": energy, "free_energy": energy, "forces": forces, "uncertainty": uncertainty}

    def fork(self) -> "Calculator":
        """A calculator for one more image (NEB) that learns into this learner: ASE gives every
        image its own calculator instance, the learning state is shared."""
        return _SharedLearner(self)

    def _ml_results(self, atoms: Atoms) -> dict | None:
        if self._ml is None:
            return None
        self._ml.calculate(atoms, ["energy", "forces"], all_changes)
        return dict(self._ml.results)

    def _budget_left(self) -> bool:
        return self.max_oracle_calls is None or self.oracle_calls < self.max_oracle_calls

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        known = self._labelled.get(structure_hash(self.atoms))
        if known is not None:  # a structure with a label is answered by it: exact, and never paid twice
            self.results = self._label_results(known, 0.0)
            return
        ml = self._ml_results(self.atoms)
        unsure = ml is None or not ml["uncertainty"] <= self.threshold  # NaN (a diverged member): unsure
        if unsure and self._budget_left():
            self.oracle_calls += 1
            labelled = self.oracle(self.atoms.copy())
            if labelled is not None:
                self._add(labelled)
                self.potential.fit(self.training, warm_start=True)
                if self._ml is None:
                    self._ml = self.potential.calculator()
                self.results = self._label_results(labelled, np.inf if ml is None else ml["uncertainty"])
                return
            self.failures.append(np.inf if ml is None else ml["uncertainty"])
            if ml is None:
                raise RuntimeError("the oracle failed on the first structure: no model to fall back on")
        if ml is None:
            raise RuntimeError("no model yet and the oracle-call budget is spent")
        self.results = {k: ml[k] for k in ("energy", "free_energy", "forces", "uncertainty")}


class _SharedLearner(Calculator):
    """Delegates to one :class:`OnlineLearner` (see :meth:`OnlineLearner.fork`)."""

    implemented_properties = OnlineLearner.implemented_properties

    def __init__(self, learner: OnlineLearner):
        super().__init__()
        self.learner = learner

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.learner.calculate(self.atoms, properties, all_changes)
        self.results = dict(self.learner.results)


# ---------------------------------------------------------------------------------------------
# the online campaign step (one firework: alflow.fw.tasks.OnlineTask)


class StoreOracle:
    """The oracle as the online learner calls it: label cache first, then the oracle, and every new
    label stored at once (a crash mid-simulation loses nothing that was paid for).

    ``stored`` / ``reused``: [{"label_id", "candidate"}] for :func:`alflow.campaign.merge`.
    """

    def __init__(self, store, campaign: Mapping, iteration: int):
        self.store, self.campaign, self.iteration = store, campaign, iteration
        self.stored: list[dict] = []
        self.reused: list[dict] = []
        self.rejected = 0  # unphysical structures refused before calling the oracle

    def label(self, cand: steps.Candidate, atoms: Atoms | None = None) -> dict:
        """The label document of the candidate's structure (``atoms``, if given): cached or computed now."""
        c = self.campaign
        item = {"candidate": cand.to_dict()}
        doc = self.store.label(cand.hash, c["oracle_hash"])
        if doc is not None and str(doc["_id"]) in {x["label_id"] for x in self.stored + self.reused}:
            return doc  # asked again this round (e.g. the key check of a structure labelled inline): one label
        if doc is not None and not failures.worth_retrying(doc):
            # paid by this very round before a crash and a rerun (stored, not merged yet): still this
            # round's call, not a reuse from the cache
            own = (doc.get("campaign"), doc.get("iteration")) == (c["name"], self.iteration) \
                and doc["_id"] not in c["label_ids"]
            (self.stored if own else self.reused).append({"label_id": str(doc["_id"]), **item})
            self.rejected += own and doc["status"] == "rejected"
            return doc
        atoms = steps.structure_from_dict(cand.structure) if atoms is None else atoms
        result = compute_label(atoms, c["spec"]["oracle"])
        doc = steps.store_label(self.store, c, self.iteration, atoms, item["candidate"], result)
        self.rejected += result["status"] == "rejected"
        self.store.checkpoint()  # paid: on disk before the simulation goes on
        self.stored.append({"label_id": str(doc["_id"]), **item})
        return doc

    def __call__(self, atoms: Atoms) -> Atoms | None:
        doc = self.label(steps.Candidate.of(atoms, "online"), atoms)
        return self.store.label_atoms(doc) if doc["status"] == "ok" else None

    def paid(self) -> int:
        return len(self.stored) - self.rejected


def _ml_prediction(pot: DeltaPotential, atoms: Atoms) -> dict:
    p = pot.predict(atoms)[0]
    return {"energy": p.energy, "forces": p.forces.tolist(), "uncertainty": p.uncertainty}


def run_online(store, campaign: Mapping, iteration: int = 1):
    """Online active learning from round ``iteration`` until the stop criterion holds.

    Each round runs the whole simulation with an :class:`OnlineLearner` (the ensemble, warm-started
    across rounds, calls the oracle inline above ``learner.threshold``). Then the oracle checks the
    round's key structure, exactly as offline: the relaxed minimum (fmax) or the saddle (energy
    error of the ML prediction); MD labels ``query.samples`` frames as validation. A round that
    does not meet the criterion adds those labels and runs again (relax: from the last minimum).
    Returns (MergeOutcome, key Candidate dict or None, trajectory id) of the last round.
    """
    name, kind = campaign["name"], campaign["kind"]
    spec = campaign["spec"]
    # rerun after a kill (the firework's ``iteration`` is where it began): go on after the last merged round
    iteration = max(int(iteration), int(campaign.get("iteration") or 0) + 1)
    criteria = stop.StopCriteria.from_dict(spec["learner"]["stop"], kind)
    starts = [steps.structure_from_dict(s) for s in campaign["start_structures"]]
    training = steps.training_images(store, campaign)
    pot = steps.new_potential(campaign, iteration).fit(training)
    # the round's checks after the simulation: key structure (NEB: and its initial state), or MD's validation
    checks = {"relax": 1, "neb": 2, "md": spec["learner"]["query"]["samples"]}[kind]
    # a relaxation goes on from the last round's checked minimum, which the learner answers with its
    # label: relaxed only to a simulation.fmax above the stop's, it would end there at once
    relax_fmax = steps.refine_fmax(spec) if kind == "relax" else None
    while True:
        oracle = StoreOracle(store, campaign, iteration)
        budget = criteria.remaining_oracle_calls(campaign["counters"]["oracle_calls"])
        # the learner leaves the checks their calls, so that max_oracle_calls holds with them
        learner = OnlineLearner(pot, training, oracle, spec["learner"]["threshold"],
                                max_oracle_calls=None if budget is None else max(budget - checks, 0))

        def affordable() -> bool:
            return budget is None or oracle.paid() < budget
        start = time.perf_counter()
        simulated = campaign if relax_fmax is None else {**campaign, "spec": {
            **campaign["spec"], "simulation": {**campaign["spec"]["simulation"], "fmax": relax_fmax}}}
        result = steps.run_simulation(learner.fork, simulated, iteration, starts)
        frames = result.band if kind == "neb" else result.frames
        trajectory = store.save_trajectory(frames, name, iteration, kind)
        store.record_iteration(name, iteration, steps.simulation_metrics(result, time.perf_counter() - start),
                               trajectory=trajectory)
        key = None
        if kind in ("relax", "neb") and not result.stopped and affordable():
            # the model's own prediction, not the learner's answer (the oracle's, where it was called inline)
            key_cand = steps.Candidate.of(result.final, "final")
            key_cand.prediction = _ml_prediction(pot, result.final)
            if kind == "neb":  # the barrier is measured from the band's initial state, as offline
                initial = steps.Candidate.of(frames[0], "query", 0)
                initial.prediction = _ml_prediction(pot, frames[0])
                key_cand.prediction["initial"] = initial.to_dict()
            oracle.label(key_cand, result.final)
            key = key_cand.to_dict()
            if kind == "neb" and affordable():
                oracle.label(initial, frames[0])
        elif kind == "md":
            # validation frames: unseen by the learner, with the model's prediction (not the learner's answer)
            picks, _ = steps.choose(store, campaign, result, iteration, also_labelled=learner.labelled_hashes())
            for c in picks:
                if not affordable():
                    break
                atoms = steps.structure_from_dict(c.structure)
                c.prediction = _ml_prediction(pot, atoms)
                oracle.label(c, atoms)
        outcome = steps.merge(store, campaign, iteration, [], oracle.reused, key, stored=oracle.stored)
        print(f"{name}: online round {iteration}: {result.steps} steps, {oracle.paid()} oracle calls; "
              f"{outcome.decision.reason}", flush=True)
        if outcome.decision.done:
            return outcome, key, str(trajectory)
        if not oracle.paid():  # every structure of the round was known: another round would repeat it
            outcome.decision = stop.StopDecision(True, False, f"stopped without converging: round {iteration} "
                                                 "learned nothing new (no oracle call)")
            return outcome, key, str(trajectory)
        # not there yet: learn from the checks too, and (relax) carry on from the last minimum
        campaign = store.campaign(name)
        training = steps.training_images(store, campaign)
        pot.fit(training, warm_start=True)
        if kind == "relax" and key is not None:
            starts = [steps.structure_from_dict(key["structure"])]
        iteration += 1
