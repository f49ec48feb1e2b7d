"""DeltaPotential and DeltaCalculator: conservative forces, smoothness, symmetry, extensivity,
accuracy, uncertainty, determinism, persistence and input validation."""

from __future__ import annotations

import json
import re
import zipfile

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from alflow.model import DeltaPotential, TrainingSettings
from alflow.model.descriptors import OverlappingAtomsError
from alflow.model.ensemble import ensemble_statistics
from alflow.model.network import ElementNetwork, StackedNetworks
from alflow.model.potential import UnknownFormatError
from conftest import free_atoms, label, make_slab, rattled, random_rotation

C = 12  # index of the C adatom; it sits on top of Cu atom 11
TOP_CU = 11


def quick(images, ensemble=2, epochs=10, seed=0, **kwargs) -> DeltaPotential:
    return DeltaPotential(
        ["Cu", "C"], ensemble=ensemble, seed=seed, training=TrainingSettings(epochs=epochs), **kwargs
    ).fit(images)


def finite_difference_forces(atoms: Atoms, h: float) -> np.ndarray:
    fd = np.zeros((len(atoms), 3))
    for a in range(len(atoms)):
        for k in range(3):
            atoms.positions[a, k] += h
            e_plus = atoms.get_potential_energy()
            atoms.positions[a, k] -= 2 * h
            e_minus = atoms.get_potential_energy()
            atoms.positions[a, k] += h
            fd[a, k] = -(e_plus - e_minus) / (2 * h)
    return fd


# --------------------------------------------------------------------------------------------- forces


@pytest.mark.parametrize("skin", [0.3, 0.0])
def test_forces_are_minus_energy_gradient(trained, skin):
    atoms = rattled(50, labelled=False)
    calc = trained.calculator(skin=skin)
    atoms.calc = calc
    forces = atoms.get_forces(apply_constraint=False).copy()
    graph = calc._graph
    fd = finite_difference_forces(atoms, h=1e-4)
    if skin > 0:
        assert calc._graph is graph  # displacements ≪ skin / 2: the neighbour graph was reused
    assert np.abs(forces).max() > 0.1
    np.testing.assert_allclose(forces, fd, rtol=0, atol=1e-4)
    # back at the starting geometry: same forces as before the excursion
    np.testing.assert_allclose(atoms.get_forces(apply_constraint=False), forces, rtol=0, atol=1e-12)


def test_dissociation_curve_is_continuous(small):
    """Pull C straight up from 1.5 to 7.5 Å above its Cu atom: every 0.01 Å step obeys the work
    theorem ΔE = −∫ F_z dz (Simpson with the force at the mid-point), so E has no jump at the Morse
    switch (5–6 Å) or the descriptor cutoff (6 Å), and the forces belong to that energy."""
    slab = make_slab()
    top = slab.positions[TOP_CU, 2]
    heights = np.round(np.arange(1.5, 7.5 + 1e-9, 0.005), 10)
    calc = small.calculator(skin=0.3)  # the neighbour graph is reused between rebuilds
    rebuilt = small.calculator(skin=0.0)
    e, f, e0, f0 = [], [], [], []
    for n, h in enumerate(heights):
        slab.positions[C, 2] = top + h
        slab.calc = calc
        e.append(slab.get_potential_energy())
        f.append(slab.get_forces(apply_constraint=False)[C].copy())
        if n % 20 == 0:
            slab.calc = rebuilt
            e0.append(e[-1] - slab.get_potential_energy())
            f0.append(f[-1] - slab.get_forces(apply_constraint=False)[C])
    e, fz = np.array(e), np.array(f)[:, 2]
    step = np.diff(e[::2]) + 0.01 / 6 * (fz[:-1:2] + 4 * fz[1::2] + fz[2::2])
    assert np.abs(step).max() <= 1e-4
    assert np.abs(step[heights[:-1:2] >= 4.0]).max() <= 1e-5  # tighter where the curve is gentle
    assert np.abs(np.array(f)[:, :2]).max() < 1e-8  # on-top site: no lateral force on C
    assert np.ptp(e) > 0.5  # the curve is not flat: C binds to the surface
    # beyond the cutoff from every Cu atom the C atom no longer feels the slab
    far = heights >= 6.0
    assert np.ptp(e[far]) < 1e-10 and np.abs(np.array(f)[far]).max() < 1e-10
    # the reused neighbour graph gives the numbers of a graph rebuilt at every step
    assert np.abs(e0).max() < 1e-10 and np.abs(f0).max() < 1e-10


