"""What the model can reach with the oracle's own data: the accuracy floor of the MD benchmark.

The direct EMT MD of the CO/Cu(100) example (2 ps, 300 K, Langevin, velocity seed = ``--seed``)
gives 2001 frames. The campaign's model (five bootstrap members, 1000 epochs, α = 0.3) is fitted
on ``--frames`` of them, picked at random or by farthest-point sampling in descriptor space
(``--select fps``: the best an offline learner could choose from that trajectory), and scored on
400 other frames drawn at random: energy MAE (eV) and force MAE (eV/Å, components of free
atoms), the issue's metric. An AL campaign's labels come from its own ML trajectories and
include the first rounds' dives, so this is a floor for what ``--frames`` oracle calls can buy.
Test frames from the same trajectory lie within a few fs of training frames; ``--test-seed S``
scores on 400 frames of another oracle MD instead (velocity seed S), as a campaign is scored on
its own last ML trajectory, a run the training set never saw. ``--dive-frames N`` adds N frames
of a first-round dive to the training set: frames of the ML MD of a model fitted on the start
alone (a campaign's round 1, run until its atoms fuse), labelled by the oracle.

    python benchmarks/bench_md_data_limit.py --seed 0 --frames 150 [--select fps]
        [--hidden 20 20] [--g2-etas 0.05 0.2154 0.9283 5 20 80] [--test-seed 1] [--dive-frames 25]
    → one line of results, appended to benchmarks/results/md_data_limit.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from ase.calculators.emt import EMT
from ase.io import read

from alflow.constraints import free_mask
from alflow.demo import emt_labelled
from alflow.model import DeltaPotential, SymmetryFunctions
from alflow.model.descriptors import frame_features
from alflow.simulate import MDSettings, md

ROOT = Path(__file__).parents[1]
RESULTS = Path(__file__).parent / "results" / "md_data_limit.json"
ELEMENTS = ("Cu", "C", "O")
TEST_FRAMES = 400
MD_FRAMES = 2001  # 2 ps at 1 fs, the start included


def farthest_points(x: np.ndarray, n: int) -> list[int]:
    """``n`` rows of ``x`` by farthest-point sampling (standardised, Euclidean), from row 0."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-12)
    chosen, nearest = [0], np.linalg.norm(x - x[0], axis=1)
    while len(chosen) < n:
        j = int(np.argmax(nearest))
        chosen.append(j)
        nearest = np.minimum(nearest, np.linalg.norm(x - x[j], axis=1))
    return chosen


def split(frames, n_train: int, select: str, seed: int, descriptor: SymmetryFunctions) -> tuple[list[int], list[int]]:
    """(training frames, 400 test frames never trained on); ``fps`` in ``descriptor``'s space."""
    order = np.random.default_rng(seed).permutation(len(frames))
    if select == "random":
        return list(order[:n_train]), list(order[n_train:n_train + TEST_FRAMES])
    chosen = farthest_points(frame_features(frames, descriptor), n_train)
    taken = set(chosen)
    rest = [i for i in order if i not in taken]
    return chosen, list(np.random.default_rng(seed + 99).choice(rest, TEST_FRAMES, replace=False))


