"""One active-learning campaign, step by step, as plain functions over a :class:`Store`.

FireWorks runs these (``alflow.fw``), but nothing here imports it, so every step is tested on its
own. An offline campaign is a sequence of rounds:

    seed (round 0):  label the starting structure(s)
    round k ≥ 1:     train on every label so far → ML simulation from the start → query frames
    every round:     label the queried frames with the oracle (in parallel, no database access)
                     → merge: store labels, record metrics, evaluate the stop criterion

Queried structures are first looked up in the label cache (structure hash, oracle-settings
hash): a structure computed before, in this campaign or another, is reused, never paid twice.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.geometry import find_mic
from ase.io import write

from alflow import metrics, query, refine, simulate, stop
from alflow.model import DeltaPotential, SymmetryFunctions, TrainingSettings
from alflow.model.descriptors import frame_features
from alflow.oracles import cache_settings, failures
from alflow.constraints import free_mask
from alflow.spec import CampaignSpec
from alflow.store.documents import atoms_from_document, configuration_document
from alflow.store.hashing import settings_hash, structure_hash


# structures travel in FireWorks specs in the store's document form (JSON-able)
structure_to_dict = configuration_document
structure_from_dict = atoms_from_document


def oracle_hash(oracle: Mapping[str, Any], elements: Sequence[str] = ()) -> str:
    """Key of the oracle settings in the label cache: what determines the labels of structures of
    ``elements`` (a DFT code's MPI ranks, launcher or scratch folder do not; see
    :func:`alflow.oracles.cache_settings`)."""
    return settings_hash(cache_settings(oracle, elements))


# ---------------------------------------------------------------------------------------------
# candidates and the label cache


@dataclass
class Candidate:
    """A structure to be labelled, with what the model predicted for it (for honest test errors)."""

    structure: dict
    hash: str
    role: str  # seed | query | final (the predicted minimum / saddle)
    frame: int | None = None
    prediction: dict = field(default_factory=dict)  # energy, forces, uncertainty of the ML model

    @classmethod
    def of(cls, atoms: Atoms, role: str, frame: int | None = None) -> "Candidate":
        prediction = {}
        results = getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}
        for key in ("energy", "forces", "uncertainty"):
            value = results.get(key, atoms.info.get(key))
            if value is not None:
                prediction[key] = np.asarray(value).tolist()
        return cls(structure_to_dict(atoms), structure_hash(atoms), role, frame, prediction)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("structure", "hash", "role", "frame", "prediction")}


def split_cached(store, campaign: Mapping, candidates: list[Candidate]) -> tuple[list[Candidate], list[dict]]:
    """Candidates still to compute, and cached labels to reuse (never pay for a label twice; a
    failure that another attempt may pass is computed again, see :func:`failures.worth_retrying`)."""
    to_compute, reused = [], []
    for c in candidates:
        label = store.label(c.hash, campaign["oracle_hash"])
        if label is None or failures.worth_retrying(label):
            to_compute.append(c)
        else:
            reused.append({"label_id": str(label["_id"]), "candidate": c.to_dict()})
    return to_compute, reused


def within_budget(campaign: Mapping, to_compute: list[Candidate], key: Candidate | None) -> list[Candidate]:
    """``to_compute`` cut to the oracle calls ``max_oracle_calls`` still allows (all of them without
    that budget): the key structure first, then (NEB) the band's initial state, then the picks."""
    criteria = stop.StopCriteria.from_dict(campaign["spec"]["learner"]["stop"], campaign["kind"])
    left = criteria.remaining_oracle_calls(campaign["counters"]["oracle_calls"])
    if left is None or len(to_compute) <= left:
        return to_compute
    first = {key.hash, (key.prediction.get("initial") or {}).get("hash")} if key is not None else set()
    ranked = sorted(to_compute, key=lambda c: (c.hash not in first, c.hash != getattr(key, "hash", None)))
    return ranked[:left]


PREDICTION_KEYS = ("energy", "forces", "uncertainty")  # of a candidate's prediction, kept with its label


