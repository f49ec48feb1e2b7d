"""FireTasks of an active-learning round. All state is in the firework spec; results go out
through FWAction. Every task but :class:`LabelTask` reaches the database through FireWorks' own
LaunchPad (``_add_launchpad_and_fw_id``): the same database and client as FireWorks.

    SeedTask                       label the starting structure(s)              (_category ml)
    TrainTask → ExploreTask        fit the ensemble; ML simulation + query      (ml)
    LabelTask × K                  oracle call, no database                     (dft)
    MergeTask                      store labels, metrics, stop or next round    (ml)
    OnlineTask                     online learner (oracle inline) to the end    (ml)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fireworks import FiretaskBase, FWAction, explicit_serialize

from alflow.oracles import compute_label
from alflow.store.documents import atoms_from_document
from alflow.store.embedded import write_atomically

# The ML steps (alflow.campaign, torch) are imported in the tasks that use them: a worker process
# that only runs LabelTask starts without them.


class _StoreTask(FiretaskBase):
    def store_and_campaign(self):
        from alflow.store import Store

        store = Store.from_launchpad(self.launchpad)
        return store, store.campaign(self["campaign"])


@explicit_serialize
class SeedTask(_StoreTask):
    """Round 0: queue the starting structure(s) for labelling (cached labels are reused)."""

    required_params = ["campaign"]

    def run_task(self, fw_spec):
        from alflow import campaign as steps
        from alflow.fw.workflow import label_round

        store, campaign = self.store_and_campaign()
        to_compute, reused = steps.split_cached(store, campaign, steps.seed_candidates(campaign))
        to_compute = steps.within_budget(campaign, to_compute, None)  # max_oracle_calls below the seeds
        return FWAction(additions=label_round(campaign, 0, to_compute, reused))


@explicit_serialize
class TrainTask(_StoreTask):
    """Fit the ensemble on every label so far; the model goes to GridFS."""

    required_params = ["campaign", "iteration"]

    def run_task(self, fw_spec):
        from alflow import campaign as steps

        store, campaign = self.store_and_campaign()
        start = time.perf_counter()
        _, model_id = steps.train(store, campaign, self["iteration"])
        store.record_iteration(campaign["name"], self["iteration"], {"train_seconds": time.perf_counter() - start})
        return FWAction(update_spec={"model_id": str(model_id)}, stored_data={"model_id": str(model_id)})


@explicit_serialize
class ExploreTask(_StoreTask):
    """ML simulation with the round's model, then the query; adds the Label fan-out and Merge."""

    required_params = ["campaign", "iteration"]

    def run_task(self, fw_spec):
        from alflow import campaign as steps
        from alflow.fw.workflow import label_round
        from alflow.refine import oracle_fmax

        store, campaign = self.store_and_campaign()
        i = self["iteration"]
        pot = store.load_model(fw_spec["model_id"])
        start = time.perf_counter()
        anchors = steps.refinement_anchors(store, campaign, pot.calculator)
        result = steps.run_simulation(pot.calculator, campaign, i, anchors=anchors)
        frames = result.band if campaign["kind"] == "neb" else result.frames
        trajectory = store.save_trajectory(frames, campaign["name"], i, campaign["kind"])
        sim = steps.simulation_metrics(result, time.perf_counter() - start)
        if anchors and campaign["kind"] == "relax":  # refined from the best label: from where, matched at how many
            sim["refined_from_fmax_oracle"] = oracle_fmax(anchors[0])
            sim["refinement_anchors"] = result.info["refinement_anchors"]
        elif anchors:  # a NEB band matched to the oracle near its labels
            sim["matched_labels"] = len(anchors)
        store.record_iteration(campaign["name"], i, sim, trajectory=trajectory)
        candidates, key = steps.choose(store, campaign, result, i)
        to_compute, reused = steps.split_cached(store, campaign, candidates)
        to_compute = steps.within_budget(campaign, to_compute, key)
        return FWAction(
            additions=label_round(campaign, i, to_compute, reused, key, str(trajectory)),
            stored_data={"simulation_converged": result.converged, "steps": result.steps,
                         "stopped": result.stopped, "queried": len(candidates)},
        )


@explicit_serialize
class LabelTask(FiretaskBase):
    """One oracle calculation. Never touches the database: runs offline and on any queue.

    The result is also written to ``label_result.json`` in the launch directory as soon as it is
    paid for: a runner killed before FireWorks records the firework completes it from there
    (``alflow resume``) instead of paying for it again."""

    required_params = ["candidate", "oracle"]

    def run_task(self, fw_spec):
        cand = self["candidate"]
        result = compute_label(atoms_from_document(cand["structure"]), self["oracle"])
        write_atomically(Path(LABEL_RESULT), json.dumps(result))
        return label_action(cand, result)


LABEL_RESULT = "label_result.json"  # a Label firework's result, in its launch directory


def label_action(candidate: dict, result: dict) -> FWAction:
    """What a Label firework returns: the result pushed to the Merge's ``labels`` (also used by the
    runner to record a label whose worker kept dying)."""
    return FWAction(stored_data={"status": result["status"], "seconds": result["seconds"]},
                    mod_spec=[{"_push": {"labels": {"candidate": candidate, "result": result}}}])


@explicit_serialize
class MergeTask(_StoreTask):
    """Store the round's labels, evaluate the stop criterion; next round or final results."""

    required_params = ["campaign", "iteration", "reused"]
    optional_params = ["key", "trajectory", "computing"]  # computing: the candidates of the Label fireworks

    def run_task(self, fw_spec):
        from alflow import campaign as steps
        from alflow.fw.workflow import round_firework
        from alflow.oracles import failures

        store, campaign = self.store_and_campaign()
        i = self["iteration"]
        computed = list(fw_spec.get("labels", []))
        # a Label firework that FIZZLED (a stock rlaunch interrupted, a bug) pushed nothing: its
        # structure is recorded as a failed call, never silently left out
        delivered = {item["candidate"]["hash"] for item in computed}
        computed += [{"candidate": c, "result": failures.lost(
                        "its oracle firework ended without a result (FIZZLED; `lpad get_fws -s FIZZLED -d more` "
                        "shows why)")} for c in self.get("computing", []) if c["hash"] not in delivered]
        outcome = steps.merge(store, campaign, i, computed, self["reused"], self.get("key"))
        data = {"decision": outcome.decision.reason, "paid": outcome.paid, "reused": outcome.reused}
        if outcome.decision.done:
            summary = steps.write_results(store, store.campaign(campaign["name"]), outcome, self.get("key"),
                                          self.get("trajectory"))
            return FWAction(stored_data={**data, "summary": str(summary)})
        online = campaign["spec"]["learner"]["kind"] == "online"
        return FWAction(additions=[round_firework(campaign["name"], i + 1, online)], stored_data=data)


@explicit_serialize
class OnlineTask(_StoreTask):
    """Online learning after the seed round: the whole simulation with the oracle called inline
    where the ensemble is unsure, repeated until the stop criterion holds; then the results."""

    required_params = ["campaign", "iteration"]

    def run_task(self, fw_spec):
        from alflow import campaign as steps
        from alflow.online import run_online

        store, campaign = self.store_and_campaign()
        outcome, key, trajectory = run_online(store, campaign, self["iteration"])
        summary = steps.write_results(store, store.campaign(campaign["name"]), outcome, key, trajectory)
        return FWAction(stored_data={"decision": outcome.decision.reason, "paid": outcome.paid,
                                     "summary": str(summary)})
