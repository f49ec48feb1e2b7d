"""Parallel oracle calls: wall time of a round's fan-out with ``--workers 1`` vs ``--workers N``.

A short CO/Cu(100) MD campaign (EMT, tiny model) whose oracle sleeps ``--seconds`` per call like a
DFT code and logs each call (the test suite's ``flaky_oracle:logging_emt``). Round 1 labels
``--samples`` frames; its fan-out time is first call start → last call end, read from the log,
so training and ML simulation are not counted. Both runs are in this process's machine, one after
the other.

    python benchmarks/bench_workers.py [--workers 2] [--samples 4] [--seconds 2]
    → table + benchmarks/results/workers.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from ase.io import write

from alflow.systems import co_cu100

ROOT = Path(__file__).parents[1]
RESULTS = Path(__file__).parent / "results"


def fan_out(workers: int, samples: int, seconds: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="alflow-workers-") as tmp:
        tmp = Path(tmp)
        write(tmp / "co.traj", co_cu100())
        log = tmp / "calls.log"
        spec = {"name": "fan-out", "system": {"structure": "co.traj"},
                "simulation": {"kind": "md", "steps": 10, "temperature_K": 300, "seed": 1},
                "oracle": {"kind": "python", "callable": "flaky_oracle:logging_emt",
                           "kwargs": {"log": str(log), "seconds": seconds}},
                "model": {"ensemble": 2, "epochs": 20},
                "learner": {"query": {"strategy": "random", "samples": samples}, "stop": {"max_iterations": 1}}}
        (tmp / "spec.yaml").write_text(yaml.safe_dump(spec))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "alflow", "run", "spec.yaml", "--store", "store",
                               "--workers", str(workers)], cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode not in (0, 3):
            raise RuntimeError(proc.stderr.strip().splitlines()[-1])
        rows = [tuple(map(float, line.split()[:2])) for line in log.read_text().splitlines()][1:]  # round 1
        return {"workers": workers, "calls": len(rows), "fan_out_s": max(b for _, b in rows) - min(a for a, _ in rows),
                "oracle_s": sum(b - a for a, b in rows), "campaign_wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    runs = [fan_out(n, args.samples, args.seconds) for n in (1, args.workers)]
    ratio = runs[1]["fan_out_s"] / runs[0]["fan_out_s"]
    print(f"{'workers':>8}{'calls':>7}{'oracle s':>10}{'fan-out s':>11}{'campaign s':>12}")
    for r in runs:
        print(f"{r['workers']:>8}{r['calls']:>7}{r['oracle_s']:>10.1f}{r['fan_out_s']:>11.1f}{r['campaign_wall_s']:>12.1f}")
    print(f"fan-out wall time, {args.workers} workers / 1 worker: {ratio:.2f} (goal <= 0.6)")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "workers.json"
    out.write_text(json.dumps({"samples": args.samples, "seconds_per_call": args.seconds, "runs": runs,
                               "ratio": ratio, "cpu_count": os.cpu_count()}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
