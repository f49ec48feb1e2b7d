"""When an active-learning campaign stops: convergence criteria first, then budgets.

:func:`evaluate` runs after each iteration's labels are merged. Convergence (``converged=True``):

- relax: the ORACLE max force (per-atom norm over free atoms, :func:`max_force`) at the
  ML-predicted minimum, labelled in this very iteration, is ≤ ``fmax`` — so the structure handed
  back is always oracle-verified (the original code tested the largest force *component*, one
  retrain late);
- neb: |E_ML − E_oracle| at the predicted saddle ≤ ``energy_tol`` and/or the error of the ML
  barrier, |(E_ML(saddle) − E_ML(initial)) − (E_oracle(saddle) − E_oracle(initial))| on the same
  two structures, ≤ ``barrier_tol``, and/or the ORACLE max force at the predicted saddle ≤
  ``saddle_fmax`` (it is a stationary point of the oracle's surface too: matched energies alone
  can pass on a band whose climbing image sits off the oracle's saddle), and/or the ORACLE max
  force at the band's initial state ≤ ``initial_fmax`` (the barrier is measured from a minimum
  of the oracle's surface), and/or, for a hop between equivalent sites (query ``endpoints:
  initial``: the final state is never labelled), the ML final state at most ``endpoint_gap`` eV
  below the ML initial state (a model with a spurious well at the final state can pass every
  other test on a band running downhill into it; a final state above the initial one is a
  relaxation stopped short, which leaves the barrier from the initial state as it is) (every
  one given);
- md: validation energy and/or force MAE ≤ ``energy_mae`` / ``force_mae`` (every one given).

Budgets (``done=True, converged=False``): ``max_iterations`` = n gives exactly n query rounds
(iterations 0 … n−1; the original code ran n+1), ``max_oracle_calls`` stops once that many oracle
calls have been paid.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np

KINDS = ("relax", "neb", "md")

# which kind each convergence criterion belongs to
_CONVERGENCE_KIND = {"fmax": "relax", "energy_tol": "neb", "barrier_tol": "neb", "saddle_fmax": "neb",
                     "initial_fmax": "neb", "endpoint_gap": "neb", "energy_mae": "md", "force_mae": "md"}
_BUDGETS = ("max_iterations", "max_oracle_calls")


def max_force(forces: Any, free_mask: Any = None) -> float:
    """Largest per-atom force norm |F_i| over free atoms (eV/Å); 0.0 when no atom is free.

    Not the largest Cartesian component: (0.03, 0.03, 0) has norm 0.042.
    """
    f = np.asarray(forces, dtype=float)
    if f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"forces must have shape [n_atoms, 3]; got {f.shape}")
    if free_mask is not None:
        mask = np.asarray(free_mask)
        if mask.dtype != bool or mask.shape != (f.shape[0],):
            raise ValueError(f"free_mask must be a bool array of shape ({f.shape[0]},); got {mask.dtype} {mask.shape}")
        f = f[mask]
    if f.shape[0] == 0:
        return 0.0
    return float(np.linalg.norm(f, axis=1).max())


#: the largest integer a spec may give (stored as BSON 64-bit integers; seeds are offset per round: room)
MAX_INTEGER = 2**62


def _finite(value: numbers.Real) -> bool:
    """math.isfinite, False for an integer too large for a float (a 400-digit number in a spec)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


@dataclass
class StopState:
    """What is known after an iteration merged its labels."""

    iteration: int  # 0-based index of the iteration that just merged
    kind: str  # relax | neb | md
    oracle_calls: int  # total oracle calls paid so far in the campaign
    final_fmax_oracle: float | None = None  # relax: oracle max force at the predicted minimum (this iteration)
    saddle_energy_error: float | None = None  # neb: |E_ML − E_oracle| at the predicted saddle, eV
    barrier_error: float | None = None  # neb: error of the ML barrier vs the oracle on the same images, eV
    saddle_fmax_oracle: float | None = None  # neb: oracle max force at the predicted saddle, eV/Å
    initial_fmax_oracle: float | None = None  # neb: oracle max force at the band's initial state, eV/Å
    endpoint_gap: float | None = None  # neb: E_ML(initial) − E_ML(final), 0 when negative, eV
    validation: Mapping[str, float] | None = None  # md: {"energy_mae": eV, "force_mae": eV/Å}
    # md: whether this iteration's ML MD ran all its steps (None: not known); validation frames
    # from a trajectory that stopped early do not stand for the whole run
    simulation_complete: bool | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"StopState.kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        for name in ("iteration", "oracle_calls"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"StopState.{name} must be an integer >= 0; got {value!r}")


@dataclass
class StopDecision:
    done: bool
    converged: bool
    reason: str


