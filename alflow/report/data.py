"""A finished (or running) campaign read from the store into plain per-iteration and per-label data.

Nothing here writes: hand it ``Store(db, create_indexes=False)`` on a database from
:func:`alflow.store.readonly.open_readonly`. Where the numbers come from:

- iterations: the ``iterations`` collection (Merge's errors and counts; Train's ``train_seconds``;
  Explore's ``max_uncertainty``, ``simulation_*`` and ``files.trajectory``);
- labels: every label the campaign paid for or trained on; the round model's prediction, made
  before the label existed, is in ``provenance.prediction`` (the honest test points);
- the final model's predictions on its own training labels (fit quality), computed here;
- stage wall times: FireWorks' ``fireworks`` (names) and ``launches`` (times) collections.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping

import numpy as np
from ase import Atoms

from alflow.constraints import free_mask
from alflow.oracles import failure_class
from alflow.store.documents import atoms_from_document
from alflow.store.store import BUCKET


@dataclass
class Iteration:
    """One round's record (``iterations`` collection): counts, errors (eV, eV/Å), times (s)."""

    number: int
    oracle_calls: int
    reused: int
    failed: int
    energy_mae: float | None
    force_mae: float | None
    max_uncertainty: float | None
    metrics: dict
    trajectory: list[Atoms] | None = field(default=None, repr=False)  # the round's ML simulation (NEB: final band)


@dataclass
class Label:
    """One label of the campaign: the oracle's answer and what the models said about it."""

    id: str
    iteration: int | None
    role: str | None
    frame: int | None
    status: str
    failure_class: str | None
    reason: str | None
    paid: bool  # paid by this campaign (else found in the label cache)
    structure_hash: str
    atoms: Atoms | None = field(default=None, repr=False)  # the structure, FixAtoms restored
    energy: float | None = None  # oracle, eV
    forces: np.ndarray | None = field(default=None, repr=False)  # oracle, eV/Å [N, 3]
    predicted: dict | None = field(default=None, repr=False)  # round model before labelling: energy, forces, uncertainty
    fitted: dict | None = field(default=None, repr=False)  # final model on its own training label: energy, forces

    @property
    def free(self) -> np.ndarray:
        return free_mask(self.atoms)


@dataclass
class FailedCall:
    """One oracle call of the campaign without a usable label: a failed call (paid), or a structure
    rejected before the call (not paid); a failed label or an earlier attempt it replaced."""

    iteration: int | None
    failure_class: str
    reason: str | None
    paid: bool = True  # False for status "rejected"


@dataclass
class StageTime:
    """Wall time (s) spent in one kind of step over the whole campaign."""

    stage: str
    seconds: float
    count: int  # fireworks (train / simulation: rounds)


@dataclass
class DirectCount:
    """Oracle calls of the direct run (no learning) to compare with; ``value`` None when unknown."""

    value: int | None
    source: str  # "given" | "estimate" | "not given"
    note: str


@dataclass
class CampaignData:
    """Everything the report shows about one campaign."""

    name: str
    kind: str
    status: str
    spec: dict
    summary: dict | None
    counters: dict
    iterations: list[Iteration]
    labels: list[Label]
    failures: list[FailedCall]
    stages: list[StageTime]
    wall_seconds: float | None
    start_structures: list[Atoms] = field(repr=False)
    final_model_iteration: int | None = None

    @property
    def direct(self) -> DirectCount:
        return direct_oracle_calls(self)

    def iteration(self, number: int) -> Iteration | None:
        return next((it for it in self.iterations if it.number == number), None)

    def last_trajectory(self) -> tuple[int, list[Atoms]] | None:
        """(iteration, frames) of the latest round with a stored ML simulation."""
        for it in reversed(self.iterations):
            if it.trajectory:
                return it.number, it.trajectory
        return None


# ---------------------------------------------------------------------------------------------


def _float(value) -> float | None:
    return None if value is None else float(value)


def read_iterations(store, name: str, trajectories: bool = True) -> list[Iteration]:
    """The campaign's iteration records, oldest first, with their ML trajectories loaded."""
    files = {}  # iteration -> trajectory id, for stores written before Explore recorded it
    for doc in store.db[f"{BUCKET}.files"].find({"metadata.kind": "trajectory", "metadata.campaign": name}):
        files[doc["metadata"]["iteration"]] = doc["_id"]
    out = []
    for doc in store.iterations(name):
        m = doc.get("metrics", {})
        number = int(doc["iteration"])
        traj_id = (doc.get("files") or {}).get("trajectory", files.get(number))
        out.append(Iteration(
            number=number,
            oracle_calls=int(m.get("oracle_calls", 0)),
            reused=int(m.get("reused", 0)),
            failed=int(m.get("failed", 0)),
            energy_mae=_float(m.get("energy_mae")),
            force_mae=_float(m.get("force_mae")),
            max_uncertainty=_float(m.get("max_uncertainty")),
            metrics=dict(m),
            trajectory=store.load_trajectory(traj_id) if trajectories and traj_id is not None else None,
        ))
    return out


