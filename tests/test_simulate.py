"""Simulations with ASE calculators: relax, NEB and MD with EMT, and a relax with the Δ-ML potential."""

from __future__ import annotations

import numpy as np
import pytest
from ase.calculators.calculator import all_changes
from ase.calculators.emt import EMT
from ase.io import read

from alflow.demo import rattled
from alflow.model import DeltaPotential, TrainingSettings
from alflow.model.descriptors import OverlappingAtomsError
from alflow.simulate import (
    MDSettings,
    NEBSettings,
    RelaxSettings,
    max_force,
    md,
    neb,
    relax,
)
from alflow.systems import c_cu100, o_cu100_neb_endpoints


def emt_fmax(atoms) -> float:
    """Max force over free atoms recomputed independently with a fresh EMT."""
    a = atoms.copy()
    a.calc = EMT()
    return max_force(a)


def fixed_indices(atoms) -> np.ndarray:
    return np.concatenate([c.index for c in atoms.constraints])


# ---------------------------------------------------------------- relax


@pytest.fixture(scope="module")
def c_relax():
    start = c_cu100()
    before = start.copy()
    return start, before, relax(start, EMT(), RelaxSettings(fmax=0.03))


def test_relax_converges_and_lowers_energy(c_relax):
    start, before, res = c_relax
    assert res.converged
    assert 0 < res.steps < 500
    assert emt_fmax(res.final) <= 0.03
    assert max_force(res.final) <= 0.03  # the stored forces agree
    energies = [f.get_potential_energy() for f in res.frames]
    assert len(res.frames) == res.steps + 1  # the start and every step
    assert energies[-1] < energies[0] - 1.0  # C binds: several eV gained on the way down
    assert res.final.get_potential_energy() == pytest.approx(min(energies), abs=1e-3)
    a = res.final.copy()
    a.calc = EMT()
    assert a.get_potential_energy() == pytest.approx(res.final.get_potential_energy(), abs=1e-10)


def test_relax_keeps_fixed_atoms_and_input(c_relax):
    start, before, res = c_relax
    fixed = fixed_indices(start)
    assert len(fixed) == 4
    np.testing.assert_array_equal(res.final.positions[fixed], before.positions[fixed])
    assert np.abs(res.final.positions - before.positions).max() > 0.1  # the free atoms did move
    # input untouched: positions, no calculator attached, constraints kept
    np.testing.assert_array_equal(start.positions, before.positions)
    assert start.calc is None
    np.testing.assert_array_equal(fixed_indices(res.final), fixed)


def test_relax_frames_hold_raw_forces(c_relax):
    _, _, res = c_relax
    frame = res.frames[0]
    raw = frame.get_forces(apply_constraint=False)
    fixed = fixed_indices(frame)
    assert np.abs(raw[fixed]).max() > 1e-3  # the SinglePointCalculator holds unconstrained forces
    assert np.abs(frame.get_forces()[fixed]).max() == 0.0
    ref = frame.copy()
    ref.calc = EMT()
    np.testing.assert_allclose(raw, ref.get_forces(apply_constraint=False), atol=1e-10)
    assert [f.info["step"] for f in res.frames] == list(range(res.steps + 1))


def test_relax_fire_and_bad_optimizer():
    res = relax(c_cu100(), EMT(), RelaxSettings(optimizer="FIRE", fmax=0.05))
    assert res.converged and emt_fmax(res.final) <= 0.05
    assert res.final.get_potential_energy() < res.frames[0].get_potential_energy() - 1.0
    with pytest.raises(ValueError, match="optimizer"):
        RelaxSettings(optimizer="LBFGS")
    settings = RelaxSettings()
    settings.optimizer = "SteepestDescent"
    with pytest.raises(ValueError, match="optimizer.*BFGS, FIRE"):
        relax(c_cu100(), EMT(), settings)