def store_label(store, campaign: Mapping, iteration: int, atoms: Atoms, candidate: Mapping, result: dict) -> dict:
    """Put an oracle result in the label cache with its provenance (campaign, round, role, frame and
    the model's ``prediction``: energy, forces, uncertainty, when the candidate has one); returns
    the label document (another writer's, if it stored the same key first)."""
    oracle = campaign["spec"]["oracle"]
    provenance = {"campaign": campaign["name"], "iteration": iteration, "role": candidate["role"],
                  "frame": candidate["frame"]}
    # what the round's model predicted before the label existed: honest test points for reports
    prediction = {k: v for k, v in (candidate.get("prediction") or {}).items() if k in PREDICTION_KEYS}
    if prediction:
        provenance["prediction"] = prediction
    doc, _ = store.put_label(atoms, campaign["oracle_hash"], dict(oracle), result, provenance)
    return doc


# ---------------------------------------------------------------------------------------------
# the steps


def start(store, spec: CampaignSpec) -> dict:
    """Create the campaign document and return it (fails on an existing name)."""
    elements = sorted({s for atoms in spec.images for s in atoms.get_chemical_symbols()})
    doc = store.create_campaign(spec.name, spec.to_dict())
    fields = {
        "elements": elements,
        "kind": spec.kind,
        "oracle_hash": oracle_hash(spec.oracle, elements),
        "start_structures": [structure_to_dict(a) for a in spec.images],
        "label_ids": [],
        "status": "running",
        "started_on": time.time(),
    }
    try:
        store.update_campaign(spec.name, **fields)
    except BaseException:  # e.g. starting structures too large for a document: no half-made campaign
        store.campaigns.delete_one({"name": spec.name, "status": "created"})
        raise
    doc.update(fields)
    return doc


def seed_candidates(campaign: Mapping) -> list[Candidate]:
    """Round 0: the starting structure(s) (NEB: both endpoints)."""
    return [Candidate.of(structure_from_dict(s), "seed") for s in campaign["start_structures"]]


def training_labels(store, campaign: Mapping) -> list[dict]:
    """Every successful label the campaign has gathered (the training set), as label documents."""
    docs = [store.label_by_id(i) for i in campaign["label_ids"]]
    return [d for d in docs if d is not None and d["status"] == "ok"]


def training_images(store, campaign: Mapping) -> list[Atoms]:
    """The training set as Atoms with energy and forces."""
    return [store.label_atoms(d) for d in training_labels(store, campaign)]


def new_potential(campaign: Mapping, iteration: int) -> DeltaPotential:
    """The untrained ensemble the spec's ``model`` section describes (seeded per round)."""
    model = campaign["spec"]["model"]
    return DeltaPotential(
        campaign["elements"],
        prior=None if model["prior"] == "none" else "morse",
        ensemble=model["ensemble"],
        seed=model["seed"] + 1000 * iteration,
        descriptor=descriptor(campaign),
        hidden=model.get("hidden", (20, 20)),  # a campaign stored before the keys: the paper's
        morse_params=model.get("morse_params"),
        training=training_settings(model),
    )


def descriptor(campaign: Mapping) -> SymmetryFunctions:
    """The spec's G2/G4 settings (``model.descriptor``) for the campaign's elements."""
    return SymmetryFunctions(campaign["elements"], **campaign["spec"]["model"].get("descriptor", {}))


def training_settings(model: Mapping) -> TrainingSettings:
    """The spec's ``model`` section as training settings."""
    return TrainingSettings(epochs=model["epochs"], force_coefficient=model["force_coefficient"],
                            bootstrap=model.get("bootstrap", True), warm_epochs=model.get("warm_epochs", 100),
                            feature_range_floor=model.get("feature_range_floor", 0.05))


def warm_start_model(store, campaign: Mapping, n_images: int) -> dict | None:
    """The model document to continue from (``model.warm_start``): the campaign's latest, unless
    the training set has doubled since the last full fit (then None: refit from scratch, so the
    normalisation follows the data)."""
    if not campaign["spec"]["model"].get("warm_start"):
        return None
    docs = store.model_documents(campaign["name"])
    cold = [d for d in docs if not d.get("metrics", {}).get("warm_start")]
    if not docs or not cold or n_images >= 2 * cold[-1]["metrics"]["n_structures"]:
        return None
    return docs[-1]


