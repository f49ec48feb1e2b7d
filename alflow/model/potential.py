"""DeltaPotential: Morse prior + per-element reference energies + Behler–Parrinello NN ensemble.

    E = E_Morse + Σ_atoms e_ref[element] + s · Σ_atoms NN_element(x_atom)

Extensive by construction (every term is a sum over atoms or pairs). The reference energies are
a least-squares fit of E_DFT − E_Morse to the element counts of the training set (minimum-norm
when the set has a single composition), which generalises the paper's "first structure" shift.

Saved as one zip file: ``metadata.json`` (format, version, settings, descriptor, Morse table,
training report; readable with ``unzip -p model.alflow metadata.json``) and ``weights.pt``
(tensors only, loaded with ``weights_only=True``).
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from ase import Atoms

from alflow.constraints import free_mask
from alflow.model.descriptors import (
    DTYPE,
    NeighborGraph,
    SymmetryFunctions,
    build_graph,
    contraction_plan,
    descriptor_jacobian,
    descriptors_with_derivatives,
    positions_vjp,
)
from alflow.model.ensemble import EnsemblePrediction, bootstrap_weights, ensemble_statistics
from alflow.model.morse import DEFAULT_SWITCH_WIDTH, MorseParameters, MorsePrior
from alflow.model.network import ElementNetwork, FeatureScaler, StackedNetworks
from alflow.model.training import TrainingData, TrainingSettings, train_member

FORMAT = "alflow-delta-potential"
FORMAT_VERSION = 1


class UnknownFormatError(ValueError):
    """A saved potential that this version of alflow cannot read."""


def _labels(images: Sequence[Atoms]) -> tuple[np.ndarray, np.ndarray]:
    """Energies [S] and stacked forces [N, 3] attached to the images, with a clear error if absent."""
    energies, forces = [], []
    for k, atoms in enumerate(images):
        calc = atoms.calc
        results = getattr(calc, "results", {}) if calc is not None else {}
        if "energy" not in results or "forces" not in results:
            raise ValueError(
                f"training structure {k} ({atoms.get_chemical_formula()}) has no energy and forces attached "
                "(attach them with a SinglePointCalculator or an oracle calculation)"
            )
        changed = calc.check_state(atoms) if getattr(calc, "atoms", None) is not None else []
        if changed:
            raise ValueError(
                f"training structure {k} ({atoms.get_chemical_formula()}): its energy and forces were computed "
                f"for another structure (changed since: {', '.join(changed)})"
            )
        energies.append(float(results["energy"]))
        forces.append(np.asarray(results["forces"], dtype=float).reshape(len(atoms), 3))
    return np.array(energies), np.concatenate(forces)


@dataclass
class Evaluation:
    """Member energies [M, S] and forces [M, N, 3] of a batch of structures."""

    energies: torch.Tensor
    forces: torch.Tensor


class DeltaPotential:
    """Δ-ML potential on a Morse prior with a bootstrap ensemble of element networks.

    Parameters other than ``elements`` default to the published model: G2/G4 at Rc = 6 Å,
    fp → 20 → 20 → 1 tanh networks, α = 0.04, LBFGS with cosine warm restarts, 5 members.
    ``prior=None`` gives a plain BPNN (the paper's contrast).
    """

    def __init__(
        self,
        elements: Sequence[str],
        prior: str | None = "morse",
        ensemble: int = 5,
        seed: int = 0,
        *,
        descriptor: SymmetryFunctions | Mapping | None = None,
        hidden: Sequence[int] = (20, 20),
        morse_params: Mapping[str, MorseParameters | Mapping] | None = None,
        morse_switch_width: float = DEFAULT_SWITCH_WIDTH,
        training: TrainingSettings | Mapping | None = None,
    ):
        if prior not in ("morse", None):
            raise ValueError(f"prior must be 'morse' or None, got {prior!r}")
        if int(ensemble) < 1:
            raise ValueError(f"ensemble must be >= 1, got {ensemble}")
        self.elements = tuple(elements)
        if isinstance(descriptor, Mapping):
            descriptor = SymmetryFunctions.from_dict(descriptor)
        self.descriptor = descriptor or SymmetryFunctions(self.elements)
        if self.descriptor.elements != self.elements:
            raise ValueError(f"descriptor elements {self.descriptor.elements} differ from {self.elements}")
        self.prior = prior
        self.n_members = int(ensemble)
        self.seed = int(seed)
        self.hidden = tuple(int(h) for h in hidden)
        self.training = TrainingSettings(**training) if isinstance(training, Mapping) else training or TrainingSettings()
        self.morse = (
            MorsePrior(self.elements, morse_params, self.descriptor.cutoff, morse_switch_width)
            if prior == "morse"
            else None
        )
        self.members: list[ElementNetwork] = []
        self.scaler: FeatureScaler | None = None
        self.reference_energies = torch.zeros(len(self.elements), dtype=DTYPE)
        self.energy_scale = 1.0
        self.report: dict = {}
        self.histories: list = []  # TrainingHistory per member of the last fit
        self._stacked: StackedNetworks | None = None

    # ----------------------------------------------------------------------------------------
    @property
    def is_trained(self) -> bool:
        return self._stacked is not None

    def member_seeds(self) -> list[int]:
        """Independent, reproducible seeds for each member (numpy SeedSequence spawned from ``seed``)."""
        return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(self.seed).spawn(self.n_members)]

    def _prior(self, graph: NeighborGraph, vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prior energies [S] and dE/d(pair vector) [P, 3] (both zero without a prior)."""
        energies = torch.zeros(graph.n_structures, dtype=DTYPE)
        if self.morse is None:
            return energies, torch.zeros_like(vec)
        v, dv_dr2 = self.morse.pair_energy((vec * vec).sum(-1), graph.species[graph.pair_i], graph.species[graph.pair_j])
        # each pair appears twice (i→j and j→i): E = ½ Σ V, dE/dr_p = ½ · dV/dr² · 2 r_p
        energies = energies.index_add(0, graph.batch[graph.pair_i], 0.5 * v)
        return energies, dv_dr2.unsqueeze(-1) * vec

    def _baseline(self, graph: NeighborGraph):
        """Prior + reference energies [S], prior dE/d(pair vectors) [P, 3] and the descriptor derivatives."""
        d = descriptors_with_derivatives(self.descriptor, graph)
        e_prior, pair_grad = self._prior(graph, d.vec)
        e_ref = torch.zeros(graph.n_structures, dtype=DTYPE).index_add(
            0, graph.batch, self.reference_energies[graph.species]
        )
        return e_prior + e_ref, pair_grad, d

    # ----------------------------------------------------------------------------------------
    def _training_data(
        self, images: list[Atoms], renormalise: bool = True
    ) -> tuple[TrainingData, NeighborGraph, torch.Tensor, torch.Tensor]:
        """The fixed data to fit on ``images``; with ``renormalise``, first set the reference
        energies, energy scale and feature scaler from them (a warm start keeps the old ones).

        Returns the data, its graph, and the labelled energies [S] and forces [N, 3].
        """
        energies, forces = (torch.from_numpy(x) for x in _labels(images))
        graph = build_graph(images, self.descriptor, names=[f"training structure {k}" for k in range(len(images))])
        free = torch.from_numpy(np.concatenate([free_mask(a) for a in images]))
        if renormalise:
            self.reference_energies = torch.zeros(len(self.elements), dtype=DTYPE)  # baseline = prior only
        e_base, pair_grad, d = self._baseline(graph)
        plan = contraction_plan(graph, self.descriptor.n_features)
        f_res = forces + (plan.to_atoms @ pair_grad.reshape(-1, 1)).view(-1, 3)  # F − F_prior
        if renormalise:
            counts = torch.zeros(graph.n_structures, len(self.elements), dtype=DTYPE)
            counts.index_put_((graph.batch, graph.species), torch.ones(graph.n, dtype=DTYPE), accumulate=True)
            self.reference_energies = torch.linalg.pinv(counts) @ (energies - e_base)
            e_base = e_base + counts @ self.reference_energies
        e_res = energies - e_base
        if renormalise:
            # energy scale: spread of the residual per atom or of the residual forces, floored at 10 meV
            per_atom = e_res / graph.n_atoms.to(DTYPE)
            spread = float(per_atom.std()) if len(per_atom) > 1 else 0.0
            f_rms = float(f_res[free].pow(2).mean().sqrt()) if free.any() else 0.0
            self.energy_scale = max(spread, f_rms, 0.01)
            self.scaler = FeatureScaler.fit(d.features, graph.species, len(self.elements),
                                            self.training.range_floor(len(images)))
        jac = descriptor_jacobian(graph, plan, d)
        data = TrainingData(
            features=d.features, species=graph.species, batch=graph.batch, n_atoms=graph.n_atoms,
            jacobian=jac, jacobian_t=jac.to_sparse_coo().t().coalesce().to_sparse_csr(),
            energy_residual=e_res, force_residual=f_res, free=free,
            scaler=self.scaler, energy_scale=self.energy_scale,
        )
        return data, graph, energies, forces

    def fit(self, images: Sequence[Atoms], warm_start: bool = False) -> "DeltaPotential":
        """Train all members on ``images`` (ASE Atoms with energy and forces attached).

        ``warm_start`` (on a trained potential): keep the normalisation and continue every member
        from its current weights for ``training.warm_epochs`` epochs — the online learner's refit
        after each new label, instead of training from scratch.
        """
        images = list(images)
        if not images:
            raise ValueError("empty training set: fit() needs at least one structure with energy and forces")
        warm = warm_start and self.is_trained
        data, graph, energies, forces = self._training_data(images, renormalise=not warm)
        settings = replace(self.training, epochs=self.training.warm_epochs) if warm else self.training
        members = self.members if warm else [
            ElementNetwork(self.elements, self.descriptor.n_features, self.hidden, seed) for seed in self.member_seeds()
        ]
        self.histories = []
        for net, seed in zip(members, self.member_seeds()):
            draw = torch.Generator().manual_seed(seed + len(images))  # a fresh, reproducible bootstrap per set
            w_e, w_f = bootstrap_weights(len(images), int(data.free.sum()), draw) if settings.bootstrap else (
                torch.ones(len(images), dtype=DTYPE), torch.ones(int(data.free.sum()), dtype=DTYPE))
            self.histories.append(train_member(net, data, w_e, w_f, settings))
        self.members = members
        self._stacked = StackedNetworks(self.members)

        pred = self.evaluate(graph)
        e_mean, f_mean = pred.energies.mean(0), pred.forces.mean(0)
        self.report = {
            "n_structures": len(images),
            "n_atoms": int(graph.n),
            "warm_start": warm,
            "energy_mae_per_atom": float(((e_mean - energies).abs() / graph.n_atoms.to(DTYPE)).mean()),
            "force_mae": float((f_mean - forces)[data.free].abs().mean()) if data.free.any() else 0.0,
            "epochs": [len(h.loss) for h in self.histories],
            "final_loss": [h.loss[-1] for h in self.histories],
            "evaluations": [h.evaluations for h in self.histories],
        }
        return self

    # ----------------------------------------------------------------------------------------
    def evaluate(self, graph: NeighborGraph) -> Evaluation:
        """Energies [M, S] and forces [M, N, 3] of every member for the structures of ``graph``."""
        if not self.is_trained:
            raise RuntimeError("the potential is not trained: call fit() or load() first")
        baseline, pair_grad, d = self._baseline(graph)
        x = self.scaler(d.features, graph.species)
        atomic, grad = self._stacked.energies_and_gradients(x, graph.species)  # [M, N], [M, N, F]
        M = atomic.shape[0]
        energies = torch.zeros(M, graph.n_structures, dtype=DTYPE).index_add(1, graph.batch, atomic)
        cot = grad * (self.energy_scale * self.scaler.jacobian(graph.species))  # ∂E_m/∂G [M, N, F]
        forces = -positions_vjp(graph, d, cot, pair_grad)  # [M, N, 3]
        return Evaluation(self.energy_scale * energies + baseline, forces)

    def predict(self, images: Sequence[Atoms] | Atoms) -> list[EnsemblePrediction]:
        """Ensemble mean, spread and uncertainty for each structure (batched in one pass)."""
        images = [images] if isinstance(images, Atoms) else list(images)
        if not images:
            return []
        graph = build_graph(images, self.descriptor)
        ev = self.evaluate(graph)
        out, start = [], 0
        for s, atoms in enumerate(images):
            n = len(atoms)
            out.append(ensemble_statistics(ev.energies[:, s], ev.forces[:, start : start + n], torch.from_numpy(free_mask(atoms))))
            start += n
        return out

    def calculator(self, **kwargs):
        """An ASE calculator backed by this potential (see :class:`alflow.model.calculator.DeltaCalculator`)."""
        from alflow.model.calculator import DeltaCalculator

        return DeltaCalculator(self, **kwargs)

    # ----------------------------------------------------------------------------------------
    def metadata(self) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "elements": list(self.elements),
            "prior": self.prior,
            "ensemble": self.n_members,
            "seed": self.seed,
            "member_seeds": self.member_seeds(),
            "hidden": list(self.hidden),
            "descriptor": self.descriptor.to_dict(),
            "morse": self.morse.to_dict() if self.morse else None,
            "training": self.training.to_dict(),
            "energy_scale": self.energy_scale,
            "reference_energies": dict(zip(self.elements, self.reference_energies.tolist())),
            "report": self.report,
        }

    def save(self, path: str | Path) -> Path:
        """Write the trained potential to ``path`` (one zip file) and return the path."""
        if not self.is_trained:
            raise RuntimeError("the potential is not trained: nothing to save")
        weights = {f"member{m}.{k}": v for m, net in enumerate(self.members) for k, v in net.state_dict().items()}
        weights.update({f"scaler.{k}": v for k, v in self.scaler.state().items()})
        buf = io.BytesIO()
        torch.save(weights, buf)
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("metadata.json", json.dumps(self.metadata(), indent=1))
            zf.writestr("weights.pt", buf.getvalue())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "DeltaPotential":
        """Read a potential written by :meth:`save`; unknown formats or versions raise a clear error."""
        path = Path(path)
        try:
            with zipfile.ZipFile(path) as zf:
                meta = json.loads(zf.read("metadata.json"))
                weights = torch.load(io.BytesIO(zf.read("weights.pt")), weights_only=True)
        except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as exc:
            raise UnknownFormatError(f"{path}: not an alflow potential file ({exc})") from None
        if meta.get("format") != FORMAT:
            raise UnknownFormatError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
        if meta.get("version") != FORMAT_VERSION:
            raise UnknownFormatError(
                f"{path}: potential file format version {meta.get('version')!r} is not supported "
                f"(this alflow reads version {FORMAT_VERSION})"
            )
        morse = meta["morse"]
        pot = cls(
            meta["elements"], meta["prior"], meta["ensemble"], meta["seed"],
            descriptor=meta["descriptor"], hidden=meta["hidden"],
            morse_params=morse["params"] if morse else None,
            morse_switch_width=morse["switch_width"] if morse else DEFAULT_SWITCH_WIDTH,
            training=meta["training"],
        )
        pot.energy_scale = float(meta["energy_scale"])
        pot.reference_energies = torch.tensor([meta["reference_energies"][e] for e in pot.elements], dtype=DTYPE)
        pot.report = meta["report"]
        pot.scaler = FeatureScaler(weights["scaler.minimum"], weights["scaler.inv_range"])
        for m, seed in enumerate(pot.member_seeds()):
            net = ElementNetwork(pot.elements, pot.descriptor.n_features, pot.hidden, seed)
            prefix = f"member{m}."
            net.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
            pot.members.append(net)
        pot._stacked = StackedNetworks(pot.members)
        return pot
