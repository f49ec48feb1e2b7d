"""Behler–Parrinello atom-centred symmetry functions (G2 radial, G4 angular).

One function per equation (Behler, J. Chem. Phys. 134, 074106 (2011)), batched over many
structures that are concatenated into one :class:`NeighborGraph`. Shapes use
``N`` atoms, ``P`` directed pairs, ``T`` angle triplets and ``F`` features.

Everything is float64 torch; derivatives come from autograd. Neighbour lists come from
matscipy (a C implementation: 0.12 ms vs 5.7 ms for ASE's on the 13-atom slab) and include
every periodic image inside the cutoff, so cells smaller than the cutoff are handled exactly.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from ase import Atoms
from matscipy.neighbours import neighbour_list
from scipy.spatial import cKDTree

from alflow.model import kernels
from alflow.overlaps import OVERLAP_FRACTION, OverlappingAtomsError, check_overlaps  # noqa: F401 (re-exported)

DTYPE = torch.float64

# torch announces its (stable for what we use: CSR @ dense, CSR @ CSR) sparse CSR API on every use
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

@dataclass(frozen=True)
class SymmetryFunctions:
    """Settings of the published G2/G4 descriptor (same set for every element).

    ``eta`` values are given in the AMP convention and divided by ``cutoff**2`` before use.
    Feature length: ``n_el * len(g2_etas) + n_el (n_el + 1) / 2 * len(g4_etas) * |zetas| * |lambdas|``,
    i.e. 20 for two elements and 36 for three with the defaults.
    """

    elements: tuple[str, ...]
    cutoff: float = 6.0
    g2_etas: tuple[float, ...] = (0.05, 0.2154, 0.9283, 5.0)
    g4_etas: tuple[float, ...] = (0.005,)
    g4_zetas: tuple[float, ...] = (1.0, 4.0)
    g4_lambdas: tuple[float, ...] = (1.0, -1.0)

    def __post_init__(self):
        object.__setattr__(self, "elements", tuple(self.elements))
        for name in ("g2_etas", "g4_etas", "g4_zetas", "g4_lambdas"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if len(set(self.elements)) != len(self.elements) or not self.elements:
            raise ValueError(f"elements must be a non-empty list of distinct symbols, got {self.elements}")
        if not (math.isfinite(self.cutoff) and self.cutoff > 0):
            raise ValueError(f"cutoff must be a positive number (Å), got {self.cutoff}")
        for name, values, ok, rule in (
                ("g2_etas", self.g2_etas, lambda v: v >= 0, ">= 0"),
                ("g4_etas", self.g4_etas, lambda v: v >= 0, ">= 0"),
                # 0 < ζ < 1: (1 + λ cos θ)^ζ has an infinite slope at collinear triplets; past
                # ~1000, 2^(1−ζ) underflows while (1 + λ cos θ)^ζ overflows (NaN features)
                ("g4_zetas", self.g4_zetas, lambda v: v == 0 or 1 <= v <= MAX_ZETA, f"0 or in [1, {MAX_ZETA}]"),
                ("g4_lambdas", self.g4_lambdas, lambda v: v in (-1.0, 1.0), "-1 or 1")):
            if not values or not all(math.isfinite(v) and ok(v) for v in values):
                raise ValueError(f"{name} must be a non-empty list of numbers {rule}, got {list(values)}")

    @property
    def element_pairs(self) -> list[tuple[int, int]]:
        n = len(self.elements)
        return [(a, b) for a in range(n) for b in range(a, n)]

    @property
    def n_radial(self) -> int:
        return len(self.elements) * len(self.g2_etas)

    @property
    def n_angular_terms(self) -> int:
        return len(self.g4_etas) * len(self.g4_zetas) * len(self.g4_lambdas)

    @property
    def n_features(self) -> int:
        return self.n_radial + len(self.element_pairs) * self.n_angular_terms

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SymmetryFunctions":
        return cls(**d)

    def __call__(self, graph: "NeighborGraph", positions: torch.Tensor | None = None) -> torch.Tensor:
        """Descriptors of every atom of ``graph``: [N, F] (positions default to the graph's)."""
        return symmetry_functions(self, graph, graph.positions if positions is None else positions)


# ---------------------------------------------------------------------------------------------
# Neighbour graph (numpy bookkeeping, built once per geometry)
# ---------------------------------------------------------------------------------------------


@dataclass
class NeighborGraph:
    """Concatenated structures with their pairs and triplets inside the cutoff.

    positions [N, 3], species [N] (index into ``elements``), batch [N] (structure index),
    pair_i / pair_j [P], pair_offset [P, 3] (Cartesian image shift, Å), triplet_ij / triplet_ik [T]
    (indices into the pair arrays, the two legs j < k of an angle centred on ``pair_i``), and the
    flat feature indices each pair / triplet term is summed into.
    """

    positions: torch.Tensor
    species: torch.Tensor
    batch: torch.Tensor
    n_structures: int
    pair_i: torch.Tensor
    pair_j: torch.Tensor
    pair_offset: torch.Tensor
    triplet_ij: torch.Tensor
    triplet_ik: torch.Tensor
    n_atoms: torch.Tensor  # [S]
    radial_index: torch.Tensor  # [P, H2] flat index into the [N * F] feature array
    angular_index: torch.Tensor  # [T, H4]

    @property
    def n(self) -> int:
        return self.positions.shape[0]


def species_indices(atoms: Atoms, elements: Sequence[str], where: str = "structure") -> np.ndarray:
    """Map chemical symbols to indices into ``elements``; unknown elements raise a clear error."""
    lookup = {e: k for k, e in enumerate(elements)}
    symbols = atoms.get_chemical_symbols()
    unknown = sorted(set(symbols) - set(lookup))
    if unknown:
        raise ValueError(
            f"{where} contains element(s) {', '.join(unknown)} not in the potential's elements "
            f"{list(elements)}"
        )
    return np.array([lookup[s] for s in symbols], dtype=np.int64)


def _pairs(atoms: Atoms, cutoff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Directed pairs (i, j, distance, Cartesian image offset) within ``cutoff``, all images."""
    if not atoms.pbc.any():  # isolated: a k-d tree, whose cost does not grow with the atoms' extent
        pairs = cKDTree(atoms.positions).query_pairs(cutoff, output_type="ndarray")
        i, j = np.concatenate([pairs[:, 0], pairs[:, 1]]), np.concatenate([pairs[:, 1], pairs[:, 0]])
        d = np.linalg.norm(atoms.positions[j] - atoms.positions[i], axis=1)
        return i, j, d, np.zeros((len(i), 3))
    atoms = _completed_cell(atoms, cutoff)
    if abs(atoms.cell.volume) < 1e-9:
        raise ValueError("a periodic structure needs a cell with non-zero volume along its periodic directions")
    i, j, d, S = neighbour_list("ijdS", atoms, cutoff)
    return i, j, d, S @ atoms.cell.array


def _completed_cell(atoms: Atoms, cutoff: float) -> Atoms:
    """``atoms``, or a copy whose missing (zero) cell vectors along non-periodic directions are
    orthogonal ones spanning the atoms plus the cutoff on both sides (a slab built without vacuum
    has c = 0); the positions are shifted into it, which changes no distance."""
    missing = (atoms.cell.lengths() < 1e-9) & ~atoms.pbc
    if not missing.any():
        return atoms
    work = Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell.complete(), pbc=atoms.pbc)
    cell, positions = work.cell.array.copy(), work.positions
    for k in np.flatnonzero(missing):
        unit = cell[k] / np.linalg.norm(cell[k])
        projection = positions @ unit
        cell[k] = unit * (np.ptp(projection) + 2.0 * cutoff)
        positions = positions - unit * (projection.min() - cutoff)
    work.set_cell(cell)
    work.positions = positions
    return work


def _triplets(pair_i: np.ndarray, n_atoms: int) -> tuple[np.ndarray, np.ndarray]:
    """All pairs of legs (p, q), p < q, that share their centre atom; pairs must be sorted by i."""
    counts = np.bincount(pair_i, minlength=n_atoms)
    block_end = np.cumsum(counts)[pair_i]  # one past the last pair of the same centre
    n_after = block_end - np.arange(len(pair_i)) - 1
    first = np.repeat(np.arange(len(pair_i)), n_after)
    starts = np.repeat(np.cumsum(n_after) - n_after, n_after)
    second = first + 1 + (np.arange(len(first)) - starts)
    return first, second


def build_graph(
    images: Sequence[Atoms],
    sf: SymmetryFunctions,
    *,
    skin: float = 0.0,
    check: bool = True,
    names: Sequence[str] | None = None,
) -> NeighborGraph:
    """Build one :class:`NeighborGraph` for a batch of structures, with pairs within cutoff + skin.

    Triplets whose third side (j–k) is longer than cutoff + skin are dropped here: their cutoff
    factor fc(R_jk) is exactly zero while no atom moves more than skin / 2.
    """
    reach = sf.cutoff + skin
    F, h2, h4, n_el = sf.n_features, len(sf.g2_etas), sf.n_angular_terms, len(sf.elements)
    parts: dict[str, list] = {k: [] for k in ("pos", "spec", "batch", "i", "j", "off", "a", "b", "nat", "c2", "c4")}
    n0 = p0 = 0
    for s, atoms in enumerate(images):
        where = names[s] if names is not None else f"structure {s}"
        if len(atoms) == 0:
            raise ValueError(f"{where} has no atoms")
        species = species_indices(atoms, sf.elements, where)
        i, j, d, offset = _pairs(atoms, reach)
        order = np.argsort(i, kind="stable")
        i, j, d, offset = i[order], j[order], d[order], offset[order]
        if check:
            check_overlaps(atoms, i, j, d, where)
        a, b = _triplets(i, len(atoms))
        v_jk = atoms.positions[j[b]] + offset[b] - atoms.positions[j[a]] - offset[a]
        keep = np.einsum("tx,tx->t", v_jk, v_jk) < reach**2
        a, b = a[keep], b[keep]
        sj, sk = species[j[a]], species[j[b]]
        lo, hi = np.minimum(sj, sk), np.maximum(sj, sk)
        pair_index = lo * n_el - lo * (lo - 1) // 2 + (hi - lo)  # position of (lo, hi) in element_pairs
        parts["c2"].append(((i + n0) * F + species[j] * h2)[:, None] + np.arange(h2))
        parts["c4"].append(((i[a] + n0) * F + sf.n_radial + pair_index * h4)[:, None] + np.arange(h4))
        parts["pos"].append(atoms.positions)
        parts["spec"].append(species)
        parts["batch"].append(np.full(len(atoms), s))
        parts["i"].append(i + n0)
        parts["j"].append(j + n0)
        parts["off"].append(offset)
        parts["a"].append(a + p0)
        parts["b"].append(b + p0)
        parts["nat"].append([len(atoms)])
        n0 += len(atoms)
        p0 += len(i)

    def cat(key, dtype, shape=(-1,)):
        return torch.from_numpy(np.concatenate(parts[key]).astype(dtype)).reshape(shape)

    return NeighborGraph(
        positions=cat("pos", np.float64, (-1, 3)),
        species=cat("spec", np.int64),
        batch=cat("batch", np.int64),
        n_structures=len(images),
        pair_i=cat("i", np.int64),
        pair_j=cat("j", np.int64),
        pair_offset=cat("off", np.float64, (-1, 3)),
        triplet_ij=cat("a", np.int64),
        triplet_ik=cat("b", np.int64),
        n_atoms=cat("nat", np.int64),
        radial_index=cat("c2", np.int64, (-1, h2)),
        angular_index=cat("c4", np.int64, (-1, h4)),
    )


# ---------------------------------------------------------------------------------------------
# The equations. Every G2 term is a function of R_ij² alone and every G4 term of the three
# invariants (R_ij², R_ik², r_ij·r_ik) of its angle, which makes exact derivatives cheap.
# ---------------------------------------------------------------------------------------------


def cosine_cutoff(r: torch.Tensor, cutoff: float) -> torch.Tensor:
    """fc(r) = ½ (cos(π r / Rc) + 1) for r < Rc, else 0. Any shape."""
    return 0.5 * (torch.cos(r.clamp_max(cutoff) * (math.pi / cutoff)) + 1.0)


def _integer_power(x: torch.Tensor, n: float) -> torch.Tensor:
    """x ** n, by repeated squaring for small non-negative integers."""
    if n == 0:
        return torch.ones_like(x)
    if not (float(n).is_integer() and 1 <= n <= 64):
        return x**n
    out, acc, k = None, x, int(n)
    while k:
        if k & 1:
            out = acc if out is None else out * acc
        k >>= 1
        if k:
            acc = acc * acc
    return out


def _power(x: torch.Tensor, zeta: torch.Tensor) -> torch.Tensor:
    """x ** zeta with one exponent per channel (the last dimension of x)."""
    out = None
    for z in sorted(set(zeta.tolist())):
        xz = _integer_power(x, z)
        out = xz if out is None else torch.where(zeta == z, xz, out)
    return out


def radial_terms(r2: torch.Tensor, etas: torch.Tensor, cutoff: float) -> torch.Tensor:
    """G2 pair terms exp(−η R²) fc(R) with Rs = 0.

    r2: [P, 1] (or [P, H2], one copy per channel); etas: [H2] → [P, H2].
    """
    return torch.exp(-etas * r2) * cosine_cutoff(torch.sqrt(r2), cutoff)


def angular_terms(
    u: torch.Tensor, w: torch.Tensor, s: torch.Tensor, channels: dict[str, torch.Tensor], cutoff: float
) -> torch.Tensor:
    """G4 triplet terms 2^(1−ζ) (1 + λ cosθ)^ζ exp(−η (R_ij² + R_ik² + R_jk²)) fc_ij fc_ik fc_jk.

    u = R_ij², w = R_ik², s = r_ij·r_ik: [T, 1] (or [T, H4]); hence cosθ = s / √(u w) and
    R_jk² = u + w − 2s. ``channels`` holds η, ζ, λ per channel, each [H4] → [T, H4].
    """
    r_ij, r_ik = torch.sqrt(u), torch.sqrt(w)
    r2_jk = u + w - 2.0 * s
    fc = cosine_cutoff(r_ij, cutoff) * cosine_cutoff(r_ik, cutoff) * cosine_cutoff(torch.sqrt(r2_jk), cutoff)
    base = (1.0 + channels["lambda"] * (s / (r_ij * r_ik))).clamp_min(0.0)
    return channels["norm"] * _power(base, channels["zeta"]) * torch.exp(-channels["eta"] * (u + w + r2_jk)) * fc


def pair_vectors(graph: NeighborGraph, positions: torch.Tensor) -> torch.Tensor:
    """r_ij = x_j − x_i + image offset: [P, 3]."""
    return positions.index_select(0, graph.pair_j) - positions.index_select(0, graph.pair_i) + graph.pair_offset


MAX_ZETA = 64  # the largest G4 ζ (also the largest the compiled kernels raise by repeated products)


@functools.lru_cache(maxsize=32)
def _channels(sf: SymmetryFunctions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """G2 η [H2] and G4 (η, ζ, λ, 2^(1−ζ)) per channel [H4], η divided by Rc² (AMP convention)."""
    rc2 = sf.cutoff**2
    combos = [(e, z, lam) for e in sf.g4_etas for z in sf.g4_zetas for lam in sf.g4_lambdas]
    col = lambda k: torch.tensor([c[k] for c in combos], dtype=DTYPE)  # noqa: E731
    g4 = {"eta": col(0) / rc2, "zeta": col(1), "lambda": col(2)}
    g4["norm"] = 2.0 ** (1.0 - g4["zeta"])
    distinct = sorted(set(sf.g4_etas))
    g4["etas"] = torch.tensor(distinct, dtype=DTYPE) / rc2
    g4["eta_of"] = torch.tensor([distinct.index(c[0]) for c in combos])
    g4["zeta_int"] = torch.tensor([int(z) if float(z).is_integer() and 0 <= z <= MAX_ZETA else -1 for z in g4["zeta"].tolist()])
    return torch.tensor(sf.g2_etas, dtype=DTYPE) / rc2, g4


def _invariants(graph: NeighborGraph, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """R² of every pair [P] and (R_ij², R_ik², r_ij·r_ik) of every triplet, each [T]."""
    r2 = (vec * vec).sum(-1)
    va, vb = vec.index_select(0, graph.triplet_ij), vec.index_select(0, graph.triplet_ik)
    return r2, r2.index_select(0, graph.triplet_ij), r2.index_select(0, graph.triplet_ik), (va * vb).sum(-1)


def _scatter(sf: SymmetryFunctions, graph: NeighborGraph, t2: torch.Tensor, t4: torch.Tensor) -> torch.Tensor:
    """Sum pair terms [P, H2] and triplet terms [T, H4] into per-atom features [N, F]."""
    out = torch.zeros(graph.n * sf.n_features, dtype=DTYPE)
    out = out.index_add(0, graph.radial_index.flatten(), t2.flatten())
    out = out.index_add(0, graph.angular_index.flatten(), t4.flatten())
    return out.view(graph.n, sf.n_features)


def symmetry_functions(sf: SymmetryFunctions, graph: NeighborGraph, positions: torch.Tensor) -> torch.Tensor:
    """All G2 and G4 features of every atom: positions [N, 3] → [N, F], differentiable.

    Feature order: G2 by (neighbour element, η); then G4 by (unordered element pair, η, ζ, λ).
    This is the plain autograd path; :func:`descriptors_with_derivatives` is the fast one.
    """
    g2, g4 = _channels(sf)
    r2, u, w, s = _invariants(graph, pair_vectors(graph, positions))
    t2 = radial_terms(r2.unsqueeze(-1), g2, sf.cutoff)
    t4 = angular_terms(u.unsqueeze(-1), w.unsqueeze(-1), s.unsqueeze(-1), g4, sf.cutoff)
    return _scatter(sf, graph, t2, t4)


@dataclass
class DescriptorDerivatives:
    """Descriptors and the exact derivatives of every term with respect to its invariants.

    vec [P, 3]; d_radial [P, H2] = ∂t2/∂R²; d_angular [3, T, H4] = ∂t4/∂(R_ij², R_ik², r_ij·r_ik).
    With these, any vector–Jacobian product (forces of many ensemble members at once, the full
    Jacobian for training) is three sparse products instead of a batched backward pass.
    """

    features: torch.Tensor  # [N, F]
    vec: torch.Tensor
    d_radial: torch.Tensor
    d_angular: torch.Tensor


def frame_features(frames: Sequence[Atoms], sf: SymmetryFunctions) -> np.ndarray:
    """Every frame's descriptors of all its atoms, flattened: [n_frames, n_atoms * F] (the frames
    of one trajectory or band: the same atoms in the same order). The ``diversity`` query's space."""
    n = len(frames[0]) if len(frames) else 0
    if any(len(f) != n for f in frames):
        raise ValueError("frame_features needs frames with the same atoms (one trajectory or band)")
    if not n:
        return np.zeros((len(frames), 0))
    graph = build_graph(frames, sf, check=False)
    return symmetry_functions(sf, graph, graph.positions).detach().numpy().reshape(len(frames), n * sf.n_features)


def _cutoff_and_slope(r: torch.Tensor, cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fc(r) and dfc/dr / (2r) = dfc/d(r²), both zero beyond the cutoff."""
    x = r.clamp_max(cutoff) * (math.pi / cutoff)
    return 0.5 * (torch.cos(x) + 1.0), -0.25 * (math.pi / cutoff) * torch.sin(x) / r


def descriptors_with_derivatives(sf: SymmetryFunctions, graph: NeighborGraph) -> DescriptorDerivatives:
    """Features [N, F] and the derivatives of every term with respect to its invariants.

    The derivatives of :func:`radial_terms` (vectorised here) and :func:`angular_terms` (a
    compiled loop over triplets, :mod:`alflow.model.kernels`) are written out in closed form:
    autograd through the ~8,000 triplets of the 13-atom slab cost 4 ms a call against 1 ms for
    an EMT call. The autograd path (:func:`symmetry_functions`) remains the reference; the tests
    hold the two to 1e-10.
    """
    g2, g4 = _channels(sf)
    vec = pair_vectors(graph, graph.positions)
    r2 = (vec * vec).sum(-1)
    fc, dfc = _cutoff_and_slope(torch.sqrt(r2), sf.cutoff)  # [P], dfc = dfc/d(R²)
    gauss = torch.exp(-g2 * r2.unsqueeze(-1))  # [P, H2]
    t2 = gauss * fc.unsqueeze(-1)
    d_radial = gauss * (dfc.unsqueeze(-1) - g2 * fc.unsqueeze(-1))
    t4, d_angular = kernels.angular_terms_and_derivatives(
        r2.numpy(), fc.numpy(), dfc.numpy(), vec.numpy(), graph.triplet_ij.numpy(), graph.triplet_ik.numpy(),
        *(g4[k].numpy() for k in ("etas", "eta_of", "zeta", "zeta_int", "lambda", "norm")), float(sf.cutoff),
    )
    t4, d_angular = torch.from_numpy(t4), torch.from_numpy(d_angular)
    return DescriptorDerivatives(_scatter(sf, graph, t2, t4), vec, d_radial, d_angular)


def _csr_pattern(rows: np.ndarray, cols: np.ndarray, n_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR row pointers and columns for COO entries, and the order that sorts values into them."""
    order = np.lexsort((cols, rows))
    crow = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_rows))])
    return torch.from_numpy(crow), torch.from_numpy(cols[order]), torch.from_numpy(order)