def train(store, campaign: Mapping, iteration: int) -> tuple[DeltaPotential, Any]:
    """Fit the ensemble on all labels so far (from scratch, or continuing the last round's with
    ``model.warm_start``); the model goes to GridFS. Returns (potential, model id)."""
    docs = training_labels(store, campaign)
    images = [store.label_atoms(d) for d in docs]
    if not images:
        raise RuntimeError(f"campaign {campaign['name']}: no successful label to train on")
    previous = warm_start_model(store, campaign, len(images))
    if previous is None:
        pot = new_potential(campaign, iteration).fit(images)
    else:
        pot = store.load_model(previous)
        pot.training = training_settings(campaign["spec"]["model"])
        pot.fit(images, warm_start=True)
    model_id = store.save_model(pot, campaign["name"], iteration, [d["_id"] for d in docs], pot.report)
    return pot, model_id


def refinement_anchors(store, campaign: Mapping, calculator_factory: Callable[[], Calculator]) -> list[Atoms]:
    """The labelled structures the round's model (``calculator_factory``) is matched to (see
    :mod:`alflow.refine`).

    Relax with ``learner.refine_below``: best (lowest oracle fmax, the start of the relaxation)
    first, up to ``learner.refine_anchors`` of them below the threshold; empty before any is.
    NEB with ``learner.match_within``: every successful label where the model's force error is at
    most ``learner.match_max_error`` (each weighs in near the band only).
    """
    learner = campaign["spec"]["learner"]
    if campaign["kind"] == "neb":
        if not learner.get("match_within"):
            return []
        return refine.well_fitted(training_images(store, campaign), calculator_factory(), learner["match_max_error"])
    below = learner.get("refine_below")  # the spec allows it for relax only
    if below is None:
        return []
    n = learner.get("refine_anchors", 1)  # a campaign stored before the key refines as it did: at one
    return refine.best_anchors(training_images(store, campaign), below, n)


def run_simulation(
    calculator_factory: Callable[[], Calculator], campaign: Mapping, iteration: int, starts: list[Atoms] | None = None,
    anchors: Sequence[Atoms] = (),
) -> simulate.SimulationResult:
    """The ML simulation of this round, from the starting structure(s) (or ``starts``);
    ``calculator_factory`` gives one calculator per NEB image (offline: ``potential.calculator``).
    Relax with ``anchors`` (:func:`refinement_anchors`): from the first, with the model matched to
    the oracle at all of them (:class:`alflow.refine.AnchoredCalculator`), to ``learner.refine_fmax``
    (a relaxation that does not converge so is redone matched at the first alone; the result's
    ``info["refinement_anchors"]`` says how many were used);
    NEB with ``anchors``: every image's model matched near them (:class:`alflow.refine.MatchedCalculator`)."""
    spec, kind = campaign["spec"], campaign["kind"]
    start_images = starts or [structure_from_dict(s) for s in campaign["start_structures"]]
    settings = dict(spec["simulation"])
    if kind == "relax":
        if not anchors:
            return simulate.relax(start_images[0], calculator_factory(), simulate.RelaxSettings(**settings))
        begin = start_images[0].copy()  # the start's constraints, the best anchor's positions
        begin.positions = anchors[0].positions
        settings["fmax"] = refine_fmax(spec)
        relax_settings = simulate.RelaxSettings(**settings)
        calculator = refine.AnchoredCalculator(calculator_factory(), anchors[0], partners=anchors[1:])
        result = simulate.relax(begin, calculator, relax_settings)
        if not result.converged and len(anchors) > 1:
            # a secant term from labels the model fits poorly can leave the matched surface without
            # a minimum (a QE campaign ran away from the same two anchors for 16 rounds): as a
            # quasi-Newton method drops a bad update, relax again matched at the best label alone
            retry = simulate.relax(begin, refine.AnchoredCalculator(calculator_factory(), anchors[0]), relax_settings)
            retry.info["refinement_anchors"] = 1
            return retry
        result.info["refinement_anchors"] = len(anchors)
        return result
    if kind == "neb":
        factory = calculator_factory
        if anchors:  # the model's errors at the labels: computed once, shared by the images
            model, within = calculator_factory(), spec["learner"]["match_within"]
            errors = [refine.model_errors(a, model) for a in anchors]
            factory = lambda: refine.MatchedCalculator(calculator_factory(), anchors, within, errors)  # noqa: E731
        return simulate.neb(start_images[0], start_images[1], factory, simulate.NEBSettings(**settings))
    if settings.get("seed") is None:  # per-round seeds differ unless fixed
        settings["seed"] = spec["model"]["seed"] + 7919 * iteration
    return simulate.md(start_images[0], calculator_factory(), simulate.MDSettings(**settings))