def test_calculator_respects_constraints(small):
    atoms = rattled(51, labelled=False)
    atoms.calc = small.calculator()
    fixed = ~free_atoms(atoms)
    assert fixed.sum() == 4
    assert np.all(atoms.get_forces()[fixed] == 0.0)
    raw = atoms.get_forces(apply_constraint=False)
    assert np.linalg.norm(raw[fixed], axis=1).min() > 1e-3
    np.testing.assert_array_equal(atoms.get_forces()[~fixed], raw[~fixed])


# --------------------------------------------------------------------------------------------- symmetry


def predict(pot, atoms):
    p = pot.predict(atoms)[0]
    return p.energy, p.forces.numpy(), p.uncertainty


def test_translation_rotation_permutation_invariance(small):
    atoms = rattled(52, labelled=False)
    e, f, u = predict(small, atoms)

    shifted = atoms.copy()
    shifted.positions += np.array([0.8, -2.1, 0.6])
    e2, f2, u2 = predict(small, shifted)
    assert e2 == pytest.approx(e, abs=1e-10)
    np.testing.assert_allclose(f2, f, rtol=0, atol=1e-10)

    R = random_rotation(11)
    rotated = atoms.copy()
    rotated.set_cell(atoms.cell.array @ R.T, scale_atoms=False)
    rotated.positions = atoms.positions @ R.T
    e3, f3, u3 = predict(small, rotated)
    assert e3 == pytest.approx(e, abs=1e-10)
    np.testing.assert_allclose(f3, f @ R.T, rtol=0, atol=1e-10)
    assert u3 == pytest.approx(u, abs=1e-10)

    rng = np.random.default_rng(3)
    perm = np.arange(len(atoms))
    cu = np.flatnonzero(atoms.numbers == 29)
    perm[cu] = rng.permutation(cu)  # new atom n is old atom perm[n]
    fixed_old = set(np.flatnonzero(~free_atoms(atoms)))
    permuted = Atoms(atoms.numbers[perm], positions=atoms.positions[perm], cell=atoms.cell, pbc=atoms.pbc)
    permuted.set_constraint(FixAtoms(indices=[n for n in range(len(perm)) if perm[n] in fixed_old]))
    e4, f4, u4 = predict(small, permuted)
    assert e4 == pytest.approx(e, abs=1e-10)
    np.testing.assert_allclose(f4, f[perm], rtol=0, atol=1e-10)
    assert u4 == pytest.approx(u, abs=1e-12)


def test_energy_is_extensive(small, training_set):
    atoms = rattled(53, labelled=False)
    bare = quick(training_set[:5], prior=None)
    assert bare.morse is None
    for pot in (small, bare):
        single = pot.predict(atoms)[0]
        double = pot.predict(atoms.repeat((2, 1, 1)))[0]
        assert double.energy == pytest.approx(2 * single.energy, rel=1e-10)
        assert double.energy_std == pytest.approx(2 * single.energy_std, rel=1e-8)
        f = single.forces.numpy()
        np.testing.assert_allclose(double.forces.numpy(), np.concatenate([f, f]), rtol=0, atol=1e-10)


def test_batched_prediction_equals_one_by_one(small):
    images = [rattled(54, labelled=False), rattled(55, labelled=False).repeat((1, 2, 1)), rattled(56, labelled=False)]
    batched = small.predict(images)
    for atoms, b in zip(images, batched):
        s = small.predict(atoms)[0]
        assert b.energy == pytest.approx(s.energy, abs=1e-10)
        np.testing.assert_allclose(b.forces.numpy(), s.forces.numpy(), rtol=0, atol=1e-10)
        assert b.uncertainty == pytest.approx(s.uncertainty, abs=1e-10)


# --------------------------------------------------------------------------------------------- accuracy


