"""FireWorks + store overhead per active-learning iteration, on a store that already holds
≥ 1,000 fireworks (and their launches).

The store is first filled with completed no-op fireworks. Then a relax campaign runs with a
deliberately tiny model (1 member, few epochs) and EMT, through the embedded runner in this
process. Training, the ML simulation and the oracle calls are timed where they happen (wrappers
around ``campaign.train``, ``campaign.run_simulation`` and the oracle call); the overhead of an
iteration is its wall time minus those: FireWorks bookkeeping, the store's reads and writes
(labels, GridFS models and trajectories) and the embedded store's atomic snapshot after each
firework.

    python benchmarks/bench_overhead.py [--fill 1000] [--rounds 6] → table + results/overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fill", type=int, default=1000, help="completed fireworks put in the store first")
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="alflow-overhead-"))

    from alflow import runner

    runner.use_store(tmp / "store")  # before FireWorks is imported
    from fireworks import Firework, FWorker, LaunchPad, ScriptTask, Workflow
    from fireworks.core.rocket_launcher import launch_rocket
    import fireworks.core.rocket

    fireworks.core.rocket.ROCKET_STREAM_LOGLEVEL = "ERROR"
    runner.embedded_rockets(fireworks.core.rocket)
    runner.embedded_queries()
    import yaml
    from ase.io import write

    from alflow import campaign, oracles
    from alflow.fw import tasks
    from alflow.spec import load_spec
    from alflow.systems import c_cu100

    # 1. fill the store with completed fireworks (chains of 10, as campaigns leave them)
    lp = LaunchPad(name="alflow", strm_lvl="ERROR")
    lp.reset("", require_password=False, max_reset_wo_password=0)
    t0 = time.perf_counter()
    for w in range(args.fill // 10):
        fws = [Firework(ScriptTask.from_str("true"), name=f"filler {w}.{k}") for k in range(10)]
        lp.add_wf(Workflow(fws, {fws[k]: [fws[k + 1]] for k in range(9)}))
    launches = tmp / "fill"
    launches.mkdir()
    import os

    here = os.getcwd()
    os.chdir(launches)
    while lp.run_exists(FWorker()):
        launch_rocket(lp, FWorker(), strm_lvl="ERROR")
    os.chdir(here)
    runner.snapshot(lp, tmp / "store" / runner.STORE_FILE)
    fill_s = time.perf_counter() - t0
    n_fw = lp.fireworks.count_documents({})

    # 2. time the expensive steps where they happen
    spent = defaultdict(float)

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t
        return wrapper

    campaign.train = timed("train", campaign.train)
    campaign.run_simulation = timed("simulate", campaign.run_simulation)
    tasks.compute_label = timed("oracle", oracles.compute_label)

    write(tmp / "start.traj", c_cu100())
    spec_path = tmp / "bench.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "overhead", "system": {"structure": "start.traj"},
        "simulation": {"kind": "relax", "fmax": 0.03, "steps": 30}, "oracle": {"kind": "emt"},
        "model": {"ensemble": 1, "epochs": 5},
        "learner": {"query": {"strategy": "relax_final", "samples": 3}, "stop": {"max_iterations": args.rounds}},
    }))
    marks = []

    def progress(line: str) -> None:
        if " merge " in line:
            marks.append((time.perf_counter(), dict(spent)))

    t_start = time.perf_counter()
    runner.run(load_spec(spec_path), tmp / "store", progress=progress)
    rows, last_t, last = [], t_start, {}
    for t, s in marks:
        work = {k: s.get(k, 0.0) - last.get(k, 0.0) for k in ("train", "simulate", "oracle")}
        wall = t - last_t
        rows.append({"wall_s": wall, **{f"{k}_s": v for k, v in work.items()}, "overhead_s": wall - sum(work.values())})
        last_t, last = t, s
    per_iteration = [r["overhead_s"] for r in rows[1:]]  # rows[0] is the seed round (no training)
    store_mb = (tmp / "store" / runner.STORE_FILE).stat().st_size / 1e6
    print(f"store: {n_fw} fireworks before the campaign (filled in {fill_s:.0f} s); store file {store_mb:.1f} MB")
    print(f"{'round':>5} {'wall s':>8} {'train s':>8} {'sim s':>8} {'oracle s':>8} {'overhead s':>10}")
    for k, r in enumerate(rows):
        print(f"{k:>5} {r['wall_s']:8.2f} {r['train_s']:8.2f} {r['simulate_s']:8.2f} {r['oracle_s']:8.2f}"
              f" {r['overhead_s']:10.2f}")
    med = statistics.median(per_iteration)
    print(f"overhead per iteration: median {med:.2f} s [min {min(per_iteration):.2f}, max {max(per_iteration):.2f}]"
          f" (goal ≤ 1 s)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "overhead.json").write_text(json.dumps({
        "fireworks_before": n_fw, "store_file_mb": store_mb, "fireworks_per_iteration": 2 + 3 + 1,
        "rounds": rows, "overhead_median_s": med, "overhead_min_s": min(per_iteration),
        "overhead_max_s": max(per_iteration), "python": sys.version.split()[0],
    }, indent=1))
    print(f"wrote {RESULTS / 'overhead.json'}")


if __name__ == "__main__":
    main()
