"""The embedded runner's durability: one owner per store, oracle calls in parallel worker
processes, and `alflow resume` after kill -9 of the runner or a worker with no call paid twice.

The campaign is a short CO/Cu(100) MD (EMT) whose oracle sleeps like a DFT code and logs every
calculation (start, end, structure hash) to a file shared by all processes: the log proves the
overlap of parallel calls and that no structure was computed twice.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from ase.io import write
from bson import json_util

from alflow.systems import co_cu100

TESTS = Path(__file__).parent


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("MONGOMOCK_SERVERSTORE_FILE", None)
    return env


def alflow(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alflow", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=900)


def start_alflow(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "alflow", *args], cwd=cwd, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def md_spec(folder: Path, seconds: float, samples: int = 4, rounds: int = 2, callable_: str = "logging_emt",
            **kwargs) -> Path:
    write(folder / "co.traj", co_cu100())
    oracle = {"kind": "python", "callable": f"flaky_oracle:{callable_}",
              "kwargs": {"log": str(folder / "calls.log"), "seconds": seconds, **kwargs}}
    spec = {"name": "md", "system": {"structure": "co.traj"},
            "simulation": {"kind": "md", "steps": 10, "temperature_K": 300, "seed": 1},
            "oracle": oracle, "model": {"ensemble": 2, "epochs": 20},
            "learner": {"query": {"strategy": "random", "samples": samples},
                        "stop": {"energy_mae": 1.0, "force_mae": 2.0, "max_iterations": rounds}}}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def calls(folder: Path) -> list[tuple[float, float, str]]:
    log = folder / "calls.log"
    rows = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
    return [(float(a), float(b), h) for a, b, h in rows]


def summary(folder: Path) -> dict:
    return json.loads((folder / "results" / "md" / "summary.json").read_text())


def store_is_whole(folder: Path) -> dict:
    """The store file parses (never truncated) — returns it."""
    return json_util.loads((folder / "store" / "store.json").read_text())


def assert_each_call_once(folder: Path) -> None:
    log = calls(folder)
    repeated = {h: n for h, n in Counter(h for _, _, h in log).items() if n > 1}
    assert not repeated, f"structures computed more than once: {repeated}"
    s = summary(folder)
    assert s["oracle_calls"] == len(log)  # every paid call is in the store, and only those
    labels = store_is_whole(folder)["alflow"]["labels"]["documents"]
    assert sorted(d["structure_hash"] for _, d in labels) == sorted(h for _, _, h in log)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The campaign run without interruption, oracle calls in 2 workers."""
    folder = tmp_path_factory.mktemp("reference")
    spec = md_spec(folder, seconds=1.5)
    proc = alflow("run", spec.name, "--store", "store", "--workers", "2", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    return folder


def test_oracle_calls_run_in_parallel_workers(reference):
    round1 = sorted(calls(reference)[1:5])  # after the seed label: round 1's 4 queried frames
    events = sorted([(a, 1) for a, _, _ in round1] + [(b, -1) for _, b, _ in round1])
    running, most, both = 0, 0, 0.0
    for (t, step), (t_next, _) in zip(events, events[1:] + [(events[-1][0], 0)]):
        running += step
        most = max(most, running)
        both += (t_next - t) if running == 2 else 0.0
    assert most == 2  # never more than --workers at once
    assert both > 0.75 * 2 * 1.5  # two pairs of 1.5-s calls ran side by side (3 s if perfectly aligned)
    assert summary(reference)["converged"]
    assert_each_call_once(reference)


def test_store_in_use_while_a_runner_holds_the_lock(tmp_path):
    from alflow.runner import store_in_use, store_lock

    assert not store_in_use(tmp_path / "nowhere")
    with store_lock(tmp_path / "store"):
        assert store_in_use(tmp_path / "store")
    assert not store_in_use(tmp_path / "store")


def test_second_process_on_a_store_is_refused(tmp_path):
    spec = md_spec(tmp_path, seconds=1.0, rounds=1)
    first = start_alflow("run", spec.name, "--store", "store", cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "calls.log").exists() and time.time() < deadline:
            time.sleep(0.2)  # the runner holds the store and has paid its first call
        before = (tmp_path / "store" / "store.json").read_bytes()
        for args in (("run", spec.name), ("resume",)):
            second = alflow(*args, "--store", "store", cwd=tmp_path)
            assert second.returncode == 1
            assert second.stderr.count("\n") == 1 and "in use by another alflow process" in second.stderr
            assert f"pid {first.pid}" in second.stderr
        assert first.poll() is None
        assert (tmp_path / "store" / "store.json").read_bytes() == before or first.poll() is None
    finally:
        first.kill()
        first.wait()


def _kill_when(proc: subprocess.Popen, folder: Path, n_calls: int, delay: float, deadline: float = 300) -> bool:
    """kill -9 ``proc`` ``delay`` s after the call log reaches ``n_calls`` lines; False if it ended first."""
    end = time.time() + deadline
    while len(calls(folder)) < n_calls and proc.poll() is None and time.time() < end:
        time.sleep(0.1)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def test_runner_killed_at_random_points_resumes_without_paying_twice(tmp_path, reference):
    rng = random.Random(7)
    spec = md_spec(tmp_path, seconds=1.5)
    runner = start_alflow("run", spec.name, "--store", "store", "--workers", "2", cwd=tmp_path)
    kills = 0
    for n_calls in (1, 3, 6):  # during the seed round, inside round 1's fan-out, and later
        if not _kill_when(runner, tmp_path, n_calls, rng.uniform(0.0, 2.0)):
            break
        kills += 1
        store_is_whole(tmp_path)  # never truncated
        runner = start_alflow("resume", "--store", "store", "--workers", "2", cwd=tmp_path)
    runner.wait(timeout=900)
    assert kills >= 2
    final = alflow("resume", "--store", "store", "--workers", "2", cwd=tmp_path)  # a finished store: nothing to do
    assert final.returncode in (0, 3), final.stderr
    s, ref = summary(tmp_path), summary(reference)
    assert s["converged"] and (s["iterations"], s["oracle_calls"]) == (ref["iterations"], ref["oracle_calls"])
    assert s["validation"]["force_mae"] == pytest.approx(ref["validation"]["force_mae"], rel=1e-6)
    assert_each_call_once(tmp_path)


@pytest.mark.parametrize("signum, oracle", [(signal.SIGKILL, "logging_emt"), (signal.SIGTERM, "code_logging_emt"),
                                             (signal.SIGINT, "code_logging_emt")], ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_worker_killed_mid_call_is_rerun(tmp_path, signum, oracle):
    """kill -9; kill (a queue's preemption, scancel) while the worker runs a code; kill -INT. FireWorks'
    Rocket records an exception in a task, SystemExit and KeyboardInterrupt included, as the
    firework's failure: FIZZLED, the merge would go on without the label. Each is a lost run instead."""
    spec = md_spec(tmp_path, seconds=3.0, rounds=1, callable_=oracle)
    runner = start_alflow("run", spec.name, "--store", "store", "--workers", "2", cwd=tmp_path)
    try:
        deadline, victim = time.time() + 300, None
        while victim is None and time.time() < deadline:  # a worker of round 1, inside its oracle call
            for pid_file in (tmp_path / "store" / "launches").glob("*/worker.pid"):
                if len(calls(tmp_path)) >= 1 and (pid_file.parent / "FW.json").read_text().count("label 1."):
                    victim = int(pid_file.read_text())
                    break
            time.sleep(0.1)
        assert victim is not None
        time.sleep(1.0)
        os.kill(victim, signum)
        assert runner.wait(timeout=900) in (0, 3)
    finally:
        runner.kill()
    s = summary(tmp_path)
    assert s["oracle_calls"] == 5 and s["failed_labels"] == 0  # the lost call was redone, not failed
    assert_each_call_once(tmp_path)  # the killed call never finished, so it was paid once
    fireworks = [d for _, d in store_is_whole(tmp_path)["alflow"]["fireworks"]["documents"]]
    assert "FIZZLED" not in {d["state"] for d in fireworks}


@pytest.mark.parametrize("workers", ["0", "1"])
def test_killed_right_after_an_oracle_call_is_paid_it_is_not_paid_again(tmp_path, workers):
    """kill -9 right after a Label task's oracle call returned, before FireWorks recorded the firework:
    of the runner running it (no workers), then `alflow resume`; of the worker running it, which the
    runner sees at once. The firework is completed from the label the task left in its launch
    directory."""
    spec = md_spec(tmp_path, seconds=0.0, samples=3, rounds=1)
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(TESTS / "killswitch"), _env()["PYTHONPATH"]]),
           "ALFLOW_TEST_DIE_AFTER_LABEL": "2" if workers == "0" else "1",  # the runner: round 1's first label
           "ALFLOW_TEST_DIE_MARKER": str(tmp_path / "killed")}
    run = subprocess.run([sys.executable, "-m", "alflow", "run", spec.name, "--store", "store", "--workers", workers],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert (tmp_path / "killed").exists()
    if workers == "0":
        assert run.returncode == -signal.SIGKILL and len(calls(tmp_path)) == 2
        resumed = alflow("resume", "--store", "store", cwd=tmp_path)
        assert resumed.returncode in (0, 3), resumed.stderr
    assert_each_call_once(tmp_path)
    assert summary(tmp_path)["oracle_calls"] == 4 and summary(tmp_path)["failed_labels"] == 0


def test_a_label_firework_that_fizzles_is_recorded_as_a_failed_call(tmp_path):
    """An oracle firework that ends without a label (here the oracle raises SystemExit, which is no
    oracle failure; a stock rlaunch interrupted is another) FIZZLES; the merge, which may run
    without it, records its structure as a failed ``crash`` call rather than leaving it out."""
    write(tmp_path / "co.traj", co_cu100())
    spec = {"name": "md", "system": {"structure": "co.traj"}, "simulation": {"kind": "md", "steps": 10, "seed": 1},
            "oracle": {"kind": "python", "callable": "flaky_oracle:exiting_emt",
                       "kwargs": {"counter": str(tmp_path / "count"), "period": 3}},
            "model": {"ensemble": 2, "epochs": 20},
            "learner": {"query": {"strategy": "random", "samples": 2}, "stop": {"max_iterations": 1}}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    proc = alflow("run", "spec.yaml", "--store", "store", cwd=tmp_path)  # in-process: no workers
    assert proc.returncode == 3, proc.stderr  # finished, unconverged (one round)
    labels = [d for _, d in store_is_whole(tmp_path)["alflow"]["labels"]["documents"]]
    (lost,) = [d for d in labels if d["status"] == "failed"]  # the third call of three
    assert lost["failure_class"] == "crash" and "its oracle firework ended without a result (FIZZLED" in lost["reason"]
    assert summary(tmp_path)["failed_labels"] == 1 and summary(tmp_path)["oracle_calls"] == 3


def test_failing_oracle_in_workers_is_recorded_by_class(tmp_path):
    spec = md_spec(tmp_path, seconds=0.0, rounds=4, callable_="flaky_logging_emt", period=4)
    proc = alflow("run", spec.name, "--store", "store", "--workers", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    s = summary(tmp_path)
    labels = [d for _, d in store_is_whole(tmp_path)["alflow"]["labels"]["documents"]]
    failed = [d for d in labels if d["status"] == "failed"]
    assert s["converged"] and s["failed_labels"] == len(failed) >= 1
    assert {d["failure_class"] for d in failed} == {"exception"}
    assert all("simulated SCF failure" in d["reason"] for d in failed)


def test_online_learner_killed_mid_round_resumes_without_paying_twice(tmp_path):
    from alflow.systems import c_cu100

    write(tmp_path / "start.traj", c_cu100())
    oracle = {"kind": "python", "callable": "flaky_oracle:logging_emt",
              "kwargs": {"log": str(tmp_path / "calls.log"), "seconds": 1.0}}
    spec = {"name": "md", "system": {"structure": "start.traj"},  # "md": the helpers' results folder
            "simulation": {"kind": "relax", "fmax": 0.05, "steps": 30}, "oracle": oracle,
            "model": {"ensemble": 2, "epochs": 20, "warm_epochs": 5},
            "learner": {"kind": "online", "threshold": 0.3, "stop": {"fmax": 0.05, "max_iterations": 1}}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    runner = start_alflow("run", "spec.yaml", "--store", "store", cwd=tmp_path)
    assert _kill_when(runner, tmp_path, 4, 0.5), "the online round ended before the kill"
    paid_before = len(calls(tmp_path))
    resumed = alflow("resume", "--store", "store", cwd=tmp_path)
    assert resumed.returncode in (0, 3), resumed.stderr
    assert len(calls(tmp_path)) > paid_before  # the round went on past where it was killed
    assert_each_call_once(tmp_path)  # the labels paid before the kill were found, not paid again


def test_ctrl_c_stops_the_run_and_resume_redoes_the_interrupted_firework(tmp_path, reference):
    spec = md_spec(tmp_path, seconds=1.5)
    # Ctrl-C as in a terminal: a suite started in the background (`… &`) passes SIGINT on ignored
    runner = subprocess.Popen([sys.executable, "-m", "alflow", "run", spec.name, "--store", "store"], cwd=tmp_path,
                              env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while len(calls(tmp_path)) < 2 and time.time() < deadline:  # the seed and a first label of round 1
        time.sleep(0.05)
    time.sleep(0.5)  # inside the next oracle call, run in this process (no workers)
    runner.send_signal(signal.SIGINT)
    _, err = runner.communicate(timeout=300)
    assert runner.returncode == 130
    assert err.strip().splitlines()[-1] == "alflow: interrupted; `alflow resume --store store` goes on from here"
    fireworks = [d for _, d in store_is_whole(tmp_path)["alflow"]["fireworks"]["documents"]]
    assert "FIZZLED" not in {d["state"] for d in fireworks}  # the user's Ctrl-C is not the firework's failure
    status = alflow("status", "--store", "store", cwd=tmp_path)  # no process holds the store: not "running"
    row = status.stdout.splitlines()[1].split()
    assert row[2] == "interrupted" and "`alflow resume --store store`" in status.stdout.splitlines()[-1]
    resumed = alflow("resume", "--store", "store", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    s, ref = summary(tmp_path), summary(reference)
    assert s["converged"] and (s["iterations"], s["oracle_calls"]) == (ref["iterations"], ref["oracle_calls"])
    assert_each_call_once(tmp_path)


def test_a_structure_that_kills_its_worker_every_time_is_recorded_as_a_crash_after_three_runs(tmp_path):
    write(tmp_path / "co.traj", co_cu100())
    spec = {"name": "md", "system": {"structure": "co.traj"}, "simulation": {"kind": "md", "steps": 10},
            "oracle": {"kind": "python", "callable": "flaky_oracle:dying_emt",
                       "kwargs": {"log": str(tmp_path / "attempts.log")}},
            "learner": {"query": {"strategy": "random", "samples": 2}, "stop": {"max_iterations": 1}}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    proc = alflow("run", "spec.yaml", "--store", "store", "--workers", "1", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr  # finished, not converged: the start could not be labelled
    assert len((tmp_path / "attempts.log").read_text().splitlines()) == 3
    (label,) = [d for _, d in store_is_whole(tmp_path)["alflow"]["labels"]["documents"]]
    assert label["status"] == "failed" and label["failure_class"] == "crash"
    assert "the worker process ended 3 times without a result" in label["reason"]
    assert summary(tmp_path)["failed_labels"] == 1


def test_a_pid_file_left_empty_or_torn_reads_as_no_worker(tmp_path):
    from alflow.runner import _read_pid

    pid = tmp_path / "worker.pid"
    assert _read_pid(pid) is None
    for text in ("", "12", "12x"):
        pid.write_text(text)
        assert _read_pid(pid) == (12 if text == "12" else None)


def test_submit_to_a_database_fireworks_never_used(tmp_path, monkeypatch):
    """`alflow submit` on a fresh database (no `lpad reset`): FireWorks' id counters are made, once."""
    import mongomock
    import fireworks.core.launchpad as fw_launchpad
    from mongomock.store import ServerStore

    from alflow.cli import main

    import mongomock.gridfs

    mongomock.gridfs.enable_gridfs_integration()
    server = ServerStore()  # one database server for every client, as mongod is
    monkeypatch.setattr(fw_launchpad, "MongoClient", lambda *a, **k: mongomock.MongoClient(_store=server))
    monkeypatch.chdir(tmp_path)
    md_spec(tmp_path, seconds=0.0)
    (tmp_path / "lp.yaml").write_text(yaml.safe_dump({"host": "localhost", "port": 27017, "name": "alflow"}))
    assert main(["submit", "spec.yaml", "-l", "lp.yaml"]) == 0
    db = mongomock.MongoClient(_store=server)["alflow"]
    assert db.campaigns.count_documents({}) == 1 and db.fireworks.count_documents({}) == 1
    assert main(["submit", "spec.yaml", "-l", "lp.yaml"]) == 1  # the same name again: refused, nothing added
    assert db.campaigns.count_documents({}) == 1 and db.fireworks.count_documents({}) == 1


def test_resume_reruns_a_firework_a_ctrl_c_stopped_only_while_what_follows_has_not_run(tmp_path, monkeypatch):
    """FireWorks reruns a firework's descendants with it: a Ctrl-C'd firework whose child already
    ran (a merge that went on without it) is left as it is, or the child's labels are paid again."""
    from fireworks import Firework, FWorker, PyTask, ScriptTask, Workflow
    from fireworks.core.rocket_launcher import launch_rocket

    from alflow.runner import EmbeddedRunner

    lp = mongomock_launchpad(monkeypatch, tmp_path)
    for name in ("ran", "waits"):
        stopped = Firework([PyTask(func="flaky_oracle.interrupt")], name=f"{name}: stopped")
        child = Firework([ScriptTask.from_str("true")], name=f"{name}: child", spec={"_allow_fizzled_parents": True})
        lp.add_wf(Workflow([stopped, child], {stopped: [child]}))
    ids = {fw["name"]: fw["fw_id"] for fw in lp.fireworks.find({}, {"name": 1, "fw_id": 1})}
    for name in ("ran: stopped", "ran: child", "waits: stopped"):
        launch_rocket(lp, FWorker(), fw_id=ids[name], strm_lvl="ERROR")
    state = lambda name: lp.fireworks.find_one({"fw_id": ids[name]})["state"]  # noqa: E731
    assert [state(n) for n in ("ran: stopped", "ran: child", "waits: stopped")] == ["FIZZLED", "COMPLETED", "FIZZLED"]
    EmbeddedRunner(lp, None, progress=lambda line: None, launches=tmp_path / "launches").adopt()
    assert (state("ran: stopped"), state("ran: child")) == ("FIZZLED", "COMPLETED")  # nothing paid twice
    assert state("waits: stopped") in ("READY", "WAITING")  # its child has not run: redone


def mongomock_launchpad(monkeypatch, folder: Path):
    """A fresh LaunchPad on an in-memory mongomock server, working in ``folder``."""
    import fireworks.core.launchpad as fw_launchpad
    import mongomock
    import mongomock.gridfs
    from fireworks import LaunchPad
    from mongomock.store import ServerStore

    mongomock.gridfs.enable_gridfs_integration()
    server = ServerStore()
    monkeypatch.setattr(fw_launchpad, "MongoClient", lambda *a, **k: mongomock.MongoClient(_store=server))
    monkeypatch.chdir(folder)
    lp = LaunchPad(name="alflow", strm_lvl="ERROR")
    lp.reset("", require_password=False)
    return lp


@pytest.mark.parametrize("started", [False, True])
def test_only_workers_that_started_count_against_the_structure(tmp_path, monkeypatch, started):
    """A runner killed between reserving an oracle firework and starting its worker leaves a launch
    that never ran: resume reruns it as often as that happens. Workers that did start and died
    count: the third is recorded as a crash."""
    import tempfile

    from fireworks import Firework, FWorker

    from alflow.campaign import Candidate
    from alflow.fw.tasks import LabelTask
    from alflow.runner import EmbeddedRunner

    lp = mongomock_launchpad(monkeypatch, tmp_path)
    task = LabelTask(candidate=Candidate.of(co_cu100(), "query").to_dict(), oracle={"kind": "emt"})
    lp.add_wf(Firework([task], spec={"_category": "dft"}, name="md: label 1.0"))
    runner = EmbeddedRunner(lp, None, progress=lambda line: None, launches=tmp_path / "launches")
    for run in range(1, 5):
        launch_dir = Path(tempfile.mkdtemp(dir=tmp_path))
        fw, launch_id = lp.reserve_fw(FWorker(category="dft"), str(launch_dir))
        lp.add_offline_run(launch_id, fw.fw_id, fw.name)
        if started:
            (launch_dir / "worker.pid").write_text("1")
        runner.recover(launch_id, fw.fw_id, launch_dir)
        state = lp.fireworks.find_one({"fw_id": fw.fw_id})["state"]
        if started and run == 3:
            assert state == "COMPLETED"
            break
        assert state == "READY"
    assert run == (3 if started else 4)
