"""VASP oracle (``kind: vasp``): one single point per label, run under custodian.

ASE's :class:`~ase.calculators.vasp.Vasp` writes INCAR, POSCAR, KPOINTS and POTCAR in the call's
scratch directory; custodian runs :class:`custodian.vasp.jobs.VaspJob` with VASP error handlers
(corrections applied and VASP rerun, up to ``max_errors``); vasprun.xml is read back with ASE.
custodian and pymatgen are an optional extra: ``pip install "alflow[vasp]"``.

Failures: ``scf`` when the final electronic loop did not converge (pymatgen's
``Vasprun.converged_electronic``, whatever custodian concluded), ``crash`` when custodian gives up
for another reason or VASP leaves no readable vasprun.xml, ``timeout`` past ``timeout_s`` (the
running VASP process group is stopped; custodian starts no retry after the deadline).

The label's ``energy`` is VASP's force-consistent free energy (``e_fr_energy``), the energy whose
derivatives the forces are; pw.x's "!" total energy is the same quantity.

Spec (paths relative to the spec file)::

    oracle:
      kind: vasp
      incar: {ENCUT: 400, ISMEAR: 1, SIGMA: 0.1, EDIFF: 1.0e-6}
      kpts: [2, 2, 1]
      xc: PBE                      # + gamma, setups, pp_path (default: $VASP_PP_PATH), handlers, max_errors
      command: vasp_std            # + mpi_ranks, launcher, timeout_s, keep_scratch, scratch
"""

from __future__ import annotations

import os
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ase import Atoms
from ase.io import read

from alflow.oracles.external import (
    RUN_KEYS,
    RunSettings,
    ScratchCalculator,
    child_environment,
    file_digest,
    stop_process_group,
)
from alflow.oracles.failures import CodeCrashed, SCFNotConverged, WalltimeExceeded
from alflow.oracles.settings import (
    SettingsError,
    boolean,
    field_value,
    grid,
    integer,
    optional,
    path_text,
    scalar,
    text,
)

INSTALL_HINT = 'the vasp oracle needs custodian and pymatgen: pip install "alflow[vasp]"'

#: custodian's VASP handlers a spec may name (custodian.vasp.handlers).
HANDLERS = (
    "VaspErrorHandler", "UnconvergedErrorHandler", "NonConvergingErrorHandler", "FrozenJobErrorHandler",
    "PositiveEnergyErrorHandler", "MeshSymmetryErrorHandler", "StdErrHandler", "LrfCommutatorHandler",
    "AliasingErrorHandler", "IncorrectSmearingHandler", "LargeSigmaHandler",
)
DEFAULT_HANDLERS = ("VaspErrorHandler", "UnconvergedErrorHandler")

#: INCAR tags alflow sets itself: a single point.
MANAGED = {"nsw": 0, "ibrion": -1}

#: Settings that only change how VASP is run, left out of the label-cache key with RUN_KEYS.
VASP_RUN_KEYS = ("pp_path", "max_errors")

KEYS = (*RUN_KEYS, "incar", "kpts", "gamma", "xc", "setups", "pp_path", "handlers", "max_errors")

#: Names ASE's Vasp takes as calculator options, not INCAR tags: they have their own keys here.
_NOT_INCAR = ("xc", "pp", "pp_version", "setups", "kpts", "gamma", "kpts_nintersections", "reciprocal", "txt",
              "directory", "command", "label", "ldau_luj", "nsw", "ibrion")

#: Seconds between custodian's checks of a running VASP (its default, 10 s, is for long runs).
POLLING_S = 1.0


def _incar(v: Any) -> dict[str, Any]:
    """INCAR tags (case-insensitive) → number, string, true/false or a list of them; upper-case keys."""
    if not isinstance(v, Mapping):
        raise ValueError(f"must be a mapping of INCAR tags, got {v!r}")
    out = {}
    for key, value in v.items():
        name = str(key)
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
            raise SettingsError((name,), "not an INCAR tag")
        if name.lower() in _NOT_INCAR:
            raise SettingsError((name,), "set by alflow or by its own oracle key (kpts, gamma, xc, setups)")
        try:
            out[name.upper()] = [scalar(x) for x in value] if isinstance(value, (list, tuple)) and value else scalar(value)
        except ValueError as exc:
            raise SettingsError((name,), str(exc)) from None
    return out


def _handlers(v: Any) -> list[str]:
    if not isinstance(v, (list, tuple)) or any(h not in HANDLERS for h in v):
        raise ValueError(f"must be a list of custodian VASP handlers ({', '.join(HANDLERS)}), got {v!r}")
    return list(v)


def _setups(v: Any) -> str | dict | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, Mapping) and all(isinstance(x, (str, int)) for x in v.values()):
        return {str(k): v2 for k, v2 in v.items()}
    raise ValueError(f"must be an ASE setups name (e.g. 'recommended') or a mapping element → suffix, got {v!r}")


