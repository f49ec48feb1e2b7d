"""Morse prior: derivative, smooth switch-off, minimum, mixing rules, missing parameters."""

from __future__ import annotations

import math

import pytest
import torch

from alflow.model import DeltaPotential, MorseParameters
from alflow.model.morse import MissingMorseParameters, MorsePrior, lookup, mix, smoothstep

PAIRS = [(0, 0), (0, 1), (1, 1)]  # Cu–Cu, Cu–C, C–C


def pair(prior: MorsePrior, r: torch.Tensor, si: int, sj: int):
    n = r.numel()
    return prior.pair_energy(r * r, torch.full((n,), si), torch.full((n,), sj))


@pytest.mark.parametrize("si, sj", PAIRS)
def test_derivative_matches_finite_differences(si, sj):
    prior = MorsePrior(["Cu", "C"])
    r2 = torch.linspace(1.0, 6.3, 531, dtype=torch.float64) ** 2
    s_i, s_j = torch.full_like(r2, si, dtype=torch.long), torch.full_like(r2, sj, dtype=torch.long)
    _, dv = prior.pair_energy(r2, s_i, s_j)
    h = 1e-5
    vp, _ = prior.pair_energy(r2 + h, s_i, s_j)
    vm, _ = prior.pair_energy(r2 - h, s_i, s_j)
    fd = (vp - vm) / (2 * h)
    assert torch.allclose(dv, fd, rtol=1e-6, atol=1e-8)
    assert dv.abs().max() > 0.1


@pytest.mark.parametrize("si, sj", PAIRS)
def test_energy_switches_off_smoothly(si, sj):
    prior = MorsePrior(["Cu", "C"])
    h = 1e-6
    r = torch.arange(4.5, 6.5 + h / 2, h, dtype=torch.float64)
    v, dv_dr2 = pair(prior, r, si, sj)
    assert (v[1:] - v[:-1]).abs().max() <= 1e-6  # no jump anywhere on the grid
    f = 2 * r * dv_dr2  # dV/dr
    assert (f[1:] - f[:-1]).abs().max() <= 1e-4  # and no jump in the force
    beyond = r >= 6.0
    assert torch.all(v[beyond] == 0) and torch.all(dv_dr2[beyond] == 0)
    # the Morse curve itself is untouched below the switch region
    below = r <= 5.0
    D, re, a = mix(prior.params[prior.elements[si]], prior.params[prior.elements[sj]])
    e = torch.exp(-a * (r[below] - re))
    assert torch.allclose(v[below], D * ((1 - e) ** 2 - 1), rtol=1e-13, atol=1e-15)
    assert v[~beyond].abs().max() > 0  # the scan did cover a non-zero tail


def test_smoothstep_is_c2():
    x = torch.tensor([0.0, 1.0], dtype=torch.float64)
    s, ds = smoothstep(x)
    assert s.tolist() == [1.0, 0.0] and ds.tolist() == [0.0, 0.0]
    x = torch.linspace(-0.5, 1.5, 2001, dtype=torch.float64)
    s, ds = smoothstep(x)
    h = x[1] - x[0]
    assert torch.allclose(ds[1:-1], (s[2:] - s[:-2]) / (2 * h), atol=1e-5)
    d2 = (ds[2:] - ds[:-2]) / (2 * h)
    assert (d2[1:] - d2[:-1]).abs().max() < 0.1  # the second derivative has no jump either


@pytest.mark.parametrize("element", ["Cu", "C"])
def test_homonuclear_minimum_is_minus_De_at_re(element):
    prior = MorsePrior([element])
    p = prior.params[element]
    assert p.re < prior.cutoff - prior.switch_width
    v, dv = pair(prior, torch.tensor([p.re], dtype=torch.float64), 0, 0)
    assert v.item() == pytest.approx(-p.De, rel=1e-12)
    assert abs(dv.item()) < 1e-12
    r = torch.linspace(0.5 * p.re, prior.cutoff, 20001, dtype=torch.float64)
    v, _ = pair(prior, r, 0, 0)
    assert r[v.argmin()].item() == pytest.approx(p.re, abs=2e-4)
    assert v.min().item() >= -p.De - 1e-12


def test_mixing_rules():
    cu = MorseParameters(De=2.7747, re=2.2179, a=1.3848)
    c = MorseParameters(De=8.9283, re=1.2859, a=1.8923)
    D, re, a = mix(cu, c)
    assert D == pytest.approx(math.sqrt(cu.De * c.De), rel=1e-14)
    assert re == pytest.approx(0.5 * (cu.re + c.re), rel=1e-14)
    mixed = MorseParameters(D, re, a)
    assert mixed.sigma == pytest.approx(0.5 * (cu.sigma + c.sigma), rel=1e-12)
    assert mix(cu, cu) == pytest.approx((cu.De, cu.re, cu.a), rel=1e-12)
    # the prior uses the mixed pair: minimum −D_AB at re_AB, symmetric in the species order
    prior = MorsePrior(["Cu", "C"], {"Cu": cu, "C": c})
    v01, _ = pair(prior, torch.tensor([re], dtype=torch.float64), 0, 1)
    v10, _ = pair(prior, torch.tensor([re], dtype=torch.float64), 1, 0)
    assert v01.item() == pytest.approx(-D, rel=1e-12) and v10.item() == v01.item()


def test_missing_element_raises_naming_it():
    with pytest.raises(MissingMorseParameters, match=r"\bZr\b") as exc:
        lookup(["Cu", "Zr"])
    assert isinstance(exc.value, KeyError)
    head = str(exc.value).split(":")[0]
    assert "Zr" in head and "Cu" not in head  # only the missing element is named
    assert not str(exc.value).startswith(("'", '"'))  # a readable message, not a quoted KeyError
    with pytest.raises(MissingMorseParameters, match=r"\bZr\b"):
        DeltaPotential(["Cu", "Zr"])
    with pytest.raises(MissingMorseParameters, match=r"\bZr\b"):
        MorsePrior(["Zr"])


def test_overrides_and_no_prior_for_unknown_element():
    zr = MorseParameters(De=3.0, re=2.6, a=1.2)
    assert lookup(["Cu", "Zr"], {"Zr": zr})["Zr"] == zr
    assert lookup(["Zr"], {"Zr": {"De": 3.0, "re": 2.6, "a": 1.2}})["Zr"].re == 2.6
    pot = DeltaPotential(["Zr"], prior=None)  # descriptors need no Morse parameters
    assert pot.morse is None and pot.descriptor.n_features == 4 + 4
    pot = DeltaPotential(["Cu", "Zr"], morse_params={"Zr": zr})
    assert pot.morse.params["Zr"] == zr


@pytest.mark.parametrize("bad", [dict(De=0.0, re=2.0, a=1.0), dict(De=1.0, re=-2.0, a=1.0), dict(De=1.0, re=2.0, a="x"),
                                 dict(De=float("inf"), re=2.0, a=1.0), dict(De=1.0, re=2.0, a=float("nan"))])
def test_invalid_parameters_are_refused(bad):
    with pytest.raises(ValueError, match="Morse parameter .* must be a positive number"):
        MorseParameters(**bad)
