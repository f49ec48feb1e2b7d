"""Full-batch training of one ensemble member: LBFGS with a strong-Wolfe line search.

Loss (the paper's, with bootstrap multiplicities w):
    L = ½ [ Σ_s w_s (ΔE_s / N_s)²  +  (α / 3) Σ_free atoms w_a |ΔF_a|² / N_s(a) ] / (S s²)
where s is the energy scale of the network output (dividing by it conditions the problem; the
minimiser is unchanged). Fixed atoms' forces are not in the loss.

The learning rate follows cosine annealing with warm restarts (T0, Tmult), stepped once per
epoch; with LBFGS it sets the initial trial step of every line search. (The original code passed
the scheduler class instead of an instance and so never applied it.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from alflow.model.descriptors import DTYPE
from alflow.model.network import ElementNetwork, FeatureScaler

AUTO_FLOOR_MIN = FeatureScaler.RELATIVE_FLOOR  # where feature_range_floor "auto" ends (20 structures on)


@dataclass
class TrainingSettings:
    """Optimiser settings; defaults follow the paper (α = 0.04, T0 = 10, Tmult = 2)."""

    epochs: int = 300
    warm_epochs: int = 100  # continuing a trained ensemble on a grown set (online learning)
    force_coefficient: float = 0.04
    learning_rate: float = 1.0
    min_learning_rate: float = 0.05
    restart_period: int = 10
    restart_multiplier: int = 2
    history_size: int = 20
    tolerance: float = 1e-10  # stop when the loss changes less than this (relative) for 10 epochs
    bootstrap: bool = True  # members fit bootstrap resamples (the paper); False: all data, own seeds
    # the descriptor scaling's least range, a fraction of each feature's magnitude; "auto":
    # max(0.05, 1/n) for n training structures (see range_floor)
    feature_range_floor: float | str = 0.05

    def __post_init__(self):
        if self.epochs < 1 or self.warm_epochs < 1:
            raise ValueError(f"epochs and warm_epochs must be >= 1, got {self.epochs}, {self.warm_epochs}")
        if self.force_coefficient < 0:
            raise ValueError(f"force_coefficient must be >= 0, got {self.force_coefficient}")
        if self.feature_range_floor != "auto" and not (
                isinstance(self.feature_range_floor, (int, float)) and self.feature_range_floor > 0):
            raise ValueError(f"feature_range_floor must be > 0 or 'auto', got {self.feature_range_floor!r}")
        if not 0 <= self.min_learning_rate <= self.learning_rate:
            raise ValueError("need 0 <= min_learning_rate <= learning_rate")

    def range_floor(self, n_structures: int) -> float:
        """The descriptor scaling's floor for a fit on ``n_structures``: the setting, or with
        "auto" 1 (scaled by magnitude) for one structure, falling as 1/n to 0.05 from 20 on: the
        early rounds' models extrapolate gently, the late ones keep the resolution of many data."""
        if self.feature_range_floor == "auto":
            return max(AUTO_FLOOR_MIN, 1.0 / max(n_structures, 1))
        return float(self.feature_range_floor)

    def to_dict(self) -> dict:
        return asdict(self)


class SparseLinear(torch.autograd.Function):
    """y = A x for a fixed sparse A, with Aᵀ precomputed for the backward pass."""

    @staticmethod
    def forward(ctx, x, a, a_t):
        ctx.a_t = a_t
        return a @ x

    @staticmethod
    def backward(ctx, grad):
        return ctx.a_t @ grad, None, None