def refine_fmax(spec: Mapping) -> float:
    """The refining relaxation's fmax (eV/Å): ``learner.refine_fmax`` or ``simulation.fmax``, at most
    the stop's fmax. Above it, a best label between the two would pass as relaxed where the model
    is matched to it: the round would return that label, already paid, and never get below the stop."""
    fmax = spec["learner"].get("refine_fmax") or spec["simulation"]["fmax"]
    stop_fmax = (spec["learner"].get("stop") or {}).get("fmax")
    return fmax if stop_fmax is None else min(fmax, stop_fmax)


def simulation_metrics(result: simulate.SimulationResult, seconds: float) -> dict:
    """Iteration metrics of a round's ML simulation: steps, converged, its wall time (s), the
    largest ensemble uncertainty (eV/Å) over every recorded frame (NEB: every band of every step)
    and (MD) the seed it ran with."""
    values = [np.asarray(f.info.get("uncertainty", np.nan), dtype=float).max() for f in result.frames]
    finite = [float(u) for u in values if np.isfinite(u)]
    metrics = {"simulation_steps": result.steps, "simulation_converged": result.converged,
               "simulation_seconds": seconds, "max_uncertainty": max(finite) if finite else None}
    if result.seed is not None:  # MD: the velocity (and Langevin noise) seed this round used
        metrics["md_seed"] = result.seed
    return metrics


def choose(
    store, campaign: Mapping, result: simulate.SimulationResult, iteration: int, also_labelled: Iterable[str] = ()
) -> tuple[list[Candidate], Candidate | None]:
    """Frames to label next (never one the campaign already has, unless its label failed in a way
    another attempt may pass, nor a hash in ``also_labelled``: labels not merged yet) and the
    round's key structure: the predicted minimum (relax) or saddle (neb), whose oracle label
    decides convergence."""
    frames = result.band if campaign["kind"] == "neb" else result.frames
    docs = [d for d in (store.label_by_id(i) for i in campaign["label_ids"]) if d]
    labelled = {d["structure_hash"] for d in docs if not failures.worth_retrying(d)}
    labelled.update(also_labelled)
    reference = None  # NEB: a labelled structure standing in for the band's initial state
    within = campaign["spec"]["learner"].get("reuse_initial_within")
    if campaign["kind"] == "neb" and within is not None and frames:
        reference = nearest_label(store, docs, frames[0], within)
        if reference is not None:
            labelled.add(structure_hash(frames[0]))  # not queried: the reference's label serves
    q = campaign["spec"]["learner"]["query"]
    ctx = query.QueryContext(
        frames=frames, kind=campaign["kind"], labelled=labelled,
        rng=np.random.default_rng(campaign["spec"]["model"]["seed"] * 104729 + iteration),
        features=lambda fs: frame_features(fs, descriptor(campaign)),  # the model's descriptors
    )
    options = dict(q["options"])
    tolerance = campaign["spec"]["learner"]["stop"].get("endpoint_gap")
    if q["strategy"] == "neb" and tolerance is not None:  # equivalent endpoints the model disagrees on: label both
        options.setdefault("equivalent_within", tolerance)
    picks = query.select(ctx, q["strategy"], q["samples"], **options)
    key = None  # a run stopped by an unphysical structure has no minimum / saddle to check
    if campaign["kind"] in ("relax", "neb") and not result.stopped:
        key = Candidate.of(result.final, "final")
        if campaign["kind"] == "neb":  # the barrier is measured from the band's initial state
            initial = Candidate.of(frames[0], "query").to_dict()
            if reference is not None:  # ML energy of the band's own initial state, oracle's of the reference
                initial.update(hash=reference["structure_hash"], reused_within=reference["displacement"],
                               oracle_energy_shift=reference["energy_shift"])
            key.prediction["initial"] = initial
            gap = query.endpoint_gap(frames)
            if np.isfinite(gap):  # unknown: the stop test has no gap, so the round cannot converge on it
                key.prediction["endpoint_gap"] = gap
    candidates = [Candidate.of(frames[k], "query", k) for k in picks]
    if key is not None:  # the stop test needs the oracle there, whatever the strategy picked
        needed = [key] + ([Candidate.of(frames[0], "query", 0)] if campaign["kind"] == "neb" else [])
        have = labelled | {c.hash for c in candidates}
        candidates += [c for c in needed if c.hash not in have]
    return candidates, key