def force_mae(pot, images):
    preds = pot.predict(images)
    errors = [
        np.abs(p.forces.numpy() - a.get_forces(apply_constraint=False))[free_atoms(a)] for p, a in zip(preds, images)
    ]
    return float(np.concatenate(errors).mean())


def test_accuracy_on_training_and_held_out_structures(trained, training_set):
    train_mae = force_mae(trained, training_set)
    assert train_mae <= 0.05
    assert trained.report["force_mae"] == pytest.approx(train_mae, rel=1e-9)
    held_out = [rattled(100 + k) for k in range(10)]
    assert force_mae(trained, held_out) <= 0.15
    energies = np.array([p.energy for p in trained.predict(held_out)])
    labels = np.array([a.get_potential_energy() for a in held_out])
    assert np.abs(energies - labels).mean() / 13 <= 0.01  # eV/atom


def test_uncertainty_grows_far_from_the_data(trained, training_set):
    baseline = np.mean([p.uncertainty for p in trained.predict(training_set)])
    assert baseline > 0
    strongly_rattled = [rattled(200 + k, stdev=0.4, labelled=False) for k in range(3)]
    assert np.mean([p.uncertainty for p in trained.predict(strongly_rattled)]) >= 2 * baseline
    close = make_slab()
    close.positions[C, 2] = close.positions[TOP_CU, 2] + 1.2
    assert trained.predict(close)[0].uncertainty >= 2 * baseline


# --------------------------------------------------------------------------------------------- uncertainty


def test_uncertainty_is_max_free_atom_force_spread(small):
    atoms = rattled(57, labelled=False)
    atoms.calc = small.calculator()
    atoms.get_potential_energy()
    r = atoms.calc.results
    free = free_atoms(atoms)
    norms = np.linalg.norm(r["forces_std"], axis=1)
    assert r["uncertainty"] == pytest.approx(norms[free].max(), rel=1e-12)
    assert r["forces_std"].shape == (len(atoms), 3) and np.all(norms > 0)
    # fixing more atoms only removes them from the maximum
    only_c = atoms.copy()
    only_c.set_constraint(FixAtoms(indices=range(12)))
    only_c.calc = small.calculator()
    only_c.get_potential_energy()
    assert only_c.calc.results["uncertainty"] == pytest.approx(norms[C], rel=1e-12)
    np.testing.assert_allclose(only_c.calc.results["forces_std"], r["forces_std"], rtol=0, atol=1e-14)


def test_fixed_atoms_do_not_enter_uncertainty():
    gen = torch.Generator().manual_seed(0)
    forces = 0.01 * torch.randn(4, 3, 3, dtype=torch.float64, generator=gen)
    forces[:, 0] += 100.0 * torch.randn(4, 3, dtype=torch.float64, generator=gen)  # wild spread on atom 0
    energies = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    free = torch.tensor([False, True, True])
    pred = ensemble_statistics(energies, forces, free)
    per_atom = torch.linalg.vector_norm(forces.std(0), dim=-1)
    assert pred.uncertainty == pytest.approx(float(per_atom[1:].max()), rel=1e-12)
    assert pred.uncertainty < 1.0 < float(per_atom[0])
    assert pred.energy_std == pytest.approx(float(np.std([1, 2, 3, 4], ddof=1)), rel=1e-12)
    single = ensemble_statistics(energies[:1], forces[:1], free)
    assert single.uncertainty == 0.0 and single.energy_std == 0.0 and torch.all(single.forces_std == 0)


def test_a_new_constraint_is_a_new_state_for_the_calculator(small):
    atoms = rattled(70, labelled=False)
    atoms.calc = small.calculator()
    before = atoms.calc.get_property("uncertainty", atoms)
    atoms.set_constraint(FixAtoms(indices=range(len(atoms))))  # same positions, no free atom left
    assert before > 0 and atoms.calc.get_property("uncertainty", atoms) == 0.0


def test_single_member_has_zero_uncertainty(training_set):
    pot = quick(training_set[:3], ensemble=1, epochs=5)
    atoms = rattled(58, labelled=False)
    atoms.calc = pot.calculator()
    atoms.get_potential_energy()
    r = atoms.calc.results
    assert r["uncertainty"] == 0.0 and r["energy_std"] == 0.0
    assert np.all(r["forces_std"] == 0.0) and np.all(np.isfinite(r["forces"]))


