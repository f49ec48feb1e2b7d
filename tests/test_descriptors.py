"""Behler–Parrinello G2/G4 descriptors: sizes, exact derivatives, periodic images, invariances."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc100

from alflow.model import SymmetryFunctions
from alflow.model.descriptors import (
    OverlappingAtomsError,
    build_graph,
    contraction_plan,
    descriptor_jacobian,
    descriptors_with_derivatives,
    positions_vjp,
    symmetry_functions,
)
from conftest import make_slab, random_rotation

CU_C = ("Cu", "C")
CU_C_O = ("Cu", "C", "O")


def features(atoms: Atoms, elements=CU_C) -> np.ndarray:
    sf = SymmetryFunctions(elements)
    graph = build_graph([atoms], sf)
    return symmetry_functions(sf, graph, graph.positions).numpy()


def rattled_slab(seed: int = 3) -> Atoms:
    slab = make_slab()
    slab.set_constraint()
    slab.rattle(0.1, seed=seed)
    return slab


def small_bulk() -> Atoms:
    """Conventional fcc Cu cell (3.63 Å, smaller than the 6 Å cutoff), rattled."""
    atoms = bulk("Cu", "fcc", a=3.63, cubic=True)
    atoms.rattle(0.1, seed=1)
    return atoms


def co_on_cu() -> Atoms:
    """A three-element structure: CO upright on Cu(100), rattled."""
    slab = fcc100("Cu", (2, 2, 3), a=3.63, vacuum=6.0)
    add_adsorbate(slab, "C", 1.9, offset=(1, 1))
    add_adsorbate(slab, "O", 3.05, offset=(1, 1))
    slab.pbc = (True, True, False)
    slab.rattle(0.1, seed=2)
    return slab


STRUCTURES = {
    "slab": (rattled_slab, CU_C),
    "bulk_smaller_than_cutoff": (small_bulk, CU_C),
    "CO_on_Cu": (co_on_cu, CU_C_O),
}


# ---------------------------------------------------------------------------------------------


def test_feature_length_two_and_three_elements():
    assert SymmetryFunctions(CU_C).n_features == 20
    assert SymmetryFunctions(CU_C_O).n_features == 36
    assert features(make_slab()).shape == (13, 20)
    assert features(co_on_cu(), CU_C_O).shape == (14, 36)


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_fast_path_and_sparse_vjp_equal_autograd(name):
    make, elements = STRUCTURES[name]
    atoms = make()
    sf = SymmetryFunctions(elements)
    graph = build_graph([atoms], sf)
    assert graph.triplet_ij.numel() > 0

    pos = graph.positions.clone().requires_grad_(True)
    G = symmetry_functions(sf, graph, pos)
    d = descriptors_with_derivatives(sf, graph)
    assert torch.allclose(d.features, G.detach(), rtol=0, atol=1e-12)
    assert G.abs().max() > 0.1  # something non-trivial was compared

    plan = contraction_plan(graph, sf.n_features)
    n, F, B = graph.n, sf.n_features, 3
    cot = torch.randn(n * F, B, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    vjp = positions_vjp(graph, d, cot.T.reshape(B, n, F)).permute(1, 2, 0)  # [N, 3, B]
    assert vjp.shape == (n, 3, B)
    for b in range(B):
        (ref,) = torch.autograd.grad((cot[:, b].view(n, F) * G).sum(), pos, retain_graph=True)
        assert ref.abs().max() > 1e-3
        assert torch.allclose(vjp[:, :, b], ref, rtol=0, atol=1e-10), name

    jac = descriptor_jacobian(graph, plan, d)
    assert jac.shape == (3 * n, n * F)
    assert torch.allclose((jac @ cot).view(n, 3, B), vjp, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "settings",
    [
        dict(g4_etas=(0.005, 0.5), g4_zetas=(1.0, 2.5, 4.0)),  # several η; a non-integer ζ (float pow)
        dict(g4_zetas=(0.0, 2.0), g4_lambdas=(1.0,), cutoff=4.5),  # ζ = 0, one λ, shorter cutoff
    ],
)
def test_compiled_kernels_match_autograd_for_other_channel_settings(settings):
    atoms = co_on_cu()
    sf = SymmetryFunctions(CU_C_O, **settings)
    graph = build_graph([atoms], sf)
    pos = graph.positions.clone().requires_grad_(True)
    G = symmetry_functions(sf, graph, pos)
    d = descriptors_with_derivatives(sf, graph)
    assert torch.allclose(d.features, G.detach(), rtol=0, atol=1e-12)
    cot = torch.randn(2, graph.n, sf.n_features, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    vjp = positions_vjp(graph, d, cot)
    for b in range(2):
        (ref,) = torch.autograd.grad((cot[b] * G).sum(), pos, retain_graph=True)
        assert torch.allclose(vjp[b], ref, rtol=0, atol=1e-10)


def test_primitive_cell_smaller_than_cutoff_matches_supercell():
    prim = bulk("Cu", "fcc", a=3.63)  # one atom, cell vectors 2.57 Å ≪ cutoff
    g_prim = features(prim)
    g_super = features(prim.repeat((2, 2, 2)))
    assert g_prim.shape == (1, 20)
    # every atom of the supercell is equivalent to the primitive atom
    np.testing.assert_allclose(g_super, np.repeat(g_prim, 8, axis=0), rtol=1e-11, atol=1e-12)
    assert g_prim[0, :4].min() > 1.0  # many periodic images contribute


def test_slab_matches_repeated_slab():
    slab = rattled_slab()
    g = features(slab)
    g2 = features(slab.repeat((2, 1, 1)))
    n = len(slab)
    np.testing.assert_allclose(g2[:n], g, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(g2[n:], g, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("name", ["slab", "CO_on_Cu"])
def test_translation_and_rotation_invariance(name):
    make, elements = STRUCTURES[name]
    atoms = make()
    g = features(atoms, elements)

    shifted = atoms.copy()
    shifted.positions += np.array([0.37, -1.21, 0.55])
    np.testing.assert_allclose(features(shifted, elements), g, rtol=0, atol=1e-11)

    R = random_rotation(7)
    rotated = atoms.copy()
    rotated.set_cell(atoms.cell.array @ R.T, scale_atoms=False)
    rotated.positions = atoms.positions @ R.T
    np.testing.assert_allclose(features(rotated, elements), g, rtol=0, atol=1e-11)


def test_permutation_equivariance():
    atoms = co_on_cu()
    g = features(atoms, CU_C_O)
    rng = np.random.default_rng(5)
    cu = np.flatnonzero(atoms.numbers == 29)
    perm = np.arange(len(atoms))
    perm[cu] = rng.permutation(cu)  # shuffle the Cu atoms among themselves
    np.testing.assert_allclose(features(atoms[perm], CU_C_O), g[perm], rtol=0, atol=1e-11)
    full = rng.permutation(len(atoms))  # any permutation, across elements too
    np.testing.assert_allclose(features(atoms[full], CU_C_O), g[full], rtol=0, atol=1e-11)


def test_overlapping_atoms_raise_naming_both_atoms():
    slab = make_slab()
    slab.set_constraint()
    slab.positions[9] = slab.positions[5] + [0.0, 0.0, 0.2]
    with pytest.raises(OverlappingAtomsError) as exc:
        build_graph([slab], SymmetryFunctions(CU_C))
    msg = str(exc.value)
    m = re.search(r"atoms (\d+) \(Cu\) and (\d+) \(Cu\)", msg)
    assert m, msg
    assert {int(m.group(1)), int(m.group(2))} == {5, 9}
    assert "structure 0" in msg


def test_unknown_element_raises_naming_it():
    atoms = Atoms("CuZr", positions=[[0, 0, 0], [0, 0, 2.5]])
    with pytest.raises(ValueError, match=r"\bZr\b"):
        build_graph([atoms], SymmetryFunctions(CU_C))


def _boxed(positions, symbols="Cu") -> Atoms:
    """Atoms alone in a periodic 30 Å box: images are far beyond the cutoff (an isolated cluster)."""
    n = len(positions)
    atoms = Atoms(symbols * n, positions=np.asarray(positions, float) + 10.0, cell=[30.0] * 3, pbc=True)
    return atoms


def _scan(make, distances):
    sf = SymmetryFunctions(CU_C)
    out = []
    for r in distances:
        graph = build_graph([make(r)], sf)
        out.append(descriptors_with_derivatives(sf, graph).features.numpy())
    return np.array(out)


def test_features_vanish_smoothly_at_cutoff():
    # Cu dimer pulled apart through the 6 Å cutoff
    dimer = lambda r: _boxed([[0, 0, 0], [0, 0, r]])  # noqa: E731
    r = np.linspace(5.5, 6.5, 1001)
    G = _scan(dimer, r)
    inside, outside = r < 6.0, r > 6.0
    assert np.all(G[inside][:, 0, :4] > 0)
    assert np.abs(G[outside]).max() == 0.0
    assert np.abs(_scan(dimer, [5.999])).max() <= 1e-6
    # continuity: no step between neighbouring grid points larger than the smooth slope allows
    assert np.abs(np.diff(G, axis=0)).max() < 1e-3
    # the approach is quadratic (fc ~ (Rc − r)²): G(6 − 2δ) / G(6 − δ) ≈ 4
    ratio = _scan(dimer, [5.998])[0, 0, 0] / _scan(dimer, [5.999])[0, 0, 0]
    assert ratio == pytest.approx(4.0, rel=1e-2)

    # an angle on atom 0 whose leg to atom 2 crosses the cutoff: angular features stay continuous
    trimer = lambda x: _boxed([[0, 0, 0], [2.5, 0.5, 1.0], [x, 0, -2.0]])  # noqa: E731
    xs = np.linspace(4.5, 6.5, 2001)
    G3 = _scan(trimer, xs)
    assert np.abs(np.diff(G3, axis=0)).max() < 1e-3
    beyond = np.hypot(xs, 2.0) >= 6.0
    assert G3[~beyond][:, 0, 8:].max() > 0
    assert np.abs(G3[beyond][:, 0, 8:]).max() == 0.0  # no angle on atom 0 once atom 2 left its sphere


@pytest.mark.parametrize(
    "positions",
    [
        pytest.param([[0, 0, 0], [1.2, 1.4, 1.6]], id="dimer"),
        pytest.param([[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0]], id="flat_trimer"),
    ],
)
def test_nonperiodic_structures_match_isolated_cluster(positions):
    """A molecule without periodic boundaries (pbc all False) has the features of the same
    molecule alone in a large periodic box."""
    free = Atoms("Cu" * len(positions), positions=positions)
    np.testing.assert_allclose(features(free), features(_boxed(positions)), rtol=1e-12, atol=1e-14)


def test_isolated_structure_pairs_do_not_depend_on_its_extent():
    """A far-away atom (a molecule that left the cluster) costs nothing and changes nothing."""
    near = Atoms("Cu3", positions=[[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0]])
    far = near + Atoms("Cu", positions=[[5000.0, 5000.0, 5000.0]])
    np.testing.assert_allclose(features(far)[:3], features(near), rtol=1e-12, atol=1e-14)
    assert not features(far)[3].any()


def test_slab_without_vacuum_has_the_features_of_the_same_slab_with_vacuum():
    """fcc100 without vacuum leaves c = 0 along the non-periodic z: a missing vector is built."""
    bare = fcc100("Cu", (2, 2, 3), a=3.61)
    assert bare.cell.lengths()[2] == 0 and not bare.pbc[2]
    padded = bare.copy()
    padded.center(vacuum=8.0, axis=2)
    np.testing.assert_allclose(features(bare), features(padded), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="has no atoms"):
        features(Atoms())