def nearest_label(store, docs: Iterable[Mapping], atoms: Atoms, within: float) -> dict | None:
    """The successful label among ``docs`` whose structure is closest to ``atoms`` (largest atomic
    displacement, minimum image), if that is at most ``within`` Å; else None. Added to the label
    document: ``displacement`` and ``energy_shift`` = −Σ F·Δx, the first-order change of the
    oracle energy from the label's structure to ``atoms`` (the rest is second order in Δx)."""
    best = None
    for doc in docs:
        if doc["status"] != "ok":
            continue
        other = store.label_atoms(doc)
        if len(other) != len(atoms) or (other.numbers != atoms.numbers).any():
            continue
        shift, _ = find_mic(atoms.positions - other.positions, atoms.cell, atoms.pbc)
        displacement = float(np.linalg.norm(shift, axis=1).max())
        if displacement <= within and (best is None or displacement < best["displacement"]):
            shift_energy = -float((np.asarray(doc["forces"]) * shift).sum())
            best = {**doc, "displacement": displacement, "energy_shift": shift_energy}
    return best


#: the checks a merge hands to the stop criterion (the others, e.g. barrier_oracle, are only recorded)
STOP_STATE_FIELDS = frozenset(f.name for f in fields(stop.StopState))


@dataclass
class MergeOutcome:
    """What a merge did: labels stored, counters, and the stop decision."""

    decision: stop.StopDecision
    paid: int
    reused: int
    failed: int
    metrics: dict