def dive_frames(start, n: int, seed: int, make_potential) -> list:
    """``n`` frames (never the start) of the ML MD of a model fitted on the oracle's label of the
    start alone, labelled by the oracle: what a campaign's first round queries."""
    if n == 0:
        return []
    pot = make_potential().fit([emt_labelled(start)])
    run = md(start, pot.calculator(), MDSettings(steps=MD_FRAMES - 1, seed=seed + 1))
    if len(run.frames) <= n:
        raise SystemExit(f"the dive lasted {len(run.frames)} frames, fewer than --dive-frames {n} + the start")
    picks = np.random.default_rng(seed + 7).choice(np.arange(1, len(run.frames)), n, replace=False)
    print(f"round-1 ML MD: {run.steps} steps ({run.stopped or 'ran to the end'}); {n} of its frames labelled")
    return [emt_labelled(run.frames[i]) for i in sorted(picks)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="MD velocity seed, split and member seeds")
    ap.add_argument("--frames", type=int, default=150, help="training frames (oracle calls)")
    ap.add_argument("--select", choices=("random", "fps"), default="random")
    ap.add_argument("--hidden", type=int, nargs="+", default=[20, 20])
    ap.add_argument("--g2-etas", type=float, nargs="+", default=list(SymmetryFunctions(ELEMENTS).g2_etas))
    ap.add_argument("--g4-etas", type=float, nargs="+", default=list(SymmetryFunctions(ELEMENTS).g4_etas))
    ap.add_argument("--dive-frames", type=int, default=0, help="+ frames of a one-structure model's ML MD")
    ap.add_argument("--test-seed", type=int, default=None, help="test on another oracle MD (this velocity seed)")
    args = ap.parse_args()
    if args.dive_frames < 0:
        ap.error("--dive-frames must be >= 0")
    if args.test_seed is not None and args.test_seed == args.seed:
        ap.error("--test-seed must differ from --seed (the training trajectory)")
    if not 1 <= args.frames <= MD_FRAMES - TEST_FRAMES:
        ap.error(f"--frames must be 1-{MD_FRAMES - TEST_FRAMES} ({MD_FRAMES} MD frames, {TEST_FRAMES} kept for the test)")
    try:
        descriptor = SymmetryFunctions(ELEMENTS, g2_etas=args.g2_etas, g4_etas=args.g4_etas)
    except ValueError as exc:
        ap.error(str(exc))

    start = read(ROOT / "workflows" / "co_cu100.traj")
    frames = md(start, EMT(), MDSettings(steps=MD_FRAMES - 1, seed=args.seed)).frames
    train_idx, test_idx = split(frames, args.frames, args.select, args.seed, descriptor)
    free = free_mask(start)
    train = [emt_labelled(frames[i]) for i in train_idx]
    if args.test_seed is not None:  # another run: 400 of its frames at random
        test_run = md(start, EMT(), MDSettings(steps=MD_FRAMES - 1, seed=args.test_seed)).frames
        test_idx = np.random.default_rng(args.test_seed).choice(len(test_run), TEST_FRAMES, replace=False)
    else:
        test_run = frames
    test = [emt_labelled(test_run[i]) for i in test_idx]

    def make_potential() -> DeltaPotential:
        return DeltaPotential(ELEMENTS, ensemble=5, seed=args.seed, hidden=args.hidden, descriptor=descriptor,
                              training=dict(epochs=1000, force_coefficient=0.3))

    train += dive_frames(start, args.dive_frames, args.seed, make_potential)
    t0 = time.perf_counter()
    pot = make_potential().fit(train)
    fit_s = time.perf_counter() - t0
    co = [a.index for a in start if a.symbol in ("C", "O")]
    predictions = pot.predict(test)
    energy_mae = np.mean([abs(p.energy - a.get_potential_energy()) for p, a in zip(predictions, test)])
    force_mae = np.mean([np.abs(np.asarray(p.forces) - a.get_forces())[free].mean() for p, a in zip(predictions, test)])
    row = {"seed": args.seed, "test_seed": args.test_seed, "frames": args.frames, "dive_frames": args.dive_frames,
           "select": args.select, "hidden": args.hidden,
           "g2_etas": args.g2_etas, "g4_etas": args.g4_etas, "energy_mae": float(energy_mae),
           "force_mae": float(force_mae), "fit_s": round(fit_s, 1),
           "c_o_distance_every_250_fs": [round(f.get_distance(*co), 3) for f in frames[::250]]}
    if args.test_seed is not None:
        row["test_c_o_distance_every_250_fs"] = [round(f.get_distance(*co), 3) for f in test_run[::250]]
    print(f"{'seed':>4} {'frames':>6} {'dive':>4} {'select':>6} {'hidden':>8} {'G2 etas':>32} {'E MAE eV':>9} {'F MAE eV/Å':>10}")
    print(f"{args.seed:>4} {args.frames:>6} {args.dive_frames:>4} {args.select:>6} {str(args.hidden):>8} "
          f"{str(args.g2_etas):>32} {energy_mae:>9.4f} {force_mae:>10.4f}")
    runs = json.loads(RESULTS.read_text())["runs"] if RESULTS.exists() else []
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "md_data_limit", "test_frames": TEST_FRAMES,
                                   "runs": runs + [row]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
