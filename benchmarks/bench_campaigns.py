"""Paper-protocol benchmark: oracle calls and accuracy of the example campaigns vs the direct
oracle run, over several seeds, with and without the Morse prior.

Each campaign runs through ``alflow run`` (FireWorks on a fresh embedded store, one process per
run) from the shipped spec in ``workflows/`` with ``model.seed`` set per run (an MD round's
velocity seed derives from it). The direct run uses the same simulation settings with EMT as the calculator, in this
process. Metrics are the paper's (REFERENCE.md):

- relax: oracle calls; energy error |E_ML(final) − E_EMT(direct minimum)|; structure error
  = mean over atoms of |Δx|+|Δy|+|Δz| between the campaign's and the direct minimum;
- neb: oracle calls; barrier error of the ML band and of the oracle-labelled saddle;
- md: oracle calls; the validation errors the campaign stopped on, and the issue's metric: energy
  and force MAE of the last ML trajectory (the model the campaign ended with, before its last
  retraining) against the oracle on 400 of its frames drawn at random.

    python benchmarks/bench_campaigns.py relax --seeds 0 1 2 3 4 [--prior none] [--jobs 2]
    → table + benchmarks/results/campaign_<case>.json

``relax_qe`` is the real-DFT case: the campaign of ``workflows/c_cu100_relax_qe.yaml`` vs a direct
Quantum ESPRESSO BFGS relaxation with the same oracle settings (``--set oracle.kpts=null`` etc.
apply to both), both timed; the direct run's wall time is the baseline of the wall-time ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml
from ase.io import read, write

from alflow import simulate
from alflow.constraints import free_mask
from alflow.metrics import barrier, structure_error
from alflow.oracles import DFT_KINDS, cache_settings, calculator_factory, oracle_options
from alflow.spec import load_spec

ROOT = Path(__file__).parents[1]
RESULTS = Path(__file__).parent / "results"
EXAMPLES = {"relax": "c_cu100_relax", "relax_online": "c_cu100_relax_online", "neb": "o_cu100_neb",
            "md": "co_cu100_md", "relax_qe": "c_cu100_relax_qe"}


def counted_oracle(oracle: dict):
    """(factory of the spec's oracle calculators whose every calculation is counted, counter)."""
    kind, options = oracle_options(oracle)
    factory = calculator_factory(kind, options)
    counter = {"calls": 0}

    def make():
        calc = factory()
        inner = calc.calculate

        def calculate(*args, **kwargs):
            counter["calls"] += 1
            return inner(*args, **kwargs)

        calc.calculate = calculate
        return calc

    return make, counter


def direct_run(spec) -> dict:
    """The simulation with the oracle itself: its calls, wall time and reference results."""
    make, counter = counted_oracle(spec.oracle)
    settings = dict(spec.simulation)
    t0 = time.perf_counter()
    if spec.kind == "relax":
        r = simulate.relax(spec.images[0], make(), simulate.RelaxSettings(**settings))
        out = {"final": r.final, "energy": r.final.get_potential_energy(), "converged": r.converged}
    elif spec.kind == "neb":
        r = simulate.neb(spec.images[0], spec.images[1], make, simulate.NEBSettings(**settings))
        out = {"barrier": barrier([a.get_potential_energy() for a in r.band])}
    else:
        return {"calls": int(settings.get("steps", 2000))}  # MD: one oracle call per step
    return {"calls": counter["calls"], "wall_s": round(time.perf_counter() - t0, 1), **out}


def cached_direct_run(spec, fresh: bool = False) -> dict:
    """:func:`direct_run`, kept in ``results/direct/`` for a DFT oracle (a direct pw.x relaxation
    takes half an hour here) and reused while the start structures, the simulation settings and
    the oracle's physics settings (the label-cache key's) are the same; ``fresh``: run it again
    and replace the kept one (e.g. on an idle machine, for the wall-time baseline)."""
    if spec.oracle["kind"] not in DFT_KINDS:
        return direct_run(spec)
    key = json.dumps({"kind": spec.kind, "simulation": spec.simulation, "oracle": cache_settings(spec.oracle),
                      "start": [a.positions.round(6).tolist() for a in spec.images]}, sort_keys=True, default=str)
    base = RESULTS / "direct" / f"{spec.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if base.with_suffix(".json").exists() and not fresh:
        direct = json.loads(base.with_suffix(".json").read_text())
        if base.with_suffix(".extxyz").exists():
            direct["final"] = read(base.with_suffix(".extxyz"))
        print(f"direct run reused from {base.with_suffix('.json')}", flush=True)
        return direct
    direct = direct_run(spec)
    base.parent.mkdir(parents=True, exist_ok=True)
    if "final" in direct:
        write(base.with_suffix(".extxyz"), direct["final"])
    base.with_suffix(".json").write_text(json.dumps({k: v for k, v in direct.items() if k != "final"}, indent=1))
    return direct


def spec_with(example: str, seed: int, prior: str, overrides: dict, folder: Path) -> Path:
    """The example's spec in ``folder`` (with its structures) with the seed, prior and overrides."""
    for f in (ROOT / "workflows").glob("*.traj"):
        shutil.copy(f, folder)
    spec = yaml.safe_load((ROOT / "workflows" / f"{example}.yaml").read_text())
    spec["model"] = {**spec.get("model", {}), "seed": seed, "prior": prior}  # MD: each round's velocity seed follows
    for dotted, value in overrides.items():  # SECTION.KEY or deeper, e.g. learner.query.samples
        *path, key = dotted.split(".")
        node = spec
        for part in path:
            node = node.setdefault(part, {})
        node[key] = value
    spec["results"] = str(folder / "results")
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def validate_trajectory(path: str, start, oracle: dict, frames: int, seed: int) -> dict:
    """Energy MAE (eV) and force MAE (eV/Å, components of free atoms) of an ML trajectory's
    recorded predictions against the oracle, on ``frames`` of its frames drawn at random."""
    trajectory = read(path, index=":")
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(len(trajectory), size=min(frames, len(trajectory)), replace=False))
    make, _ = counted_oracle(oracle)
    calc, free = make(), free_mask(start)
    e_err, f_err = [], []
    for i in picks:
        ml = trajectory[i]
        atoms = start.copy()  # the start's constraints, the frame's positions
        atoms.positions = ml.positions
        atoms.calc = calc
        e_err.append(abs(ml.get_potential_energy() - atoms.get_potential_energy()))
        f_err.append(np.abs(ml.get_forces(apply_constraint=False) - atoms.get_forces(apply_constraint=False))[free])
    return {"frames": len(picks), "of": len(trajectory), "energy_mae": float(np.mean(e_err)),
            "force_mae": float(np.concatenate(f_err).mean())}


