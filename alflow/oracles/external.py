"""One call of an external code: its own scratch directory, an MPI launcher, a time limit.

Every call runs in a fresh directory under ``scratch`` (default: ``oracle_scratch/`` in the current
directory, which is the launch directory when FireWorks runs a label task). The directory is
removed after a successful call unless ``keep_scratch`` is set, and always kept after a failed
one, for inspection: its path ends the failure's reason. A call that runs past ``timeout_s`` is
stopped with its whole process group (launcher and ranks) and recorded as ``timeout``.

None of these settings changes the physics: they are left out of the label-cache key
(:data:`RUN_KEYS`), so more ranks or another launcher reuse the labels already paid for.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from alflow.oracles.failures import CodeCrashed, NonFiniteResult, OracleFailure, WalltimeExceeded
from alflow.oracles.settings import (
    SettingsError,
    boolean,
    check_keys,
    field_value,
    integer,
    optional,
    path_text,
    positive_number,
    text,
)

#: How the code is run, not what it computes: never part of the label-cache key.
RUN_KEYS = ("command", "mpi_ranks", "launcher", "timeout_s", "keep_scratch", "scratch")

#: Launcher used when ``mpi_ranks`` > 1 and no ``launcher`` is given.
DEFAULT_LAUNCHER = "mpirun -np {ranks}"

#: Folder (in the current directory) that holds the per-call scratch directories by default.
DEFAULT_SCRATCH = "oracle_scratch"

#: Seconds a stopped process group gets between SIGTERM and SIGKILL.
TERMINATE_GRACE_S = 5.0


def _launcher(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"must be a string such as 'mpirun -np {{ranks}}' ('' for none), got {v!r}")
    try:
        v.format(ranks=1)
    except (KeyError, IndexError, ValueError):
        raise ValueError(f"may only use the placeholder {{ranks}}, got {v!r}") from None
    return v


@dataclass(frozen=True)
class RunSettings:
    """How an external code is run for one label.

    Attributes:
        command: the code's executable with its own flags, e.g. ``"pw.x"`` or ``"pw.x -nk 2"``.
        mpi_ranks: MPI ranks per call; 1 runs ``command`` without a launcher (unless one is given).
        launcher: prefix of ``command``, ``{ranks}`` replaced by ``mpi_ranks``; default
            ``"mpirun -np {ranks}"`` when ``mpi_ranks`` > 1; ``""`` for none (e.g. under ``srun``).
            Run as root, Open MPI's ``OMPI_ALLOW_RUN_AS_ROOT`` variables are set for the call.
        timeout_s: wall-time limit of one call in seconds (none by default).
        keep_scratch: keep the scratch directory of successful calls too.
        scratch: folder of the per-call directories; default ``oracle_scratch`` in the current
            directory. Relative paths in a spec are relative to the spec file.
    """

    command: str = ""
    mpi_ranks: int = 1
    launcher: str | None = None
    timeout_s: float | None = None
    keep_scratch: bool = False
    scratch: str | None = None

    @staticmethod
    def checked(data: Mapping, keys, required: Mapping[str, str]) -> dict:
        """A spec's oracle section without ``kind``, its keys checked against ``keys`` and every
        ``required`` key present (its value: what the error adds, e.g. an example)."""
        data = check_keys({k: v for k, v in data.items() if k != "kind"}, keys)
        for key, hint in required.items():
            if key not in data:
                raise SettingsError(key, f"required ({hint})")
        return data

    def to_dict(self) -> dict[str, Any]:
        """The normalised settings (JSON-able), as a spec's oracle section holds them."""
        return asdict(self)

    @staticmethod
    def run_fields(data: Mapping, base: Path | None) -> dict[str, Any]:
        """The validated :data:`RUN_KEYS` of ``data`` (only those present)."""
        checks = {
            "command": text,
            "mpi_ranks": integer(1),
            "launcher": optional(_launcher),
            "timeout_s": optional(positive_number),
            "keep_scratch": boolean,
            "scratch": optional(path_text(base)),
        }
        return {k: field_value(data, k, check, None) for k, check in checks.items() if k in data}

    def argv(self) -> list[str]:
        """The command line of one call (launcher, ranks, executable)."""
        launcher = self.launcher
        if launcher is None:
            launcher = DEFAULT_LAUNCHER if self.mpi_ranks > 1 else ""
        argv = shlex.split(launcher.format(ranks=self.mpi_ranks)) + shlex.split(self.command)
        if not argv:
            raise SettingsError("command", "is empty")
        return argv