def test_members_differ_with_one_training_structure(training_set):
    pot = quick(training_set[:1], ensemble=3, epochs=20)
    for atoms in (training_set[0], rattled(59, labelled=False)):
        p = pot.predict(atoms)[0]
        e = p.member_energies
        assert len(e) == 3
        assert (e[:, None] - e[None, :]).abs().add(torch.eye(3, dtype=e.dtype)).min() > 1e-8
        assert p.uncertainty > 1e-4


# --------------------------------------------------------------------------------------------- determinism, persistence


def test_same_seed_same_model_different_seed_different_model(training_set):
    images = training_set[:5]
    test = [rattled(60, labelled=False), rattled(61, labelled=False)]
    a = quick(images, seed=7).predict(test)
    b = quick(images, seed=7).predict(test)
    c = quick(images, seed=8).predict(test)
    for pa, pb, pc in zip(a, b, c):
        assert pa.energy == pb.energy and pa.uncertainty == pb.uncertainty
        assert torch.equal(pa.forces, pb.forces) and torch.equal(pa.member_energies, pb.member_energies)
        assert abs(pa.energy - pc.energy) > 1e-8
        assert (pa.forces - pc.forces).abs().max() > 1e-6


def test_save_load_roundtrip(small, tmp_path):
    path = small.save(tmp_path / "model.alflow")
    loaded = DeltaPotential.load(path)
    images = [rattled(62, labelled=False), rattled(63, labelled=False)]
    for p, q in zip(small.predict(images), loaded.predict(images)):
        assert abs(p.energy - q.energy) <= 1e-12
        assert abs(p.uncertainty - q.uncertainty) <= 1e-12
        assert abs(p.energy_std - q.energy_std) <= 1e-12
        assert torch.allclose(p.forces, q.forces, rtol=0, atol=1e-12)
        assert torch.allclose(p.member_energies, q.member_energies, rtol=0, atol=1e-12)
    assert loaded.elements == small.elements and loaded.n_members == small.n_members
    assert loaded.descriptor == small.descriptor
    atoms = images[0]
    atoms.calc = loaded.calculator()
    assert atoms.get_potential_energy() == pytest.approx(small.predict(atoms)[0].energy, abs=1e-12)


def _rewrite_metadata(src, dst, **changes):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        meta = json.loads(zin.read("metadata.json"))
        meta.update(changes)
        zout.writestr("metadata.json", json.dumps(meta))
        zout.writestr("weights.pt", zin.read("weights.pt"))


def test_load_rejects_unknown_files(small, tmp_path):
    good = small.save(tmp_path / "model.alflow")
    future = tmp_path / "future.alflow"
    _rewrite_metadata(good, future, version=999)
    with pytest.raises(UnknownFormatError, match="999"):
        DeltaPotential.load(future)
    other = tmp_path / "other.alflow"
    _rewrite_metadata(good, other, format="something-else")
    with pytest.raises(UnknownFormatError, match="something-else"):
        DeltaPotential.load(other)
    junk = tmp_path / "not_a_model.txt"
    junk.write_text("this is not a zip file\n")
    with pytest.raises(UnknownFormatError, match=re.escape(str(junk))):
        DeltaPotential.load(junk)


# --------------------------------------------------------------------------------------------- bad input


def test_fit_rejects_bad_training_sets(training_set):
    with pytest.raises(ValueError, match="empty"):
        DeltaPotential(["Cu", "C"]).fit([])

    unlabelled = [training_set[0], rattled(64, labelled=False)]
    with pytest.raises(ValueError, match="training structure 1"):
        DeltaPotential(["Cu", "C"]).fit(unlabelled)

    oxygen = make_slab()
    oxygen[C].symbol = "O"
    oxygen = label(oxygen)
    with pytest.raises(ValueError, match=r"\bO\b"):
        DeltaPotential(["Cu", "C"]).fit([training_set[0], oxygen])

    fused = make_slab()
    fused.positions[9] = fused.positions[5] + [0.0, 0.0, 0.2]
    fused.calc = SinglePointCalculator(fused, energy=0.0, forces=np.zeros((len(fused), 3)))
    with pytest.raises(OverlappingAtomsError, match="training structure 2"):
        DeltaPotential(["Cu", "C"]).fit([training_set[0], training_set[1], fused])

    moved = training_set[1].copy()
    moved.calc = training_set[1].calc  # its label, then the carbon moved: the label is stale
    moved.positions[C] += [0.0, 0.0, 0.3]
    with pytest.raises(ValueError, match=r"training structure 1 .*computed for another structure .*positions"):
        DeltaPotential(["Cu", "C"]).fit([training_set[0], moved])
    assert DeltaPotential(["Cu", "C"]).predict([]) == []


