"""Oracles: factories of the ASE calculators that provide reference energies and forces.

``calculator_factory(kind, options)`` returns a zero-argument callable that builds a fresh
calculator; ``describe(kind, options)`` names it for provenance fields.
"""

from __future__ import annotations

import importlib
import re
import time
from typing import Any, Callable, Mapping, Sequence

import ase
import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.calculators.emt import EMT

from alflow.oracles.failures import classify
from alflow.overlaps import find_overlap

KINDS = ("emt", "python", "espresso", "vasp")

#: Oracle kinds run as external codes, configured by flat keys of the spec's oracle section.
DFT_KINDS = ("espresso", "vasp")


def dft_settings(kind: str, options: Mapping[str, Any], base=None):
    """Validated settings of a DFT oracle (:mod:`alflow.oracles.espresso`, :mod:`.vasp`);
    relative paths against ``base``. Raises :class:`alflow.oracles.settings.SettingsError`."""
    if kind == "espresso":
        from alflow.oracles.espresso import EspressoSettings

        return EspressoSettings.from_mapping(options, base)
    from alflow.oracles.vasp import VaspSettings

    return VaspSettings.from_mapping(options, base)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown oracle kind '{kind}' (known: {', '.join(KINDS)})")


def emt_options(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(EMT.default_parameters))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for the emt oracle "
            f"(known: {', '.join(EMT.default_parameters)})"
        )
    return dict(options)


def _python_options(options: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    unknown = sorted(set(options) - {"callable", "kwargs"})
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for the python oracle (known: callable, kwargs)")
    spec = options.get("callable")
    if not spec:
        raise ValueError("the python oracle needs options['callable'] = 'package.module:function'")
    kwargs = options.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"the python oracle's options['kwargs'] must be a mapping, got {kwargs!r}")
    return spec, dict(kwargs)