@dataclass
class TrainingData:
    """Everything that stays fixed while the networks train (built once per training set).

    features [N, F], species [N], batch [N], n_atoms [S]; jacobian, jacobian_t: dG/dx as sparse
    [3N, N·F] and its transpose; energy_residual [S] and force_residual [N, 3]: DFT minus prior and
    reference energies (eV, eV/Å); free [N] bool; scaler; energy_scale s (eV).
    """

    features: torch.Tensor
    species: torch.Tensor
    batch: torch.Tensor
    n_atoms: torch.Tensor
    jacobian: torch.Tensor
    jacobian_t: torch.Tensor
    energy_residual: torch.Tensor
    force_residual: torch.Tensor
    free: torch.Tensor
    scaler: FeatureScaler
    energy_scale: float

    def predict(self, net: ElementNetwork, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Network energies [S] and forces [N, 3] (eV, eV/Å) on the training structures."""
        x = self.scaler(self.features, self.species).requires_grad_(True)
        with torch.enable_grad():
            atomic = net(x, self.species)
            (dx,) = torch.autograd.grad(atomic.sum(), x, create_graph=create_graph)
        cot = (dx * self.scaler.jacobian(self.species)).reshape(-1, 1)
        forces = -SparseLinear.apply(cot, self.jacobian, self.jacobian_t).view(-1, 3)
        energies = torch.zeros(len(self.n_atoms), dtype=DTYPE).index_add(0, self.batch, atomic)
        return self.energy_scale * energies, self.energy_scale * forces


@dataclass
class TrainingHistory:
    """Per-epoch loss and the learning rate that epoch used (for checks and plots)."""

    loss: list[float] = field(default_factory=list)
    learning_rate: list[float] = field(default_factory=list)
    evaluations: int = 0
    restarts: int = 0


def train_member(
    net: ElementNetwork,
    data: TrainingData,
    energy_weights: torch.Tensor,
    force_weights: torch.Tensor,
    settings: TrainingSettings,
) -> TrainingHistory:
    """Fit one member in place. energy_weights [S], force_weights [n_free] (bootstrap multiplicities)."""
    s2 = data.energy_scale**2
    n_struct = len(data.n_atoms)
    per_atom_n = data.n_atoms[data.batch][data.free].to(DTYPE)
    force_norm = settings.force_coefficient / 3.0 * force_weights / per_atom_n
    energy_norm = energy_weights / data.n_atoms.to(DTYPE) ** 2
    history = TrainingHistory()

    def closure():
        optimizer.zero_grad()
        energies, forces = data.predict(net, create_graph=True)
        de = energies - data.energy_residual
        df = ((forces - data.force_residual)[data.free] ** 2).sum(-1)
        loss = 0.5 * ((energy_norm * de**2).sum() + (force_norm * df).sum()) / (n_struct * s2)
        loss.backward()
        history.evaluations += 1
        return loss

    optimizer = torch.optim.LBFGS(
        net.parameters(),
        lr=settings.learning_rate,
        max_iter=1,
        # torch gives the line search max_eval − 1 evaluations and defaults max_eval to
        # max_iter · 5 // 4 = 1: without this the search could never shrink a trial step
        max_eval=26,
        history_size=settings.history_size,
        line_search_fn="strong_wolfe",
        # torch's own tolerances freeze LBFGS for good once a step is that small (its state
        # persists across our one-iteration steps): stopping is left to the loop below
        tolerance_grad=0.0,
        tolerance_change=0.0,
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=settings.restart_period, T_mult=settings.restart_multiplier, eta_min=settings.min_learning_rate
    )
    quiet = 0
    for _ in range(settings.epochs):
        history.learning_rate.append(optimizer.param_groups[0]["lr"])
        loss = float(optimizer.step(closure).detach())
        scheduler.step()
        if optimizer.state[optimizer._params[0]].get("t") == 0:
            # the line search found no better point along the quasi-Newton direction: restart
            # from steepest descent (LBFGS would otherwise retry the same direction forever)
            optimizer.state.clear()
            history.restarts += 1
        if history.loss and abs(history.loss[-1] - loss) <= settings.tolerance * max(abs(loss), 1e-30):
            quiet += 1
        else:
            quiet = 0
        history.loss.append(loss)
        if quiet >= 10:
            break
    return history