@dataclass(frozen=True)
class VaspSettings(RunSettings):
    """Settings of the VASP oracle (single point under custodian).

    Attributes:
        incar: INCAR tags (NSW and IBRION are set by alflow: a single point).
        kpts: Monkhorst-Pack (or Γ-centred, ``gamma``) grid.
        gamma: Γ-centred grid.
        xc: ASE's xc name (sets GGA/METAGGA and the POTCAR family, e.g. PBE → potpaw_PBE).
        setups: ASE's POTCAR setups (``"recommended"``, or element → suffix such as ``_pv``).
        pp_path: folder holding potpaw_PBE/ etc. (default: ``$VASP_PP_PATH``).
        handlers: custodian VASP error handlers, by class name.
        max_errors: corrections custodian may apply before it gives up.
        command: the VASP executable (default ``vasp_std``); see :class:`RunSettings` for the rest.
    """

    command: str = "vasp_std"
    incar: dict = field(default_factory=dict)
    kpts: list = field(default_factory=lambda: [1, 1, 1])
    gamma: bool = False
    xc: str = "PBE"
    setups: Any = None
    pp_path: str | None = None
    handlers: list = field(default_factory=lambda: list(DEFAULT_HANDLERS))
    max_errors: int = 5

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base: Path | None = None) -> "VaspSettings":
        """Validated settings from a spec's oracle section (``kind`` ignored); relative paths are
        taken relative to ``base``. Raises :class:`SettingsError` naming the field."""
        data = cls.checked(data, KEYS, {"incar": "INCAR tags, e.g. {ENCUT: 400, ISMEAR: 1, SIGMA: 0.1}"})
        values = RunSettings.run_fields(data, base)
        values.update(
            incar=field_value(data, "incar", _incar, None),
            kpts=field_value(data, "kpts", grid, [1, 1, 1]),
            gamma=field_value(data, "gamma", boolean, False),
            xc=field_value(data, "xc", text, "PBE"),
            setups=field_value(data, "setups", _setups, None),
            pp_path=field_value(data, "pp_path", optional(path_text(base)), None),
            handlers=field_value(data, "handlers", _handlers, list(DEFAULT_HANDLERS)),
            max_errors=field_value(data, "max_errors", integer(0), 5),
        )
        return cls(**values)

    def physics(self, elements: Sequence[str] = ()) -> dict[str, Any]:
        """What determines the labels (label-cache key): INCAR, k-points, xc, setups, handlers, and
        the POTCAR of each of ``elements`` by content (:func:`potcar_digests`); not how VASP is run
        (RUN_KEYS, max_errors) nor where the POTCARs lie (pp_path)."""
        d = {k: v for k, v in self.to_dict().items() if k not in RUN_KEYS and k not in VASP_RUN_KEYS}
        if elements:
            d["potcars"] = potcar_digests(self, elements)
        return d

    def summary(self) -> str:
        encut = self.incar.get("ENCUT")
        return f"{self.xc}, {'ENCUT=' + format(encut, 'g') + ' eV, ' if encut else ''}kpts {'x'.join(map(str, self.kpts))}"


def require_custodian():
    """custodian's VaspJob, handlers module and Custodian, or ImportError with the install hint."""
    try:
        from custodian import Custodian
        from custodian.vasp import handlers
        from custodian.vasp.jobs import VaspJob
        from pymatgen.io.vasp.outputs import Vasprun
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from None
    return Custodian, VaspJob, handlers, Vasprun


def potcar_digests(settings: VaspSettings, elements: Sequence[str]) -> dict[str, dict | None]:
    """Each element's POTCAR as ASE picks it for these settings (family, setups, pp_path or
    $VASP_PP_PATH): its path below the family folder and sha256 (None where it cannot be found
    here, e.g. on a machine that only submits). POTCAR sets of one name differ between releases."""
    import tempfile

    elements = sorted(set(elements))
    try:
        with tempfile.TemporaryDirectory(prefix="alflow-potcar-") as tmp:
            paths = VaspOracle(settings).vasp(Path(tmp))._build_pp_list(Atoms(elements))
    except Exception:  # no POTCAR library here: the key cannot tell the sets apart
        return dict.fromkeys(elements)
    return {el: {"file": "/".join(Path(p).parts[-2:]), "sha256": file_digest(Path(p))} for el, p in zip(elements, paths)}


