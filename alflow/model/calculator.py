"""ASE calculator for a trained :class:`~alflow.model.potential.DeltaPotential`.

``results``: energy / free_energy (eV) and forces (eV/Å) are the ensemble means; energy_std,
forces_std [N, 3] and uncertainty (max over free atoms of the per-atom norm of forces_std, eV/Å)
describe the spread. Like every ASE calculator it returns raw forces: ``atoms.get_forces()``
applies the constraints, and fixed atoms are left out of ``uncertainty``.

The neighbour graph (pairs and triplets within cutoff + skin) is kept between calls and rebuilt
only when an atom has moved more than skin / 2 or the cell, pbc or species change; overlapping
atoms are refused on every call, as when the graph is built.

Each call allocates and frees a few arrays of ~1 MB. glibc serves those with mmap and returns them
to the OS on free, so every call paid fresh page faults (about 40 % of the call on the 13-atom
slab). The first calculator therefore raises glibc's mmap and trim thresholds to 256 MB for the
process, keeping freed blocks for reuse. Set ALFLOW_KEEP_MALLOC=1 to leave malloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from alflow.model.descriptors import build_graph, check_overlaps
from alflow.model.ensemble import ensemble_statistics
from alflow.constraints import free_mask
from alflow.model.potential import DeltaPotential


@functools.cache
def keep_freed_memory(threshold: int = 256 << 20) -> bool:
    """Raise glibc's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD (once per process); False elsewhere."""
    if os.environ.get("ALFLOW_KEEP_MALLOC") == "1":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold) and libc.mallopt(M_TRIM_THRESHOLD, threshold))
    except (OSError, AttributeError):  # not glibc
        return False


class DeltaCalculator(Calculator):
    """Ensemble-mean energy and forces of a DeltaPotential, with its uncertainty."""

    implemented_properties = ["energy", "free_energy", "forces", "energy_std", "forces_std", "uncertainty"]

    def __init__(self, potential: DeltaPotential, skin: float = 0.3, **kwargs):
        super().__init__(**kwargs)
        if not potential.is_trained:
            raise ValueError("the potential is not trained: call fit() or load() first")
        if skin < 0:
            raise ValueError(f"skin must be >= 0, got {skin}")
        keep_freed_memory()
        self.potential = potential
        self.skin = float(skin)
        self._graph = None
        self._reference: np.ndarray | None = None  # positions at the last rebuild

    def _graph_for(self, atoms, system_changes):
        structural = {"numbers", "cell", "pbc"} & set(system_changes)
        moved = (
            np.inf
            if self._reference is None or structural
            else float(np.sqrt(((atoms.positions - self._reference) ** 2).sum(1).max(initial=0.0)))
        )
        if moved > 0.5 * self.skin:
            self._graph = build_graph([atoms], self.potential.descriptor, skin=self.skin, names=["structure"])
            self._reference = atoms.positions.copy()
        else:
            g = self._graph
            g.positions = torch.from_numpy(np.ascontiguousarray(atoms.positions, dtype=np.float64))
            # atoms may have closed in by up to the skin since the rebuild checked them
            i, j = g.pair_i.numpy(), g.pair_j.numpy()
            d = np.linalg.norm(atoms.positions[j] + g.pair_offset.numpy() - atoms.positions[i], axis=1)
            check_overlaps(atoms, i, j, d, "structure")
        return self._graph

    def check_state(self, atoms, tol=1e-15):
        """ASE's changes, plus "constraints" when other atoms are fixed: the uncertainty is taken
        over the free atoms only."""
        changes = super().check_state(atoms, tol)
        if self.atoms is not None and not changes and not np.array_equal(free_mask(atoms), free_mask(self.atoms)):
            changes.append("constraints")
        return changes

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        graph = self._graph_for(self.atoms, system_changes)
        ev = self.potential.evaluate(graph)
        pred = ensemble_statistics(ev.energies[:, 0], ev.forces, torch.from_numpy(free_mask(self.atoms)))
        self.results = {
            "energy": pred.energy,
            "free_energy": pred.energy,
            "forces": pred.forces.numpy(),
            "energy_std": pred.energy_std,
            "forces_std": pred.forces_std.numpy(),
            "uncertainty": pred.uncertainty,
        }