def child_environment() -> dict[str, str]:
    """Environment of the code: one OpenMP thread per rank unless set, and Open MPI allowed to
    run as root when we are root (containers)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


def stop_process_group(proc: subprocess.Popen, grace_s: float = TERMINATE_GRACE_S) -> None:
    """SIGTERM the process group of ``proc`` (a session leader), SIGKILL it after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(argv: list[str], directory: Path, stdout: str, stderr: str | None = None,
                stdin: str | None = None, timeout_s: float | None = None, code: str = "the code") -> int:
    """Run ``argv`` in ``directory`` (stdout/stderr/stdin: file names there) in its own process
    group; its exit status, or :class:`WalltimeExceeded` after stopping the group at ``timeout_s``,
    or :class:`CodeCrashed` when it cannot be started."""
    directory = Path(directory)
    with open(directory / stdout, "wb") as out, \
            open(directory / stderr if stderr else os.devnull, "wb") as err, \
            open(directory / stdin if stdin else os.devnull, "rb") as inp:
        try:
            proc = subprocess.Popen(argv, cwd=directory, stdin=inp, stdout=out, stderr=err,
                                    env=child_environment(), start_new_session=True)
        except OSError as exc:
            raise CodeCrashed(f"cannot start {code} ({shlex.join(argv)}): {exc.strerror or exc}") from None
        previous = _raise_on_sigterm()
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_process_group(proc)
            raise WalltimeExceeded(f"{code} ran past timeout_s = {timeout_s:g} s and was stopped") from None
        except BaseException as exc:  # interrupted or terminated: leave no ranks behind
            stop_process_group(proc, grace_s=1.0)
            if isinstance(exc, Terminated):
                _die_of_sigterm()
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


class Terminated(SystemExit):
    """This process got SIGTERM while a code ran (see :func:`_raise_on_sigterm`)."""


def _raise_on_sigterm():
    """While a code runs in its own session, a SIGTERM of this process (left at its default, in
    the main thread) raises :class:`Terminated` instead of killing it, so the code's process group
    is stopped too rather than orphaned. The previous handler, or None when nothing was changed."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def terminate(signum, frame):
        raise Terminated(128 + signum)

    return signal.signal(signal.SIGTERM, terminate)


def _die_of_sigterm() -> None:
    """End this process as SIGTERM's default action would have, once the code is stopped. Not an
    exception: FireWorks' Rocket catches every exception of a task, SystemExit included, and would
    record the oracle firework as FIZZLED, a lost label; a worker killed by the signal is a lost
    run instead, which the runner (or ``lpad detect_lostruns --rerun``) runs again."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
    os._exit(128 + signal.SIGTERM)  # not reached: the signal's default action ends the process


def new_scratch_directory(root: str | None, prefix: str) -> Path:
    """A fresh directory ``<root>/<prefix>-<date>-<time>-<random>`` (root created if needed)."""
    folder = Path(root if root is not None else DEFAULT_SCRATCH).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-", dir=folder))


def file_digest(path: Path) -> str | None:
    """sha256 of a file (a pseudopotential, a POTCAR: the label-cache key counts them by content),
    or None when it cannot be read here."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


class ScratchCalculator(Calculator):
    """ASE calculator that runs an external code once per call in its own scratch directory.

    Subclasses implement :meth:`prepare` (checks before anything is paid) and :meth:`run_in`
    (write the input, run, read the results). The calculator sees the atoms without constraints:
    an oracle returns the forces on every atom. Any error of :meth:`run_in` is an
    :class:`OracleFailure` (other exceptions become :class:`CodeCrashed`) whose message ends with
    the kept scratch directory. ``last_directory``: the directory of the latest call.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]
    code = "code"

    def __init__(self, settings: RunSettings):
        super().__init__()
        self.settings = settings
        self.last_directory: Path | None = None

    def prepare(self, atoms: Atoms) -> None:
        """Refuse a call that cannot work (e.g. a missing pseudopotential) before it runs."""

    def run_in(self, directory: Path, atoms: Atoms) -> dict[str, Any]:
        raise NotImplementedError

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms.copy()
        atoms.set_constraint()
        self.prepare(atoms)
        directory = new_scratch_directory(self.settings.scratch, self.code)
        self.last_directory = directory
        try:
            results = self.run_in(directory, atoms)
        except OracleFailure as exc:
            exc.scratch = str(directory)
            raise
        except Exception as exc:  # an unreadable result, a bug: the directory is evidence
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            where = f" (in {Path(frame.filename).name}:{frame.lineno})"
            raise CodeCrashed(f"{type(exc).__name__}: {exc}{where}", scratch=directory) from exc
        if not all(np.isfinite(results[k]).all() for k in ("energy", "forces", "stress") if k in results):
            raise NonFiniteResult(f"{self.code} returned energy or forces that are not finite", scratch=directory)
        if not self.settings.keep_scratch:
            shutil.rmtree(directory, ignore_errors=True)
        self.results = results