class _Deadline:
    """Stops the running VASP process group at the deadline; no VASP starts after it."""

    def __init__(self, timeout_s: float | None):
        self.end = None if timeout_s is None else time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        self.expired = False
        self.proc = None
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def started(self, proc) -> None:
        with self._lock:
            self.proc = proc
            if self.end is not None and self._timer is None:
                self._timer = threading.Timer(max(self.end - time.monotonic(), 0.0), self._stop)
                self._timer.daemon = True
                self._timer.start()

    def check(self) -> None:
        if self.end is not None and time.monotonic() >= self.end:
            self.expired = True
            raise WalltimeExceeded(f"VASP ran past timeout_s = {self.timeout_s:g} s and was stopped")

    def _stop(self) -> None:
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:  # still running at the deadline
                self.expired = True
                stop_process_group(self.proc)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def timed_job(VaspJob, deadline: _Deadline, **kwargs):
    """A custodian VaspJob whose runs respect ``deadline`` and alflow's child environment."""

    class TimedVaspJob(VaspJob):
        def run(self, directory="./"):
            deadline.check()
            env = child_environment()
            saved = {k: os.environ.get(k) for k in env if os.environ.get(k) != env[k]}
            os.environ.update({k: env[k] for k in saved})
            try:
                proc = super().run(directory=directory)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            deadline.started(proc)
            return proc

    return TimedVaspJob(**kwargs)


class VaspOracle(ScratchCalculator):
    """One VASP single point per call, under custodian, in its own scratch directory."""

    code = "vasp"

    def __init__(self, settings: VaspSettings):
        super().__init__(settings)
        self.settings: VaspSettings = settings

    def prepare(self, atoms: Atoms) -> None:
        require_custodian()

    def vasp(self, directory: Path):
        """ASE's Vasp calculator that writes the inputs of one call in ``directory``."""
        from ase.calculators.vasp import Vasp

        s = self.settings
        kwargs: dict[str, Any] = {k.lower(): v for k, v in s.incar.items()}
        kwargs.update(MANAGED, xc=s.xc, kpts=tuple(s.kpts), gamma=s.gamma)
        if s.setups is not None:
            kwargs["setups"] = s.setups
        if s.pp_path is not None:
            family = Vasp(xc=s.xc).input_params["pp"]
            folder = {"pbe": "potpaw_PBE", "lda": "potpaw"}.get(str(family).lower(), family)
            kwargs["pp"] = os.path.join(s.pp_path, folder)
        return Vasp(directory=str(directory), **kwargs)

    def write_input(self, atoms: Atoms, directory: Path):
        """Write INCAR, POSCAR, KPOINTS, POTCAR of ``atoms`` in ``directory``; the calculator."""
        atoms = atoms.copy()
        atoms.set_constraint()
        calc = self.vasp(Path(directory))
        calc.write_input(atoms)
        return calc

    def run_in(self, directory: Path, atoms: Atoms) -> dict[str, Any]:
        Custodian, VaspJob, handlers, Vasprun = require_custodian()
        s = self.settings
        calc = self.write_input(atoms, directory)
        deadline = _Deadline(s.timeout_s)
        job = timed_job(VaspJob, deadline, vasp_cmd=s.argv(), auto_npar=False, auto_gamma=False)
        custodian = Custodian([getattr(handlers, name)() for name in s.handlers], [job], max_errors=s.max_errors,
                              polling_time_step=POLLING_S, monitor_freq=30, directory=str(directory))
        error: Exception | None = None
        try:
            custodian.run()
        except WalltimeExceeded:
            raise
        except Exception as exc:  # custodian gave up (corrections exhausted, non-zero exit, ...)
            error = exc
        finally:
            deadline.cancel()
        if deadline.expired:
            raise WalltimeExceeded(f"VASP ran past timeout_s = {s.timeout_s:g} s and was stopped")
        vasprun = Path(directory) / "vasprun.xml"
        converged = None
        try:
            with warnings.catch_warnings():  # pymatgen warns about an unconverged run: we report it
                warnings.simplefilter("ignore")
                run = Vasprun(str(vasprun), parse_dos=False, parse_eigen=False, parse_potcar_file=False)
            converged = run.converged_electronic
            nelm = run.parameters.get("NELM")
        except Exception:  # no or truncated vasprun.xml: judged below
            pass
        if converged is False:
            raise SCFNotConverged(f"VASP SCF not converged in NELM = {nelm} electronic steps"
                                  + (f"; custodian: {type(error).__name__}: {error}" if error else ""))
        if error is not None:
            raise CodeCrashed(f"custodian: {type(error).__name__}: {error}"[:1500])
        if not vasprun.is_file():
            raise CodeCrashed("VASP wrote no vasprun.xml")
        result = read(vasprun, format="vasp-xml", index=-1)
        forces = result.get_forces()
        energy = result.calc.get_property("free_energy", allow_calculation=False)
        out = {"energy": energy, "free_energy": energy, "forces": forces[calc.resort]}
        stress = result.calc.results.get("stress")
        if stress is not None:
            out["stress"] = stress
        return out


def describe(settings: VaspSettings) -> str:
    return f"VASP under custodian ({settings.summary()})"
