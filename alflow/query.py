"""Query strategies: which frames of an ML simulation go to the oracle (DFT) for labels.

A strategy is a function ``(ctx, samples, **options) -> list[int]`` returning frame indices in
pick order. Built-ins (:data:`STRATEGIES`):

``random``
    ``samples`` distinct frames drawn uniformly.
``max_uncertainty``
    the ``samples`` frames of highest ensemble uncertainty (ties: earlier frame first).
``relax_final``
    the predicted minimum (the last frame of the relaxation) always, plus ``samples`` random
    others: the paper's "k random + final", so up to ``samples + 1`` frames.
``neb``
    the two endpoints of the band, the highest-energy interior image (the predicted saddle), and
    ``samples − 1`` further interior images by uncertainty when ``samples > 1``; so up to
    ``max(samples, 1) + 2`` frames. Labelled endpoints are skipped. Option ``endpoints: initial``
    labels only the initial state (a hop between equivalent sites).
``diversity``
    farthest-point sampling on ``ctx.features`` (Euclidean on standardised features), starting at
    the highest-uncertainty frame; each next pick maximises (min distance to the picks) ×
    uncertainty.

Plug-ins are named ``"package.module:function"``. :func:`select` runs any strategy and then
enforces, on its output, what the original code got wrong: no structure already labelled (its
:func:`~alflow.store.hashing.structure_hash` is in ``ctx.labelled``), no frame twice, no two
frames with the same structure in one query, any trajectory length (0, 1, 2 frames included).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import numbers
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Collection, Mapping, Sequence

import numpy as np
from ase import Atoms

from alflow.store.hashing import structure_hash

log = logging.getLogger(__name__)

KINDS = ("relax", "neb", "md")

Strategy = Callable[..., list[int]]  # (ctx: QueryContext, samples: int, **options) -> frame indices


# ----------------------------------------------------------------------------- frame accessors


def _frame_result(atoms: Atoms, key: str, unit: str) -> float:
    calc = atoms.calc
    stale = False
    if calc is not None and key in getattr(calc, "results", {}):
        # a live calculator shared by several frames only holds the results of the last one
        if getattr(calc, "atoms", None) is None or not calc.check_state(atoms):
            return float(np.asarray(calc.results[key]).reshape(()))
        stale = True
    if key in atoms.info:
        return float(np.asarray(atoms.info[key]).reshape(()))
    if stale:
        raise ValueError(
            f"frame has a calculator whose {key!r} belongs to a different structure (stale results) "
            f"and no atoms.info[{key!r}]; record each frame with its own results"
        )
    raise ValueError(
        f"frame has no {key!r} ({unit}) in atoms.calc.results or atoms.info; "
        "query strategies need the ML calculator's results attached to every frame"
    )


def frame_uncertainty(atoms: Atoms) -> float:
    """Ensemble uncertainty of a frame (eV/Å): ``calc.results["uncertainty"]``, else ``info``."""
    return _frame_result(atoms, "uncertainty", "eV/Å")


def frame_energy(atoms: Atoms) -> float:
    """ML energy of a frame (eV): ``calc.results["energy"]``, else ``atoms.info["energy"]``."""
    return _frame_result(atoms, "energy", "eV")


# ----------------------------------------------------------------------------- context


@dataclass
class QueryContext:
    """What a strategy sees.

    ``labelled``: structure hashes already labelled or already queued; never queried again.
    ``features``: per-frame descriptor vectors ``[n_frames, d]`` (for ``diversity``).
    """

    frames: Sequence[Atoms]
    kind: str
    labelled: Collection[str] = ()
    rng: np.random.Generator = field(kw_only=True)
    features: Callable[[Sequence[Atoms]], np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"QueryContext.kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if not isinstance(self.rng, np.random.Generator):
            raise TypeError(f"QueryContext.rng must be a numpy.random.Generator; got {type(self.rng).__name__}")
        if isinstance(self.labelled, str):
            raise TypeError("QueryContext.labelled must be a collection of structure hashes, not one string")

    @cached_property
    def hashes(self) -> list[str]:
        """Structure hash of every frame."""
        return [structure_hash(a) for a in self.frames]

    def is_labelled(self, i: int) -> bool:
        return self.hashes[i] in self._labelled

    @property
    def _labelled(self) -> frozenset[str]:
        return frozenset(self.labelled)

    def available(self, indices: Sequence[int] | None = None, exclude: Collection[int] = ()) -> list[int]:
        """Queryable frames among ``indices`` (default all), in order: not labelled, not the same
        structure as an earlier candidate or as a frame in ``exclude``."""
        seen = set(self._labelled) | {self.hashes[j] for j in exclude}
        out = []
        for i in range(len(self.frames)) if indices is None else indices:
            h = self.hashes[i]
            if h not in seen:
                seen.add(h)
                out.append(int(i))
        return out

    def uncertainties(self, indices: Sequence[int]) -> np.ndarray:
        """Uncertainty of the given frames; NaN (a diverged prediction) counts as +inf."""
        u = np.array([frame_uncertainty(self.frames[i]) for i in indices], dtype=float)
        return np.where(np.isnan(u), np.inf, u)


# ----------------------------------------------------------------------------- built-in strategies


def _top_by_uncertainty(ctx: QueryContext, pool: list[int], k: int) -> list[int]:
    if k <= 0 or not pool:
        return []
    u = ctx.uncertainties(pool)
    order = np.argsort(-u, kind="stable")
    return [pool[j] for j in order[:k]]


def _random(ctx: QueryContext, pool: list[int], k: int) -> list[int]:
    k = min(k, len(pool))
    if k <= 0:
        return []
    return [pool[j] for j in ctx.rng.choice(len(pool), size=k, replace=False)]


def random_strategy(ctx: QueryContext, samples: int) -> list[int]:
    """``samples`` distinct frames, uniformly at random."""
    return _random(ctx, ctx.available(), samples)


def max_uncertainty(ctx: QueryContext, samples: int) -> list[int]:
    """The ``samples`` frames of highest uncertainty."""
    return _top_by_uncertainty(ctx, ctx.available(), samples)


def relax_final(ctx: QueryContext, samples: int) -> list[int]:
    """The last frame (the ML-predicted minimum) always, plus ``samples`` random others."""
    n = len(ctx.frames)
    if n == 0:
        return []
    final = n - 1
    picks = [] if ctx.is_labelled(final) else [final]
    return picks + _random(ctx, ctx.available(range(n - 1), exclude=[final]), samples)


NEB_ENDPOINTS = ("both", "initial")


def endpoint_gap(band: Sequence[Atoms]) -> float:
    """How far (eV) the band's final state lies below its initial state, E(initial) − E(final),
    and 0 when it lies above; NaN when an energy is.

    For equivalent endpoints. A final state below the initial one is a well the model puts there
    and not at the initial state: the band can run downhill into it, past the real saddle. One
    above it is a relaxation that stopped short on a soft slope (the NEB example's final state
    starts 0.4 Å from the bridge, where undertrained models stall 0.1 eV up); the barrier is
    measured from the initial state, and the saddle tests still see the climbing image."""
    return float(max(frame_energy(band[0]) - frame_energy(band[-1]), 0.0)) if len(band) > 1 else 0.0


def neb(ctx: QueryContext, samples: int, endpoints: str = "both", equivalent_within: float | None = None) -> list[int]:
    """Endpoints + the highest-energy interior image (predicted saddle), plus ``samples − 1``
    interior images by uncertainty when ``samples > 1``. Labelled images are skipped.

    ``endpoints="initial"`` labels the initial state only (the barrier is measured from it): for a
    hop between equivalent sites the final state is the initial one translated, so its label
    would teach the model nothing new. Unless the model puts the final state more than
    ``equivalent_within`` (eV; None: never) below the initial one (:func:`endpoint_gap`): it is
    then wrong there, and the final state is labelled too (a campaign stopped on a band running
    downhill into a spurious well at the unlabelled final state: barrier 0 instead of 0.13 eV).
    """
    if endpoints not in NEB_ENDPOINTS:
        raise ValueError(f"endpoints must be one of {', '.join(NEB_ENDPOINTS)}, got {endpoints!r}")
    n = len(ctx.frames)
    if n == 0:
        return []
    # not known to agree (a NaN energy included): label both
    disagree = equivalent_within is not None and not endpoint_gap(ctx.frames) <= equivalent_within
    ends = (0, n - 1) if endpoints == "both" or disagree else (0,)
    picks = [i for i in dict.fromkeys(ends) if not ctx.is_labelled(i)]
    interior = list(range(1, n - 1))
    if interior:
        energies = [frame_energy(ctx.frames[i]) for i in interior]
        saddle = interior[int(np.nanargmax(energies))] if not np.all(np.isnan(energies)) else None
        if saddle is not None and not ctx.is_labelled(saddle):
            picks.append(saddle)
        pool = ctx.available(interior, exclude=picks if saddle is None else picks + [saddle])
        picks += _top_by_uncertainty(ctx, pool, samples - 1)
    return picks


def _standardised(x: np.ndarray) -> np.ndarray:
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)


def diversity(ctx: QueryContext, samples: int) -> list[int]:
    """Uncertainty-weighted farthest-point sampling on ``ctx.features`` (standardised, Euclidean).

    Starts at the highest-uncertainty frame; each next pick maximises
    (min distance to the frames picked so far) × uncertainty. With zero uncertainty everywhere
    (a one-member ensemble) it is plain farthest-point sampling from the first frame.
    """
    if ctx.features is None:
        raise ValueError(
            "query strategy 'diversity' needs QueryContext.features (a callable frames -> [n_frames, d])"
        )
    pool = ctx.available()
    if samples <= 0 or not pool:
        return []
    x = np.asarray(ctx.features(ctx.frames), dtype=float)
    if x.ndim != 2 or x.shape[0] != len(ctx.frames):
        raise ValueError(f"features must have shape [n_frames={len(ctx.frames)}, d]; got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    x = _standardised(x)[pool]
    u = ctx.uncertainties(pool)
    u = np.where(np.isinf(u), np.finfo(float).max / 1e6, u)
    if not np.any(u > 0):
        u = np.ones_like(u)
    chosen = [int(np.argmax(u))]
    mind = np.linalg.norm(x - x[chosen[0]], axis=1)
    while len(chosen) < min(samples, len(pool)):
        score = mind * u
        score[chosen] = -np.inf
        j = int(np.argmax(score))
        chosen.append(j)
        mind = np.minimum(mind, np.linalg.norm(x - x[j], axis=1))
    return [pool[j] for j in chosen]


STRATEGIES: dict[str, Strategy] = {
    "random": random_strategy,
    "max_uncertainty": max_uncertainty,
    "relax_final": relax_final,
    "neb": neb,
    "diversity": diversity,
}


# ----------------------------------------------------------------------------- lookup and select


def get_strategy(name: str) -> Strategy:
    """A built-in strategy by name, or a plug-in ``"package.module:function"``."""
    if not isinstance(name, str):
        raise TypeError(f"strategy name must be a string; got {type(name).__name__}")
    if name in STRATEGIES:
        return STRATEGIES[name]
    if ":" not in name:
        raise ValueError(
            f"unknown query strategy {name!r}; built-ins: {', '.join(STRATEGIES)}, "
            "or a plug-in as 'package.module:function'"
        )
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ValueError(f"query strategy plug-in {name!r} must read 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # not found, or the module itself fails as it is imported
        raise ValueError(f"query strategy plug-in {name!r}: cannot import module {module_name!r} "
                         f"({type(exc).__name__}: {exc})") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"query strategy plug-in {name!r}: {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ValueError(f"query strategy plug-in {name!r} is not callable ({type(obj).__name__})")
    return obj


#: the values a built-in strategy's option may take
OPTION_CHOICES: dict[str, dict[str, tuple]] = {"neb": {"endpoints": NEB_ENDPOINTS}}
OPTION_NUMBERS: dict[str, tuple[str, ...]] = {"neb": ("equivalent_within",)}  # numbers >= 0


def option_error(name: str, options: Mapping[str, Any]) -> tuple[str, str] | None:
    """(option, why) for the first of ``options`` (spec ``learner.query`` keys beyond strategy and
    samples) that strategy ``name`` does not take, or whose value a built-in refuses; else None."""
    params = inspect.signature(get_strategy(name)).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    allowed = [k for k in list(params)[2:] if params[k].kind is not inspect.Parameter.VAR_KEYWORD]
    for key, value in options.items():
        if not takes_any and key not in allowed:
            return key, f"not an option of query strategy {name!r} (options: {', '.join(allowed) or 'none'})"
        choices = OPTION_CHOICES.get(name, {}).get(key)
        if choices is not None and value not in choices:
            return key, f"must be one of {', '.join(choices)}, got {value!r}"
        if key in OPTION_NUMBERS.get(name, ()) and (
                isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0):
            return key, f"must be a number >= 0, got {value!r}"
    return None


def _as_index(value: Any, n: int, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"query strategy {name!r} returned a non-integer frame index {value!r}")
    i = int(value)
    if not 0 <= i < n:
        raise ValueError(f"query strategy {name!r} returned frame index {i} outside 0..{n - 1}")
    return i


def select(ctx: QueryContext, strategy: str | Strategy, samples: int, **options: Any) -> list[int]:
    """Run ``strategy`` and return its picks, cleaned: in pick order, ints, without labelled
    structures, repeated frames or repeated structures (first pick kept). ``samples`` beyond what
    is available gives everything available; nothing left gives ``[]``."""
    if isinstance(samples, (bool, np.bool_)) or not isinstance(samples, numbers.Integral):
        raise ValueError(f"samples must be an integer; got {samples!r}")
    if samples < 0:
        raise ValueError(f"samples must be >= 0; got {samples}")
    fn = get_strategy(strategy) if isinstance(strategy, str) else strategy
    name = strategy if isinstance(strategy, str) else getattr(fn, "__name__", repr(fn))
    if len(ctx.frames) == 0:
        return []
    raw = fn(ctx, int(samples), **options)
    if raw is None or isinstance(raw, (str, bytes)):
        raise ValueError(f"query strategy {name!r} must return a list of frame indices; got {raw!r}")
    seen = set(ctx._labelled)
    picks: list[int] = []
    dropped = 0
    for value in list(raw):
        i = _as_index(value, len(ctx.frames), name)
        h = ctx.hashes[i]
        if h in seen:
            dropped += 1
            continue
        seen.add(h)
        picks.append(i)
    if dropped:
        log.info("query strategy %r: dropped %d labelled or duplicate picks", name, dropped)
    return picks
