"""Campaigns through FireWorks on the embedded store, driven by the real CLI (``alflow run``).

These check the machinery with a small, fast model: rounds and merges, the label cache (no
oracle call is ever paid twice, also across campaigns), failure recording, the read-only status
view and that a bad spec leaves the store untouched. Convergence against direct EMT runs is
checked by the slow campaign tests and benchmarks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase.calculators.emt import EMT
from ase.io import read, write
from bson import json_util

from alflow.constraints import free_mask
from alflow.refine import oracle_fmax
from alflow.simulate import max_force
from alflow.store.readonly import open_readonly
from alflow.store.store import Store
from alflow.systems import c_cu100, co_cu100, o_cu100_neb_endpoints

from flaky_oracle import calls_made

TESTS = Path(__file__).parent


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("MONGOMOCK_SERVERSTORE_FILE", None)
    return subprocess.run([sys.executable, "-m", "alflow", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def relax_spec(folder: Path, name: str, oracle: dict, rounds: int = 3) -> Path:
    write(folder / "start.traj", c_cu100())
    spec = {
        "name": name,
        "system": {"structure": "start.traj"},
        "simulation": {"kind": "relax", "fmax": 0.03, "steps": 200},
        "oracle": oracle,
        "model": {"prior": "morse", "ensemble": 2, "epochs": 60},
        "learner": {"query": {"strategy": "relax_final", "samples": 1},
                    "stop": {"fmax": 0.03, "max_iterations": rounds}},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def collection(store: Path, name: str) -> list[dict]:
    data = json_util.loads((store / "store.json").read_text())
    return [doc for _, doc in data["alflow"].get(name, {}).get("documents", [])]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One small relax campaign with an oracle that counts its calls in a file."""
    folder = tmp_path_factory.mktemp("campaign")
    counter = folder / "calls.txt"
    oracle = {"kind": "python", "callable": "flaky_oracle:counting_emt", "kwargs": {"counter": str(counter)}}
    spec = relax_spec(folder, "relax-small", oracle)
    proc = run_cli("run", spec.name, "--store", "store", cwd=folder)
    return folder, counter, oracle, proc


def test_campaign_runs_rounds_and_writes_summary(finished):
    folder, counter, _, proc = finished
    assert proc.returncode in (0, 3), proc.stderr  # converged, or stopped at max_iterations
    summary = json.loads((folder / "results" / "relax-small" / "summary.json").read_text())
    assert f"results: {folder / 'results' / 'relax-small' / 'summary.json'}" in proc.stdout
    assert summary["campaign"] == "relax-small" and summary["kind"] == "relax"
    assert summary["converged"] == (proc.returncode == 0)
    assert 1 <= summary["iterations"] <= 3
    rounds = collection(folder / "store", "iterations")
    assert sorted(r["iteration"] for r in rounds) == list(range(summary["iterations"] + 1))
    # every oracle call happened exactly once and is recorded: seed + ≤ 2 per round (final + 1 random)
    calls = calls_made(counter)
    assert summary["oracle_calls"] == calls <= 1 + 2 * summary["iterations"]
    labels = collection(folder / "store", "labels")
    assert len(labels) == calls
    assert len({(l["structure_hash"], l["oracle_hash"]) for l in labels}) == calls
    assert summary["failed_labels"] == 0 and summary["reused_labels"] == 0
    # the relax result is the oracle-labelled predicted minimum
    assert Path(summary["final_structure"]).is_file()
    final = read(summary["final_structure"])
    final.calc = EMT()
    assert abs(final.get_potential_energy() - summary["final_energy_oracle"]) < 1e-6
    assert abs(max_force(final.get_forces(), free_mask(final)) - summary["final_fmax_oracle"]) < 1e-6


def test_second_campaign_reuses_cached_labels(finished):
    folder, counter, oracle, _ = finished
    before = calls_made(counter)
    spec = relax_spec(folder, "relax-again", oracle, rounds=1)
    proc = run_cli("run", spec.name, "--store", "store", cwd=folder)
    assert proc.returncode in (0, 3), proc.stderr
    summary = json.loads((folder / "results" / "relax-again" / "summary.json").read_text())
    seed_round = next(r for r in collection(folder / "store", "iterations")
                      if r["campaign"] == "relax-again" and r["iteration"] == 0)
    assert seed_round["metrics"]["reused"] == 1 and seed_round["metrics"]["oracle_calls"] == 0
    assert summary["reused_labels"] >= 1
    assert calls_made(counter) - before == summary["oracle_calls"]


