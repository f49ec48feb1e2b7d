"""Speed of the Δ-ML model core on the paper's 13-atom C/Cu(100) slab.

1. One energy + forces + uncertainty call of a 5-member ensemble vs one ASE EMT call, same
   process, same sequence of geometries (a new geometry every call: 0.01 Å Gaussian moves, as
   in a relaxation; both calculators keep their neighbour lists with a skin). Trials interleave
   ML and EMT so both see the same machine load; we report the median ratio and its spread.
2. Fitting a 5-member ensemble on 20 structures × 13 atoms for 200 LBFGS epochs.
3. Descriptor throughput: features + invariant derivatives for a batch of 20 structures.

    python benchmarks/bench_model.py [--threads N]     → table + benchmarks/results/model.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numba
import numpy as np
import torch
from ase.calculators.emt import EMT

from alflow.demo import rattled
from alflow.model import DeltaPotential, TrainingSettings
from alflow.model.descriptors import build_graph, descriptors_with_derivatives
from alflow.systems import c_cu100

RESULTS = Path(__file__).parent / "results"


def per_call(atoms, n: int, rng: np.random.Generator) -> float:
    start = atoms.positions.copy()
    steps = rng.normal(0.0, 0.01, (n, *start.shape))
    t0 = time.perf_counter()
    for k in range(n):
        atoms.positions = start + steps[k]
        atoms.get_forces()
        atoms.calc.results.get("uncertainty")
    elapsed = time.perf_counter() - t0
    atoms.positions = start
    return elapsed / n


def call_ratio(pot: DeltaPotential, trials: int, calls: int) -> dict:
    base = c_cu100()
    ml, emt = base.copy(), base.copy()
    ml.calc, emt.calc = pot.calculator(), EMT()
    rng = np.random.default_rng(0)
    per_call(ml, 50, rng), per_call(emt, 50, rng)  # warm-up
    ml_ms, emt_ms = [], []
    for _ in range(trials):
        ml_ms.append(1e3 * per_call(ml, calls, rng))
        emt_ms.append(1e3 * per_call(emt, calls, rng))
    ratios = sorted(m / e for m, e in zip(ml_ms, emt_ms))
    return {
        "ml_ms_median": statistics.median(ml_ms),
        "emt_ms_median": statistics.median(emt_ms),
        "ratio_median": statistics.median(ratios),
        "ratio_min": ratios[0],
        "ratio_max": ratios[-1],
        "trials": trials,
        "calls_per_trial": calls,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch and numba threads (default: theirs)")
    parser.add_argument("--trials", type=int, default=7)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    threads = {"torch": torch.get_num_threads(), "numba": numba.get_num_threads()}

    base = c_cu100()
    train = rattled(base, 0.1, range(20))
    pot = DeltaPotential(["Cu", "C"], ensemble=5, seed=0, training=TrainingSettings(epochs=200))
    pot.fit(train[:2])  # pays torch's one-off optimiser import (~2 s) outside the timing
    t0 = time.perf_counter()
    pot.fit(train)
    fit_s = time.perf_counter() - t0

    graph = build_graph(train, pot.descriptor)
    t0, n = time.perf_counter(), 20
    for _ in range(n):
        descriptors_with_derivatives(pot.descriptor, graph)
    desc_s = (time.perf_counter() - t0) / n

    calls = call_ratio(pot, args.trials, 300)
    result = {
        "system": "C/Cu(100) 2x2x3 + C, 13 atoms, Rc 6.0 Å, G2 + G4 (20 features)",
        "torch": torch.__version__,
        "threads": threads,
        "python": platform.python_version(),
        "ensemble_call_vs_emt": calls,
        "fit_5_members_20_structures_200_epochs_s": fit_s,
        "fit_evaluations_per_member": pot.report["evaluations"],
        "descriptor_atoms_per_s": graph.n / desc_s,
        "pairs_triplets_per_structure": [len(graph.pair_i) // 20, len(graph.triplet_ij) // 20],
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"model_threads{threads['torch']}.json"
    out.write_text(json.dumps(result, indent=1))
    c = calls
    print(f"{'measure':<52}{'value':>24}")
    print(f"{'ensemble (5) E+F+uncertainty call, ms (median)':<52}{c['ml_ms_median']:>24.2f}")
    print(f"{'ASE EMT E+F call, ms (median)':<52}{c['emt_ms_median']:>24.2f}")
    spread = f"{c['ratio_median']:.2f} [{c['ratio_min']:.2f}, {c['ratio_max']:.2f}]"
    print(f"{'ratio ML / EMT: median [min, max]':<52}{spread:>24}")
    print(f"{'fit 5 members, 20 structures, 200 epochs, s':<52}{fit_s:>24.2f}")
    print(f"{'descriptors + derivatives, atoms/s':<52}{result['descriptor_atoms_per_s']:>24.0f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
