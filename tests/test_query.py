"""Query strategies and the invariants select() enforces on every strategy, plug-ins included."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from alflow.query import (
    STRATEGIES,
    QueryContext,
    endpoint_gap,
    frame_energy,
    frame_uncertainty,
    get_strategy,
    option_error,
    select,
)
from alflow.store.hashing import structure_hash


def frame(x: float, energy: float = 0.0, uncertainty: float | None = 0.1, where: str = "calc") -> Atoms:
    """A 2-atom frame whose first atom sits at x (distinct x → distinct structure hash)."""
    atoms = Atoms("CuC", positions=[[x, 0.0, 0.0], [0.0, 0.0, 2.0]], cell=[10, 10, 10], pbc=False)
    forces = np.zeros((2, 3))
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    if uncertainty is not None:
        if where == "calc":
            atoms.calc.results["uncertainty"] = uncertainty
        else:
            atoms.info["uncertainty"] = uncertainty
    return atoms


def trajectory(n: int, energies=None, uncertainties=None) -> list[Atoms]:
    energies = np.zeros(n) if energies is None else energies
    uncertainties = np.full(n, 0.1) if uncertainties is None else uncertainties
    return [frame(0.1 * i, energies[i], uncertainties[i]) for i in range(n)]


def ctx(frames, kind="relax", labelled=(), seed=0, features=None) -> QueryContext:
    return QueryContext(frames, kind, labelled, rng=np.random.default_rng(seed), features=features)


def hashes(frames, idx):
    return {structure_hash(frames[i]) for i in idx}


# ----------------------------------------------------------------------------- accessors


def test_accessors_read_calc_results_then_info_and_fail_clearly():
    a = frame(0.0, energy=-1.5, uncertainty=0.2)
    assert frame_uncertainty(a) == pytest.approx(0.2)
    assert frame_energy(a) == pytest.approx(-1.5)
    b = frame(0.0, uncertainty=0.3, where="info")
    assert frame_uncertainty(b) == pytest.approx(0.3)
    c = frame(0.0, uncertainty=None)
    with pytest.raises(ValueError, match="uncertainty"):
        frame_uncertainty(c)
    d = Atoms("Cu")
    with pytest.raises(ValueError, match="energy"):
        frame_energy(d)


def test_accessor_rejects_stale_results_of_a_shared_calculator():
    a, b = frame(0.0), frame(1.0)
    b.calc = a.calc  # results belong to a, not b
    with pytest.raises(ValueError, match="stale"):
        frame_uncertainty(b)


# ----------------------------------------------------------------------------- edge cases, all built-ins


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("n", [0, 1, 2])
@pytest.mark.parametrize("samples", [0, 1, 5])
def test_short_trajectories_work(name, n, samples):
    frames = trajectory(n)
    feats = lambda fr: np.arange(len(fr), dtype=float)[:, None]  # noqa: E731
    kind = "neb" if name == "neb" else "relax"
    out = select(ctx(frames, kind, features=feats), name, samples)
    assert all(type(i) is int for i in out)
    assert len(out) == len(set(out)) <= n
    if n == 0:
        assert out == []
    if name in ("relax_final", "neb") and n > 0:
        assert n - 1 in out  # the final frame / the last endpoint, even with samples = 0


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_all_labelled_gives_empty(name):
    frames = trajectory(6, energies=np.arange(6.0))
    labelled = [structure_hash(a) for a in frames]
    feats = lambda fr: np.random.default_rng(0).normal(size=(len(fr), 2))  # noqa: E731
    assert select(ctx(frames, "neb" if name == "neb" else "md", labelled, features=feats), name, 3) == []


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_duplicate_structures_collapse(name):
    # frames 1, 2, 3 identical positions (a relaxation that stalled) → one structure
    frames = [frame(0.0, 0.0, 0.1), frame(0.5, 1.0, 0.9), frame(0.5, 1.0, 0.9), frame(0.5, 1.0, 0.9), frame(1.0, 0.0, 0.1)]
    feats = lambda fr: np.array([[a.positions[0, 0]] for a in fr])  # noqa: E731
    out = select(ctx(frames, "neb" if name == "neb" else "relax", features=feats), name, 10)
    assert len(hashes(frames, out)) == len(out)  # never the same structure twice
    assert len(out) == 3  # everything available: 3 distinct structures


def test_samples_validation_and_cap():
    frames = trajectory(4)
    with pytest.raises(ValueError, match="samples"):
        select(ctx(frames), "random", -1)
    with pytest.raises(ValueError, match="samples"):
        select(ctx(frames), "random", 1.5)
    assert sorted(select(ctx(frames), "random", 100)) == [0, 1, 2, 3]


def test_unknown_strategy_lists_builtins():
    with pytest.raises(ValueError, match="max_uncertainty") as err:
        get_strategy("maxuncertainty")
    assert "relax_final" in str(err.value)


# ----------------------------------------------------------------------------- semantics


def test_random_is_seeded_and_distinct():
    frames = trajectory(30)
    a = select(ctx(frames, seed=7), "random", 10)
    b = select(ctx(frames, seed=7), "random", 10)
    c = select(ctx(frames, seed=8), "random", 10)
    assert a == b and a != c
    assert len(set(a)) == 10


def test_random_skips_labelled():
    frames = trajectory(10)
    labelled = [structure_hash(frames[i]) for i in range(8)]
    for seed in range(5):
        assert sorted(select(ctx(frames, labelled=labelled, seed=seed), "random", 5)) == [8, 9]


def test_max_uncertainty_orders_by_uncertainty_and_skips_labelled():
    u = np.array([0.1, 0.9, 0.3, 0.8, 0.2, 0.7])
    frames = trajectory(6, uncertainties=u)
    assert select(ctx(frames), "max_uncertainty", 3) == [1, 3, 5]
    assert select(ctx(frames, labelled=[structure_hash(frames[1])]), "max_uncertainty", 2) == [3, 5]


def test_max_uncertainty_reads_info_fallback():
    frames = [frame(0.1 * i, uncertainty=u, where="info") for i, u in enumerate([0.1, 0.5, 0.2])]
    assert select(ctx(frames), "max_uncertainty", 1) == [1]


def test_relax_final_always_includes_last_frame_plus_random():
    frames = trajectory(20)
    assert select(ctx(frames), "relax_final", 0) == [19]
    out = select(ctx(frames), "relax_final", 4)
    assert out[0] == 19 and len(out) == 5 and len(set(out)) == 5
    # final already labelled: only the random others
    out = select(ctx(frames, labelled=[structure_hash(frames[19])]), "relax_final", 3)
    assert 19 not in out and len(out) == 3


def test_relax_final_when_last_frames_repeat_keeps_the_final_structure():
    frames = trajectory(5) + [frame(0.4)]  # last frame repeats frame 4's structure
    out = select(ctx(frames), "relax_final", 10)
    assert out[0] == 5 and 4 not in out and sorted(out) == [0, 1, 2, 3, 5]


def test_neb_endpoints_and_saddle():
    e = np.array([0.0, 0.05, 0.3, 0.12, 0.01])
    u = np.array([0.0, 0.4, 0.1, 0.2, 0.0])
    frames = trajectory(5, energies=e, uncertainties=u)
    assert select(ctx(frames, "neb"), "neb", 1) == [0, 4, 2]
    assert select(ctx(frames, "neb"), "neb", 0) == [0, 4, 2]
    # extras by uncertainty among the other interior images
    assert select(ctx(frames, "neb"), "neb", 2) == [0, 4, 2, 1]
    assert select(ctx(frames, "neb"), "neb", 3) == [0, 4, 2, 1, 3]
    # labelled endpoints skipped; the saddle is still picked
    labelled = [structure_hash(frames[0]), structure_hash(frames[4])]
    assert select(ctx(frames, "neb", labelled=labelled), "neb", 1) == [2]


def test_neb_needs_energies_not_uncertainty_for_one_sample():
    frames = [frame(0.1 * i, energy=[0, 1, 0][i], uncertainty=None) for i in range(3)]
    assert select(ctx(frames, "neb"), "neb", 1) == [0, 2, 1]


def test_diversity_spreads_over_clusters():
    # three tight clusters in 2-D; the highest-uncertainty frame is in cluster A
    rng = np.random.default_rng(1)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    pts = np.concatenate([c + 0.1 * rng.normal(size=(10, 2)) for c in centres])
    u = np.full(30, 0.1)
    u[3] = 0.5
    frames = trajectory(30, uncertainties=u)
    feats = lambda fr: pts  # noqa: E731
    out = select(ctx(frames, "md", features=feats), "diversity", 3)
    assert out[0] == 3
    assert sorted(i // 10 for i in out) == [0, 1, 2]  # one per cluster
    # a max-uncertainty query with the same budget would not spread out
    u2 = u.copy()
    u2[:10] += 0.2
    frames2 = trajectory(30, uncertainties=u2)
    assert {i // 10 for i in select(ctx(frames2, "md"), "max_uncertainty", 3)} == {0}
    assert sorted(i // 10 for i in select(ctx(frames2, "md", features=feats), "diversity", 3)) == [0, 1, 2]


def test_diversity_weights_distance_by_uncertainty():
    # 1-D: a far frame with negligible uncertainty loses to a nearer, uncertain one
    pts = np.array([[0.0], [1.0], [10.0]])
    frames = trajectory(3, uncertainties=np.array([1.0, 0.9, 0.01]))
    out = select(ctx(frames, "md", features=lambda fr: pts), "diversity", 2)
    assert out == [0, 1]


def test_diversity_requires_features():
    with pytest.raises(ValueError, match="features"):
        select(ctx(trajectory(3), "md"), "diversity", 2)


# ----------------------------------------------------------------------------- plug-ins


def my_strategy(ctx: QueryContext, samples: int, offset: int = 0) -> list[int]:
    """Deliberately sloppy: repeats frames and returns labelled ones; select() must clean it."""
    n = len(ctx.frames)
    return [(i + offset) % n for i in range(samples)] + [0, 0]


NOT_CALLABLE = 42


def test_plugin_from_this_module_is_filtered():
    frames = trajectory(5) + [frame(0.1)]  # frame 5 duplicates frame 1's structure
    labelled = [structure_hash(frames[2])]
    name = f"{__name__}:my_strategy"
    assert get_strategy(name) is my_strategy
    out = select(ctx(frames, labelled=labelled), name, 6, offset=0)
    # raw: 0 1 2 3 4 5 0 0 → drop 2 (labelled), 5 (same structure as 1), repeated 0s
    assert out == [0, 1, 3, 4]


def test_plugin_from_a_module_on_sys_path(tmp_path, monkeypatch):
    (tmp_path / "my_alflow_plugin.py").write_text(textwrap.dedent(
        """
        def last_two(ctx, samples):
            n = len(ctx.frames)
            return [n - 1, n - 2][:samples]
        """
    ))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert select(ctx(trajectory(4)), "my_alflow_plugin:last_two", 2) == [3, 2]
    finally:
        sys.modules.pop("my_alflow_plugin", None)


def test_plugin_errors_name_the_plugin():
    with pytest.raises(ValueError, match="no_such_module_xyz"):
        get_strategy("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="nope"):
        get_strategy(f"{__name__}:nope")
    with pytest.raises(ValueError, match="not callable"):
        get_strategy(f"{__name__}:NOT_CALLABLE")


def test_plugin_returning_bad_indices_is_an_error():
    bad = lambda c, s: [0, 99]  # noqa: E731
    with pytest.raises(ValueError, match="99"):
        select(ctx(trajectory(3)), bad, 1)
    neg = lambda c, s: [-1]  # noqa: E731
    with pytest.raises(ValueError, match="-1"):
        select(ctx(trajectory(3)), neg, 1)


def test_context_validation():
    with pytest.raises(ValueError, match="kind"):
        QueryContext(trajectory(2), "relaxation", rng=np.random.default_rng(0))
    with pytest.raises(TypeError):
        QueryContext(trajectory(2), "relax")  # rng required


def test_neb_initial_endpoint_only():
    e = np.array([0.0, 0.05, 0.3, 0.12, 0.01])
    u = np.array([0.0, 0.4, 0.1, 0.2, 0.0])
    frames = trajectory(5, energies=e, uncertainties=u)
    assert select(ctx(frames, "neb"), "neb", 1, endpoints="initial") == [0, 2]
    assert select(ctx(frames, "neb"), "neb", 2, endpoints="initial") == [0, 2, 1]
    with pytest.raises(ValueError, match="endpoints must be one of both, initial"):
        select(ctx(frames, "neb"), "neb", 1, endpoints="final")


def test_neb_labels_the_final_state_too_when_the_model_puts_it_below_the_initial_state():
    """``endpoints: initial`` declares the endpoints equivalent; a model that puts the final state
    more than ``equivalent_within`` below the initial one has a well there the initial state does
    not: the final state is labelled. One above it (a relaxation stopped short) is not."""
    e = np.array([0.0, 0.05, 0.3, 0.12, 0.12])
    frames = trajectory(5, energies=e, uncertainties=np.zeros(5))
    assert endpoint_gap(frames) == 0.0
    assert select(ctx(frames, "neb"), "neb", 1, endpoints="initial", equivalent_within=0.01) == [0, 2]
    e = np.array([0.0, 0.05, 0.3, 0.12, -0.02])
    frames = trajectory(5, energies=e, uncertainties=np.zeros(5))
    assert endpoint_gap(frames) == pytest.approx(0.02)
    assert select(ctx(frames, "neb"), "neb", 1, endpoints="initial") == [0, 2]
    assert select(ctx(frames, "neb"), "neb", 1, endpoints="initial", equivalent_within=0.03) == [0, 2]
    assert select(ctx(frames, "neb"), "neb", 1, endpoints="initial", equivalent_within=0.01) == [0, 4, 2]
    assert select(ctx(frames, "neb"), "neb", 1, endpoints="initial", equivalent_within=0.01,
                  ) == select(ctx(frames, "neb"), "neb", 1)  # as with both endpoints
    e[-1] = np.nan  # a model energy that is not a number: not known to agree
    frames = trajectory(5, energies=e, uncertainties=np.zeros(5))
    assert select(ctx(frames, "neb"), "neb", 1, endpoints="initial", equivalent_within=0.03) == [0, 4, 2]
    assert option_error("neb", {"equivalent_within": 0.01}) is None
    assert option_error("neb", {"equivalent_within": -1}) == ("equivalent_within", "must be a number >= 0, got -1")
    assert option_error("neb", {"equivalent_within": "small"})[0] == "equivalent_within"


def test_option_error_names_the_option():
    assert option_error("neb", {"endpoints": "initial"}) is None
    assert option_error("neb", {"endpoints": "final"}) == ("endpoints", "must be one of both, initial, got 'final'")
    key, why = option_error("random", {"endpoints": "initial"})
    assert key == "endpoints" and "not an option of query strategy 'random' (options: none)" in why