def test_relax_not_converged_when_steps_run_out():
    res = relax(c_cu100(), EMT(), RelaxSettings(steps=3))
    assert not res.converged and res.steps == 3 and len(res.frames) == 4
    assert emt_fmax(res.final) > 0.03


def test_max_force():
    forces = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    assert max_force(forces) == 5.0
    assert max_force(forces, np.array([False, True, True])) == 1.0
    assert max_force(forces, np.zeros(3, bool)) == 0.0


# ---------------------------------------------------------------- NEB


@pytest.fixture(scope="module")
def o_neb():
    initial, final = o_cu100_neb_endpoints()
    before = (initial.copy(), final.copy())
    settings = NEBSettings(images=3, fmax=0.05, climb=True)
    return (initial, final), before, neb(initial, final, EMT, settings)


def test_neb_barrier(o_neb):
    _, _, res = o_neb
    assert res.converged
    assert len(res.band) == 5
    energies = np.array([image.get_potential_energy() for image in res.band])
    barrier = energies.max() - energies[0]
    assert 0.10 < barrier < 0.20  # EMT O hollow → hollow on Cu(100): ≈ 0.13 eV
    assert abs(energies[-1] - energies[0]) < 0.02  # equivalent hollow sites
    saddle = int(np.argmax(energies))
    assert 0 < saddle < 4
    assert res.final.get_potential_energy() == energies[saddle]
    np.testing.assert_array_equal(res.final.positions, res.band[saddle].positions)
    # the saddle O sits near the bridge, about halfway between the two hollows
    x0, xs, x1 = (image.positions[-1, 0] for image in (res.band[0], res.final, res.band[-1]))
    assert abs(xs - 0.5 * (x0 + x1)) < 0.2
    assert abs(x1 - x0) == pytest.approx(3.63 / np.sqrt(2), abs=0.05)  # relaxed into the next hollow


def test_neb_endpoints_relaxed_and_inputs_kept(o_neb):
    (initial, final), (i0, f0), res = o_neb
    for end in (res.band[0], res.band[-1]):
        assert emt_fmax(end) <= 0.05
    np.testing.assert_array_equal(initial.positions, i0.positions)
    np.testing.assert_array_equal(final.positions, f0.positions)
    assert initial.calc is None and final.calc is None
    fixed = fixed_indices(i0)
    for image in res.band:
        np.testing.assert_array_equal(image.positions[fixed], i0.positions[fixed])
    # frames: the whole band at every optimizer step
    assert len(res.frames) == 5 * (res.steps + 1)
    assert [f.info["image"] for f in res.frames[-5:]] == list(range(5))


def test_neb_single_image_and_errors():
    initial, final = o_cu100_neb_endpoints()
    res = neb(initial, final, EMT, NEBSettings(images=1))
    assert res.converged and len(res.band) == 3
    energies = [image.get_potential_energy() for image in res.band]
    assert int(np.argmax(energies)) == 1
    assert 0.10 < energies[1] - energies[0] < 0.20
    with pytest.raises(ValueError, match="images"):
        NEBSettings(images=0)
    with pytest.raises(ValueError, match="interpolation"):
        NEBSettings(interpolation="spline")
    with pytest.raises(ValueError, match="number of atoms"):
        neb(initial, final[:-1], EMT)
    swapped = final.copy()
    swapped.numbers[[0, -1]] = swapped.numbers[[-1, 0]]
    with pytest.raises(ValueError, match="species order"):
        neb(initial, swapped, EMT)


def test_neb_climbing_image_reaches_saddle(o_neb):
    """With 2 images no image sits at the midpoint: only the climbing image finds the saddle."""
    _, _, ref = o_neb
    ref_barrier = ref.final.get_potential_energy() - ref.band[0].get_potential_energy()
    initial, final = o_cu100_neb_endpoints()
    res = neb(initial, final, EMT, NEBSettings(images=2, climb=True))
    assert res.converged
    barrier = res.final.get_potential_energy() - res.band[0].get_potential_energy()
    assert barrier == pytest.approx(ref_barrier, abs=0.005)
    assert emt_fmax(res.final) <= 0.05  # a stationary point: the true force vanishes at the saddle
    assert emt_fmax(ref.final) <= 0.05


