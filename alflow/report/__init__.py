"""Campaign reports: PNG figures and one self-contained HTML page, read from the store.

    data.py     the store → plain per-iteration / per-label data (reads only)
    figures.py  the figures (matplotlib, Agg canvas)
    page.py     the header table and the HTML page

``alflow report`` wires them: :func:`write_report` on a ``Store(db, create_indexes=False)`` of a
database from :func:`alflow.store.readonly.open_readonly`. matplotlib is imported here only on use.
"""

from __future__ import annotations

import json
from pathlib import Path


def write_report(store, name: str, out_dir: str | Path) -> Path:
    """Write the report of campaign ``name`` into ``out_dir`` (created): the figures (PNG),
    ``report.html`` (figures embedded, opens offline) and ``report.json`` (the header's values and
    the failures by class, for scripts). Returns the path of report.html."""
    from alflow.report import figures, page
    from alflow.report.data import failures_by_class, plain_value, read_campaign

    data = read_campaign(store, name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shown = []
    for filename, title, caption, draw in figures.FIGURES[:3]:
        shown.append((draw(data, out / filename), title, caption))
    if data.kind in figures.KIND_FIGURES:
        filename, draw = figures.KIND_FIGURES[data.kind]
        title, caption = figures.KIND_CAPTIONS[data.kind]
        shown.append((draw(data, out / filename), title, caption))
    filename, title, caption, draw = figures.FIGURES[3]
    shown.append((draw(data, out / filename), title, caption))

    html_path = out / "report.html"
    html_path.write_text(page.render_html(data, shown), encoding="utf-8")
    rows = page.header_rows(data)
    direct = data.direct
    (out / "report.json").write_text(json.dumps({
        "campaign": name,
        "kind": data.kind,
        "summary": {row.key: plain_value(row.value) for row in rows if row.key},
        "header": [{"label": row.label, "text": row.text} for row in rows],
        "direct_oracle_calls": {"value": direct.value, "source": direct.source, "note": direct.note},
        "failures_by_class": failures_by_class(data),
        "figures": [p.name for p, _, _ in shown],
    }, indent=1, ensure_ascii=False), encoding="utf-8")
    return html_path


__all__ = ["write_report"]