def test_status_reads_the_store_without_writing(finished):
    folder, *_ = finished
    store = folder / "store" / "store.json"
    before = store.read_bytes()
    proc = run_cli("status", "--store", "store", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert any(line.startswith("relax-small") for line in proc.stdout.splitlines())
    assert store.read_bytes() == before


def test_bad_spec_is_refused_and_store_untouched(finished, tmp_path):
    folder, *_ = finished
    store = folder / "store" / "store.json"
    before = store.read_bytes()
    bad = folder / "bad.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load((folder / "relax-small.yaml").read_text()), "name": "bad",
                                   "model": {"ensemble": 0}}))
    proc = run_cli("run", "bad.yaml", "--store", "store", cwd=folder)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0
    assert "bad.yaml: model.ensemble: must be an integer >= 1, got 0" in proc.stderr
    assert store.read_bytes() == before
    # nothing is created for a fresh store either
    proc = run_cli("run", str(bad), "--store", str(tmp_path / "fresh"), cwd=tmp_path)
    assert proc.returncode != 0 and not (tmp_path / "fresh").exists()


def run_flaky_relax(tmp_path: Path) -> dict:
    """Run a two-round relax campaign ``relax-flaky`` in ``tmp_path`` (store ``store``) whose oracle
    raises on every second call; returns its summary.json."""
    counter = tmp_path / "calls.txt"
    oracle = {"kind": "python", "callable": "flaky_oracle:flaky_emt", "kwargs": {"counter": str(counter), "period": 2}}
    spec = relax_spec(tmp_path, "relax-flaky", oracle, rounds=2)
    proc = run_cli("run", spec.name, "--store", "store", cwd=tmp_path)
    assert proc.returncode in (0, 3), proc.stderr
    return json.loads((tmp_path / "results" / "relax-flaky" / "summary.json").read_text())


def test_failing_oracle_is_recorded_and_campaign_goes_on(tmp_path):
    summary = run_flaky_relax(tmp_path)
    failed = [l for l in collection(tmp_path / "store", "labels") if l["status"] == "failed"]
    assert summary["failed_labels"] == len(failed) >= 1
    assert all("simulated SCF failure" in l["reason"] and l["failure_class"] == "exception" for l in failed)
    assert summary["iterations"] == 2


def small_spec(folder: Path, name: str, kind: str) -> Path:
    """Tiny NEB / MD campaigns (the paper's systems, EMT) that finish in seconds."""
    if kind == "neb":
        initial, final = o_cu100_neb_endpoints()
        write(folder / "initial.traj", initial)
        write(folder / "final.traj", final)
        system = {"initial": "initial.traj", "final": "final.traj"}
        simulation = {"kind": "neb", "images": 3, "fmax": 0.05, "steps": 100}
        learner = {"query": {"strategy": "neb", "samples": 1}, "stop": {"energy_tol": 0.01, "max_iterations": 2}}
    else:
        write(folder / "start.traj", co_cu100())
        system = {"structure": "start.traj"}
        simulation = {"kind": "md", "steps": 50, "temperature_K": 300, "seed": 3}
        learner = {"query": {"strategy": "random", "samples": 4},
                   "stop": {"energy_mae": 0.05, "force_mae": 0.04, "max_iterations": 2}}
    spec = {"name": name, "system": system, "simulation": simulation, "oracle": {"kind": "emt"},
            "model": {"ensemble": 2, "epochs": 40}, "learner": learner}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("kind", ["neb", "md"])
