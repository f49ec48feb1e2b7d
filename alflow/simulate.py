"""Relaxations, NEB and NVT MD with any ASE calculator (the Δ-ML potential, EMT, DFT).

Each run works on copies (the input Atoms are never modified; constraints are kept) and returns a
:class:`SimulationResult` whose ``frames`` are snapshots with a ``SinglePointCalculator`` holding
the calculator's results: energy (eV) and raw, unconstrained forces (eV/Å), plus any other standard
ASE property. ``SinglePointCalculator`` only accepts ASE's standard properties, so extra results
(e.g. the Δ-ML ``uncertainty``, ``energy_std``, ``forces_std``) are stored in ``frame.info`` under
their result names (kept by ``copy()`` and by .traj/extxyz files) and mirrored in
``frame.calc.results`` for in-memory use. ``frame.info["step"]`` is the optimizer/MD step.

A ``trajectory`` path writes the recorded frames as they come: ASE .traj, or extxyz when the suffix
is .xyz/.extxyz. Units: eV, Å, eV/Å, fs, K. ASE does the work (BFGS/FIRE, NEB + IDPP, Langevin /
NVTBerendsen, Maxwell–Boltzmann velocities).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_properties
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import Trajectory, write
from ase.md.langevin import Langevin
from ase.md.nvtberendsen import NVTBerendsen

try:  # ASE >= 3.29 (MaxwellBoltzmannDistribution is deprecated there)
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:  # pragma: no cover
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

from ase.mep import NEB
from ase.optimize import BFGS, FIRE

from alflow import constraints
from alflow.model.descriptors import OverlappingAtomsError

OPTIMIZERS = {"BFGS": BFGS, "FIRE": FIRE}
THERMOSTATS = ("langevin", "berendsen")
INTERPOLATIONS = ("idpp", "linear")
NEB_METHODS = ("improvedtangent", "aseneb", "eb", "spline", "string")
# info keys this module writes; dropped from the working copy so a frame never carries stale values
_RESERVED_INFO = ("uncertainty", "energy_std", "forces_std", "step", "image")


def _choice(field: str, value: str, allowed: Sequence[str]) -> str:
    """The canonical spelling of ``value`` among ``allowed`` (case-insensitive), else ValueError."""
    for name in allowed:
        if str(value).lower() == name.lower():
            return name
    raise ValueError(f"unknown {field} {value!r}; allowed: {', '.join(allowed)}")


def _positive(field: str, value: float, strict: bool = True) -> None:
    if not (value > 0 if strict else value >= 0) or not np.isfinite(value):
        raise ValueError(f"{field} must be {'> 0' if strict else '>= 0'}, got {value}")


@dataclass
class RelaxSettings:
    """Local optimisation: ASE ``optimizer`` ("BFGS" | "FIRE") until max force < ``fmax`` (eV/Å)
    over free atoms, at most ``steps`` steps."""

    optimizer: str = "BFGS"
    fmax: float = 0.03
    steps: int = 500

    def __post_init__(self) -> None:
        self.optimizer = _choice("optimizer", self.optimizer, tuple(OPTIMIZERS))
        _positive("fmax", self.fmax)
        _positive("steps", self.steps, strict=False)


@dataclass
class NEBSettings:
    """Nudged elastic band with ``images`` moving images between two endpoints.

    Endpoints are relaxed first (``relax_endpoints``, to ``endpoint_fmax``, None → ``fmax``) with
    the same optimizer; the band is interpolated (``interpolation`` "idpp" | "linear", minimum-image
    convention along periodic axes) and optimised with ``method`` and, if ``climb``, a climbing
    image, until the NEB force < ``fmax`` (eV/Å) or ``steps`` steps.
    """

    images: int = 3
    climb: bool = True
    fmax: float = 0.05
    steps: int = 500
    interpolation: str = "idpp"
    method: str = "improvedtangent"
    optimizer: str = "BFGS"
    relax_endpoints: bool = True
    endpoint_fmax: float | None = None

    def __post_init__(self) -> None:
        if int(self.images) != self.images or self.images < 1:
            raise ValueError(f"images (moving NEB images) must be an integer >= 1, got {self.images}")
        self.interpolation = _choice("interpolation", self.interpolation, INTERPOLATIONS)
        self.method = _choice("method", self.method, NEB_METHODS)
        self.optimizer = _choice("optimizer", self.optimizer, tuple(OPTIMIZERS))
        _positive("fmax", self.fmax)
        _positive("steps", self.steps, strict=False)
        if self.endpoint_fmax is not None:
            _positive("endpoint_fmax", self.endpoint_fmax)


@dataclass
class MDSettings:
    """NVT molecular dynamics at ``temperature_K`` with a ``timestep_fs`` step for ``steps`` steps.

    ``thermostat`` "langevin" (``friction_per_fs``, 1/fs) or "berendsen" (``taut_fs``, fs). Initial
    velocities are Maxwell–Boltzmann from ``seed`` (None → a fresh seed, reported in the result);
    the Langevin noise continues the same random stream. A frame is recorded every ``interval``
    steps.
    """

    temperature_K: float = 300.0
    timestep_fs: float = 1.0
    steps: int = 2000
    thermostat: str = "langevin"
    friction_per_fs: float = 0.02
    taut_fs: float = 100.0
    seed: int | None = None
    interval: int = 1

    def __post_init__(self) -> None:
        self.thermostat = _choice("thermostat", self.thermostat, THERMOSTATS)
        _positive("temperature_K", self.temperature_K, strict=False)
        _positive("timestep_fs", self.timestep_fs)
        _positive("steps", self.steps, strict=False)
        _positive("friction_per_fs", self.friction_per_fs)
        _positive("taut_fs", self.taut_fs)
        if int(self.interval) != self.interval or self.interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {self.interval}")


@dataclass
class SimulationResult:
    """Outcome of :func:`relax`, :func:`neb` or :func:`md`.

    ``frames``: every recorded structure with its results (relax: one per optimizer step, the start
    included; md: steps 0, interval, 2·interval, … and always the last step; neb: the whole band,
    images + 2 structures, at every optimizer step, in band order; endpoint relaxations are not
    included). ``final``: relaxed structure / last MD frame / saddle (highest-energy moving image of
    the final band). ``converged``: relax and neb, max force (as ASE defines it, free atoms,
    constraints respected) below fmax, for neb also both endpoint relaxations; md, all steps ran.
    ``steps``: optimizer or MD steps taken (neb: of the band). ``band``: neb's final band with
    endpoints. ``seed``: md's seed actually used. ``stopped``: why the run ended early, when the
    calculator met an unphysical structure (atoms fused: an ML potential far from its data); the
    frames recorded until then are kept and ``converged`` is False. ``info``: the caller's notes.
    """

    frames: list[Atoms]
    final: Atoms
    converged: bool
    steps: int
    band: list[Atoms] | None = None
    seed: int | None = None
    stopped: str | None = None
    info: dict = field(default_factory=dict)  # how the caller ran it (e.g. refinement_anchors)


def _guarded(run: Callable[[], object]) -> str | None:
    """Run an optimizer or dynamics; the reason when an unphysical structure stopped it, else None."""
    try:
        run()
    except OverlappingAtomsError as exc:
        return f"stopped early: {exc}"
    return None


def max_force(atoms_or_forces: Atoms | np.ndarray, free_mask: np.ndarray | None = None) -> float:
    """Largest per-atom force norm (eV/Å) over free atoms; 0.0 when none is free.

    For Atoms the forces are ``atoms.get_forces()`` (constraints applied) and the default mask drops
    FixAtoms atoms; for a [N, 3] array the default mask keeps every atom.
    """
    if isinstance(atoms_or_forces, Atoms):
        forces = atoms_or_forces.get_forces()
        mask = constraints.free_mask(atoms_or_forces) if free_mask is None else free_mask
    else:
        forces = np.asarray(atoms_or_forces, dtype=float).reshape(-1, 3)
        mask = np.ones(len(forces), dtype=bool) if free_mask is None else free_mask
    norms = np.linalg.norm(forces, axis=1)[np.asarray(mask, dtype=bool)]
    return float(norms.max(initial=0.0))


def _working_copy(atoms: Atoms, calculator: Calculator) -> Atoms:
    """A copy of ``atoms`` (constraints kept, no stale result keys) with ``calculator`` attached."""
    work = atoms.copy()
    extra = set(getattr(calculator, "implemented_properties", ())) - set(all_properties)
    for key in (*_RESERVED_INFO, *extra):
        work.info.pop(key, None)
    work.calc = calculator
    return work


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.item() if value.ndim == 0 else value.copy()
    if isinstance(value, np.generic):
        return value.item()
    return value


def snapshot(atoms: Atoms, **info) -> Atoms:
    """A copy of ``atoms`` with its calculator's current results frozen in a SinglePointCalculator.

    Standard properties go to the SinglePointCalculator (forces raw, unconstrained); other results
    go to ``info`` (and are mirrored in ``calc.results``); ``info`` keywords are added to ``info``.
    """
    atoms.get_potential_energy()
    atoms.get_forces()  # both are cached for the current positions in every run here
    results = atoms.calc.results
    frame = atoms.copy()
    standard = {k: _plain(v) for k, v in results.items() if k in all_properties}
    extra = {k: _plain(v) for k, v in results.items() if k not in all_properties}
    frame.calc = SinglePointCalculator(frame, **standard)
    frame.calc.results.update(extra)
    frame.info.update(extra)
    frame.info.update(info)
    return frame


class _Recorder:
    """Collects frames and, given a path, writes each one as it comes (.traj, or extxyz)."""

    def __init__(self, path: str | Path | None):
        self.frames: list[Atoms] = []
        self._traj = None
        self._xyz: Path | None = None
        if path is not None:
            path = Path(path)
            if path.suffix.lower() in (".xyz", ".extxyz"):
                self._xyz = path
                path.write_text("")
            else:
                self._traj = Trajectory(str(path), "w")

    def add(self, frame: Atoms) -> None:
        self.frames.append(frame)
        if self._traj is not None:
            self._traj.write(frame)
        elif self._xyz is not None:
            write(self._xyz, frame, format="extxyz", append=True)

    def close(self) -> None:
        if self._traj is not None:
            self._traj.close()
            self._traj = None

    def __enter__(self) -> _Recorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _relax_working(atoms: Atoms, settings: RelaxSettings, recorder: _Recorder) -> tuple[bool, int, str | None]:
    """Relax ``atoms`` (calculator attached) in place, recording each step; (converged, steps, stopped)."""
    opt = OPTIMIZERS[settings.optimizer](atoms, logfile=None)
    opt.attach(lambda: recorder.add(snapshot(atoms, step=opt.nsteps)))
    outcome = []
    stopped = _guarded(lambda: outcome.append(opt.run(fmax=settings.fmax, steps=settings.steps)))
    return bool(outcome and outcome[0]), int(opt.nsteps), stopped


def relax(
    atoms: Atoms,
    calculator: Calculator,
    settings: RelaxSettings | None = None,
    trajectory: str | Path | None = None,
) -> SimulationResult:
    """Relax a copy of ``atoms`` with ``calculator``; frames are the optimizer steps, start included."""
    settings = settings or RelaxSettings()
    settings.__post_init__()
    work = _working_copy(atoms, calculator)
    with _Recorder(trajectory) as rec:
        converged, steps, stopped = _relax_working(work, settings, rec)
    if not rec.frames:
        raise OverlappingAtomsError(f"relaxation could not start: {stopped}")
    return SimulationResult(frames=rec.frames, final=rec.frames[-1], converged=converged, steps=steps, stopped=stopped)


def _check_endpoints(initial: Atoms, final: Atoms) -> None:
    if len(initial) != len(final):
        raise ValueError(f"NEB endpoints differ in number of atoms: {len(initial)} vs {len(final)}")
    if not np.array_equal(initial.numbers, final.numbers):
        raise ValueError(
            "NEB endpoints differ in species order: "
            f"{initial.get_chemical_formula('all')} vs {final.get_chemical_formula('all')}"
        )
    if not np.allclose(initial.cell.array, final.cell.array) or not np.array_equal(initial.pbc, final.pbc):
        raise ValueError("NEB endpoints differ in cell or pbc")


def neb(
    initial: Atoms,
    final: Atoms,
    calculator_factory: Callable[[], Calculator],
    settings: NEBSettings | None = None,
    trajectory: str | Path | None = None,
) -> SimulationResult:
    """Minimum-energy path from ``initial`` to ``final``; one calculator per image from the factory.

    The trajectory holds the band (images + 2 structures) per optimizer step, as ASE's NEBTools
    expects. ``final`` of the result is the saddle: the highest-energy moving image of the final
    band (the climbing image), which is the band's maximum unless an endpoint lies higher.
    """
    settings = settings or NEBSettings()
    settings.__post_init__()
    _check_endpoints(initial, final)
    ends = [_working_copy(a, calculator_factory()) for a in (initial, final)]
    ends_converged = True
    if settings.relax_endpoints:
        end_settings = RelaxSettings(
            optimizer=settings.optimizer,
            fmax=settings.fmax if settings.endpoint_fmax is None else settings.endpoint_fmax,
            steps=settings.steps,
        )
        for k, end in enumerate(ends):
            recorder = _Recorder(None)
            ok, _, stopped = _relax_working(end, end_settings, recorder)
            ends_converged &= ok
            if stopped:  # the band cannot be built: return the endpoints as far as they got
                last = [recorder.frames[-1] if recorder.frames else None] + [
                    snapshot(e, step=0) if j != k else None for j, e in enumerate(ends) if j != k
                ]
                band = [f for f in (last if k == 0 else last[::-1]) if f is not None]
                return SimulationResult(frames=band, final=band[0], converged=False, steps=0, band=band,
                                        stopped=f"endpoint {k}: {stopped}")
    for end in ends:
        end.get_potential_energy()
        end.get_forces()

    band = [ends[0]]
    for _ in range(settings.images):
        image = ends[0].copy()
        image.calc = calculator_factory()
        band.append(image)
    band.append(ends[1])
    path = NEB(band, climb=settings.climb, method=settings.method)
    path.interpolate(method=settings.interpolation, mic=bool(ends[0].pbc.any()), apply_constraint=False)

    def snap_band(step: int) -> list[Atoms]:
        return [snapshot(image, step=step, image=i) for i, image in enumerate(band)]

    with _Recorder(trajectory) as rec:
        opt = OPTIMIZERS[settings.optimizer](path, logfile=None)

        def record() -> None:
            for frame in snap_band(opt.nsteps):
                rec.add(frame)

        opt.attach(record)
        outcome = []
        stopped = _guarded(lambda: outcome.append(opt.run(fmax=settings.fmax, steps=settings.steps)))
    n_band = settings.images + 2
    final_band = (rec.frames[-n_band:] if rec.frames else [snapshot(e, step=0) for e in ends]) if stopped \
        else snap_band(int(opt.nsteps))
    moving = final_band[1:-1] or final_band
    saddle = moving[int(np.argmax([image.get_potential_energy() for image in moving]))]
    return SimulationResult(
        frames=rec.frames,
        final=saddle,
        converged=bool(outcome and outcome[0]) and ends_converged,
        steps=int(opt.nsteps),
        band=final_band,
        stopped=stopped,
    )


def md(
    atoms: Atoms,
    calculator: Calculator,
    settings: MDSettings | None = None,
    trajectory: str | Path | None = None,
) -> SimulationResult:
    """NVT MD of a copy of ``atoms``; reproducible for a given seed (velocities and Langevin noise).

    Frames: steps 0, interval, 2·interval, … plus the last step when ``steps % interval != 0``,
    i.e. ``steps // interval + 1`` (+1) frames. The centre of mass is fixed only without constraints.
    """
    settings = settings or MDSettings()
    settings.__post_init__()
    # a fresh seed fits 63 bits, so a store (BSON: 64-bit integers) can record it
    seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> 1) if settings.seed is None \
        else int(settings.seed)
    rng = np.random.default_rng(seed)
    work = _working_copy(atoms, calculator)
    thermalize_momenta(work, temperature_K=settings.temperature_K, rng=rng)
    fixcm = not work.constraints
    dt = settings.timestep_fs * units.fs
    if settings.thermostat == "langevin":
        dyn = Langevin(
            work,
            timestep=dt,
            temperature_K=settings.temperature_K,
            friction=settings.friction_per_fs / units.fs,
            fixcm=fixcm,
            rng=rng,
            logfile=None,
        )
    else:
        dyn = NVTBerendsen(
            work,
            timestep=dt,
            temperature_K=settings.temperature_K,
            taut=settings.taut_fs * units.fs,
            fixcm=fixcm,
            logfile=None,
        )
    with _Recorder(trajectory) as rec:
        dyn.attach(lambda: rec.add(snapshot(work, step=dyn.nsteps)), interval=settings.interval)
        stopped = _guarded(lambda: dyn.run(steps=settings.steps))
        if not stopped and rec.frames[-1].info["step"] != dyn.nsteps:
            rec.add(snapshot(work, step=dyn.nsteps))
    if not rec.frames:
        raise OverlappingAtomsError(f"MD could not start: {stopped}")
    return SimulationResult(
        frames=rec.frames,
        final=rec.frames[-1],
        converged=not stopped and int(dyn.nsteps) == settings.steps,
        steps=int(dyn.nsteps),
        seed=seed,
        stopped=stopped,
    )
