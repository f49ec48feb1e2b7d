"""alflow on a MongoDB server: `alflow submit` + FireWorks' stock `rlaunch`, `alflow run -l`, and the
FireWorks configuration files. The server parts run when ALFLOW_TEST_MONGODB_URI is set (e.g.
mongodb://user:password@localhost:27017/?authSource=admin after `docker compose up -d`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from ase.io import write

from alflow.fw.launchpad import launchpad_settings
from alflow.systems import co_cu100

ROOT = Path(__file__).parents[1]
URI = os.environ.get("ALFLOW_TEST_MONGODB_URI")
needs_server = pytest.mark.skipif(
    not URI, reason="no MongoDB server: set ALFLOW_TEST_MONGODB_URI=mongodb://... to run these against one")


def test_launchpad_file_takes_its_values_from_the_environment(monkeypatch, tmp_path):
    env = {"ALFLOW_MONGO_HOST": "db.example.org", "ALFLOW_MONGO_PORT": "27018", "ALFLOW_MONGO_DB": "campaigns",
           "ALFLOW_MONGO_USER": "alice", "ALFLOW_MONGO_PASSWORD": "s3cr$t{x}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = launchpad_settings(ROOT / "fw_configs" / "my_launchpad.yaml")
    assert (settings["host"], settings["port"], settings["name"]) == ("db.example.org", 27018, "campaigns")
    assert (settings["username"], settings["password"]) == ("alice", "s3cr$t{x}")
    monkeypatch.delenv("ALFLOW_MONGO_PASSWORD")
    with pytest.raises(ValueError, match="ALFLOW_MONGO_PASSWORD not set") as exc:
        launchpad_settings(ROOT / "fw_configs" / "my_launchpad.yaml")
    assert "alice" not in str(exc.value) and "s3cr" not in str(exc.value)


@pytest.mark.parametrize("adapter, directives", [
    ("my_qadapter_slurm.yaml", ["#SBATCH --nodes=1", "#SBATCH --ntasks=16", "#SBATCH --time=01:00:00",
                                "#SBATCH --job-name=alflow-dft"]),
    ("my_qadapter_pbs.yaml", ["#PBS -l nodes=1:ppn=16", "#PBS -l walltime=01:00:00", "#PBS -N alflow-dft"]),
])
def test_queue_adapters_render_job_scripts(adapter, directives, tmp_path):
    from fireworks.user_objects.queue_adapters.common_adapter import CommonAdapter

    qadapter = CommonAdapter.from_file(str(ROOT / "fw_configs" / adapter))
    script = qadapter.get_script_str(str(tmp_path))
    assert script.startswith("#!/bin/bash")
    for line in directives:
        assert line in script, f"{line!r} missing from:\n{script}"
    assert "rlaunch -l ~/.fireworks/my_launchpad.yaml -w $ALFLOW_FW_CONFIGS/my_fworker_dft.yaml singleshot" in script
    assert "module load quantum-espresso" in script and "None" not in script


def test_fworkers_split_ml_and_dft():
    for name, category in (("my_fworker_ml.yaml", "ml"), ("my_fworker_dft.yaml", "dft")):
        assert yaml.safe_load((ROOT / "fw_configs" / name).read_text())["category"] == category


@pytest.fixture
def server_launchpad(tmp_path):
    """A launchpad file for a fresh database on the test server; the database is dropped after."""
    from pymongo import MongoClient

    name = f"alflow_test_{uuid.uuid4().hex[:8]}"
    path = tmp_path / "launchpad.yaml"
    path.write_text(yaml.safe_dump({"host": "${ALFLOW_TEST_MONGODB_URI}", "uri_mode": True, "name": name,
                                    "strm_lvl": "ERROR"}))
    yield path
    MongoClient(URI).drop_database(name)


def _campaign(folder: Path) -> Path:
    write(folder / "co.traj", co_cu100())
    spec = {"name": "server-md", "system": {"structure": "co.traj"},
            "simulation": {"kind": "md", "steps": 10, "temperature_K": 300, "seed": 1}, "oracle": {"kind": "emt"},
            "model": {"ensemble": 2, "epochs": 20},
            "learner": {"query": {"strategy": "random", "samples": 3}, "stop": {"max_iterations": 2}}}
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    return folder / "spec.yaml"


def _submitted_to_store_file(folder: Path) -> None:
    """The campaign submitted to a store file in ``folder`` (``store/store.json``, FireWorks'
    mongomock format), with ``lp.yaml`` for the stock commands on it."""
    _campaign(folder)
    submit = ("from alflow.runner import owned_store, submit\n"
              "from alflow.spec import load_spec\n"
              "from alflow.store.embedded import snapshot\n"
              "with owned_store('store') as (lp, path):\n"
              "    submit(load_spec('spec.yaml'), lp)\n"
              "    snapshot(lp, path)\n")
    proc = _cli(sys.executable, "-c", submit, cwd=folder)
    assert proc.returncode == 0, proc.stderr
    (folder / "lp.yaml").write_text(yaml.safe_dump({"host": "localhost", "name": "alflow", "strm_lvl": "ERROR"}))


def _cli(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "MONGOMOCK_SERVERSTORE_FILE"}
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@needs_server
def test_submit_then_stock_rlaunch_runs_the_campaign(server_launchpad, tmp_path):
    spec = _campaign(tmp_path)
    proc = _cli(sys.executable, "-m", "alflow", "submit", spec.name, "-l", str(server_launchpad), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    again = _cli(sys.executable, "-m", "alflow", "submit", spec.name, "-l", str(server_launchpad), cwd=tmp_path)
    assert again.returncode == 1 and "already exists" in again.stderr
    rendered = tmp_path / "rendered.yaml"  # what `envsubst` gives users for the stock commands
    rendered.write_text(yaml.safe_dump(launchpad_settings(server_launchpad)))
    rlaunch = Path(sys.executable).with_name("rlaunch")
    proc = _cli(str(rlaunch), "-l", str(rendered), "rapidfire", cwd=tmp_path)  # no alflow process in the loop
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "results" / "server-md" / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["oracle_calls"] == 1 + 2 * 3
    status = _cli(sys.executable, "-m", "alflow", "status", "-l", str(server_launchpad), cwd=tmp_path)
    assert status.returncode == 0 and "server-md" in status.stdout


def test_stock_rlaunch_runs_a_submitted_campaign_with_no_alflow_process_in_the_loop(tmp_path):
    """The server path without a server: the campaign is submitted to a store file, then FireWorks'
    own `rlaunch rapidfire`, in its mongomock mode on that file, runs every firework."""
    _submitted_to_store_file(tmp_path)
    env = {**os.environ, "MONGOMOCK_SERVERSTORE_FILE": str(tmp_path / "store" / "store.json")}
    rlaunch = Path(sys.executable).with_name("rlaunch")
    proc = subprocess.run([str(rlaunch), "-l", "lp.yaml", "rapidfire"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "results" / "server-md" / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["oracle_calls"] == 1 + 2 * 3
    status = _cli(sys.executable, "-m", "alflow", "status", "--store", "store", "server-md", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[-1].split()[:4] == ["all", "7", "0", "0"]


@needs_server
def test_run_drives_a_server_launchpad_with_offline_workers(server_launchpad, tmp_path):
    spec = _campaign(tmp_path)
    proc = _cli(sys.executable, "-m", "alflow", "run", spec.name, "-l", str(server_launchpad), "--workers", "2",
                cwd=tmp_path)
    assert proc.returncode in (0, 3), proc.stderr
    summary = json.loads((tmp_path / "results" / "server-md" / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["oracle_calls"] == 1 + 2 * 3


def test_submit_refuses_a_bad_spec_or_launchpad_in_one_line(tmp_path, monkeypatch):
    spec = _campaign(tmp_path)
    monkeypatch.delenv("ALFLOW_MONGO_PASSWORD", raising=False)
    (tmp_path / "nobody.yaml").write_text(yaml.safe_dump({  # nothing listens on port 9
        "host": "mongodb://127.0.0.1:9/", "uri_mode": True, "name": "x",
        "mongoclient_kwargs": {"serverSelectionTimeoutMS": 300}}))
    cases = {  # (spec, launchpad) → what the one-line error names
        ("spec.yaml", "missing.yaml"): "missing.yaml: launchpad file not found",
        ("spec.yaml", "nobody.yaml"): "nobody.yaml: cannot reach the MongoDB server (127.0.0.1:9",
        ("spec.yaml", str(ROOT / "fw_configs" / "my_launchpad.yaml")): "ALFLOW_MONGO_PASSWORD",
        ("nope.yaml", str(ROOT / "fw_configs" / "my_launchpad.yaml")): "nope.yaml",
        ("spec.yaml", "spec.yaml"): "spec.yaml: not a usable launchpad file (missing key 'host')",
        ("spec.yaml", "tab.yaml"): "tab.yaml: YAML syntax error at line 2",
    }
    (tmp_path / "tab.yaml").write_text("host: localhost\n\tport: 27017\n")
    for (spec_name, launchpad), named in cases.items():
        proc = _cli(sys.executable, "-m", "alflow", "submit", spec_name, "-l", launchpad, cwd=tmp_path)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and named in proc.stderr, proc.stderr
    assert spec.exists() and not (tmp_path / "results").exists()


def test_qlaunch_reservation_with_the_alflow_worker_and_recover_offline(tmp_path):
    """docs/hpc.md §4 without a cluster: oracle fireworks reserved by the stock `qlaunch -r` with
    `rocket_launch: python -m alflow.fw.worker singleshot --offline`, the job run by a stand-in
    `sbatch`, the results brought back by `lpad recover_offline`; ML fireworks by `rlaunch`. The
    store is a FireWorks mongomock file, every command a separate process."""
    _submitted_to_store_file(tmp_path)
    (tmp_path / "qa.yaml").write_text(yaml.safe_dump({
        "_fw_name": "CommonAdapter", "_fw_q_type": "SLURM", "job_name": "dft", "nodes": 1, "walltime": "00:10:00",
        "rocket_launch": f"{sys.executable} -m alflow.fw.worker singleshot --offline"}))
    bin_dir = tmp_path / "bin"  # sbatch runs the job script at once, in its directory
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/bash\nbash "$1" > job.log 2>&1\necho "Submitted batch job 42"\n')
    (bin_dir / "sbatch").chmod(0o755)
    env = {**os.environ, "MONGOMOCK_SERVERSTORE_FILE": str(tmp_path / "store" / "store.json"),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    tools = Path(sys.executable).parent

    def fw(*args):
        proc = subprocess.run([str(tools / args[0]), "-l", "lp.yaml", *args[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout + proc.stderr

    ml = ROOT / "fw_configs" / "my_fworker_ml.yaml"
    dft = ROOT / "fw_configs" / "my_fworker_dft.yaml"
    (tmp_path / "jobs").mkdir()
    for _ in range(10):
        fw("rlaunch", "-w", str(ml), "rapidfire")
        if (tmp_path / "results" / "server-md" / "summary.json").exists():
            break
        while True:  # one job per launch directory, as `qlaunch rapidfire` makes them
            job = tmp_path / "jobs" / str(len(list((tmp_path / "jobs").iterdir())))
            job.mkdir()
            if "reserved FW" not in fw("qlaunch", "-r", "-w", str(dft), "-q", "qa.yaml", "--launch_dir", str(job),
                                       "singleshot"):
                break
        fw("lpad", "recover_offline")
    summary = json.loads((tmp_path / "results" / "server-md" / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["oracle_calls"] == 1 + 2 * 3
    assert len(list((tmp_path / "jobs").glob("**/FW_offline.json"))) == summary["oracle_calls"]