def import_callable(spec: str) -> Callable[..., Any]:
    """The object named by ``'package.module:function'`` (the part after ':' may be dotted)."""
    module_name, sep, attr = spec.partition(":")
    if not (module_name and sep and attr):
        raise ValueError(f"oracle callable '{spec}' is not of the form 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
        for name in attr.split("."):
            obj = getattr(obj, name)
    except Exception as exc:  # a module that fails on import (syntax, a missing variable) as well
        raise ValueError(f"cannot import oracle callable '{spec}': {type(exc).__name__}: {exc}") from exc
    if not callable(obj):
        raise ValueError(f"oracle callable '{spec}' is not callable")
    return obj


def calculator_factory(kind: str, options: Mapping[str, Any] | None = None) -> Callable[[], Calculator]:
    """Zero-argument factory of fresh calculators of oracle ``kind``.

    ``"emt"``: ASE's EMT, ``options`` are its parameters. ``"python"``: ``options`` are
    ``{"callable": "package.module:function", "kwargs": {...}}``; the function is imported now
    and called with ``kwargs`` each time, and must return an ASE calculator. ``"espresso"`` and
    ``"vasp"``: ``options`` are the flat keys of the spec's oracle section (see
    :mod:`alflow.oracles.espresso`, :mod:`alflow.oracles.vasp`); each calculation runs the code
    once in its own scratch directory.
    """
    _check_kind(kind)
    options = options or {}
    if kind == "emt":
        emt_kwargs = emt_options(options)
        return lambda: EMT(**emt_kwargs)
    if kind in DFT_KINDS:  # settings as a spec's oracle section holds them (flat keys)
        settings = dft_settings(kind, options)
        if kind == "espresso":
            from alflow.oracles.espresso import EspressoOracle

            return lambda: EspressoOracle(settings)
        from alflow.oracles.vasp import VaspOracle

        return lambda: VaspOracle(settings)
    spec, kwargs = _python_options(options)
    function = import_callable(spec)
    return lambda: function(**kwargs)


def describe(kind: str, options: Mapping[str, Any] | None = None) -> str:
    """Human-readable name of the oracle, e.g. ``"EMT (ASE 3.29.0)"``."""
    _check_kind(kind)
    options = options or {}
    if kind == "emt":
        extra = "".join(f", {k}={v!r}" for k, v in emt_options(options).items())
        return f"EMT (ASE {ase.__version__}{extra})"
    if kind in DFT_KINDS:
        module = importlib.import_module(f"alflow.oracles.{kind}")
        return module.describe(dft_settings(kind, options))
    spec, kwargs = _python_options(options)
    return f"{spec}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"


def oracle_options(oracle: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(kind, options) of a campaign spec's ``oracle`` section."""
    kind = oracle["kind"]
    if kind == "python":
        return kind, {"callable": oracle["callable"], "kwargs": dict(oracle.get("kwargs") or {})}
    if kind in DFT_KINDS:
        return kind, {k: v for k, v in oracle.items() if k != "kind"}
    return kind, dict(oracle.get("options") or {})


def cache_settings(oracle: Mapping[str, Any], elements: Sequence[str] = ()) -> dict[str, Any]:
    """The part of a spec's oracle section that determines its labels, for the label-cache key.

    DFT oracles leave out how the code is run (command, mpi_ranks, launcher, timeout_s,
    keep_scratch, scratch; VASP also max_errors) and where files lie (pseudo_dir: Quantum
    ESPRESSO pseudopotentials count by file name and content digest; VASP pp_path), so more ranks
    or a new launcher reuse the labels already paid for; VASP adds each of ``elements``' POTCAR
    by content. Other kinds: the section unchanged.
    """
    kind, options = oracle_options(oracle)
    if kind in DFT_KINDS:
        return {"kind": kind, **dft_settings(kind, options).physics(elements)}
    return dict(oracle)


#: Classes of failed oracle calls (``failure_class`` of a label; see :mod:`alflow.oracles.failures`),
#: plus "rejected" and "unknown" for labels stored without a class.
FAILURE_CLASSES = ("scf", "crash", "timeout", "nonfinite", "exception", "unphysical", "rejected", "unknown")

_REASON_CLASSES = (  # (class, pattern in the reason), first match wins
    ("timeout", re.compile(r"wall ?time|time ?out|timed out|time limit", re.I)),
    ("scf", re.compile(r"\bscf\b|self-consisten|not converge", re.I)),
    ("nonfinite", re.compile(r"not finite|\bnan\b|\binf\b", re.I)),
)


def failure_class(status: str, reason: str | None = None, recorded: str | None = None) -> str | None:
    """The class of an oracle result or label: None when ``status`` is "ok"; the ``recorded``
    class when the oracle gave one; else "rejected" for a rejected result, and for a failed one
    the class its ``reason`` names (time limit, SCF non-convergence, non-finite values), or
    "exception" (any other error), or "unknown" (no reason recorded)."""
    if status == "ok":
        return None
    if recorded:
        return str(recorded)
    if status == "rejected":
        return "rejected"
    for name, pattern in _REASON_CLASSES:
        if reason and pattern.search(reason):
            return name
    return "exception" if reason else "unknown"


def compute_label(atoms: Atoms, oracle: Mapping[str, Any]) -> dict[str, Any]:
    """Energy and forces of ``atoms`` from the oracle; never raises for a failed calculation.

    Returns ``{"status": "ok", "energy", "forces", ["stress"], "seconds"}`` or
    ``{"status": "failed", "failure_class", "reason", "seconds"}``: an exception of the
    oracle becomes a recorded failure and the campaign goes on (class ``"scf"``, ``"crash"`` or
    ``"timeout"`` for a classified DFT failure, see :mod:`alflow.oracles.failures`, else
    ``"exception"``). A structure with overlapping atoms is ``"rejected"`` (class
    ``"unphysical"``) without calling the oracle: nothing is paid for it.
    """
    kind, options = oracle_options(oracle)
    start = time.perf_counter()
    overlap = find_overlap(atoms)
    if overlap is not None:
        return {"status": "rejected", "failure_class": "unphysical", "reason": overlap[:2000],
                "seconds": time.perf_counter() - start}
    try:
        atoms = atoms.copy()
        atoms.calc = calculator_factory(kind, options)()
        energy = float(atoms.get_potential_energy())
        forces = np.asarray(atoms.get_forces(apply_constraint=False), dtype=float)
        if forces.shape != (len(atoms), 3):  # would fail only when stored, in the merge, again on every rerun
            raise ValueError(f"the oracle returned forces of shape {forces.shape} for {len(atoms)} atoms")
        result: dict[str, Any] = {"status": "ok", "energy": energy, "forces": forces.tolist()}
        stress = atoms.calc.results.get("stress")  # kept when the oracle computed it anyway (no extra call)
        if stress is not None:
            stress = np.asarray(stress, dtype=float)
            if stress.shape not in ((6,), (3, 3)):
                raise ValueError(f"the oracle returned a stress of shape {stress.shape}")
            result["stress"] = stress.tolist()
        if not (np.isfinite(energy) and np.isfinite(forces).all() and np.isfinite(result.get("stress", 0.0)).all()):
            result = {"status": "failed", "failure_class": "nonfinite", "reason": "energy or forces not finite"}
    except Exception as exc:  # an oracle may fail in any way; it is recorded, not fatal
        result = {"status": "failed", "failure_class": classify(exc), "reason": f"{type(exc).__name__}: {exc}"[:2000]}
    result["seconds"] = time.perf_counter() - start
    return result
