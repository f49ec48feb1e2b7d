"""Training: the learning-rate schedule, convergence, target scaling, the force mask, bagging."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase.calculators.singlepoint import SinglePointCalculator

from alflow.model import DeltaPotential, TrainingSettings
from alflow.model.ensemble import bootstrap_weights
from conftest import free_atoms, label, rattled


def cosine_warm_restarts(epochs, lr_max, lr_min, period, multiplier):
    out, t_i, t_cur = [], period, 0
    for _ in range(epochs):
        out.append(lr_min + (lr_max - lr_min) * (1 + math.cos(math.pi * t_cur / t_i)) / 2)
        t_cur += 1
        if t_cur == t_i:
            t_cur, t_i = 0, t_i * multiplier
    return out


def test_cosine_warm_restart_schedule_is_applied(training_set):
    settings = TrainingSettings(
        epochs=35, learning_rate=1.0, min_learning_rate=0.1, restart_period=10, restart_multiplier=2
    )
    pot = DeltaPotential(["Cu", "C"], ensemble=1, training=settings).fit(training_set[:3])
    lr = pot.histories[0].learning_rate
    assert len(lr) == 35
    np.testing.assert_allclose(lr, cosine_warm_restarts(35, 1.0, 0.1, 10, 2), rtol=0, atol=1e-12)
    assert lr[0] == lr[10] == lr[30] == pytest.approx(1.0)
    assert lr[9] < 0.15 and lr[29] < 0.15 and lr[20] == pytest.approx(0.55)

    # the rate reaches the optimiser: another schedule gives another model
    other = TrainingSettings(epochs=35, learning_rate=0.3, min_learning_rate=0.01, restart_period=10)
    pot2 = DeltaPotential(["Cu", "C"], ensemble=1, training=other).fit(training_set[:3])
    atoms = training_set[5]
    assert abs(pot.predict(atoms)[0].energy - pot2.predict(atoms)[0].energy) > 1e-8


def test_loss_decreases(trained):
    assert len(trained.histories) == 5
    for history in trained.histories:
        loss = np.array(history.loss)
        assert np.all(np.isfinite(loss))
        assert loss[-1] < 0.01 * loss[0]
        assert loss.min() == pytest.approx(loss[-1], rel=0.05)  # no blow-up at the end


def test_near_identical_structures_train_stably():
    a = rattled(0)
    b = rattled(0, labelled=False)
    b.positions[4:] += np.random.default_rng(1).normal(scale=1e-6, size=(len(b) - 4, 3))
    b = label(b)
    assert abs(a.get_potential_energy() - b.get_potential_energy()) < 1e-4
    pot = DeltaPotential(["Cu", "C"], ensemble=2, training=TrainingSettings(epochs=30)).fit([a, b])
    assert np.isfinite(pot.energy_scale) and pot.energy_scale >= 0.01
    for history in pot.histories:
        assert np.all(np.isfinite(history.loss))
    for atoms, p in zip([a, b], pot.predict([a, b])):
        assert np.isfinite(p.energy) and torch.isfinite(p.forces).all() and np.isfinite(p.uncertainty)
        assert abs(p.energy - atoms.get_potential_energy()) < 0.1
    assert np.isfinite(pot.predict(rattled(70, labelled=False))[0].energy)


def test_fixed_atom_forces_are_not_in_the_loss(training_set):
    sane = training_set[:3]
    absurd = []
    for atoms in sane:
        atoms = atoms.copy()
        forces = sane[len(absurd)].get_forces(apply_constraint=False).copy()
        fixed = ~free_atoms(atoms)
        forces[fixed] = 1e3
        atoms.calc = SinglePointCalculator(atoms, energy=sane[len(absurd)].get_potential_energy(), forces=forces)
        absurd.append(atoms)
    settings = TrainingSettings(epochs=15)
    p_sane = DeltaPotential(["Cu", "C"], ensemble=2, training=settings).fit(sane)
    p_absurd = DeltaPotential(["Cu", "C"], ensemble=2, training=settings).fit(absurd)
    for h_sane, h_absurd in zip(p_sane.histories, p_absurd.histories):
        np.testing.assert_allclose(h_absurd.loss, h_sane.loss, rtol=1e-10, atol=0)
    test = [rattled(71, labelled=False), rattled(72, labelled=False)]
    for ps, pa, atoms in zip(p_sane.predict(test), p_absurd.predict(test), test):
        free = free_atoms(atoms)
        assert pa.energy == pytest.approx(ps.energy, abs=1e-8)
        np.testing.assert_allclose(pa.forces.numpy()[free], ps.forces.numpy()[free], rtol=0, atol=1e-8)


def test_bootstrap_weights():
    w_e, w_f = bootstrap_weights(15, 135, torch.Generator().manual_seed(1))
    assert w_e.shape == (15,) and w_f.shape == (135,)
    assert w_e.sum().item() == 15 and w_f.sum().item() == 135
    for w in (w_e, w_f):
        assert torch.all(w >= 0) and torch.equal(w, w.round())
        assert (w == 0).any()  # a resample, not the identity
    v_e, v_f = bootstrap_weights(15, 135, torch.Generator().manual_seed(2))
    assert not torch.equal(w_f, v_f) and not torch.equal(w_e, v_e)
    again = bootstrap_weights(15, 135, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], w_e) and torch.equal(again[1], w_f)
    empty_e, empty_f = bootstrap_weights(1, 0, torch.Generator().manual_seed(0))
    assert empty_e.tolist() == [1.0] and empty_f.numel() == 0


def test_members_get_different_bootstrap_samples(trained):
    seeds = trained.member_seeds()
    assert len(set(seeds)) == len(seeds)
    draws = [bootstrap_weights(15, 135, torch.Generator().manual_seed(s))[1] for s in seeds]
    assert all(not torch.equal(draws[i], draws[j]) for i in range(5) for j in range(i + 1, 5))


def test_warm_start_continues_from_current_weights_and_learns_new_data():
    """The online learner's refit: normalisation kept, members continue, new structures learnt."""
    first = [rattled(seed, 0.1) for seed in range(6)]
    new = [rattled(seed, 0.15) for seed in range(300, 303)]
    pot = DeltaPotential(["Cu", "C"], ensemble=2, seed=1, training=TrainingSettings(epochs=120, warm_epochs=60))
    pot.fit(first)
    scaler_min = pot.scaler.minimum.clone()
    refs, scale = pot.reference_energies.clone(), pot.energy_scale
    weights = [p.detach().clone() for p in pot.members[0].parameters()]

    def new_force_mae():
        return np.mean([np.abs(p.forces.numpy() - a.calc.results["forces"])[free_atoms(a)].mean()
                        for p, a in zip(pot.predict(new), new)])

    before = new_force_mae()
    pot.fit(first + new, warm_start=True)
    assert pot.report["warm_start"] and max(pot.report["epochs"]) <= 60
    assert torch.equal(pot.scaler.minimum, scaler_min) and torch.equal(pot.reference_energies, refs)
    assert pot.energy_scale == scale
    assert any(not torch.equal(a, b) for a, b in zip(weights, pot.members[0].parameters()))
    assert new_force_mae() < 0.6 * before  # the refit learnt the added structures
    # a cold fit on the same data re-derives the normalisation
    pot.fit(first + new)
    assert not pot.report["warm_start"] and not torch.equal(pot.scaler.minimum, scaler_min)
