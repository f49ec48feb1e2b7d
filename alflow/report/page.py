"""The report's header table and its self-contained HTML page (figures embedded as base64 PNG).

The header's result numbers are the campaign's ``summary`` (the contents of ``summary.json``),
shown as they are; what the page adds (calls saved, wall times) is computed from the same data.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from alflow.report.data import CampaignData, failures_by_class


@dataclass
class Row:
    """One header line: ``text`` as shown; ``key`` / ``value``: the summary.json field it shows."""

    label: str
    text: str
    key: str | None = None
    value: Any = None


def number(value: Any, unit: str = "") -> str:
    """How the page writes a number: integers as they are, floats to 6 significant digits."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        text = f"{value:.6g}"
    else:
        text = str(value)
    return f"{text} {unit}".strip()


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def _settings(d: dict, skip: Sequence[str] = ()) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items() if v not in (None, {}, []) and k not in skip)


def spec_rows(data: CampaignData) -> list[Row]:
    """What was run: the campaign spec in a few lines."""
    spec = data.spec
    oracle = dict(spec.get("oracle", {}))
    kind = oracle.pop("kind", "?")
    learner = spec.get("learner", {})
    q = learner.get("query", {})
    query = f"{q.get('strategy')} × {q.get('samples')}" + (f" ({_settings(q['options'])})" if q.get("options") else "")
    learn = f"{learner.get('kind', 'offline')}, query {query}"
    if learner.get("kind") == "online":
        learn += f", threshold {learner.get('threshold')} eV/Å"
    return [
        Row("Campaign", data.name),
        Row("Simulation", f"{data.kind}: {_settings(spec.get('simulation', {}))}"),
        Row("Oracle", f"{kind}" + (f": {_settings(oracle)}" if _settings(oracle) else "")),
        Row("Model", _settings(spec.get("model", {}), skip=("morse_params",))),
        Row("Learner", learn),
        Row("Stop criteria", _settings(learner.get("stop", {}))),
    ]


_RESULTS = {  # kind -> [(summary key, label, unit)]
    "relax": [("final_energy", "Final energy, ML", "eV"), ("final_energy_oracle", "Final energy, oracle", "eV"),
              ("final_fmax_oracle", "Final fmax, oracle", "eV/Å")],
    "neb": [("barrier", "Barrier, ML band", "eV"), ("barrier_oracle", "Barrier, oracle at the ML saddle", "eV")],
    "md": [],
}


def header_rows(data: CampaignData) -> list[Row]:
    """The header table: spec summary, outcome, oracle calls (and saved vs the direct run), results, wall times."""
    rows = spec_rows(data)
    s = data.summary
    if s is None:  # still running (or stopped without a result)
        c = data.counters
        rows += [Row("Outcome", f"no result yet (campaign status: {data.status})"),
                 Row("AL iterations so far", number(data.iterations[-1].number if data.iterations else 0)),
                 Row("Oracle calls paid", number(c.get("oracle_calls"))),
                 Row("Labels reused from the cache", number(c.get("reused_labels"))),
                 Row("Failed oracle calls", number(c.get("failed_labels")))]
        paid = c.get("oracle_calls")
    else:
        classes = failures_by_class(data)
        by_class = f" ({', '.join(f'{k}: {v}' for k, v in classes.items())})" if classes else ""
        rows += [
            Row("Outcome", "converged" if s["converged"] else "not converged", "converged", s["converged"]),
            Row("Why", str(s.get("reason", "")), "reason", s.get("reason")),
            Row("AL iterations", number(s["iterations"]), "iterations", s["iterations"]),
            Row("Oracle calls paid", number(s["oracle_calls"]), "oracle_calls", s["oracle_calls"]),
            Row("Labels reused from the cache", number(s["reused_labels"]), "reused_labels", s["reused_labels"]),
            Row("Failed labels", number(s["failed_labels"]) + by_class, "failed_labels", s["failed_labels"]),
        ]
        paid = s["oracle_calls"]
    direct = data.direct
    rows.append(Row("Direct run, oracle calls", f"{direct.value} ({direct.note})" if direct.value else direct.note))
    if direct.value and paid is not None:
        saved = direct.value - paid
        rows.append(Row("Oracle calls saved vs the direct run",
                        f"{saved} ({100 * saved / direct.value:.0f} %)" + (", estimate" if direct.source == "estimate" else "")))
    if s is not None:
        for key, label, unit in _RESULTS.get(data.kind, []):
            if key in s:
                rows.append(Row(label, number(s[key], unit), key, s[key]))
        if data.kind == "md" and isinstance(s.get("validation"), dict):
            v = s["validation"]
            for key, label, unit in (("energy_mae", "Validation energy MAE (last round)", "eV"),
                                     ("force_mae", "Validation force MAE (last round)", "eV/Å"),
                                     ("frames", "Validation frames", "")):
                rows.append(Row(label, number(v.get(key), unit), f"validation.{key}", v.get(key)))
    rows.append(Row("Wall time, campaign (fireworks running)", duration(data.wall_seconds)))
    for st in data.stages:
        rows.append(Row(f"Wall time, {st.stage}", f"{duration(st.seconds)} ({st.count} firework{'s' if st.count != 1 else ''})"))
    return rows


