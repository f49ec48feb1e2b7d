"""Element networks: one MLP per element; E = Σ_atoms s · MLP_element(x_atom) (Behler–Parrinello).

:class:`ElementNetwork` is one ensemble member (trained on its own with LBFGS);
:class:`StackedNetworks` evaluates M trained members at once with batched matrix products
and returns each member's energy and its gradient with respect to the features.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from alflow.model.descriptors import DTYPE


class FeatureScaler:
    """Per-element min–max scaling of descriptors to [−1, 1] on the training set.

    min, inv_range: [n_elements, F]. A feature's range is floored at ``relative_floor`` (default
    5 %) of its magnitude, so a channel that barely varies in the training data (one structure,
    two near-identical ones) is not stretched by orders of magnitude; a channel that is always
    zero gets range 1. With a floor of 1 a non-negative feature (every G2/G4) is scaled by its
    magnitude, not its spread: small training sets then extrapolate far more gently
    (benchmarks/README.md, "feature range floor").
    """

    RELATIVE_FLOOR = 0.05

    def __init__(self, minimum: torch.Tensor, inv_range: torch.Tensor):
        self.minimum = minimum
        self.inv_range = inv_range

    @classmethod
    def fit(cls, features: torch.Tensor, species: torch.Tensor, n_elements: int,
            relative_floor: float = RELATIVE_FLOOR) -> "FeatureScaler":
        F = features.shape[1]
        lo = torch.zeros(n_elements, F, dtype=DTYPE)
        inv = torch.ones(n_elements, F, dtype=DTYPE)
        for e in range(n_elements):
            x = features[species == e]
            if len(x):
                lo[e] = x.min(0).values
                floor = relative_floor * x.abs().max(0).values
                span = torch.maximum(x.max(0).values - lo[e], floor)
                inv[e] = torch.where(floor > 1e-8, 1.0 / span.clamp_min(1e-300), torch.ones_like(span))
        return cls(lo, inv)

    def __call__(self, features: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """Scaled features x = 2 (G − min) / range − 1: [N, F]."""
        return 2.0 * (features - self.minimum[species]) * self.inv_range[species] - 1.0

    def jacobian(self, species: torch.Tensor) -> torch.Tensor:
        """dx/dG per atom and feature: [N, F]."""
        return 2.0 * self.inv_range[species]

    def state(self) -> dict[str, torch.Tensor]:
        return {"minimum": self.minimum, "inv_range": self.inv_range}


def element_mlp(n_features: int, hidden: Sequence[int], generator: torch.Generator) -> nn.Sequential:
    """fp → hidden… → 1 with tanh, float64, Xavier-initialised from ``generator``."""
    layers: list[nn.Module] = []
    sizes = [n_features, *hidden, 1]
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(n_in, n_out, dtype=DTYPE)
        with torch.no_grad():
            bound = (6.0 / (n_in + n_out)) ** 0.5
            lin.weight.copy_((torch.rand(n_out, n_in, generator=generator, dtype=DTYPE) * 2 - 1) * bound)
            lin.bias.zero_()
        layers.append(lin)
        if k < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class ElementNetwork(nn.Module):
    """One ensemble member: an MLP per element giving atomic energies (in units of the energy scale)."""

    def __init__(self, elements: Sequence[str], n_features: int, hidden: Sequence[int], seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.elements = tuple(elements)
        self.mlps = nn.ModuleList(element_mlp(n_features, hidden, generator) for _ in self.elements)

    def forward(self, x: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """Atomic outputs: x [N, F] (scaled features), species [N] → [N]."""
        out = torch.zeros(x.shape[0], dtype=DTYPE)
        for e, mlp in enumerate(self.mlps):
            idx = torch.nonzero(species == e).flatten()
            if len(idx):
                out = out.index_put((idx,), mlp(x.index_select(0, idx)).squeeze(-1))
        return out


class StackedNetworks:
    """M trained :class:`ElementNetwork` members evaluated together (weights stacked per element)."""

    def __init__(self, members: Sequence[ElementNetwork]):
        self.n_members = len(members)
        self.layers = []  # per element: [(W [M, in, out], b [M, 1, out]), ...]
        for e in range(len(members[0].mlps)):
            linears = [[m for m in member.mlps[e] if isinstance(m, nn.Linear)] for member in members]
            self.layers.append(
                [
                    (
                        torch.stack([lin[k].weight.detach().T for lin in linears]).contiguous(),
                        torch.stack([lin[k].bias.detach() for lin in linears]).unsqueeze(1),
                    )
                    for k in range(len(linears[0]))
                ]
            )

    def energies_and_gradients(self, x: torch.Tensor, species: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Atomic outputs of each member and the gradient of their sum: x [N, F] → ([M, N], [M, N, F])."""
        atomic = torch.zeros(self.n_members, x.shape[0], dtype=DTYPE)
        grad = torch.zeros(self.n_members, *x.shape, dtype=DTYPE)
        for e, layers in enumerate(self.layers):
            idx = torch.nonzero(species == e).flatten()
            if not len(idx):
                continue
            h = x.index_select(0, idx).expand(self.n_members, -1, -1)
            acts = []
            for W, b in layers[:-1]:
                h = torch.tanh(torch.baddbmm(b, h, W))
                acts.append(h)
            W, b = layers[-1]
            atomic[:, idx] = (torch.bmm(h, W) + b).squeeze(-1)
            # backward by hand through tanh layers: dE/dh = W_out; dh/dz = 1 − h²
            g = W.transpose(1, 2).expand(-1, len(idx), -1)
            for (W_k, _), h_k in zip(reversed(layers[:-1]), reversed(acts)):
                g = torch.bmm(g * (1.0 - h_k * h_k), W_k.transpose(1, 2))
            grad[:, idx] = g
        return atomic, grad
