"""Embedded runner: campaigns on the embedded store, driven by the one process that owns it.

``alflow run`` / ``alflow resume`` hold an exclusive lock on the store directory (a second alflow
process is refused at once). The ML fireworks (seed, train + explore, merge, online) run in this
process, each in its own launch directory. With ``workers`` > 0 the oracle (``dft``) fireworks go
to that many worker subprocesses in FireWorks' offline mode: reserve the firework, write its
``FW.json`` into a launch directory, snapshot, start ``python -m alflow.fw.worker`` there (it never
opens the store), and when it exits ``recover_offline`` its FWAction. With ``workers`` = 0 they
run in this process too. The store is snapshotted after every state change (at most once per
polling cycle), atomically.

Resume after a crash or kill -9 (of the runner and/or workers): a worker still running is adopted
(its pid in the launch directory), a finished one is recovered from its ``FW_offline.json`` (the
oracle is not paid again), one that died without a result is rerun, and a firework this process
was running when it died is rerun, unless it is an oracle firework that had paid for its call
(its label in the launch directory, ``label_result.json``): that one is completed from it. A
worker whose firework FIZZLED (a ``kill -INT``) left no label either and counts as lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from alflow.fw.worker import PID_FILE as WORKER_PID  # a worker writes it in its launch directory as it starts
from alflow.status import CTRL_C, failed_launch, failure_line, last_error
from alflow.store.embedded import (  # noqa: F401 (STORE_FILE, snapshot, use_store: this module's API too)
    STORE_FILE,
    embedded_queries,
    no_write_at_exit,
    snapshot,
    use_store,
)

LOCK_FILE = "lock"
POLL_SECONDS = 0.2
LOCK_ATTEMPTS = 5
ERROR_LOG = "error.log"  # an in-process firework's traceback, in its launch dir
MAX_LOST_RUNS = 3  # a firework whose worker died this often without a result is recorded as failed


def store_in_use(store_dir: str | Path) -> bool:
    """Whether an ``alflow run`` / ``resume`` holds the store directory's lock now (read-only:
    tested with a shared lock taken and dropped at once; no lock file, no owner)."""
    try:
        fd = os.open(Path(store_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@contextlib.contextmanager
def store_lock(store_dir: Path) -> Iterator[None]:
    """Hold the store directory's exclusive lock (released by the OS if this process dies)."""
    store_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(store_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for attempt in range(LOCK_ATTEMPTS):  # a few tries: `alflow status` holds it shared for an instant
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == LOCK_ATTEMPTS - 1:
                    owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    raise RuntimeError(f"{store_dir}: the store is in use by another alflow process (pid {owner}); "
                                       "wait for it to finish or stop it") from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def embedded_rockets(rocket_module) -> None:
    """No ping thread for rockets launched here: its last ping writes to the launch while the rocket
    completes it, and mongomock is not thread-safe (measured: "OrderedDict mutated during
    iteration"). Pings detect lost remote workers; the embedded runner is one process."""
    rocket_module.start_ping_launch = lambda launchpad, launch_id: None


@dataclass
class Worker:
    """A worker process running one offline firework in ``launch_dir``."""

    launch_id: int
    fw_id: int
    launch_dir: Path
    pid: int
    process: subprocess.Popen | None = None  # None: adopted from an earlier runner

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return _worker_running(self.pid, self.launch_dir)


def _worker_running(pid: int, launch_dir: Path) -> bool:
    """Whether ``pid`` is a live alflow worker in ``launch_dir`` (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        cwd = os.readlink(f"/proc/{pid}/cwd")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return "alflow.fw.worker" in cmdline and Path(cwd) == launch_dir and state != "Z"


def _read_pid(pid_file: Path) -> int | None:
    """The worker pid written in ``pid_file`` (None: missing, or left empty or torn by a crash)."""
    try:
        return int(pid_file.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _interrupt_flag() -> Iterator[Callable[[], bool]]:
    """While inside: a Ctrl-C still raises KeyboardInterrupt, and the yielded function tells
    whether one came (FireWorks' Rocket catches it inside a task and carries on)."""
    import signal
    import threading

    came = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum, frame):
        came.append(signum)
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:  # started with Ctrl-C ignored (a background job): keep it so
        yield lambda: False
        return
    signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(came)
    finally:
        signal.signal(signal.SIGINT, previous)


def _offline_result(launch_dir: Path) -> dict:
    """``FW_offline.json`` of a launch ({} when missing or cut short by a kill)."""
    try:
        return json.loads((launch_dir / "FW_offline.json").read_text())
    except (OSError, ValueError):
        return {}


class EmbeddedRunner:
    """Runs every READY firework of the embedded store until none is left (see the module doc)."""

    def __init__(self, launchpad, store_path: Path | None, workers: int = 0, progress: Callable[[str], None] = print,
                 launches: Path | None = None, campaign: str | None = None):
        """``store_path``: the embedded store's file (None: a MongoDB server, nothing to snapshot);
        ``launches``: where launch directories go (default: next to the store file);
        ``campaign``: run only this campaign's fireworks (a server's database is shared)."""
        from fireworks import FWorker

        if workers < 0:
            raise ValueError(f"--workers must be >= 0, got {workers}")
        self.lp, self.path, self.workers, self.progress = launchpad, store_path, workers, progress
        self.launches = launches or store_path.parent / "launches"
        self.launches.mkdir(parents=True, exist_ok=True)
        launchpad.alflow_checkpoint = self.save  # the online learner's labels, stored mid-firework
        checkout = launchpad.checkout_fw

        def checkout_and_save(*args, **kwargs):  # an in-process firework is on disk as RUNNING while it
            fw, launch_id = checkout(*args, **kwargs)  # runs, so `alflow status` names it (not the last one)
            if fw is not None and kwargs.get("state", "RUNNING") == "RUNNING":
                self.save()
            return fw, launch_id

        launchpad.checkout_fw = checkout_and_save
        # in-process fireworks: ML ones only when workers take the oracle calls
        query = {"name": {"$regex": f"^{re.escape(campaign)}: "}} if campaign else None
        self.local = FWorker(name="alflow-embedded", category="ml" if workers else "", query=query)
        self.remote = FWorker(name="alflow-worker", category="dft", query=query)
        self.active: dict[int, Worker] = {}
        self._interrupted: Callable[[], bool] = lambda: False  # set while run() is inside
        self._worker_env = {k: v for k, v in os.environ.items() if k != "MONGOMOCK_SERVERSTORE_FILE"}

    # ---------------------------------------------------------------------------- the loop
    def run(self) -> None:
        """Until nothing is ready, reserved, running or in a worker."""
        with _interrupt_flag() as interrupted:
            self._interrupted = interrupted
            self._run()

    def _run(self) -> None:
        # every state change is saved as it happens; an exception (a Ctrl-C) can come in the middle
        # of FireWorks' several-document updates, so what it leaves in memory is not saved
        while True:
            changed = self.reap() | self.dispatch()
            if changed:
                self.save()
            if self.run_local():
                continue
            if self.active:
                time.sleep(POLL_SECONDS)
                continue
            if not changed:
                break
        self.save()

    def save(self) -> None:
        if self.path is not None:
            snapshot(self.lp, self.path)

    def _new_launch_dir(self) -> Path:
        return Path(tempfile.mkdtemp(dir=self.launches, prefix="launch_"))

    def run_local(self) -> bool:
        """Run one READY in-process firework; False if there was none."""
        from fireworks.core.rocket_launcher import launch_rocket

        launch_dir, here = self._new_launch_dir(), os.getcwd()
        os.chdir(launch_dir)
        error_log = launch_dir / ERROR_LOG
        try:  # a failing task's traceback goes to its launch dir, the terminal gets one line
            with open(error_log, "w") as err:
                ran = launch_rocket(self.lp, self.local, strm_lvl="ERROR", err_file=err)
        finally:
            os.chdir(here)
            with contextlib.suppress(OSError):  # the launch dir may be gone
                if error_log.stat().st_size == 0:
                    error_log.unlink()
        if not ran:
            with contextlib.suppress(OSError):  # nothing ran there: drop the empty folder
                launch_dir.rmdir()
            return False
        if self._interrupted():
            # FireWorks records a Ctrl-C inside a task as the firework's failure (FIZZLED): it was
            # the user's, so the firework is made READY again for `alflow resume`, and we stop
            launch = self.lp.launches.find_one({"launch_dir": str(launch_dir)}, {"fw_id": 1})
            if launch is not None:
                self.lp.rerun_fw(launch["fw_id"])
            self.save()
            raise KeyboardInterrupt
        self.save()
        self.progress(_progress_line(self.lp, launch_dir))
        return True

    # ---------------------------------------------------------------------------- workers
    def dispatch(self) -> bool:
        """Reserve READY oracle fireworks for free worker slots and start their workers."""
        from fireworks.core.firework import Firework  # noqa: F401 (FW.json below)

        started = False
        while len(self.active) < self.workers:
            launch_dir = self._new_launch_dir()
            fw, launch_id = self.lp.reserve_fw(self.remote, str(launch_dir))
            if fw is None:
                launch_dir.rmdir()
                break
            fw.to_file(str(launch_dir / "FW.json"))  # what `qlaunch --reserve` writes (setup_offline_job)
            (launch_dir / "FW_offline.json").write_text(json.dumps({"launch_id": launch_id}))
            self.lp.add_offline_run(launch_id, fw.fw_id, fw.name)
            self.save()  # the reservation is on disk before the oracle can be paid
            log = open(launch_dir / "worker.log", "wb")
            process = subprocess.Popen([sys.executable, "-m", "alflow.fw.worker"], cwd=launch_dir,
                                       env=self._worker_env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # a Ctrl-C of the runner leaves it running
            log.close()
            self.active[launch_id] = Worker(launch_id, fw.fw_id, launch_dir, process.pid, process)
            started = True
        return started

    def reap(self) -> bool:
        """Recover the workers that have exited; True if any had."""
        done = [w for w in self.active.values() if not w.alive()]
        for w in done:
            del self.active[w.launch_id]
            self.recover(w.launch_id, w.fw_id, w.launch_dir)
            self.progress(_progress_line(self.lp, w.launch_dir))
        return bool(done)

    def recover(self, launch_id: int, fw_id: int, launch_dir: Path) -> None:
        """A finished worker's FWAction into the store, or a rerun if it left none (lost worker:
        an infrastructure failure, not the structure's, so nothing is recorded against it) -- up
        to MAX_LOST_RUNS runs: then the label is recorded as a ``crash`` failure, so a structure
        that kills its worker every time (out of memory, a segfault) is not paid for for ever.

        A worker whose firework FIZZLED left no label either: every oracle failure is a label
        (``compute_label``), so what FIZZLES is the run itself (a ``kill -INT`` of the worker,
        which FireWorks' Rocket records as the task's failure). Recovered as FIZZLED, the merge
        would go on without the label; it is a lost run instead."""
        result = _offline_result(launch_dir)
        if "fwaction" in result and result.get("state") != "FIZZLED":
            if self.lp.recover_offline(launch_id, ignore_errors=True) is None:
                return
            # a result is there: never pay again for it. FireWorks also reads the worker's last
            # ping, which a kill can leave torn; without it the launch simply ends now
            (launch_dir / "FW_ping.json").unlink(missing_ok=True)
            if self.lp.recover_offline(launch_id, ignore_errors=True) is None:
                return
        self.lp.forget_offline(launch_id)
        if self._complete_from_result(launch_id, fw_id, launch_dir):  # paid, killed before it was reported
            return
        # the runs whose worker started (a runner killed between reserving and starting it costs
        # the structure nothing)
        runs = sum((Path(launch["launch_dir"]) / WORKER_PID).is_file()
                   for launch in self.lp.launches.find({"fw_id": fw_id}, {"launch_dir": 1}))
        if runs >= MAX_LOST_RUNS and self._record_lost_label(launch_id, fw_id, launch_dir, runs):
            return
        self.lp.rerun_fw(fw_id)

    def _complete_from_result(self, launch_id: int, fw_id: int, launch_dir: Path) -> bool:
        """Complete an oracle firework from the label its task left in ``launch_dir``
        (:data:`~alflow.fw.tasks.LABEL_RESULT`) when the run was killed before FireWorks recorded
        it: that call is paid, never paid again. False when there is no such label."""
        from alflow.fw.tasks import LABEL_RESULT, LabelTask, label_action

        try:
            result = json.loads((launch_dir / LABEL_RESULT).read_text())
        except (OSError, ValueError):
            return False
        task = self.lp.get_fw_by_id(fw_id).tasks[0]
        if not isinstance(task, LabelTask) or not isinstance(result, dict) or "status" not in result:
            return False
        self.lp.complete_launch(launch_id, label_action(task["candidate"], result), "COMPLETED")
        return True

    def _record_lost_label(self, launch_id: int, fw_id: int, launch_dir: Path, runs: int) -> bool:
        """Complete an oracle firework whose worker died ``runs`` times with the failed label its
        LabelTask would have returned (class ``crash``); False if it is not a label firework."""
        from alflow.fw.tasks import LabelTask, label_action
        from alflow.oracles import failures

        task = self.lp.get_fw_by_id(fw_id).tasks[0]
        if not isinstance(task, LabelTask):
            return False
        log = (launch_dir / "worker.log").read_text(errors="replace").strip().splitlines()[-3:] \
            if (launch_dir / "worker.log").is_file() else []
        result = failures.lost(f"the worker process ended {runs} times without a result (out of memory? killed?); "
                               f"last run in {launch_dir}" + (f": {' | '.join(log)}" if log else ""))
        self.lp.complete_launch(launch_id, label_action(task["candidate"], result), "COMPLETED")
        return True

    def adopt(self) -> None:
        """After a crash: take over the runs an earlier runner left, from the store and launch dirs."""
        offline = {r["launch_id"]: r for r in self.lp.offline_runs.find({"completed": False, "deprecated": {"$ne": True}})}
        for launch_id, run in offline.items():
            launch = self.lp.launches.find_one({"launch_id": launch_id}, {"launch_dir": 1})
            launch_dir = Path(launch["launch_dir"]) if launch else None
            pid_file = launch_dir / WORKER_PID if launch_dir else None
            pid = _read_pid(pid_file) if pid_file else None
            if pid is not None and _worker_running(pid, launch_dir):
                self.active[launch_id] = Worker(launch_id, run["fw_id"], launch_dir, pid)
            elif launch_dir is not None:
                self.recover(launch_id, run["fw_id"], launch_dir)
            else:
                self.lp.forget_offline(launch_id)
                self.lp.rerun_fw(run["fw_id"])
        # fireworks this process's predecessor was running itself (no offline run): completed from
        # the label they left (an oracle call paid just before the kill), or run again
        mine = {r["fw_id"] for r in offline.values()}
        for fw in self.lp.fireworks.find({"state": {"$in": ["RESERVED", "RUNNING"]}}, {"fw_id": 1}):
            if fw["fw_id"] in mine:
                continue
            launch = self.lp.launches.find_one({"fw_id": fw["fw_id"], "state": "RUNNING"}, {"launch_id": 1, "launch_dir": 1},
                                               sort=[("launch_id", -1)])
            if launch is None or not self._complete_from_result(launch["launch_id"], fw["fw_id"],
                                                                Path(launch["launch_dir"])):
                self.lp.rerun_fw(fw["fw_id"])
        # and those a Ctrl-C stopped (FireWorks records it as the firework's failure), unless what
        # follows them has run since: FireWorks would rerun that too, and pay its labels again
        for fw in self.lp.fireworks.find({"state": "FIZZLED"}, {"fw_id": 1}):
            stopped = last_error(failed_launch(self.lp.launches, fw["fw_id"])) == CTRL_C
            if stopped and not self._children_ran(fw["fw_id"]):
                self.lp.rerun_fw(fw["fw_id"])
        self.save()

    def _children_ran(self, fw_id: int) -> bool:
        """Whether a firework that depends on ``fw_id`` has left WAITING / READY."""
        wf = self.lp.workflows.find_one({"nodes": fw_id}, {"links": 1})
        children = (wf or {}).get("links", {}).get(str(fw_id), [])
        return self.lp.fireworks.count_documents(
            {"fw_id": {"$in": children}, "state": {"$nin": ["WAITING", "READY"]}}) > 0


# ---------------------------------------------------------------------------------------------
# run and resume


@contextlib.contextmanager
def owned_store(store_dir: str | Path) -> Iterator[tuple[object, Path]]:
    """Lock the store directory, select it for FireWorks, and yield (LaunchPad, store file)."""
    store_dir = Path(store_dir).resolve()
    with store_lock(store_dir):
        path = use_store(store_dir)
        import fireworks.core.rocket
        from fireworks import LaunchPad

        # FireWorks' FW_config setting, read by each Rocket: errors only; progress is ours
        fireworks.core.rocket.ROCKET_STREAM_LOGLEVEL = "ERROR"
        embedded_rockets(fireworks.core.rocket)
        embedded_queries()
        launchpad = LaunchPad(name="alflow", strm_lvl="ERROR")
        no_write_at_exit(launchpad)
        if launchpad.fw_id_assigner.count_documents({}) == 0:  # a new store: initialise FireWorks' counters
            launchpad.reset("", require_password=False, max_reset_wo_password=0)
        yield launchpad, path


def run(spec, store_dir: str | Path | None, progress: Callable[[str], None] = print, workers: int = 0,
        launchpad: str | Path | None = None) -> Path:
    """Run the campaign of ``spec`` to completion; returns summary.json's path. On the embedded
    store in ``store_dir``, or with ``launchpad`` (a launchpad file) on a MongoDB server, this
    process standing in for rlaunch (launch directories under ``launches/`` here)."""
    if launchpad is not None:
        from alflow.fw.launchpad import launchpad_from_file

        lp = launchpad_from_file(launchpad)
        submit(spec, lp)
        EmbeddedRunner(lp, None, workers, progress, launches=Path("launches").resolve(), campaign=spec.name).run()
        return _summary_path(lp, spec.name)
    with owned_store(store_dir) as (lp, path):
        submit(spec, lp)
        EmbeddedRunner(lp, path, workers, progress).run()
        return _summary_path(lp, spec.name)


def submit(spec, launchpad) -> None:
    """Register the campaign in the LaunchPad's database and add its first workflow."""
    from alflow.campaign import start
    from alflow.fw.workflow import campaign_workflow
    from alflow.store import Store

    store = Store(launchpad.db)
    if store.campaign(spec.name) is not None:
        raise ValueError(f"campaign '{spec.name}' already exists in this store (use another name or store; "
                         "an interrupted one: `alflow resume --store DIR` on an embedded store, `lpad "
                         "detect_lostruns --rerun` then `rlaunch rapidfire` on a server, see docs/hpc.md)")
    if launchpad.fw_id_assigner.count_documents({}) == 0:  # a database FireWorks never used (no `lpad reset`)
        launchpad._restart_ids(1, 1)  # what reset does to the id counters, leaving everything else alone
    start(store, spec)
    try:
        launchpad.add_wf(campaign_workflow(spec.name))
    except BaseException:  # no campaign without its workflow: submitting again must work
        store.campaigns.delete_one({"name": spec.name})
        raise


def resume(store_dir: str | Path, progress: Callable[[str], None] = print, workers: int = 0) -> list[Path]:
    """Finish every unfinished campaign of the store after a crash or kill; their summary.json paths."""
    store_dir = Path(store_dir)
    if not (store_dir / STORE_FILE).is_file():
        raise OSError(f"{store_dir / STORE_FILE}: no alflow store here")
    with owned_store(store_dir) as (launchpad, path):
        from alflow.store import Store

        names = [c["name"] for c in Store(launchpad.db).campaigns.find({}, {"name": 1})]
        runner = EmbeddedRunner(launchpad, path, workers, progress)
        runner.adopt()
        runner.run()
        return [_summary_path(launchpad, name) for name in names]


def _summary_path(launchpad, name: str) -> Path:
    from alflow.store import Store

    campaign = Store(launchpad.db).campaign(name)
    if campaign.get("summary") is None:
        raise RuntimeError(f"campaign '{name}' stopped without a result: {_failure(launchpad, name)}")
    return Path(campaign["spec"]["results"]) / "summary.json"


def _failure(launchpad, name: str) -> str:
    """One line on the campaign's first firework that fizzled: its name and the exception's last line."""
    mine = {"name": {"$regex": f"^{re.escape(name)}: "}}
    fw = launchpad.fireworks.find_one({**mine, "state": "FIZZLED"}, sort=[("updated_on", 1)])
    if fw is None:
        waiting = launchpad.fireworks.count_documents({**mine, "state": "WAITING"})
        return f"{waiting} fireworks are still waiting and none can run"
    launch = failed_launch(launchpad.launches, fw["fw_id"])
    message = failure_line(fw["name"], last_error(launch))
    logs = [Path(launch.get("launch_dir", "")) / f for f in (ERROR_LOG, "worker.log")] if launch.get("launch_dir") else []
    log = next((p for p in logs if p.is_file()), None)
    return message + (f" (traceback: {log})" if log else "")


def _progress_line(launchpad, launch_dir: Path) -> str:
    """The firework that just ran in ``launch_dir`` and its campaign's counters (queries by key only)."""
    from alflow.store import Store

    launch = launchpad.launches.find_one({"launch_dir": str(launch_dir)}, {"fw_id": 1})
    last = launchpad.fireworks.find_one({"fw_id": launch["fw_id"]}, {"name": 1, "state": 1}) if launch else None
    if last is None:
        return "started"
    name = last["name"].split(": ", 1)[0]
    c = Store(launchpad.db).campaign(name) or {}
    counters = c.get("counters", {})
    what = f"{last['name']} {last['state'].lower()}"
    return (
        f"{what:<40} oracle calls {counters.get('oracle_calls', 0):>4}  reused {counters.get('reused_labels', 0):>3}"
        f"  failed {counters.get('failed_labels', 0):>3}"
    )