def iteration_rows(data: CampaignData) -> tuple[list[str], list[list[str]]]:
    """Per-iteration table: columns and formatted rows."""
    check = {"relax": ("final_fmax_oracle", "oracle fmax (eV/Å)"), "neb": ("saddle_energy_error", "saddle |ΔE| (eV)"),
             "md": ("frames", "validation frames")}.get(data.kind, ("", ""))
    cols = ["iteration", "paid", "reused", "failed", "energy MAE (eV)", "force MAE (eV/Å)", check[1],
            "max uncertainty (eV/Å)", "train (s)", "simulation (s)", "decision"]
    rows = []
    for it in data.iterations:
        m = it.metrics
        rows.append([str(it.number), str(it.oracle_calls), str(it.reused), str(it.failed), number(it.energy_mae),
                     number(it.force_mae), number(m.get(check[0])), number(it.max_uncertainty),
                     number(round(m["train_seconds"], 1)) if m.get("train_seconds") is not None else "—",
                     number(round(m["simulation_seconds"], 1)) if m.get("simulation_seconds") is not None else "—",
                     str(m.get("decision", ""))])
    return cols, rows


def failure_rows(data: CampaignData) -> list[list[str]]:
    """Calls without a label by class: class, count, paid or not, iterations, one example reason."""
    out = []
    for cls, n in failures_by_class(data).items():
        calls = [f for f in data.failures if f.failure_class == cls]
        its = sorted({f.iteration for f in calls if f.iteration is not None})
        paid = {f.paid for f in calls}
        reason = next((f.reason for f in calls if f.reason), "")
        out.append([cls, str(n), "paid" if paid == {True} else "rejected before the call" if paid == {False} else "both",
                    ", ".join(map(str, its)), reason[:200]])
    return out


_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto; max-width: 1150px;
       color: #222; line-height: 1.4; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
table.header th { width: 17em; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #444; font-size: 0.9em; margin-top: 0.3em; }
.converged { color: #1a7f37; font-weight: bold; } .notconverged { color: #b42318; font-weight: bold; }
"""


def _table(cols: Sequence[str] | None, rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>" if cols else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}">{head}{body}</table>'


def render_html(data: CampaignData, figures: Sequence[tuple[Path, str, str]]) -> str:
    """The page: header table, failures by class, per-iteration table, every figure embedded.
    ``figures``: (PNG path, title, caption)."""
    header = []
    for row in header_rows(data):
        text = html.escape(row.text)
        if row.key == "converged":
            text = f'<span class="{"converged" if row.value else "notconverged"}">{text}</span>'
        header.append(f"<tr><th>{html.escape(row.label)}</th><td>{text}</td></tr>")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>alflow report: {html.escape(data.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Campaign report: {html.escape(data.name)}</h1>",
        f'<table class="header">{"".join(header)}</table>',
        "<h2>Failed oracle calls by class</h2>",
    ]
    failures = failure_rows(data)
    parts.append(_table(["class", "calls", "oracle paid", "iterations", "example reason"], failures) if failures
                 else "<p>No oracle call failed.</p>")
    parts.append("<h2>Iterations</h2>")
    parts.append(_table(*iteration_rows(data)))
    for path, title, caption in figures:
        encoded = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        parts.append(f"<figure><h2>{html.escape(title)}</h2>"
                     f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(title)}">'
                     f"<figcaption>{html.escape(caption)} ({html.escape(Path(path).name)})</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
