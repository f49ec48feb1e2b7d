"""``alflow demo``: fit the Δ-ML ensemble to EMT-labelled C/Cu(100) structures and report.

A small end-to-end run of the model core on the paper's relaxation system: 15 rattled
structures labelled by EMT, a 5-member ensemble, errors on 10 held-out structures, the
uncertainty on and far from the data, and the cost of one ensemble call vs one EMT call.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from alflow.model import DeltaPotential
from alflow.constraints import free_mask
from alflow.systems import c_cu100


def emt_labelled(atoms: Atoms) -> Atoms:
    """A copy of ``atoms`` with EMT energy and (unconstrained) forces attached."""
    atoms = atoms.copy()
    atoms.calc = EMT()
    energy, forces = atoms.get_potential_energy(), atoms.get_forces(apply_constraint=False)
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    return atoms


def rattled(base: Atoms, amplitude: float, seeds) -> list[Atoms]:
    out = []
    for seed in seeds:
        atoms = base.copy()
        atoms.rattle(amplitude, seed=seed)
        out.append(emt_labelled(atoms))
    return out


def force_mae(pot: DeltaPotential, images: list[Atoms]) -> float:
    """Mean absolute error of the ensemble-mean forces on free atoms (eV/Å)."""
    errors = [
        np.abs(p.forces.numpy() - a.calc.results["forces"])[free_mask(a)]
        for p, a in zip(pot.predict(images), images)
    ]
    return float(np.concatenate(errors).mean())


def run_demo(output: Path, seed: int = 0) -> dict:
    """Fit, evaluate and save the demo potential; returns the numbers it prints."""
    base = c_cu100()
    train, test = rattled(base, 0.1, range(15)), rattled(base, 0.1, range(100, 110))
    far = rattled(base, 0.4, range(200, 205))
    t0 = time.perf_counter()
    pot = DeltaPotential(["Cu", "C"], prior="morse", ensemble=5, seed=seed).fit(train)
    fit_s = time.perf_counter() - t0
    mean_unc = lambda imgs: float(np.mean([p.uncertainty for p in pot.predict(imgs)]))  # noqa: E731

    atoms = base.copy()
    atoms.calc = pot.calculator()
    emt = base.copy()
    emt.calc = EMT()
    timings = {}
    rng = np.random.default_rng(seed)
    for name, a in (("ml", atoms), ("emt", emt)):
        start = a.positions.copy()
        t0 = time.perf_counter()
        for _ in range(200):
            a.positions = start + rng.normal(0.0, 0.01, start.shape)
            a.get_forces()
        timings[name] = (time.perf_counter() - t0) / 200
    output.mkdir(parents=True, exist_ok=True)
    path = pot.save(output / "c_cu100.alflow")
    return {
        "fit_seconds": fit_s,
        "train_force_mae": force_mae(pot, train),
        "test_force_mae": force_mae(pot, test),
        "uncertainty_train": mean_unc(train),
        "uncertainty_far": mean_unc(far),
        "ml_call_ms": 1e3 * timings["ml"],
        "emt_call_ms": 1e3 * timings["emt"],
        "model": str(path),
    }


def format_report(r: dict) -> str:
    return "\n".join(
        [
            "C/Cu(100), 5-member Δ-ML ensemble (Morse prior) on 15 EMT-labelled rattled structures",
            f"  fit time                      {r['fit_seconds']:8.2f} s",
            f"  force MAE train / held-out    {r['train_force_mae']:8.4f} / {r['test_force_mae']:.4f} eV/Å",
            f"  uncertainty on data / far     {r['uncertainty_train']:8.4f} / {r['uncertainty_far']:.4f} eV/Å",
            f"  ensemble call / EMT call      {r['ml_call_ms']:8.2f} / {r['emt_call_ms']:.2f} ms",
            f"  model saved to {r['model']}",
        ]
    )