def test_neb_unrelaxed_endpoints_fire():
    initial, final = o_cu100_neb_endpoints()
    res = neb(initial, final, EMT, NEBSettings(images=1, relax_endpoints=False, optimizer="FIRE", steps=300))
    assert res.converged
    np.testing.assert_array_equal(res.band[0].positions, initial.positions)  # endpoints as given
    np.testing.assert_array_equal(res.band[-1].positions, final.positions)
    assert emt_fmax(res.band[0]) > 0.05
    # the unrelaxed initial endpoint is the band's highest point; the saddle is still the moving image
    energies = [image.get_potential_energy() for image in res.band]
    assert int(np.argmax(energies)) == 0
    np.testing.assert_array_equal(res.final.positions, res.band[1].positions)


# ---------------------------------------------------------------- MD


def test_md_frames_and_reproducibility():
    start = c_cu100()
    before = start.copy()
    a = md(start, EMT(), MDSettings(steps=30, seed=1))
    b = md(start, EMT(), MDSettings(steps=30, seed=1))
    c = md(start, EMT(), MDSettings(steps=30, seed=2))
    assert a.converged and a.steps == 30 and a.seed == 1
    assert len(a.frames) == 31  # steps 0..30
    for fa, fb in zip(a.frames, b.frames):
        np.testing.assert_array_equal(fa.positions, fb.positions)
        np.testing.assert_array_equal(fa.get_velocities(), fb.get_velocities())
    assert np.abs(a.final.positions - c.final.positions).max() > 1e-3
    np.testing.assert_array_equal(start.positions, before.positions)
    assert start.calc is None and start.get_momenta().max() == 0.0
    fixed = fixed_indices(start)
    for frame in a.frames:
        np.testing.assert_array_equal(frame.positions[fixed], before.positions[fixed])
    # the atoms really move and the initial velocities are thermal (300 K over the 9 free atoms)
    assert np.abs(a.final.positions - before.positions).max() > 0.01
    v0 = a.frames[0].get_velocities()
    ke = 0.5 * (a.frames[0].get_masses()[:, None] * v0**2).sum()
    assert 0.2 < ke / (1.5 * 9 * 300 * 8.617333e-5) < 3.0
    # energies agree with a fresh EMT call
    ref = a.final.copy()
    ref.calc = EMT()
    assert ref.get_potential_energy() == pytest.approx(a.final.get_potential_energy(), abs=1e-10)


def test_md_interval_berendsen_and_drawn_seed():
    res = md(c_cu100(), EMT(), MDSettings(steps=30, interval=7, thermostat="berendsen"))
    assert [f.info["step"] for f in res.frames] == [0, 7, 14, 21, 28, 30]  # + the last step
    assert res.final is res.frames[-1] and res.converged
    assert isinstance(res.seed, int) and 0 <= res.seed < 2**63  # a store (BSON int64) can record it
    from alflow.campaign import simulation_metrics

    assert simulation_metrics(res, 1.0)["md_seed"] == res.seed  # and a campaign round does
    # the recorded seed reproduces the run
    again = md(c_cu100(), EMT(), MDSettings(steps=30, interval=7, thermostat="berendsen", seed=res.seed))
    np.testing.assert_array_equal(again.final.positions, res.final.positions)
    res5 = md(c_cu100(), EMT(), MDSettings(steps=30, interval=5, seed=0))
    assert len(res5.frames) == 30 // 5 + 1
    with pytest.raises(ValueError, match="thermostat.*langevin, berendsen"):
        MDSettings(thermostat="nose-hoover")


# ---------------------------------------------------------------- ML calculator, trajectory files


@pytest.fixture(scope="module")
def ml_potential():
    images = rattled(c_cu100(), 0.1, range(5))
    pot = DeltaPotential(["Cu", "C"], prior="morse", ensemble=2, seed=0, training=TrainingSettings(epochs=20))
    return pot.fit(images)


