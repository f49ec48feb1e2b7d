"""The paper's three systems as EMT campaigns through ``alflow run``, checked against a direct EMT
run in the same test: convergence, oracle calls, and accuracy in the paper's metrics.

Slow (minutes each): opt in with ``pytest -m slow``. The campaign settings are the shipped
examples in ``workflows/`` (the NEB and MD ones shortened where noted).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase.calculators.emt import EMT
from ase.io import read

from alflow import simulate
from alflow.constraints import free_mask
from alflow.metrics import barrier, structure_error
from alflow.systems import c_cu100, co_cu100, o_cu100_neb_endpoints
from test_campaign_run import run_cli

pytestmark = pytest.mark.slow
WORKFLOWS = Path(__file__).parents[1] / "workflows"


class CountingEMT(EMT):
    """EMT that counts its calculations (the direct run's oracle calls)."""

    calls = 0

    def calculate(self, *args, **kwargs):
        CountingEMT.calls += 1
        super().calculate(*args, **kwargs)


def counted(run) -> tuple[simulate.SimulationResult, int]:
    CountingEMT.calls = 0
    result = run()
    return result, CountingEMT.calls


def run_example(tmp_path: Path, example: str, **overrides) -> dict:
    """Run ``workflows/<example>.yaml`` (sections updated by ``overrides``) in ``tmp_path``."""
    for f in WORKFLOWS.glob("*.traj"):
        shutil.copy(f, tmp_path)
    spec = yaml.safe_load((WORKFLOWS / f"{example}.yaml").read_text())
    for section, values in overrides.items():
        spec[section] = {**spec.get(section, {}), **values} if isinstance(values, dict) else values
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    proc = run_cli("run", "spec.yaml", "--store", "store", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr  # 0: converged
    return json.loads((tmp_path / "results" / spec["name"] / "summary.json").read_text())


def direct_relax() -> tuple[simulate.SimulationResult, int]:
    return counted(lambda: simulate.relax(c_cu100(), CountingEMT(), simulate.RelaxSettings(fmax=0.03)))


def check_relax(summary: dict, max_calls: int) -> None:
    direct, direct_calls = direct_relax()
    assert summary["converged"] and summary["final_fmax_oracle"] <= 0.03
    assert summary["oracle_calls"] <= max_calls < direct_calls + 1
    final = read(summary["final_structure"])
    assert abs(summary["final_energy"] - direct.final.get_potential_energy()) < 0.005  # paper: 0.0039–0.0049 eV
    assert structure_error(final, direct.final) < 0.01  # paper: 0.0032–0.0059 Å


def test_relax_offline_converges_with_fewer_oracle_calls(tmp_path):
    check_relax(run_example(tmp_path, "c_cu100_relax"), max_calls=12)  # five seeds: 8-10 calls


def test_relax_online_converges(tmp_path):
    check_relax(run_example(tmp_path, "c_cu100_relax_online"), max_calls=31)


def test_neb_offline_matches_the_direct_barrier(tmp_path):
    summary = run_example(tmp_path, "o_cu100_neb")
    initial, final = o_cu100_neb_endpoints()
    settings = simulate.NEBSettings(images=3, climb=True, fmax=0.05)
    direct, direct_calls = counted(lambda: simulate.neb(initial, final, CountingEMT, settings))
    direct_barrier = barrier([a.get_potential_energy() for a in direct.band])
    assert 0.05 < direct_barrier < 0.3  # the EMT hop (REFERENCE: ≈ 0.13 eV)
    assert summary["converged"] and summary["oracle_calls"] < direct_calls / 2
    assert abs(summary["barrier_oracle"] - direct_barrier) < 0.02
    assert abs(summary["barrier"] - direct_barrier) < 0.02


def test_short_md_campaign_validates_on_unseen_frames(tmp_path):
    # 300 steps (the example: 2000), 20 frames per round (the example: 50); looser thresholds than
    # the example's 0.05 eV / 0.04 eV/Å: measured, this short campaign reaches 0.067 / 0.057 in
    # round 5 and then stays near 0.06 eV/Å in forces (rounds 6-8: 0.062, 0.062, 0.056)
    steps = 300
    summary = run_example(tmp_path, "co_cu100_md", simulation={"steps": steps, "seed": 11},
                          learner={"query": {"strategy": "random", "samples": 20},
                                   "stop": {"energy_mae": 0.1, "force_mae": 0.07, "max_iterations": 8}})
    assert summary["converged"] and summary["oracle_calls"] <= 121 < steps
    v = summary["validation"]
    assert v["energy_mae"] <= 0.1 and v["force_mae"] <= 0.07
    # frames of the final ML trajectory, none trained on: the model holds there too
    frames = read(summary["trajectory"], index=":")
    rng = np.random.default_rng(0)
    e_err, f_err = [], []
    for k in rng.choice(len(frames), 10, replace=False):
        ml = frames[k]
        ref = ml.copy()
        ref.calc = EMT()
        e_err.append(abs(ml.get_potential_energy() - ref.get_potential_energy()))
        free = free_mask(ref)
        f_err.append(np.abs(ml.get_forces(apply_constraint=False) - ref.get_forces(apply_constraint=False))[free])
    assert np.mean(e_err) < 0.1 and np.concatenate(f_err).mean() < 0.08
    assert co_cu100().get_chemical_formula() == frames[0].get_chemical_formula()
    # against the direct EMT MD (same start, velocities and thermostat seed): the CO bond and the
    # height of C above the surface average alike (measured: bond 1.198 vs 1.188 Å, height 1.42 vs 1.46 Å)
    direct = simulate.md(co_cu100(), EMT(), simulate.MDSettings(steps=steps, seed=11)).frames
    symbols = frames[0].get_chemical_symbols()
    c, o = symbols.index("C"), symbols.index("O")
    cu = [i for i, s in enumerate(symbols) if s == "Cu"]

    def averages(trajectory):
        bond = np.mean([f.get_distance(c, o, mic=True) for f in trajectory])
        height = np.mean([f.positions[c, 2] - f.positions[cu, 2].max() for f in trajectory])
        return bond, height

    (bond_ml, height_ml), (bond_emt, height_emt) = averages(frames), averages(direct)
    assert abs(bond_ml - bond_emt) < 0.03 and abs(height_ml - height_emt) < 0.2