def read_labels(store, campaign: Mapping) -> tuple[list[Label], list[FailedCall]]:
    """Every label the campaign paid for or trained on (oldest first), and every failed call it paid."""
    name = campaign["name"]
    ids = list(campaign.get("label_ids") or [])
    query = {"$or": [{"campaign": name}, {"_id": {"$in": ids}}, {"history.campaign": name}]}
    labels, failures = [], []
    for doc in store.labels_collection.find(query).sort("_id", 1):
        prov = doc.get("provenance") or {}
        mine = doc.get("campaign") == name
        for attempt in doc.get("history") or []:  # earlier failed attempts, replaced by an ok label
            if attempt.get("campaign") == name:
                status = attempt.get("status", "failed")
                failures.append(FailedCall(attempt.get("iteration"), failure_class(
                    status, attempt.get("reason"), attempt.get("failure_class")), attempt.get("reason"),
                    status != "rejected"))
        if not mine and doc["_id"] not in ids:
            continue
        cls = failure_class(doc["status"], doc.get("reason"), doc.get("failure_class"))
        if mine and cls is not None:
            failures.append(FailedCall(doc.get("iteration"), cls, doc.get("reason"), doc["status"] != "rejected"))
        config = store.configurations.find_one({"hash": doc["structure_hash"]})
        pred = prov.get("prediction") if mine else None  # another campaign's model predicted it
        labels.append(Label(
            id=str(doc["_id"]), iteration=doc.get("iteration") if mine else None,
            role=prov.get("role"), frame=prov.get("frame"), status=doc["status"], failure_class=cls,
            reason=doc.get("reason"), paid=mine, structure_hash=doc["structure_hash"],
            atoms=atoms_from_document(config) if config else None,
            energy=_float(doc.get("energy")),
            forces=np.asarray(doc["forces"], dtype=float) if doc.get("forces") is not None else None,
            predicted={
                "energy": float(pred["energy"]),
                "forces": np.asarray(pred["forces"], dtype=float) if pred.get("forces") is not None else None,
                "uncertainty": _float(pred.get("uncertainty")),
            } if pred and pred.get("energy") is not None else None,
        ))
    return labels, failures


def fit_final_model(store, name: str, labels: list[Label]) -> int | None:
    """The final model's predictions on its own (ok) training labels, into ``Label.fitted``;
    returns that model's iteration (None when the campaign stored no model, e.g. online)."""
    docs = store.model_documents(name)
    if not docs:
        return None
    doc = docs[-1]
    trained = {str(i) for i in doc.get("training_labels", [])}
    points = [lab for lab in labels if lab.id in trained and lab.status == "ok" and lab.atoms is not None]
    if points:
        pot = store.load_model(doc)
        for lab, p in zip(points, pot.predict([lab.atoms for lab in points])):
            lab.fitted = {"energy": float(p.energy), "forces": p.forces.detach().cpu().numpy()}
    return int(doc["iteration"])


_STAGES = (  # firework name after "<campaign>: " -> stage
    (re.compile(r"seed$"), "seed (queue the start)"),
    (re.compile(r"round (\d+)$"), "round"),
    (re.compile(r"label (\d+)\.\d+$"), "oracle calls (label fireworks)"),
    (re.compile(r"merge (\d+)$"), "merge (store labels, stop test)"),
    (re.compile(r"online from round (\d+)$"), "online learning"),
)


def _seconds(launch: Mapping) -> float | None:
    if launch.get("runtime_secs") is not None:
        return float(launch["runtime_secs"])
    try:
        start, end = (datetime.fromisoformat(str(launch[k])) for k in ("time_start", "time_end"))
    except (KeyError, ValueError, TypeError):
        return None
    return (end - start).total_seconds()


def read_stage_times(db, name: str, iterations: list[Iteration]) -> tuple[list[StageTime], float | None]:
    """Wall time per stage from FireWorks' launches, and the campaign's wall time: the time during
    which any of its fireworks ran (the union of the launch intervals, so parallel oracle calls are
    counted once and the time a stopped campaign waited for ``alflow resume`` not at all). A round
    firework is split into training (``train_seconds``) and the ML simulation + query."""
    fws = {d["fw_id"]: d["name"] for d in db["fireworks"].find(
        {"name": {"$regex": f"^{re.escape(name)}: "}}, {"fw_id": 1, "name": 1})}
    totals: dict[str, list[float]] = {}
    intervals = []
    for launch in db["launches"].find({"fw_id": {"$in": list(fws)}}):
        seconds = _seconds(launch)
        if launch.get("time_start") and launch.get("time_end"):
            intervals.append(tuple(datetime.fromisoformat(str(launch[k])) for k in ("time_start", "time_end")))
        if seconds is None:
            continue
        what = fws[launch["fw_id"]][len(name) + 2:]
        stage = next((s for pattern, s in _STAGES if pattern.match(what)), "other")
        totals.setdefault(stage, []).append(seconds)
    stages = []
    rounds = totals.pop("round", None)
    for stage in (s for _, s in _STAGES):
        if stage == "round" and rounds:
            train = sum(float(it.metrics.get("train_seconds", 0.0)) for it in iterations)
            if train:
                stages.append(StageTime("training", train, len(rounds)))
            stages.append(StageTime("ML simulation + query" if train else "training + ML simulation + query",
                                    sum(rounds) - train, len(rounds)))
        elif stage in totals:
            stages.append(StageTime(stage, sum(totals[stage]), len(totals[stage])))
    if "other" in totals:
        stages.append(StageTime("other", sum(totals["other"]), len(totals["other"])))
    return stages, _covered_seconds(intervals)


