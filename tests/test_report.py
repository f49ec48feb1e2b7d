"""Campaign reports and the live status view, on campaigns run through ``alflow run``.

A short EMT relax and NEB campaign share one embedded store; ``alflow report`` draws both. Every
figure must be a real PNG with content, embedded in the HTML; the header shows summary.json's
numbers; failed labels appear by class; and neither ``report`` nor ``status`` writes the store.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.image import imread

from alflow.oracles import failure_class
from alflow.report.page import number
from alflow.spec import SpecError, parse_spec
from test_campaign_run import TESTS, relax_spec, run_cli, run_flaky_relax, small_spec

PNG = b"\x89PNG\r\n\x1a\n"
FIGURES = {
    "relax": ["learning_curve.png", "parity.png", "calibration.png", "relaxation.png", "oracle_accounting.png"],
    "neb": ["learning_curve.png", "parity.png", "calibration.png", "neb.png", "oracle_accounting.png"],
}


def _stamp(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """A relax and an NEB campaign in one store, then ``alflow report`` for both."""
    folder = tmp_path_factory.mktemp("report")
    relax = relax_spec(folder, "relax-report", {"kind": "emt"}, rounds=2)
    neb = small_spec(folder, "neb-report", "neb")
    for spec in (relax, neb):
        proc = run_cli("run", spec.name, "--store", "store", cwd=folder)
        assert proc.returncode in (0, 3), proc.stderr
    before = _stamp(folder / "store" / "store.json")
    proc = run_cli("report", "--store", "store", "--output", "reports", cwd=folder)
    return folder, proc, before


@pytest.mark.parametrize("name, kind", [("relax-report", "relax"), ("neb-report", "neb")])
def test_report_figures_are_real_pngs_embedded_in_the_html(reported, name, kind):
    folder, proc, _ = reported
    assert proc.returncode == 0, proc.stderr
    out = folder / "reports" / name
    assert f"report: {out / 'report.html'}" in proc.stdout
    html = (out / "report.html").read_text()
    assert json.loads((out / "report.json").read_text())["figures"] == FIGURES[kind]
    for fig in FIGURES[kind]:
        data = (out / fig).read_bytes()
        assert data.startswith(PNG), fig
        assert len(data) > 15_000, fig
        pixels = imread(out / fig)[..., :3]
        assert pixels.std() > 0.05, fig  # not a blank canvas
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, fig  # lines, markers, text in colour
        assert f"data:image/png;base64,{base64.b64encode(data).decode()}" in html, fig
    assert html.count("data:image/png;base64,") == len(FIGURES[kind])
    assert "src=\"http" not in html and "<script" not in html  # opens offline


@pytest.mark.parametrize("name", ["relax-report", "neb-report"])
def test_report_header_numbers_equal_summary_json(reported, name):
    folder, *_ = reported
    summary = json.loads((folder / "results" / name / "summary.json").read_text())
    out = folder / "reports" / name
    shown = json.loads((out / "report.json").read_text())["summary"]
    keys = {"converged", "reason", "iterations", "oracle_calls", "reused_labels", "failed_labels"}
    keys |= {"final_energy", "final_energy_oracle", "final_fmax_oracle"} if summary["kind"] == "relax" else {"barrier"}
    assert keys <= set(shown)
    html = (out / "report.html").read_text()
    for key, value in shown.items():
        assert value == summary[key], key
        if not isinstance(value, (str, bool)):
            assert f"<td>{number(value)}" in html, key


def test_report_and_status_never_write_the_store(reported):
    folder, proc, before = reported
    store = folder / "store" / "store.json"
    assert _stamp(store) == before  # report
    proc = run_cli("status", "--store", "store", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert set(rows) == {"relax-report", "neb-report"}
    assert re.search(r"merge \d+ \(completed\)", rows["relax-report"])
    assert _stamp(store) == before


def test_status_names_a_store_file_it_cannot_read_and_refuses_bad_watch_periods(tmp_path):
    (tmp_path / "store").mkdir()
    for text, detail in (("[]", "not a mapping of databases"), ('{"alflow": {', "Expecting property name")):
        (tmp_path / "store" / "store.json").write_text(text)
        proc = run_cli("status", "--store", "store", cwd=tmp_path)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert f"store.json: not an alflow store snapshot ({detail}" in proc.stderr
    for period in ("inf", "nan", "0"):
        proc = run_cli("status", "--store", "store", "--watch", period, cwd=tmp_path)
        assert proc.returncode != 0 and f"--watch: seconds must be > 0 and at most 86400, got {period}" in proc.stderr


def test_status_watch_redraws_until_ctrl_c(reported):
    folder, _, before = reported
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "alflow", "status", "--store", "store", "--watch", "0.2"],
                            cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tables = 0
    for line in proc.stdout:
        tables += line.startswith("campaign ")
        if tables == 2:  # redrawn once: stop it as Ctrl-C would
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert tables == 2
    assert _stamp(folder / "store" / "store.json") == before


def test_report_shows_failed_labels_by_class(tmp_path):
    summary = run_flaky_relax(tmp_path)
    assert summary["failed_labels"] >= 1
    proc = run_cli("report", "relax-flaky", "--store", "store", "--output", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "relax-flaky" / "report.json").read_text())
    assert report["failures_by_class"] == {"exception": summary["failed_labels"]}
    html = (tmp_path / "out" / "relax-flaky" / "report.html").read_text()
    assert "Failed oracle calls by class" in html
    assert f"<td>exception</td><td>{summary['failed_labels']}</td>" in html
    assert "simulated SCF failure" in html
    # alflow status CAMPAIGN: the same failures per round, by class, and the totals of summary.json
    proc = run_cli("status", "relax-flaky", "--store", "store", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[2:]}
    per_round = [int(r[3]) for k, r in rows.items() if k.isdigit()]
    assert sum(per_round) == summary["failed_labels"]
    assert sum(line.count("exception") for line in proc.stdout.splitlines()) == sum(1 for n in per_round if n)
    assert rows["all"][1:4] == [str(summary["oracle_calls"]), str(summary["reused_labels"]),
                                str(summary["failed_labels"])]


def test_report_names_a_missing_campaign(reported):
    folder, *_ = reported
    proc = run_cli("report", "nope", "--store", "store", cwd=folder)
    assert proc.returncode == 1
    assert "no campaign named 'nope'" in proc.stderr and "relax-report" in proc.stderr


def test_snapshot_reader_never_writes_even_under_mongomock_persistence(reported):
    """With FireWorks' mongomock mode active in the process (its ServerStore writes the file named by
    MONGOMOCK_SERVERSTORE_FILE at exit), the read-only loader still leaves the store alone."""
    folder, _, before = reported
    store = folder / "store" / "store.json"
    code = ("import mongomock_persistence\n"
            "from alflow.store.readonly import open_readonly\n"
            "db = open_readonly('store'); db.campaigns.delete_many({}); print(db.campaigns.count_documents({}))")
    env = {**os.environ, "MONGOMOCK_SERVERSTORE_FILE": str(store)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0"
    assert _stamp(store) == before


@pytest.mark.parametrize("status, reason, recorded, expected", [
    ("ok", None, None, None),
    ("failed", "RuntimeError: simulated SCF failure", "exception", "exception"),  # the oracle's class wins
    ("failed", "SCF did not converge in 100 steps", None, "scf"),
    ("failed", "job killed: walltime exceeded", None, "timeout"),
    ("rejected", "atoms 0.4 Å apart", "unphysical", "unphysical"),
    ("failed", "energy or forces not finite", None, "nonfinite"),
    ("failed", "KeyError: 'x'", None, "exception"),
    ("failed", None, None, "unknown"),
    ("rejected", "atoms too close", None, "rejected"),
])
def test_failure_class(status, reason, recorded, expected):
    assert failure_class(status, reason, recorded) == expected


def test_spec_report_section(tmp_path):
    path = relax_spec(tmp_path, "r", {"kind": "emt"})
    data = yaml.safe_load(path.read_text())
    assert parse_spec(data, path).report == {"direct_oracle_calls": None}
    assert parse_spec({**data, "report": {"direct_oracle_calls": 31}}, path).to_dict()["report"] == {"direct_oracle_calls": 31}
    with pytest.raises(SpecError, match=r"r.yaml: report.direct_oracle_calls: must be an integer >= 1, got 0"):
        parse_spec({**data, "report": {"direct_oracle_calls": 0}}, path)
    with pytest.raises(SpecError, match=r"r.yaml: report.calls: unknown key"):
        parse_spec({**data, "report": {"calls": 3}}, path)


def test_header_of_a_campaign_still_running(reported):
    """No summary yet: the header says so and shows the counters so far (read from an in-memory copy)."""
    from alflow.report.data import read_campaign
    from alflow.report.page import header_rows
    from alflow.store import Store
    from alflow.store.readonly import load_snapshot

    folder, _, before = reported
    db = load_snapshot(folder / "store" / "store.json")
    db.campaigns.update_one({"name": "relax-report"}, {"$unset": {"summary": ""}, "$set": {"status": "running"}})
    data = read_campaign(Store(db, create_indexes=False), "relax-report", model=False)
    rows = {row.label: row.text for row in header_rows(data)}
    assert rows["Outcome"] == "no result yet (campaign status: running)"
    assert rows["Oracle calls paid"] == str(data.counters["oracle_calls"])
    assert _stamp(folder / "store" / "store.json") == before


def test_open_readonly_refuses_missing_sources(tmp_path):
    from alflow.store.readonly import open_readonly

    with pytest.raises(OSError, match="no alflow store here"):
        open_readonly(tmp_path)
    with pytest.raises(OSError, match="launchpad file not found"):
        open_readonly(launchpad=tmp_path / "my_launchpad.yaml")
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_campaign_wall_time_counts_overlapping_launches_once_and_gaps_not_at_all():
    from datetime import datetime, timedelta

    from alflow.report.data import _covered_seconds

    t = datetime(2026, 1, 1)
    s = lambda a, b: (t + timedelta(seconds=a), t + timedelta(seconds=b))  # noqa: E731
    # two parallel oracle calls (overlap), then a 1-hour stop before resume, then one more launch
    assert _covered_seconds([s(0, 10), s(5, 12), s(12, 20), s(3620, 3630)]) == 30.0
    assert _covered_seconds([s(0, 10), s(2, 4)]) == 10.0
    assert _covered_seconds([]) is None


def test_direct_run_estimate_comes_from_a_relaxation_that_began_at_the_start():
    """A refined round relaxes from its best label, an online round from the last minimum: a few
    steps that say nothing about the direct relaxation from the start."""
    from alflow.report.data import CampaignData, Iteration, direct_oracle_calls

    def rounds(*metrics):
        return [Iteration(k + 1, 1, 0, 0, None, None, None, m) for k, m in enumerate(metrics)]

    def data(iterations, learner="offline"):
        return CampaignData(name="c", kind="relax", status="completed", spec={"learner": {"kind": learner}},
                            summary=None, counters={}, iterations=iterations, labels=[], failures=[], stages=[],
                            wall_seconds=None, start_structures=[])

    plain = {"simulation_steps": 24, "simulation_converged": True}
    refined = {"simulation_steps": 3, "simulation_converged": True, "refined_from_fmax_oracle": 0.4}
    count = direct_oracle_calls(data(rounds(plain, {**plain, "simulation_steps": 28}, refined, refined)))
    assert (count.value, count.source) == (29, "estimate") and "round 2" in count.note
    assert direct_oracle_calls(data(rounds(plain, {**plain, "simulation_steps": 2}), "online")).value == 25
    assert direct_oracle_calls(data(rounds(refined))).source == "not given"


def test_a_wide_axis_goes_log_and_symmetric_log_when_a_value_is_not_positive():
    import matplotlib.pyplot as plt

    from alflow.report.figures import _log_if_wide

    scales = []
    for values in ([0.1, 0.2], [0.001, 1.0], [-0.03, 0.0002, 0.13]):  # an oracle barrier can be negative
        fig, ax = plt.subplots()
        ax.plot(range(len(values)), values)
        _log_if_wide(ax, values)
        scales.append(ax.get_yscale())
        if min(values) < 0:
            fig.canvas.draw()
            assert ax.get_ylim()[0] < min(values)  # drawn, not clipped off the axis
        plt.close(fig)
    assert scales == ["linear", "log", "symlog"]