def run_campaign(example: str, seed: int, prior: str, overrides: dict, validate: dict | None = None
                 ) -> tuple[dict, float]:
    """One campaign in a fresh folder and store; returns (summary, wall seconds)."""
    with tempfile.TemporaryDirectory(prefix="alflow-bench-") as tmp:
        tmp = Path(tmp)
        spec_with(example, seed, prior, overrides, tmp)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "alflow", "run", "spec.yaml", "--store", "store"], cwd=tmp,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode not in (0, 3):
            last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:]
            return {"converged": False, "error": f"exit {proc.returncode}: {' '.join(last)}"}, wall
        summary = json.loads((tmp / "results" / "summary.json").read_text())
        if "final_structure" in summary:
            summary["final_atoms"] = read(summary["final_structure"])
        if validate and "trajectory" in summary:  # before the folder goes
            summary["trajectory_validation"] = validate_trajectory(summary["trajectory"], seed=seed, **validate)
        summary["rounds"] = round_metrics(tmp / "store", summary["campaign"])
        return summary, wall


def round_metrics(store_dir: Path, name: str) -> list[dict]:
    """Each round's recorded metrics (calls, the model's errors on its new labels, ...), rounded."""
    from alflow.report.data import read_iterations
    from alflow.store import Store
    from alflow.store.readonly import open_readonly

    store = Store(open_readonly(store_dir), create_indexes=False)
    return [{k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in it.metrics.items()
             if isinstance(v, (int, float))} for it in read_iterations(store, name, trajectories=False)]


