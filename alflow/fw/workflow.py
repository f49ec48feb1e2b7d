"""Workflow builders: the campaign's first workflow, a round's ML firework, the label fan-out."""

from __future__ import annotations

from typing import Mapping

from fireworks import Firework, Workflow

from alflow.campaign import Candidate
from alflow.fw.tasks import ExploreTask, LabelTask, MergeTask, OnlineTask, SeedTask, TrainTask

ML = {"_category": "ml", "_add_launchpad_and_fw_id": True}


def campaign_workflow(name: str) -> Workflow:
    """The workflow ``alflow run`` / ``alflow submit`` adds: round 0, the rest follows by additions."""
    seed = Firework([SeedTask(campaign=name)], spec=dict(ML), name=f"{name}: seed")
    return Workflow([seed], name=f"alflow {name}", metadata={"alflow_campaign": name})


def round_firework(name: str, iteration: int, online: bool = False) -> Firework:
    """Round ``iteration`` ≥ 1 on the ML worker: train, then simulate and query (offline), or the
    online learner's firework, which runs to the end of the campaign."""
    if online:
        tasks = [OnlineTask(campaign=name, iteration=iteration)]
        return Firework(tasks, spec=dict(ML), name=f"{name}: online from round {iteration}")
    tasks = [TrainTask(campaign=name, iteration=iteration), ExploreTask(campaign=name, iteration=iteration)]
    return Firework(tasks, spec=dict(ML), name=f"{name}: round {iteration}")


def label_round(
    campaign: Mapping,
    iteration: int,
    to_compute: list[Candidate],
    reused: list[dict],
    key: Candidate | None = None,
    trajectory: str | None = None,
) -> Workflow:
    """K oracle fireworks (category dft, run in parallel) feeding one Merge firework."""
    name = campaign["name"]
    oracle = dict(campaign["spec"]["oracle"])
    labels = [
        Firework(
            [LabelTask(candidate=c.to_dict(), oracle=oracle)],
            spec={"_category": "dft", "alflow_campaign": name, "alflow_iteration": iteration},
            name=f"{name}: label {iteration}.{k}",
        )
        for k, c in enumerate(to_compute)
    ]
    merge = Firework(
        [MergeTask(campaign=name, iteration=iteration, reused=reused, computing=[c.to_dict() for c in to_compute],
                   key=key.to_dict() if key else None, trajectory=trajectory)],
        spec={**ML, "_allow_fizzled_parents": True},  # a lost label must not hang the campaign
        name=f"{name}: merge {iteration}",
    )
    return Workflow(labels + [merge], links_dict={fw.fw_id: [merge.fw_id] for fw in labels})