@dataclass
class ContractionPlan:
    """Fixed sparsity patterns of one neighbour graph for :func:`descriptor_jacobian` (training).

    to_invariants [P + 3T, N·F]: where each term sits in the feature array (values: the
    invariant derivatives); to_pairs [3P, P + 3T]: chain rule from (R², u, w, s) to pair vectors
    (values: pair vector components); to_atoms [3N, 3P]: r_ij = x_j − x_i + offset.
    """

    inv_crow: torch.Tensor
    inv_col: torch.Tensor
    pair_crow: torch.Tensor
    pair_col: torch.Tensor
    pair_source: torch.Tensor  # flat index into vec [P·3] of each to_pairs entry
    pair_coef: torch.Tensor
    to_atoms: torch.Tensor
    n_columns: int


def contraction_plan(graph: NeighborGraph, n_features: int) -> ContractionPlan:
    """Precompute the sparse patterns of the Jacobian factors (and to_atoms, for pair potentials)."""
    P, h2 = graph.radial_index.shape
    T, h4 = graph.angular_index.shape
    i, j = graph.pair_i.numpy(), graph.pair_j.numpy()
    ta, tb = graph.triplet_ij.numpy(), graph.triplet_ik.numpy()
    x3 = np.arange(3)
    t_rows = lambda legs: (legs[:, None] * 3 + x3).ravel()  # noqa: E731
    t_cols = lambda block: np.repeat(P + block * T + np.arange(T), 3)  # noqa: E731
    # chain rule of R² = r·r, u = r_ij·r_ij, w = r_ik·r_ik, s = r_ij·r_ik: each entry is a
    # coefficient times one component of one pair vector (its flat index in ``vec``)
    rows = np.concatenate([np.arange(3 * P), t_rows(ta), t_rows(tb), t_rows(ta), t_rows(tb)])
    cols = np.concatenate([np.repeat(np.arange(P), 3), t_cols(0), t_cols(1), t_cols(2), t_cols(2)])
    src = np.concatenate([np.arange(3 * P), t_rows(ta), t_rows(tb), t_rows(tb), t_rows(ta)])
    coef = np.concatenate([np.full(3 * (P + 2 * T), 2.0), np.ones(6 * T)])
    pair_crow, pair_col, pair_order = _csr_pattern(rows, cols, 3 * P)
    a_rows = np.concatenate([(j[:, None] * 3 + x3).ravel(), (i[:, None] * 3 + x3).ravel()])
    a_cols = np.tile(np.arange(3 * P), 2)
    atom_crow, atom_col, atom_order = _csr_pattern(a_rows, a_cols, 3 * graph.n)
    signs = torch.from_numpy(np.concatenate([np.ones(3 * P), -np.ones(3 * P)]))[atom_order]
    return ContractionPlan(
        inv_crow=torch.cat([torch.arange(0, P * h2, h2), P * h2 + torch.arange(0, 3 * T * h4 + 1, h4)]),
        inv_col=torch.cat([graph.radial_index.flatten(), graph.angular_index.flatten().repeat(3)]),
        pair_crow=pair_crow,
        pair_col=pair_col,
        pair_source=torch.from_numpy(src[pair_order.numpy()]),
        pair_coef=torch.from_numpy(coef[pair_order.numpy()]),
        to_atoms=torch.sparse_csr_tensor(atom_crow, atom_col, signs, (3 * graph.n, 3 * P)),
        n_columns=graph.n * n_features,
    )