def metrics(kind: str, summary: dict, direct: dict) -> dict:
    out = {"converged": bool(summary.get("converged")), "oracle_calls": summary.get("oracle_calls"),
           "iterations": summary.get("iterations"), "failed_labels": summary.get("failed_labels"),
           "rounds": summary.get("rounds")}
    if "error" in summary:  # the campaign did not finish: say why, in the row and the JSON
        out["error"] = summary["error"]
    if direct.get("wall_s") and summary.get("wall_s"):
        out["wall_ratio"] = summary["wall_s"] / direct["wall_s"]
    if kind == "relax" and "final_atoms" in summary:
        out["energy_error"] = abs(summary["final_energy"] - direct["energy"])
        out["structure_error"] = structure_error(summary["final_atoms"], direct["final"])
    if kind == "neb" and "barrier" in summary:
        out["barrier_error"] = abs(summary["barrier"] - direct["barrier"])
        if "barrier_oracle" in summary:
            out["barrier_error_oracle"] = abs(summary["barrier_oracle"] - direct["barrier"])
    if kind == "md":
        out.update({k: (summary.get("validation") or {}).get(k) for k in ("energy_mae", "force_mae")})
        if "trajectory_validation" in summary:
            tv = summary["trajectory_validation"]
            out.update(trajectory_frames=tv["of"], validation_frames=tv["frames"],
                       validation_energy_mae=tv["energy_mae"], validation_force_mae=tv["force_mae"])
    return out


def mean_std(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.4g} ± {s:.2g}"


def write_results(out: Path, args, example: str, overrides: dict, direct: dict, runs: list[dict]) -> dict:
    """The runs so far and their mean ± std, as JSON; returns the table."""
    keys = [k for k in ("oracle_calls", "energy_error", "structure_error", "barrier_error", "barrier_error_oracle",
                        "energy_mae", "force_mae", "validation_energy_mae", "validation_force_mae", "wall_s",
                        "wall_ratio") if any(r.get(k) is not None for r in runs)]
    table = {k: mean_std([r.get(k) for r in runs]) for k in keys}
    out.write_text(json.dumps({
        "case": args.case, "example": f"workflows/{example}.yaml", "prior": args.prior, "seeds": args.seeds,
        "overrides": overrides,
        "direct_oracle_calls": direct["calls"],
        "direct": {k: v for k, v in direct.items() if k in ("energy", "barrier", "wall_s", "converged")},
        "converged": sum(r["converged"] for r in runs), "mean_std": table, "runs": runs,
    }, indent=1))
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", choices=sorted(EXAMPLES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--prior", choices=("morse", "none"), default="morse")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a spec key (YAML value), e.g. model.force_coefficient=0.3")
    ap.add_argument("--tag", help="suffix of the results file (runs with --set)")
    ap.add_argument("--jobs", type=int, default=1, help="campaigns run at a time (wall times then share the machine)")
    ap.add_argument("--fresh-direct", action="store_true", help="DFT: run the direct run again, replacing the kept one")
    ap.add_argument("--direct-only", action="store_true", help="only the direct run (DFT: kept for later runs)")
    args = ap.parse_args()
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    example = EXAMPLES[args.case]
    with tempfile.TemporaryDirectory(prefix="alflow-direct-") as tmp:  # the overrides apply to the direct run too
        spec = load_spec(spec_with(example, args.seeds[0], args.prior, overrides, Path(tmp)))
        direct = cached_direct_run(spec, fresh=args.fresh_direct)
    print(json.dumps({"direct": {k: v for k, v in direct.items() if k != "final"}}), flush=True)
    if args.direct_only:
        return
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"campaign_{args.case}{'_noprior' if args.prior == 'none' else ''}{'_' + args.tag if args.tag else ''}.json"
    runs = []
    validate = {"start": spec.images[0], "oracle": spec.oracle, "frames": 400} if spec.kind == "md" else None

    def one(seed: int) -> dict:
        summary, wall = run_campaign(example, seed, args.prior, overrides, validate)
        summary["wall_s"] = round(wall, 1)
        return {"seed": seed, "wall_s": round(wall, 1), **metrics(spec.kind, summary, direct)}

    # --jobs N: N campaigns at a time (each its own process; wall times then share the machine).
    # The JSON is rewritten after every seed: a long run keeps what it measured.
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for row in pool.map(one, args.seeds):
            runs.append(row)
            print(json.dumps(row), flush=True)
            table = write_results(out, args, example, overrides, direct, runs)
    print(f"\n{args.case} (prior {args.prior}{', ' if overrides else ''}{args.set or ''}), {len(runs)} seeds, "
          f"{sum(r['converged'] for r in runs)} converged; direct oracle run: {direct['calls']} calls")
    for k, v in table.items():
        print(f"  {k:<22} {v}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