def test_relax_with_ml_calculator_records_uncertainty(ml_potential, tmp_path):
    path = tmp_path / "ml_relax.traj"
    res = relax(c_cu100(), ml_potential.calculator(), RelaxSettings(steps=5), trajectory=path)
    assert len(res.frames) == res.steps + 1 <= 6
    for frame in res.frames:
        u = frame.info["uncertainty"]
        assert isinstance(u, float) and np.isfinite(u) and u >= 0.0
        assert frame.calc.results["uncertainty"] == u
        assert frame.info["forces_std"].shape == (len(frame), 3)
        assert np.isfinite(frame.info["energy_std"])
    assert res.frames[0].info["uncertainty"] > 0.0  # two members disagree somewhere
    # the stored uncertainty is that of the structure: recompute
    calc = ml_potential.calculator()
    ref = res.final.copy()
    ref.calc = calc
    ref.get_potential_energy()
    assert calc.results["uncertainty"] == pytest.approx(res.final.info["uncertainty"], rel=1e-9)
    back = read(path, index=":")
    assert len(back) == len(res.frames)
    assert back[-1].info["uncertainty"] == pytest.approx(res.final.info["uncertainty"])
    # a later EMT run from an ML frame carries no stale uncertainty
    emt = relax(res.final, EMT(), RelaxSettings(steps=2))
    assert "uncertainty" not in emt.frames[-1].info


@pytest.mark.parametrize("suffix", [".traj", ".extxyz"])
@pytest.mark.filterwarnings("ignore:Skipping unhashable information adsorbate_info")
def test_trajectory_files(tmp_path, suffix):
    path = tmp_path / f"md{suffix}"
    res = md(c_cu100(), EMT(), MDSettings(steps=10, interval=2, seed=3), trajectory=path)
    back = read(path, index=":")
    assert len(back) == len(res.frames) == 6
    for a, b in zip(res.frames, back):
        np.testing.assert_allclose(b.positions, a.positions, atol=1e-6)
        assert b.get_potential_energy() == pytest.approx(a.get_potential_energy(), abs=1e-6)
        np.testing.assert_allclose(
            b.get_forces(apply_constraint=False), a.get_forces(apply_constraint=False), atol=1e-6
        )
    path = tmp_path / f"neb{suffix}"
    initial, final = o_cu100_neb_endpoints()
    res = neb(initial, final, EMT, NEBSettings(images=1, fmax=0.1), trajectory=path)
    back = read(path, index=":")
    assert len(back) == len(res.frames) == 3 * (res.steps + 1)
    np.testing.assert_allclose(back[-2].positions, res.band[1].positions, atol=1e-6)


class _FusingCalculator(EMT):
    """EMT that reports fused atoms from its ``fail_after``-th call on (as an ML potential far
    from its data can)."""

    def __init__(self, fail_after: int):
        super().__init__()
        self.calls, self.fail_after = 0, fail_after

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        self.calls += 1
        if self.calls >= self.fail_after:
            raise OverlappingAtomsError("structure: atoms 0 (Cu) and 12 (C) are 0.3 Å apart")
        super().calculate(atoms, properties, system_changes)


def test_simulations_stop_at_unphysical_structures_and_keep_their_frames():
    res = relax(c_cu100(), _FusingCalculator(fail_after=6), RelaxSettings(fmax=0.01))
    assert res.stopped and "0.3 Å apart" in res.stopped and not res.converged
    assert len(res.frames) == 5 and res.final is res.frames[-1]
    md_res = md(c_cu100(), _FusingCalculator(fail_after=8), MDSettings(steps=50, seed=1))
    assert md_res.stopped and not md_res.converged and 1 <= len(md_res.frames) < 51
    with pytest.raises(OverlappingAtomsError):
        relax(c_cu100(), _FusingCalculator(fail_after=1))