# --------------------------------------------------------------------------------------------- networks


@pytest.mark.parametrize("hidden", [None, (7,), (5, 6, 4)])
def test_stacked_gradient_equals_autograd(small, hidden):
    F = small.descriptor.n_features
    members = small.members if hidden is None else [ElementNetwork(["Cu", "C"], F, hidden, s) for s in (1, 2, 3)]
    gen = torch.Generator().manual_seed(4)
    x = 3.0 * torch.rand(17, F, dtype=torch.float64, generator=gen) - 1.5
    species = torch.tensor([0, 1, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1])
    atomic, grad = StackedNetworks(members).energies_and_gradients(x, species)
    assert atomic.shape == (len(members), 17) and grad.shape == (len(members), 17, F)
    for m, net in enumerate(members):
        xm = x.clone().requires_grad_(True)
        out = net(xm, species)
        (ref,) = torch.autograd.grad(out.sum(), xm)
        assert torch.allclose(atomic[m], out.detach(), rtol=0, atol=1e-12)
        assert torch.allclose(grad[m], ref, rtol=0, atol=1e-12)
        assert ref.abs().max() > 1e-3


def test_feature_range_floor_is_the_least_scaling_range_as_a_fraction_of_the_magnitude():
    import torch

    from alflow.model.network import FeatureScaler

    features = torch.tensor([[1.0, 0.0], [1.1, 0.0], [4.0, 0.0]], dtype=torch.float64)
    species = torch.tensor([0, 0, 1])
    default = FeatureScaler.fit(features, species, 2)  # 5 %: element 0 varies by 0.1 > 0.055
    torch.testing.assert_close(default.inv_range, torch.tensor([[10.0, 1.0], [5.0, 1.0]], dtype=torch.float64))
    by_magnitude = FeatureScaler.fit(features, species, 2, relative_floor=1.0)
    torch.testing.assert_close(by_magnitude.inv_range, torch.tensor([[1 / 1.1, 1.0], [0.25, 1.0]], dtype=torch.float64))
    x = by_magnitude(features, species)
    assert x[:, 0].min() >= -1.0 and x[:, 0].max() <= 1.0  # still inside [-1, 1] on the training set


def test_feature_range_floor_is_a_training_setting_kept_with_the_model(tmp_path):
    with pytest.raises(ValueError, match="feature_range_floor must be > 0"):
        TrainingSettings(feature_range_floor=0.0)
    images = [rattled(60), rattled(61)]
    pot = DeltaPotential(["Cu", "C"], ensemble=1, training=TrainingSettings(epochs=3, feature_range_floor=1.0)).fit(images)
    again = DeltaPotential.load(pot.save(tmp_path / "m.alflow"))
    assert again.training.feature_range_floor == 1.0


def test_feature_range_floor_auto_falls_with_the_training_set_to_the_default():
    auto = TrainingSettings(feature_range_floor="auto")
    assert [auto.range_floor(n) for n in (1, 2, 4, 20, 150)] == [1.0, 0.5, 0.25, 0.05, 0.05]
    assert TrainingSettings(feature_range_floor=0.3).range_floor(1) == 0.3
    with pytest.raises(ValueError, match="feature_range_floor must be > 0 or 'auto'"):
        TrainingSettings(feature_range_floor="big")
    # a one-structure fit with "auto" scales exactly as one with the floor at 1
    images = [rattled(62)]
    scalers = [DeltaPotential(["Cu", "C"], ensemble=1, training=TrainingSettings(epochs=2, feature_range_floor=f))
               .fit(images).scaler.inv_range for f in ("auto", 1.0)]
    assert np.array_equal(scalers[0].numpy(), scalers[1].numpy())
