"""Bagging ensembles: bootstrap weights for each member and ensemble statistics.

Members differ in their initial weights (own seed) and in their data: a bootstrap draw over the
structures for the energy terms and over the free atoms for the force terms, so even a training
set of one structure gives members different data (the original code's members were identical).
With ``TrainingSettings.bootstrap = False`` every member fits all the data and members differ by
their seeds only (measured: a better ensemble mean when the training set is a handful of structures).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alflow.model.descriptors import DTYPE


def bootstrap_weights(
    n_structures: int, n_free_atoms: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multiplicities of a bootstrap resample: ([n_structures], [n_free_atoms]), each summing to its n."""

    def draw(n: int) -> torch.Tensor:
        if n == 0:
            return torch.zeros(0, dtype=DTYPE)
        picks = torch.randint(n, (n,), generator=generator)
        return torch.bincount(picks, minlength=n).to(DTYPE)

    return draw(n_structures), draw(n_free_atoms)


@dataclass
class EnsemblePrediction:
    """Mean and spread of M members for one structure (eV, eV/Å).

    ``uncertainty`` = max over free atoms of |σ_F(atom)|, the norm of the per-atom standard
    deviation of the forces across members (eV/Å; 0 for a single member).
    """

    energy: float
    forces: torch.Tensor  # [N, 3]
    energy_std: float
    forces_std: torch.Tensor  # [N, 3]
    uncertainty: float
    member_energies: torch.Tensor  # [M]


def ensemble_statistics(energies: torch.Tensor, forces: torch.Tensor, free: torch.Tensor) -> EnsemblePrediction:
    """energies [M], forces [M, N, 3], free [N] bool → :class:`EnsemblePrediction` (sample std, ddof 1)."""
    m = energies.shape[0]
    correction = 1 if m > 1 else 0
    forces_std = forces.std(0, correction=correction) if m > 1 else torch.zeros_like(forces[0])
    per_atom = torch.linalg.vector_norm(forces_std, dim=-1)[free]
    return EnsemblePrediction(
        energy=float(energies.mean()),
        forces=forces.mean(0),
        energy_std=float(energies.std(correction=correction)) if m > 1 else 0.0,
        forces_std=forces_std,
        uncertainty=float(per_atom.max()) if per_atom.numel() else 0.0,
        member_energies=energies,
    )
