"""Oracles for campaign tests: EMT that fails on every other call, and one that counts calls."""

from __future__ import annotations

from pathlib import Path

from ase.calculators.emt import EMT


def count_call(counter: Path) -> int:
    """Count one call in ``counter`` and return the calls so far: one byte appended per call, an
    append being atomic across processes (a read-then-write count could lose calls made at once)."""
    with open(counter, "ab") as fh:
        fh.write(b".")
    return counter.stat().st_size


def calls_made(counter: Path) -> int:
    """The calls counted in ``counter`` by :func:`count_call` (0 before the first)."""
    return counter.stat().st_size if counter.exists() else 0


class FlakyEMT(EMT):
    """EMT that raises ``error`` on every ``period``-th energy evaluation (counted in a file, across processes)."""

    error: type[BaseException] = RuntimeError
    what = "simulated SCF failure"

    def __init__(self, counter: str, period: int = 2):
        super().__init__()
        self.counter, self.period = Path(counter), period

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        n = count_call(self.counter)
        if n % self.period == 0:
            raise self.error(f"{self.what} on call {n}")
        super().calculate(atoms, properties, system_changes)


def flaky_emt(counter: str, period: int = 2) -> EMT:
    return FlakyEMT(counter, period)


def counting_emt(counter: str) -> EMT:
    """EMT that counts its calculations in ``counter`` (:func:`calls_made`; to prove no call is repaid)."""
    return FlakyEMT(counter, period=10**9)


class LoggingEMT(EMT):
    """EMT that appends ``start end structure-hash`` to ``log`` for every calculation, after
    sleeping ``seconds`` (a stand-in for a DFT call: the log proves overlap and no call repaid)."""

    def __init__(self, log: str, seconds: float = 0.0):
        super().__init__()
        self.log, self.seconds = Path(log), seconds

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        import time

        from alflow.store.hashing import structure_hash

        start = time.time()
        self.wait()
        super().calculate(atoms, properties, system_changes)
        with open(self.log, "a") as fh:  # one short append: atomic across processes
            fh.write(f"{start:.3f} {time.time():.3f} {structure_hash(self.atoms)}\n")

    def wait(self) -> None:
        import time

        time.sleep(self.seconds)


def logging_emt(log: str, seconds: float = 0.0) -> EMT:
    return LoggingEMT(log, seconds)


class CodeLoggingEMT(LoggingEMT):
    """LoggingEMT whose wait is an external code (``sleep``) run as alflow runs DFT codes: in its
    own process group, a SIGTERM of this process stopping it first."""

    def wait(self) -> None:
        import tempfile

        from alflow.oracles.external import run_command

        with tempfile.TemporaryDirectory() as folder:
            run_command(["sleep", str(self.seconds)], Path(folder), "sleep.out", code="sleep")


def code_logging_emt(log: str, seconds: float = 0.0) -> EMT:
    return CodeLoggingEMT(log, seconds)


class ExitingEMT(FlakyEMT):
    """FlakyEMT raising SystemExit: not an Exception, so no oracle failure but the firework's own."""

    error, what = SystemExit, "simulated exit"


def exiting_emt(counter: str, period: int = 3) -> EMT:
    return ExitingEMT(counter, period)


class FlakyLoggingEMT(LoggingEMT):
    """LoggingEMT that raises on every ``period``-th calculation (counted across processes by
    one-byte appends to ``log + '.count'``); failed calls are not in the log."""

    def __init__(self, log: str, seconds: float = 0.0, period: int = 4):
        super().__init__(log, seconds)
        self.period = period

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        n = count_call(Path(str(self.log) + ".count"))
        if n % self.period == 0:
            raise RuntimeError(f"simulated SCF failure on call {n}")
        super().calculate(atoms, properties, system_changes)


def flaky_logging_emt(log: str, seconds: float = 0.0, period: int = 4) -> EMT:
    return FlakyLoggingEMT(log, seconds, period)


class DyingEMT(EMT):
    """EMT whose process is killed in every calculation, as the out-of-memory killer would (each
    attempt appended to ``log`` first)."""

    def __init__(self, log: str):
        super().__init__()
        self.log = Path(log)

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        import os
        import signal

        with open(self.log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        os.kill(os.getpid(), signal.SIGKILL)


def dying_emt(log: str) -> EMT:
    return DyingEMT(log)


def broken_strategy(ctx, samples):
    """A query plug-in with a bug: its firework fizzles."""
    raise ValueError("this plug-in is broken")


class MisshapenEMT(EMT):
    """EMT whose forces lose the first ``drop`` atoms (e.g. a wrapper returning free atoms only)."""

    def __init__(self, drop: int = 4):
        super().__init__()
        self.drop = drop

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        super().calculate(atoms, properties, system_changes)
        self.results["forces"] = self.results["forces"][self.drop:]


def misshapen_emt(drop: int = 4) -> EMT:
    return MisshapenEMT(drop)


def interrupt() -> None:
    """A task stopped by a Ctrl-C (for a FireWorks PyTask)."""
    raise KeyboardInterrupt