@dataclass
class StopCriteria:
    """Stop criteria of a campaign (the spec's ``learner.stop`` mapping)."""

    max_iterations: int | None = None
    fmax: float | None = None  # relax, eV/Å
    energy_tol: float | None = None  # neb, eV
    barrier_tol: float | None = None  # neb, eV
    saddle_fmax: float | None = None  # neb, eV/Å
    initial_fmax: float | None = None  # neb, eV/Å
    endpoint_gap: float | None = None  # neb (equivalent endpoints), eV
    energy_mae: float | None = None  # md, eV
    force_mae: float | None = None  # md, eV/Å
    max_oracle_calls: int | None = None

    def __post_init__(self) -> None:
        for name in _BUDGETS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= MAX_INTEGER:
                raise ValueError(f"stop criterion {name!r} must be an integer >= 1 (and <= 2^62: stored); got {value!r}")
            setattr(self, name, int(value))
        for name in _CONVERGENCE_KIND:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not _finite(value) or value <= 0:
                raise ValueError(f"stop criterion {name!r} must be a finite number > 0; got {value!r}")
            setattr(self, name, float(value))

    @classmethod
    def allowed_keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, kind: str | None = None) -> "StopCriteria":
        """Validated criteria. Unknown keys, non-positive values and an empty mapping are errors;
        with ``kind`` given, so are criteria of another kind and criteria that can never stop it."""
        if d is None:
            d = {}
        if not isinstance(d, Mapping):
            raise ValueError(f"stop criteria must be a mapping; got {type(d).__name__}")
        allowed = cls.allowed_keys()
        for key in d:
            if key not in allowed:
                raise ValueError(f"unknown stop criterion {key!r}; allowed: {', '.join(allowed)}")
        criteria = cls(**{k: v for k, v in d.items() if v is not None})
        if not criteria.given():
            raise ValueError(f"stop criteria need at least one of: {', '.join(allowed)}")
        if kind is not None:
            criteria.check_kind(kind)
        return criteria

    def given(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def check_kind(self, kind: str) -> None:
        """Raise if a criterion belongs to another simulation kind, or nothing could stop ``kind``."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
        for name, owner in _CONVERGENCE_KIND.items():
            if getattr(self, name) is not None and owner != kind:
                raise ValueError(f"stop criterion {name!r} applies to {owner} campaigns, not {kind}")
        if not self.given():
            raise ValueError(f"no stop criterion given: a {kind} campaign would never stop")

    def remaining_oracle_calls(self, oracle_calls: int) -> int | None:
        """Oracle calls still allowed by ``max_oracle_calls`` (None: no such budget)."""
        if self.max_oracle_calls is None:
            return None
        return max(self.max_oracle_calls - oracle_calls, 0)


def _g(x: float) -> str:
    return f"{x:.4g}"


def _convergence(criteria: StopCriteria, state: StopState) -> tuple[bool | None, str]:
    """(met, description); met is None when no convergence criterion applies to this kind."""
    if state.kind == "relax" and criteria.fmax is not None:
        value = state.final_fmax_oracle
        if value is None:
            return False, "the predicted minimum has no oracle label this iteration"
        ok = value <= criteria.fmax  # NaN compares False
        return ok, f"oracle fmax {_g(value)} {'≤' if ok else '>'} {_g(criteria.fmax)} eV/Å at the predicted minimum"
    neb = (("saddle energy error", state.saddle_energy_error, criteria.energy_tol, "eV"),
           ("barrier error", state.barrier_error, criteria.barrier_tol, "eV"),
           ("oracle fmax at the saddle", state.saddle_fmax_oracle, criteria.saddle_fmax, "eV/Å"),
           ("oracle fmax at the initial state", state.initial_fmax_oracle, criteria.initial_fmax, "eV/Å"),
           ("model's final state below its initial state by", state.endpoint_gap, criteria.endpoint_gap, "eV"))
    if state.kind == "neb" and any(threshold is not None for _, _, threshold, _ in neb):
        parts, ok_all = [], True
        for name, value, threshold, unit in neb:
            if threshold is None:
                continue
            if value is None:
                return False, f"no {name} this iteration (the saddle or the initial state lacks an oracle label)"
            ok = abs(value) <= threshold
            ok_all &= ok
            parts.append(f"{name} {_g(abs(value))} {'≤' if ok else '>'} {_g(threshold)} {unit}")
        return ok_all, ", ".join(parts)
    if state.kind == "md" and (criteria.energy_mae is not None or criteria.force_mae is not None):
        if state.validation is None:
            return False, "no validation this iteration"
        if state.simulation_complete is False:
            return False, "the ML MD stopped before its last step this iteration"
        parts, ok_all = [], True
        for key, unit in (("energy_mae", "eV"), ("force_mae", "eV/Å")):
            threshold = getattr(criteria, key)
            if threshold is None:
                continue
            if key not in state.validation:
                raise ValueError(f"validation lacks {key!r} needed by the stop criterion; has {sorted(state.validation)}")
            value = float(state.validation[key])
            ok = value <= threshold
            ok_all &= ok
            parts.append(f"{key.replace('_', ' ')} {_g(value)} {'≤' if ok else '>'} {_g(threshold)} {unit}")
        return ok_all, "validation " + ", ".join(parts)
    return None, ""


def evaluate(criteria: StopCriteria, state: StopState) -> StopDecision:
    """Decide after an iteration: converged criteria first, then budgets."""
    criteria.check_kind(state.kind)
    met, detail = _convergence(criteria, state)
    if met:
        return StopDecision(True, True, f"converged: {detail}")
    rounds = state.iteration + 1
    budget = []
    if criteria.max_iterations is not None and rounds >= criteria.max_iterations:
        budget.append(f"reached max_iterations = {criteria.max_iterations} ({rounds} query rounds)")
    if criteria.max_oracle_calls is not None and state.oracle_calls >= criteria.max_oracle_calls:
        budget.append(f"reached max_oracle_calls = {criteria.max_oracle_calls} ({state.oracle_calls} oracle calls paid)")
    tail = f" ({detail})" if detail else ""
    if budget:
        return StopDecision(True, False, f"stopped without converging: {'; '.join(budget)}{tail}")
    progress = [f"{rounds} query round{'s' if rounds != 1 else ''}"]
    if criteria.max_iterations is not None:
        progress[0] += f" of {criteria.max_iterations}"
    progress.append(f"{state.oracle_calls} oracle calls" + (
        f" of {criteria.max_oracle_calls}" if criteria.max_oracle_calls is not None else ""))
    return StopDecision(False, False, f"continuing: {', '.join(progress)}{tail}")
