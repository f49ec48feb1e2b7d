"""Oracles for campaign tests: EMT that fails on every other call, and one that counts calls."""

from __future__ import annotations

from pathlib import Path

from ase.calculators.emt import EMT


class FlakyEMT(EMT):
    """EMT that raises on every ``period``-th energy evaluation (counted in a file, across processes)."""

    def __init__(self, counter: str, period: int = 2):
        super().__init__()
        self.counter, self.period = Path(counter), period

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        n = int(self.counter.read_text()) + 1 if self.counter.exists() else 1
        self.counter.write_text(str(n))
        if n % self.period == 0:
            raise RuntimeError(f"simulated SCF failure on call {n}")
        super().calculate(atoms, properties, system_changes)


def flaky_emt(counter: str, period: int = 2) -> EMT:
    return FlakyEMT(counter, period)


def counting_emt(counter: str) -> EMT:
    """EMT that appends one line per calculation to ``counter`` (to prove no call is repaid)."""
    return FlakyEMT(counter, period=10**9)