def merge(
    store, campaign: Mapping, iteration: int, computed: list[dict], reused: list[dict], key: Mapping | None = None,
    stored: list[dict] = (),
) -> MergeOutcome:
    """Store the round's labels, update counters and metrics, evaluate the stop criterion.

    ``computed``: [{"candidate": Candidate dict, "result": oracle result}] from the Label steps;
    ``reused``: [{"label_id", "candidate"}] found in the label cache; ``stored``: the same form,
    for labels paid this round and already stored by the caller (the online learner's calls);
    ``key``: the Candidate dict of the predicted minimum / saddle (its label, new or cached,
    decides relax / NEB convergence).
    """
    name = campaign["name"]
    records, paid, failed, broken, n_reused = [], 0, 0, 0, 0
    # in structure order, not the order parallel workers finished in: the training set (and so
    # the next model) does not depend on which oracle call returned first
    for item in sorted(computed, key=lambda item: item["candidate"]["hash"]):
        cand, result = item["candidate"], item["result"]
        doc = store_label(store, campaign, iteration, structure_from_dict(cand["structure"]), cand, result)
        paid += result["status"] != "rejected"  # the oracle ran, whether or not another writer stored it first
        failed += result["status"] != "ok"
        broken += result["status"] == "failed"  # the oracle's failures, not rejections
        records.append((cand, doc))
    seen = {doc["_id"] for _, doc in records}
    for items, paid_here in ((stored, True), (reused, False)):  # labels already in the store
        for item in items:
            doc = store.label_by_id(item["label_id"])
            if doc["_id"] in seen:  # asked for twice this round (e.g. inline, then as the key): one label
                continue
            seen.add(doc["_id"])
            paid += paid_here and doc["status"] != "rejected"
            failed += paid_here and doc["status"] != "ok"
            broken += paid_here and doc["status"] == "failed"
            n_reused += not paid_here
            records.append((item["candidate"], doc))
    label_ids = list(dict.fromkeys([*campaign["label_ids"], *(d["_id"] for _, d in records)]))
    store.update_campaign(name, label_ids=label_ids, iteration=iteration)
    # the round's numbers first, the campaign's counters summed from its rounds: a merge run twice counts once
    store.record_iteration(name, iteration, {"oracle_calls": paid, "reused": n_reused, "failed": failed})
    counters = store.tally_rounds(name)

    errors = prediction_errors(store, records)
    checks = key_checks(store, campaign, key)
    if campaign["kind"] == "md" and errors["energy_mae"] is not None:
        checks["validation"] = {"energy_mae": errors["energy_mae"], "force_mae": errors["force_mae"]}
        checks["simulation_complete"] = simulation_complete(store, name, iteration)
    if iteration == 0:  # the seed round only labels the start; the criteria apply from round 1 on
        ok = any(d["status"] == "ok" for _, d in records)
        decision = stop.StopDecision(not ok, False, "seed labels stored" if ok else
                                     "no starting structure could be labelled by the oracle")
    else:
        state = stop.StopState(iteration=iteration - 1, kind=campaign["kind"],
                               oracle_calls=counters["oracle_calls"],
                               **{k: v for k, v in checks.items() if k in STOP_STATE_FIELDS})
        criteria = stop.StopCriteria.from_dict(campaign["spec"]["learner"]["stop"], campaign["kind"])
        decision = stop.evaluate(criteria, state)
        if not records and not decision.done:  # the next round would train on the same data
            decision = stop.StopDecision(True, False, f"stopped without converging: round {iteration} had nothing "
                                         "new to label (every structure its query could choose is labelled)")
    limit = campaign["spec"]["learner"].get("max_failures_per_iteration")
    if limit is not None and broken > limit and not decision.converged:
        decision = stop.StopDecision(True, False, f"stopped: {broken} oracle calls failed in round {iteration}, "
                                     f"more than learner.max_failures_per_iteration = {limit} (see the failed "
                                     "labels' failure_class and reason)")
    store.record_iteration(
        name, iteration,
        {**errors, **{k: v for k, v in checks.items() if k not in ("validation", "simulation_complete")},
         "oracle_calls": paid, "reused": n_reused, "failed": failed, "decision": decision.reason, "done": decision.done,
         "converged": decision.converged},
    )
    return MergeOutcome(decision, paid, n_reused, failed, {**errors, **checks})


def simulation_complete(store, name: str, iteration: int) -> bool | None:
    """Whether the iteration's ML simulation ran to its end (its recorded metrics), None if unknown."""
    for doc in store.iterations(name):
        if doc["iteration"] == iteration:
            return (doc.get("metrics") or {}).get("simulation_converged")
    return None


def prediction_errors(store, records: list[tuple[dict, dict]]) -> dict:
    """Model-vs-oracle errors on the round's new labels, predicted BEFORE retraining (test errors)."""
    e_err, f_err = [], []
    for cand, doc in records:
        pred = cand.get("prediction") or {}
        if doc["status"] != "ok" or "energy" not in pred:
            continue
        free = free_mask(store.label_atoms(doc))
        e_err.append(abs(pred["energy"] - doc["energy"]))
        f_err.append(np.abs(np.asarray(pred["forces"]) - np.asarray(doc["forces"]))[free])
    return {
        "energy_mae": float(np.mean(e_err)) if e_err else None,
        "force_mae": float(np.concatenate(f_err).mean()) if f_err else None,
        "frames": len(e_err),
    }