def _covered_seconds(intervals: list[tuple[datetime, datetime]]) -> float | None:
    """Length of the union of time intervals, in seconds (None for none)."""
    if not intervals:
        return None
    total, (start, end) = 0.0, sorted(intervals)[0]
    for a, b in sorted(intervals)[1:]:
        if a > end:
            total += (end - start).total_seconds()
            start, end = a, b
        else:
            end = max(end, b)
    return total + (end - start).total_seconds()


def direct_oracle_calls(data: CampaignData) -> DirectCount:
    """The direct run's oracle calls: given in the spec (``report.direct_oracle_calls``), else an
    estimate from what the campaign recorded, clearly labelled as one (MD: one call per step of a
    run as long; relax: the steps of the last ML relaxation that began at the start structure, not
    at a refinement's label nor at an online round's last minimum; NEB: the final band's steps ×
    moving images; only when that ML run converged), else "not given"."""
    given = (data.spec.get("report") or {}).get("direct_oracle_calls")
    if given:
        return DirectCount(int(given), "given", "direct run, from the campaign spec")
    sim = data.spec.get("simulation", {})
    if data.kind == "md" and sim.get("steps"):
        return DirectCount(int(sim["steps"]) + 1, "estimate",
                           f"estimate: a direct MD of {sim['steps']} steps, one oracle call per step")
    online = data.spec.get("learner", {}).get("kind") == "online"

    def from_start(it) -> bool:  # a relaxation that began where the direct run begins
        return data.kind != "relax" or not (it.metrics.get("refined_from_fmax_oracle") is not None
                                            or (online and it.number > 1))

    last = next((it for it in reversed(data.iterations)
                 if it.metrics.get("simulation_steps") is not None and from_start(it)), None)
    if last is not None and not last.metrics.get("simulation_converged"):
        last = None  # a run cut off by its step limit says nothing about the direct run's length
    if last is not None and data.kind == "relax":
        n = int(last.metrics["simulation_steps"]) + 1
        return DirectCount(n, "estimate", f"estimate: force calls of the last ML relaxation from the start "
                                          f"(round {last.number}, same optimizer)")
    if last is not None and data.kind == "neb":
        images = int(sim.get("images", 3))
        n = (int(last.metrics["simulation_steps"]) + 1) * images
        return DirectCount(n, "estimate", f"estimate: the final ML band's steps × {images} moving images "
                                          "(endpoint relaxations not counted)")
    return DirectCount(None, "not given", "not given")


def read_campaign(store, name: str, model: bool = True) -> CampaignData:
    """The campaign ``name`` as plain data (``model=False``: skip the final model's predictions)."""
    campaign = store.campaign(name)
    if campaign is None:
        names = sorted(d["name"] for d in store.campaigns.find({}, {"name": 1}))
        raise ValueError(f"no campaign named {name!r} in this store (campaigns: {', '.join(names) or 'none'})")
    iterations = read_iterations(store, name)
    labels, failures = read_labels(store, campaign)
    stages, wall = read_stage_times(store.db, name, iterations)
    data = CampaignData(
        name=name, kind=campaign.get("kind", campaign["spec"]["simulation"].get("kind", "?")),
        status=campaign.get("status", "?"), spec=campaign["spec"], summary=campaign.get("summary"),
        counters=dict(campaign.get("counters") or {}), iterations=iterations, labels=labels,
        failures=failures, stages=stages, wall_seconds=wall,
        start_structures=[atoms_from_document(s) for s in campaign.get("start_structures") or []],
    )
    if model:
        data.final_model_iteration = fit_final_model(store, name, labels)
    return data


def failures_by_class(data: CampaignData) -> dict[str, int]:
    """Failed oracle calls of the campaign per failure class, most frequent first."""
    counts: dict[str, int] = {}
    for f in data.failures:
        counts[f.failure_class] = counts.get(f.failure_class, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def plain_value(value: Any) -> Any:
    """JSON-able copy of numpy scalars / arrays (for report.json)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
