"""Pairwise Morse prior of the Δ-ML potential.

V(r) = De [(1 − e^(−a (r − re)))² − 1] · S(r), where S is a C² smoothstep that switches the
potential off between ``cutoff − switch_width`` and ``cutoff``: energy and forces are continuous
(the original code's hard cutoff jumped by ~0.013 eV / 0.018 eV/Å per pair).

Mixing rules of the paper: D_AB = √(D_A D_B); re_AB and σ_AB arithmetic means, with
σ = re − ln2 / a the zero crossing of the Morse curve.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Mapping, Sequence

import torch

from alflow.model.descriptors import DTYPE


class MissingMorseParameters(KeyError):
    """An element has no Morse parameters (never silently borrow another element's)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


@dataclass(frozen=True)
class MorseParameters:
    """Morse parameters of one element: well depth De (eV), bond length re (Å), width a (1/Å)."""

    De: float
    re: float
    a: float
    source: str = "user"

    def __post_init__(self):
        for name in ("De", "re", "a"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"Morse parameter {name} must be a positive number, got {value!r}")

    @property
    def sigma(self) -> float:
        """Zero crossing of the Morse curve, re − ln2 / a (Å)."""
        return self.re - math.log(2.0) / self.a


def shipped_table() -> dict[str, MorseParameters]:
    """The parameter table shipped with alflow, with the calculator that produced each entry."""
    text = resources.files("alflow.model").joinpath("morse_parameters.json").read_text()
    return {el: MorseParameters(**p) for el, p in json.loads(text)["elements"].items()}


def lookup(elements: Sequence[str], overrides: Mapping[str, MorseParameters | Mapping] | None = None) -> dict:
    """Parameters for ``elements``: ``overrides`` first, then the shipped table; clear error if absent."""
    table = shipped_table()
    for el, p in (overrides or {}).items():
        table[el] = p if isinstance(p, MorseParameters) else MorseParameters(**p)
    missing = [el for el in elements if el not in table]
    if missing:
        raise MissingMorseParameters(
            f"no Morse parameters for element(s) {', '.join(missing)}: fit them with "
            f"`alflow fit-morse {' '.join(missing)} --oracle emt` (or your DFT oracle) and pass them "
            f"as morse_params, or use prior=None"
        )
    return {el: table[el] for el in elements}


def mix(pa: MorseParameters, pb: MorseParameters) -> tuple[float, float, float]:
    """(D, re, a) of the A–B pair from the paper's mixing rules."""
    D = math.sqrt(pa.De * pb.De)
    re = 0.5 * (pa.re + pb.re)
    sigma = 0.5 * (pa.sigma + pb.sigma)
    return D, re, math.log(2.0) / (re - sigma)


DEFAULT_SWITCH_WIDTH = 1.0  # Å: the prior is switched off over the last this much before the cutoff


def smoothstep(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """S(x) = 1 − 10x³ + 15x⁴ − 6x⁵ on [0, 1] (1 below, 0 above) and dS/dx; C² at both ends."""
    x = x.clamp(0.0, 1.0)
    x2 = x * x
    return 1.0 - x2 * x * (10.0 - 15.0 * x + 6.0 * x2), -30.0 * x2 * (1.0 - x) ** 2


class MorsePrior:
    """Smoothly cut-off pairwise Morse energy for a fixed list of elements."""

    def __init__(
        self,
        elements: Sequence[str],
        params: Mapping[str, MorseParameters] | None = None,
        cutoff: float = 6.0,
        switch_width: float = DEFAULT_SWITCH_WIDTH,
    ):
        if not 0 < switch_width <= cutoff:
            raise ValueError(f"switch_width must be in (0, cutoff], got {switch_width}")
        self.elements = tuple(elements)
        self.params = lookup(self.elements, params)
        self.cutoff = float(cutoff)
        self.switch_width = float(switch_width)
        n = len(self.elements)
        table = torch.zeros(3, n, n, dtype=DTYPE)
        for i, ei in enumerate(self.elements):
            for j, ej in enumerate(self.elements):
                table[:, i, j] = torch.tensor(mix(self.params[ei], self.params[ej]), dtype=DTYPE)
        self._D, self._re, self._a = table

    def pair_energy(
        self, r2: torch.Tensor, si: torch.Tensor, sj: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """V and dV/d(r²) of each pair: r2, si, sj [P] (species indices) → ([P], [P])."""
        D, re, a = self._D[si, sj], self._re[si, sj], self._a[si, sj]
        r = torch.sqrt(r2)
        e = torch.exp(-a * (r - re))
        v = D * ((1.0 - e) ** 2 - 1.0)
        dv_dr = 2.0 * D * a * e * (1.0 - e)
        s, ds = smoothstep((r - (self.cutoff - self.switch_width)) / self.switch_width)
        return v * s, (dv_dr * s + v * ds / self.switch_width) / (2.0 * r)

    def to_dict(self) -> dict:
        return {
            "elements": list(self.elements),
            "params": {el: asdict(p) for el, p in self.params.items()},
            "cutoff": self.cutoff,
            "switch_width": self.switch_width,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "MorsePrior":
        return cls(d["elements"], {el: MorseParameters(**p) for el, p in d["params"].items()}, d["cutoff"], d["switch_width"])