def key_checks(store, campaign: Mapping, key: Mapping | None) -> dict:
    """Oracle checks of the predicted minimum (relax: fmax) or saddle (neb: |E_ML − E_oracle|, fmax;
    the barrier and the oracle's fmax at the band's initial state)."""
    if key is None:
        return {}
    doc = store.label(key["hash"], campaign["oracle_hash"])
    if doc is None or doc["status"] != "ok":
        return {}
    free = free_mask(store.label_atoms(doc))  # the campaign's constraints: the same at the initial state
    if campaign["kind"] == "relax":
        return {"final_fmax_oracle": simulate.max_force(np.asarray(doc["forces"]), free)}
    checks = {"saddle_energy_error": abs(key["prediction"]["energy"] - doc["energy"]),
              "saddle_fmax_oracle": simulate.max_force(np.asarray(doc["forces"]), free)}
    if "endpoint_gap" in key["prediction"]:
        checks["endpoint_gap"] = key["prediction"]["endpoint_gap"]
    initial = key["prediction"].get("initial")
    start = store.label(initial["hash"], campaign["oracle_hash"]) if initial else None
    if start is None or start["status"] != "ok":
        return checks
    # the initial state's label, or a reused one within reuse_initial_within: its forces
    checks["initial_fmax_oracle"] = simulate.max_force(np.asarray(start["forces"]), free)
    if "energy" in initial["prediction"]:
        ml = key["prediction"]["energy"] - initial["prediction"]["energy"]
        start_energy = start["energy"] + initial.get("oracle_energy_shift", 0.0)  # a reused nearby label
        checks["barrier_oracle"] = doc["energy"] - start_energy
        checks["barrier_error"] = abs(ml - checks["barrier_oracle"])
    return checks


def write_results(
    store, campaign: Mapping, outcome: MergeOutcome, key: Mapping | None, trajectory: str | None
) -> Path:
    """summary.json (DESIGN §5 fields) plus the final structure, band or trajectory files."""
    name, kind = campaign["name"], campaign["kind"]
    out = Path(campaign["spec"]["results"])
    out.mkdir(parents=True, exist_ok=True)
    counters = campaign["counters"]
    summary: dict[str, Any] = {
        "campaign": name,
        "kind": kind,
        "converged": outcome.decision.converged,
        "reason": outcome.decision.reason,
        "iterations": campaign["iteration"],
        "oracle_calls": counters["oracle_calls"],
        "failed_labels": counters["failed_labels"],
        "reused_labels": counters["reused_labels"],
    }
    frames = store.load_trajectory(trajectory) if trajectory else []
    label = store.label(key["hash"], campaign["oracle_hash"]) if key else None
    if kind == "relax" and label is not None and label["status"] == "ok":
        final = store.label_atoms(label)
        write(out / "final_structure.extxyz", final)
        summary.update(
            final_structure=str(out / "final_structure.extxyz"),
            final_energy=key["prediction"].get("energy"),
            final_energy_oracle=label["energy"],
            final_fmax_oracle=outcome.metrics.get("final_fmax_oracle"),
        )
    elif kind == "neb" and frames:
        write(out / "band.extxyz", frames)
        energies = [f.get_potential_energy() for f in frames]
        initial = (key or {}).get("prediction", {}).get("initial") or {"hash": structure_hash(frames[0])}
        start = store.label(initial["hash"], campaign["oracle_hash"])
        summary.update(band=str(out / "band.extxyz"), barrier=metrics.barrier(energies))
        if label is not None and start is not None and label["status"] == start["status"] == "ok":
            summary["barrier_oracle"] = label["energy"] - start["energy"] - initial.get("oracle_energy_shift", 0.0)
    elif kind == "md" and frames:
        write(out / "trajectory.extxyz", frames)
        summary.update(
            trajectory=str(out / "trajectory.extxyz"),
            validation={k: outcome.metrics.get(k) for k in ("energy_mae", "force_mae", "frames")},
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    store.update_campaign(name, status="converged" if outcome.decision.converged else "stopped", summary=summary)
    return out / "summary.json"
