"""Classes of failed oracle calls, as labels record them in ``failure_class``.

A failed call is recorded with ``status: "failed"``, a class and a reason; a structure refused
before paying is ``status: "rejected"`` (class ``"unphysical"``, see :mod:`alflow.overlaps`).

=============  ==============================================================================
class          meaning
=============  ==============================================================================
``scf``        the electronic self-consistency did not converge (:class:`SCFNotConverged`)
``crash``      the code exited non-zero, could not be started, or left no readable result
               (:class:`CodeCrashed`)
``timeout``    the call exceeded its ``timeout_s`` and was stopped (:class:`WalltimeExceeded`)
``nonfinite``  the code returned NaN or infinite energy or forces
``exception``  any other error raised by the oracle (e.g. an invalid setting, a Python oracle)
``unphysical`` rejected before the call: atoms closer than a fraction of their covalent radii
=============  ==============================================================================

An oracle (or a calculator returned by a ``python`` oracle) reports a classified failure by
raising one of the exceptions below; :func:`classify` maps any exception to its class.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Mapping

from ase.calculators.calculator import CalculationFailed


class OracleFailure(RuntimeError):
    """A classified failure of an external code; ``scratch``: its kept directory, if any."""

    failure_class = "crash"

    def __init__(self, message: str, scratch: str | Path | None = None):
        super().__init__(message)
        self.message = message
        self.scratch = None if scratch is None else str(scratch)

    def __str__(self) -> str:
        return self.message[:1500] + (f" (scratch kept: {self.scratch})" if self.scratch else "")


class SCFNotConverged(OracleFailure):
    """The electronic self-consistency did not converge."""

    failure_class = "scf"


class CodeCrashed(OracleFailure):
    """The code exited with an error, could not be started, or wrote no readable result."""

    failure_class = "crash"


class WalltimeExceeded(OracleFailure):
    """The call ran past its time limit and was stopped."""

    failure_class = "timeout"


# classes another attempt may pass: a lost node, a longer ``timeout_s``, more ranks (the run settings
# are not part of the label-cache key); ``scf``, ``nonfinite`` and ``unphysical`` follow from the
# structure and the physics settings, which are, so such a label is reused, never paid again
RETRIED = ("crash", "timeout", "exception")
MAX_ATTEMPTS = 3  # oracle calls per structure and oracle settings, the failed ones included


def attempts(label: Mapping) -> int:
    """Oracle calls a label document stands for: itself and the failed attempts in its ``history``."""
    return 1 + len(label.get("history", []))


def worth_retrying(label: Mapping) -> bool:
    """Whether a cached label is to be computed again rather than reused: a ``failed`` one of a
    class in :data:`RETRIED`, fewer than :data:`MAX_ATTEMPTS` times so far."""
    return label["status"] == "failed" and label.get("failure_class") in RETRIED and attempts(label) < MAX_ATTEMPTS


def lost(reason: str) -> dict:
    """The result recorded for an oracle call whose run ended without one (its worker killed every
    time, its firework FIZZLED): a ``crash``, which a later round may pay again."""
    return {"status": "failed", "failure_class": "crash", "seconds": 0.0, "reason": reason[:2000]}


class NonFiniteResult(OracleFailure):
    """The code returned NaN or infinite energy or forces."""

    failure_class = "nonfinite"


def classify(exc: BaseException) -> str:
    """The ``failure_class`` of an exception raised by an oracle call."""
    if isinstance(exc, OracleFailure):
        return exc.failure_class
    if isinstance(exc, subprocess.TimeoutExpired):
        return "timeout"
    if isinstance(exc, (subprocess.CalledProcessError, CalculationFailed)):
        return "crash"
    return "exception"