def test_neb_and_md_campaigns_run_and_report(tmp_path, kind):
    spec = small_spec(tmp_path, f"small-{kind}", kind)
    proc = run_cli("run", spec.name, "--store", "store", cwd=tmp_path)
    assert proc.returncode in (0, 3), proc.stderr
    summary = json.loads((tmp_path / "results" / f"small-{kind}" / "summary.json").read_text())
    labels = collection(tmp_path / "store", "labels")
    assert summary["oracle_calls"] == len(labels) and summary["failed_labels"] == 0
    if kind == "neb":
        band = read(summary["band"], index=":")
        assert len(band) == 5  # 3 moving images + the two (ML-relaxed) endpoints
        energies = [a.get_potential_energy() for a in band]
        assert summary["barrier"] == pytest.approx(max(energies) - energies[0])
        assert 2 <= len([l for l in labels if l["iteration"] == 0]) <= 2  # both endpoints seeded
    else:
        frames = read(summary["trajectory"], index=":")
        assert len(frames) == 51  # 50 steps, every step recorded, step 0 included
        v = summary["validation"]
        assert v["frames"] >= 1 and v["energy_mae"] >= 0 and v["force_mae"] >= 0
        assert len([l for l in labels if l["iteration"] == 2]) <= 4


def test_refinement_starts_each_round_at_the_best_label_matched_to_the_oracle(tmp_path):
    """``learner.refine_below``: a round's ML relaxation starts from the labelled structure with the
    lowest oracle fmax, and the model there gives exactly the oracle's energy and forces."""
    spec = relax_spec(tmp_path, "relax-refined", {"kind": "emt"}, rounds=2)
    raw = yaml.safe_load(spec.read_text())
    raw["learner"]["refine_below"] = 100.0  # anchored from round 1 on
    raw["learner"]["refine_fmax"] = 0.005  # the anchored ML relaxation goes below simulation.fmax (0.03)
    spec.write_text(yaml.safe_dump(raw))
    proc = run_cli("run", spec.name, "--store", "store", cwd=tmp_path)
    assert proc.returncode in (0, 3), proc.stderr
    store = Store(open_readonly(tmp_path / "store"), create_indexes=False)
    labels = {}
    for doc in store.labels_collection.find({"status": "ok"}):
        labels[doc["provenance"]["iteration"], doc["structure_hash"]] = store.label_atoms(doc)
    rounds = [r for r in store.iterations("relax-refined") if r["iteration"] >= 1]
    assert rounds
    for r in rounds:
        earlier = [a for (i, _), a in labels.items() if i < r["iteration"]]
        best = min(earlier, key=oracle_fmax)
        assert r["metrics"]["refined_from_fmax_oracle"] == pytest.approx(oracle_fmax(best))
        assert r["metrics"]["refinement_anchors"] == min(2, len(earlier))  # the default: matched at two labels
        first = store.load_trajectory(r["files"]["trajectory"])[0]
        np.testing.assert_allclose(first.positions, best.positions, atol=1e-8)
        assert first.get_potential_energy() == pytest.approx(best.get_potential_energy(), abs=1e-8)
        np.testing.assert_allclose(first.get_forces(apply_constraint=False), best.get_forces(apply_constraint=False),
                                   atol=1e-8)
        if r["metrics"]["simulation_converged"]:
            last = store.load_trajectory(r["files"]["trajectory"])[-1]
            assert max_force(last.get_forces(apply_constraint=False), free_mask(c_cu100())) <= 0.005


def test_a_fizzled_firework_is_one_line_with_the_traceback_left_in_its_launch_dir(tmp_path):
    spec = relax_spec(tmp_path, "broken-query", {"kind": "emt"}, rounds=2)
    spec.write_text(spec.read_text().replace("strategy: relax_final", "strategy: flaky_oracle:broken_strategy"))
    proc = run_cli("run", spec.name, "--store", "store", cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    line = proc.stderr.strip()
    assert "firework 'broken-query: round 1' failed: ValueError: this plug-in is broken (traceback: " in line
    log = Path(line.rsplit("(traceback: ", 1)[1].rstrip(")"))
    assert log.name == "error.log" and "this plug-in is broken" in log.read_text()
    status = run_cli("status", "--store", "store", cwd=tmp_path)  # failed, not "interrupted": resume would fail too
    assert status.stdout.splitlines()[1].split()[2] == "failed"
    assert "broken-query: failed: firework 'broken-query: round 1' failed: ValueError: this plug-in is broken" \
        in status.stdout