def _factors(graph: NeighborGraph, plan: ContractionPlan, d: DescriptorDerivatives) -> tuple[torch.Tensor, torch.Tensor]:
    """The geometry-dependent sparse factors: to_invariants [P + 3T, N·F] and to_pairs [3P, P + 3T]."""
    P, T = graph.pair_i.shape[0], graph.triplet_ij.shape[0]
    to_inv = torch.sparse_csr_tensor(
        plan.inv_crow, plan.inv_col, torch.cat([d.d_radial.flatten(), d.d_angular.flatten()]),
        (P + 3 * T, plan.n_columns),
    )
    values = d.vec.flatten().index_select(0, plan.pair_source) * plan.pair_coef
    to_pairs = torch.sparse_csr_tensor(plan.pair_crow, plan.pair_col, values, (3 * P, P + 3 * T))
    return to_inv, to_pairs


def positions_vjp(
    graph: NeighborGraph,
    d: DescriptorDerivatives,
    cot: torch.Tensor,
    pair_grad: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_(n,f) cot[b, n, f] ∂G[n,f]/∂x for B cotangents at once: cot [B, N, F] → [B, N, 3].

    With cot = ∂E_m/∂G of every ensemble member m this is −(forces) of all members in one pass
    over pairs and triplets (:func:`alflow.model.kernels.positions_vjp`). ``pair_grad`` [P, 3],
    a gradient with respect to the pair vectors shared by all B (a pair potential), is added.
    """
    if pair_grad is None:
        pair_grad = torch.zeros_like(d.vec)
    out = kernels.positions_vjp(
        cot.detach().reshape(cot.shape[0], -1).contiguous().numpy(), graph.radial_index.numpy(), d.d_radial.numpy(),
        graph.angular_index.numpy(), d.d_angular.numpy(), d.vec.numpy(), graph.pair_i.numpy(),
        graph.pair_j.numpy(), graph.triplet_ij.numpy(), graph.triplet_ik.numpy(),
        pair_grad.detach().contiguous().numpy(), graph.n,
    )
    return torch.from_numpy(out)


def descriptor_jacobian(graph: NeighborGraph, plan: ContractionPlan, d: DescriptorDerivatives) -> torch.Tensor:
    """dG/dx as a sparse CSR matrix [3N, N·F] (row 3n + k: coordinate k of atom n), for training."""
    to_inv, to_pairs = _factors(graph, plan, d)
    return plan.to_atoms @ (to_pairs @ to_inv)
