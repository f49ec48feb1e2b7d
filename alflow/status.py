"""The live status tables of ``alflow status``, read without writing: one row per campaign, or one
row per iteration of a named campaign (calls paid, reused, failed by class).

Stage: the campaign's running firework, else the last one that finished (FireWorks' ``fireworks``
collection); calls from the campaign's counters; the last uncertainty is the largest ensemble
uncertainty along the latest round's ML simulation (the iteration records).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ACTIVE = ("RUNNING", "RESERVED")
INTERRUPTED = "interrupted"
FAILED = "failed"
CTRL_C = "KeyboardInterrupt"  # the last traceback line of a firework a Ctrl-C stopped: rerun, not failed


@dataclass
class StatusRow:
    campaign: str
    kind: str
    status: str
    iteration: int
    stage: str
    paid: int
    reused: int
    failed: int
    last_uncertainty: float | None
    why: str | None = None  # a failed campaign: its firework that failed and the error


def _stage(db, name: str) -> str:
    """The campaign's running firework (or the last finished one), without the campaign prefix."""
    mine = {"name": {"$regex": f"^{re.escape(name)}: "}}
    fws = db["fireworks"]
    doc = fws.find_one({**mine, "state": {"$in": list(ACTIVE)}}, {"name": 1, "state": 1}, sort=[("updated_on", -1)])
    if doc is None:
        doc = fws.find_one({**mine, "state": {"$in": ["COMPLETED", "FIZZLED"]}}, {"name": 1, "state": 1},
                           sort=[("updated_on", -1), ("fw_id", -1)])
    if doc is None:
        return "—"
    return f"{doc['name'][len(name) + 2:]} ({doc['state'].lower()})"


def failed_launch(launches, fw_id: int) -> dict:
    """A firework's latest failed launch document ({} if none)."""
    return launches.find_one({"fw_id": fw_id, "state": "FIZZLED"}, sort=[("time_end", -1)]) or {}


def last_error(launch: dict) -> str:
    """The last line of the traceback a failed launch recorded ('' if none)."""
    trace = ((launch.get("action") or {}).get("stored_data") or {}).get("_exception", {}).get("_stacktrace", "")
    return next((line.strip() for line in reversed(trace.splitlines()) if line.strip()), "")


def failure_line(fw_name: str, error: str) -> str:
    """One line on a failed firework, as ``alflow run`` and ``alflow status`` print it."""
    return f"firework '{fw_name}' failed: {error or 'no traceback recorded'}"


def failed_firework(db, name: str) -> tuple[str, str] | None:
    """(firework name, last error line) of a campaign's firework that failed, not by a Ctrl-C."""
    for fw in db["fireworks"].find({"name": {"$regex": f"^{re.escape(name)}: "}, "state": "FIZZLED"},
                                   {"fw_id": 1, "name": 1}):
        error = last_error(failed_launch(db["launches"], fw["fw_id"]))
        if error != CTRL_C:
            return fw["name"], error
    return None


def status_rows(db, owner_running: bool | None = None) -> list[StatusRow]:
    """One row per campaign in ``db`` (oldest first). A campaign still marked running shows as
    "failed" when one of its fireworks failed (a resume would fail again), else, with
    ``owner_running`` False (an embedded store no alflow process holds), as "interrupted"."""
    rows = []
    for c in db["campaigns"].find({}).sort("created_on", 1):
        name, n = c["name"], c.get("counters") or {}
        last = None
        for it in db["iterations"].find({"campaign": name}).sort("iteration", -1):
            value = (it.get("metrics") or {}).get("max_uncertainty")
            if value is not None:
                last = float(value)
                break
        status = c.get("status", "?")
        failure = failed_firework(db, name) if status == "running" else None
        if failure:
            status = FAILED
        elif status == "running" and owner_running is False:
            status = INTERRUPTED
        rows.append(StatusRow(name, c.get("kind", "?"), status, int(c.get("iteration", 0)),
                              _stage(db, name), int(n.get("oracle_calls", 0)), int(n.get("reused_labels", 0)),
                              int(n.get("failed_labels", 0)), last,
                              failure_line(*failure) if failure else None))
    return rows


def format_table(rows: list[StatusRow], store: str | None = None) -> str:
    """The rows as a fixed-width text table (campaign names first, so lines start with them);
    ``store``: the directory an interrupted campaign is resumed from."""
    lines = [f"{'campaign':<28}{'kind':<7}{'status':<11}{'round':>6}  {'stage':<26}{'paid':>6}{'reused':>8}"
             f"{'failed':>8}  {'last unc. (eV/Å)':>16}"]
    for r in rows:
        unc = f"{r.last_uncertainty:.3g}" if r.last_uncertainty is not None else "—"
        lines.append(f"{r.campaign:<28}{r.kind:<7}{r.status:<11}{r.iteration:>6}  {r.stage[:25]:<26}{r.paid:>6}"
                     f"{r.reused:>8}{r.failed:>8}  {unc:>16}")
    if not rows:
        lines.append("(no campaign in this store)")
    lines += [f"{r.campaign}: {FAILED}: {r.why}" for r in rows if r.status == FAILED]
    if any(r.status == INTERRUPTED for r in rows):
        lines.append(f"{INTERRUPTED}: no alflow process is running it; finish it with `alflow resume --store {store}`"
                     if store else f"{INTERRUPTED}: finish it with `alflow resume`")
    return "\n".join(lines)


def iteration_table(db, name: str) -> str:
    """Per-iteration oracle accounting of campaign ``name``: calls paid, labels reused from the
    cache, failed calls by class (rejected structures were not paid), the model's errors on the
    round's new labels and the largest uncertainty along its ML simulation."""
    from alflow.report.data import read_labels, read_iterations
    from alflow.store import Store

    store = Store(db, create_indexes=False)
    campaign = store.campaign(name)
    if campaign is None:
        names = sorted(d["name"] for d in db["campaigns"].find({}, {"name": 1}))
        raise ValueError(f"no campaign named {name!r} in this store (campaigns: {', '.join(names) or 'none'})")
    _, failures = read_labels(store, campaign)
    by_round: dict[int | None, dict[str, int]] = {}
    for f in failures:
        counts = by_round.setdefault(f.iteration, {})
        counts[f.failure_class] = counts.get(f.failure_class, 0) + 1

    def num(x, fmt=".3g"):
        return format(x, fmt) if x is not None else "—"

    lines = [f"{name}: {campaign.get('status', '?')}, round {campaign.get('iteration', 0)}",
             f"{'round':>5}{'paid':>6}{'reused':>8}{'failed':>8}  {'failed by class':<28}"
             f"{'E MAE (eV)':>11}{'F MAE (eV/Å)':>13}{'max unc. (eV/Å)':>16}"]
    for it in read_iterations(store, name, trajectories=False):
        classes = ", ".join(f"{k} {v}" for k, v in sorted(by_round.get(it.number, {}).items())) or "—"
        lines.append(f"{it.number:>5}{it.oracle_calls:>6}{it.reused:>8}{it.failed:>8}  {classes[:27]:<28}"
                     f"{num(it.energy_mae):>11}{num(it.force_mae):>13}{num(it.max_uncertainty):>16}")
    n = campaign.get("counters") or {}
    lines.append(f"{'all':>5}{int(n.get('oracle_calls', 0)):>6}{int(n.get('reused_labels', 0)):>8}"
                 f"{int(n.get('failed_labels', 0)):>8}")
    return "\n".join(lines)
