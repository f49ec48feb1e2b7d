"""Quantum ESPRESSO oracle (``kind: espresso``): one pw.x SCF per label through ASE's Espresso.

ASE's :class:`~ase.calculators.espresso.Espresso` writes the input and reads the output; the run
goes through :class:`LimitedEspressoProfile`, an :class:`~ase.calculators.espresso.EspressoProfile`
that adds the launcher, the time limit and the check of the output. Failures are classified:
``scf`` when pw.x reports "convergence NOT achieved", ``crash`` for a non-zero exit or an output
without results (the first "Error in routine" message is quoted), ``timeout`` past ``timeout_s``.

Spec (paths relative to the spec file)::

    oracle:
      kind: espresso
      pseudo_dir: /usr/share/espresso/pseudo       # default: Debian's quantum-espresso-data
      pseudopotentials: {Cu: Cu.pbe-kjpaw.UPF, C: C.pbe-rrkjus.UPF}
      input_data: {ecutwfc: 30, ecutrho: 240, occupations: smearing, smearing: mv, degauss: 0.02}
      kpts: [2, 2, 1]                               # null: Γ only (pw.x's Γ tricks)
      mpi_ranks: 2                                  # + command, launcher, timeout_s, keep_scratch, scratch
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ase import Atoms
from ase.calculators.espresso import Espresso, EspressoProfile
from ase.io.espresso_namelist.keys import ALL_KEYS
from ase.io.espresso_namelist.namelist import Namelist

from alflow.oracles.external import (
    RUN_KEYS,
    RunSettings,
    ScratchCalculator,
    file_digest,
    run_command,
)
from alflow.oracles.failures import CodeCrashed, SCFNotConverged
from alflow.oracles.settings import (
    SettingsError,
    element_files,
    field_value,
    grid,
    integer,
    path_text,
    positive_number,
    scalar,
)

#: Where Debian and Ubuntu's ``quantum-espresso-data`` package puts its pseudopotentials.
DEBIAN_PSEUDO_DIR = "/usr/share/espresso/pseudo"

#: pw.x namelists a single-point input may set.
SECTIONS = ("control", "system", "electrons")

#: input_data keys alflow sets itself: an SCF with forces, files in the scratch directory.
MANAGED = {"calculation": "scf", "tprnfor": True, "outdir": ".", "prefix": "alflow"}

#: input_data keys a spec may not set (alflow writes them, or they would hide a failure).
FORBIDDEN = (*MANAGED, "pseudo_dir", "wfcdir", "scf_must_converge", "ibrav", "celldm", "nat", "ntyp",
             "a", "b", "c", "cosab", "cosac", "cosbc")

KEYS = (*RUN_KEYS, "pseudo_dir", "pseudopotentials", "input_data", "kpts", "koffset")

_POSITIVE = ("ecutwfc", "ecutrho", "degauss", "conv_thr", "mixing_beta")

_SCF_FAILED = re.compile(r"convergence NOT achieved.*", re.I)
_ERROR = re.compile(r"Error in routine\s+(\S+)\s*\(\s*(-?\d+)\s*\):\s*\n\s*(.*)")


def _input_data(v: Any) -> dict[str, Any]:
    """pw.x parameters, flat or by namelist, as one flat mapping with lower-case keys."""
    if not isinstance(v, Mapping):
        raise ValueError(f"must be a mapping of pw.x parameters, got {v!r}")
    flat: dict[str, Any] = {}
    for key, value in v.items():
        if isinstance(value, Mapping):
            if str(key).lower() not in SECTIONS:
                raise SettingsError((str(key),), f"not a namelist alflow writes (allowed: {', '.join(SECTIONS)})")
            items = [(str(k), val, (str(key), str(k))) for k, val in value.items()]
        else:
            items = [(str(key), value, (str(key),))]
        for name, val, where in items:
            name_l = name.lower()
            section = Namelist.search_key(name_l, {s: ALL_KEYS["pw"][s] for s in SECTIONS})
            if section is None:
                raise SettingsError(where, f"not a pw.x parameter of {'/'.join(SECTIONS)}")
            if name_l.split("(")[0] in FORBIDDEN:  # celldm(1) as well as celldm
                raise SettingsError(where, "set by alflow (an SCF with forces; pseudo_dir is its own key)")
            if name_l in flat:  # pw.x's names are case-insensitive, and the namelists are flattened
                raise SettingsError(where, "given twice (the names are case-insensitive, across namelists)")
            try:
                val = scalar(val)
                if name_l in _POSITIVE:
                    val = positive_number(val)
                if name_l == "electron_maxstep":
                    val = integer(1)(val)
                if name_l == "mixing_beta" and val > 1:
                    raise ValueError(f"must be a number in (0, 1], got {val!r}")
            except ValueError as exc:
                raise SettingsError(where, str(exc)) from None
            flat[name_l] = val
    if "ecutwfc" not in flat:
        raise SettingsError(("ecutwfc",), "required (plane-wave cutoff in Ry)")
    return flat


def _kpts(v: Any) -> list[int] | None:
    return None if v is None else grid(v)


def _koffset(v: Any) -> list[int]:
    if not isinstance(v, (list, tuple)) or len(v) != 3 or any(n not in (0, 1) or isinstance(n, bool) for n in v):
        raise ValueError(f"must be three of 0 or 1, got {v!r}")
    return [int(n) for n in v]


@dataclass(frozen=True)
class EspressoSettings(RunSettings):
    """Settings of the Quantum ESPRESSO oracle (one pw.x SCF with forces per label).

    Attributes:
        pseudo_dir: folder of the pseudopotential files (default: Debian's quantum-espresso-data).
        pseudopotentials: element → file name in ``pseudo_dir``; every element labelled needs one.
        input_data: pw.x parameters of &control, &system, &electrons (flat or by namelist);
            ``ecutwfc`` (Ry) is required. alflow sets calculation='scf', tprnfor, outdir, prefix.
        kpts: Monkhorst-Pack grid, or None for Γ only.
        koffset: grid offsets (0 or 1 per axis).
        command: the pw.x executable (default ``pw.x``); see :class:`RunSettings` for the rest.
    """

    command: str = "pw.x"
    pseudo_dir: str = DEBIAN_PSEUDO_DIR
    pseudopotentials: dict = field(default_factory=dict)
    input_data: dict = field(default_factory=dict)
    kpts: list | None = field(default_factory=lambda: [1, 1, 1])
    koffset: list = field(default_factory=lambda: [0, 0, 0])

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base: Path | None = None) -> "EspressoSettings":
        """Validated settings from a spec's oracle section (``kind`` ignored); relative paths are
        taken relative to ``base``. Raises :class:`SettingsError` naming the field."""
        data = cls.checked(data, KEYS, {"pseudopotentials": "element → file name in pseudo_dir",
                                        "input_data": "at least ecutwfc, in Ry"})
        values = RunSettings.run_fields(data, base)
        values.update(
            pseudo_dir=field_value(data, "pseudo_dir", path_text(base), DEBIAN_PSEUDO_DIR),
            pseudopotentials=field_value(data, "pseudopotentials", element_files, None),
            input_data=field_value(data, "input_data", _input_data, None),
            kpts=field_value(data, "kpts", _kpts, [1, 1, 1]),
            koffset=field_value(data, "koffset", _koffset, [0, 0, 0]),
        )
        return cls(**values)

    def physics(self, elements: Sequence[str] = ()) -> dict[str, Any]:
        """What determines the labels, for the label-cache key (``elements``: unused, the
        pseudopotentials are named per element already): not the run settings
        (:data:`RUN_KEYS`) and not the folder of the pseudopotentials, but each file's name and
        content digest (None where the file cannot be read here)."""
        d = {k: v for k, v in self.to_dict().items() if k not in RUN_KEYS and k != "pseudo_dir"}
        d["pseudopotentials"] = {
            el: {"file": name, "sha256": file_digest(Path(self.pseudo_dir) / name)}
            for el, name in sorted(self.pseudopotentials.items())
        }
        return d

    def summary(self) -> str:
        """Short description for provenance, e.g. ``ecutwfc=30 Ry, kpts 2x2x1, Cu.pbe.UPF``."""
        kpts = "Γ" if self.kpts is None else "x".join(map(str, self.kpts))
        cut = f"ecutwfc={self.input_data['ecutwfc']:g} Ry"
        return f"{cut}, kpts {kpts}, {', '.join(self.pseudopotentials[e] for e in sorted(self.pseudopotentials))}"


class LimitedEspressoProfile(EspressoProfile):
    """ASE's profile with alflow's run: the launcher, a time limit that stops the whole process
    group, and the output checked for a failed SCF or an error before ASE reads it."""

    def __init__(self, settings: EspressoSettings):
        super().__init__(command=shlex.join(settings.argv()), pseudo_dir=settings.pseudo_dir)
        self.settings = settings

    def run(self, directory, inputfile, outputfile, errorfile=None, append=False):
        argv = self.get_command(inputfile)
        status = run_command(argv, Path(directory), outputfile, errorfile,
                             timeout_s=self.settings.timeout_s, code="pw.x")
        check_output(Path(directory) / outputfile, status, Path(directory) / errorfile if errorfile else None)


def check_output(output: Path, status: int, errors: Path | None = None) -> None:
    """Raise the failure a pw.x run shows: :class:`SCFNotConverged` when its output says
    "convergence NOT achieved" (whatever the exit status), :class:`CodeCrashed` for a non-zero
    exit status (quoting pw.x's "Error in routine" message or the end of stderr)."""
    text = output.read_text(errors="replace") if output.is_file() else ""
    if (match := _SCF_FAILED.search(text)) is not None:
        raise SCFNotConverged(f"pw.x SCF not converged: {match.group(0).strip()}")
    if status != 0:
        if (error := _ERROR.search(text)) is not None:
            detail = f"Error in routine {error.group(1)} ({error.group(2)}): {error.group(3).strip()}"
        else:
            tail = errors.read_text(errors="replace").strip().splitlines()[-3:] if errors and errors.is_file() else []
            detail = " | ".join(line.strip() for line in tail) or "no error message"
        raise CodeCrashed(f"pw.x exited with status {status}: {detail}"[:1500])


class EspressoOracle(ScratchCalculator):
    """One pw.x SCF per call in its own scratch directory; energy (the force-consistent total
    energy pw.x prints after '!'), forces, and stress when ``input_data`` asks for it."""

    code = "espresso"

    def __init__(self, settings: EspressoSettings):
        super().__init__(settings)
        self.settings: EspressoSettings = settings

    def prepare(self, atoms: Atoms) -> None:
        missing = sorted(set(atoms.get_chemical_symbols()) - set(self.settings.pseudopotentials))
        if missing:
            raise ValueError(f"oracle.pseudopotentials has no file for {', '.join(missing)} "
                             f"(given: {', '.join(sorted(self.settings.pseudopotentials))})")
        for element in sorted(set(atoms.get_chemical_symbols())):
            path = Path(self.settings.pseudo_dir) / self.settings.pseudopotentials[element]
            if not path.is_file():
                raise ValueError(f"pseudopotential of {element} not found: {path} (oracle.pseudo_dir)")

    def espresso(self, directory: Path) -> Espresso:
        """ASE's Espresso calculator for one call in ``directory``."""
        s = self.settings
        return Espresso(profile=LimitedEspressoProfile(s), directory=str(directory),
                        input_data={**s.input_data, **MANAGED}, pseudopotentials=dict(s.pseudopotentials),
                        kpts=None if s.kpts is None else tuple(s.kpts), koffset=tuple(s.koffset))

    def write_input(self, atoms: Atoms, directory: Path) -> Path:
        """Write the pw.x input of ``atoms`` into ``directory`` without running; its path."""
        atoms = atoms.copy()
        atoms.set_constraint()
        calc = self.espresso(Path(directory))
        calc.write_inputfiles(atoms, ["energy", "forces"])
        return Path(directory) / calc.template.inputname

    def run_in(self, directory: Path, atoms: Atoms) -> dict[str, Any]:
        calc = self.espresso(directory)  # what Espresso.calculate does, with the reading checked
        calc.write_inputfiles(atoms, ["energy", "forces"])
        calc.template.execute(calc.directory, calc.profile)  # raises the classified failures
        try:
            results = dict(calc.template.read_results(calc.directory))
        except Exception as exc:  # ASE's reader fails in many ways on a truncated output
            raise CodeCrashed(f"pw.x output holds no readable results ({type(exc).__name__}: {exc})") from exc
        if results.get("energy") is None or results.get("forces") is None:
            raise CodeCrashed("pw.x output holds no energy or forces")
        return results


def describe(settings: EspressoSettings) -> str:
    return f"Quantum ESPRESSO pw.x ({settings.summary()})"


__all__ = ["EspressoSettings", "EspressoOracle", "LimitedEspressoProfile", "check_output", "DEBIAN_PSEUDO_DIR",
           "describe"]
