"""The campaign spec: a YAML file, validated into typed dataclasses with one-line errors.

Every error names the file and the field (``c_cu100.yaml: learner.query.samples: must be an
integer >= 0, got -1``). Paths inside the spec are relative to the spec file. Nothing is written
anywhere while a spec is validated.

    name: c-cu100-relax
    system: {structure: c_cu100.traj}              # NEB: {initial: a.traj, final: b.traj}
    simulation: {kind: relax, fmax: 0.03}           # relax | neb | md
    oracle: {kind: emt}                             # emt | python (callable: "pkg.mod:function") | espresso | vasp
    model: {prior: morse, ensemble: 5}              # also seed, epochs, bootstrap, feature_range_floor, warm_start, warm_epochs, morse_params, hidden, descriptor
    learner:
      kind: offline                                 # offline | online (+ threshold: eV/Å)
      refine_below: 0.3                             # relax: refine from the best label below this fmax (eV/Å)
      refine_anchors: 2                             # relax: ... matching the oracle at this many labels
      refine_fmax: 0.01                             # relax: ... and relaxing the matched model to this fmax (eV/Å)
      match_within: 0.5                             # neb: match the band's model to the oracle near its labels (Å)
      match_max_error: 1.0                          # neb: ... where its force error is at most this (eV/Å)
      query: {strategy: relax_final, samples: 1}
      stop: {fmax: 0.03, max_iterations: 20}        # neb: energy_tol, barrier_tol, saddle_fmax, initial_fmax, endpoint_gap; md: energy_mae, force_mae
    report: {direct_oracle_calls: 31}               # optional: oracle calls of the direct run, for `alflow report`
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import yaml
from ase import Atoms
from ase.io import read

from alflow.constraints import free_mask
from alflow.model.morse import DEFAULT_SWITCH_WIDTH as MORSE_SWITCH_WIDTH
from alflow.model.morse import MissingMorseParameters, lookup
from alflow.oracles import emt_options, import_callable
from alflow.stop import MAX_INTEGER


class SpecError(ValueError):
    """An invalid campaign spec; the message is one line naming the file and field."""


# ---------------------------------------------------------------------------------------------
# field checks


MAX_SEED = MAX_INTEGER  # seeds are offset per round: 2^62 leaves them room below BSON's 2^63


def _integer(lo: int | None = None, hi: int | None = None) -> Callable[[Any], int]:
    """An int in [lo, hi]; above MAX_INTEGER in any case (said only when exceeded, if hi is not given)."""
    top = MAX_INTEGER if hi is None else hi

    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo) or v > top:
            over = isinstance(v, int) and not isinstance(v, bool) and v > top
            shown = hi if hi is not None else (top if over else None)
            bounds = (f" >= {lo}" if lo is not None else "") + (f" and <= {shown}" if shown is not None else "")
            raise ValueError(f"must be an integer{bounds}, got {v!r}")
        return v

    return check


def _number(lo: float | None = None, strict: bool = True) -> Callable[[Any], float]:
    def check(v):
        bad = isinstance(v, bool) or not isinstance(v, (int, float))
        if not bad and (v != v or abs(v) > sys.float_info.max):  # NaN, inf, or an integer past any float
            raise ValueError(f"must be a finite number, got {v!r}")
        if not bad and lo is not None:
            bad = v <= lo if strict else v < lo
        if bad:
            bound = f" {'>' if strict else '>='} {lo}" if lo is not None else ""
            raise ValueError(f"must be a number{bound}, got {v!r}")
        return float(v)

    return check


def _number_or_auto(lo: float) -> Callable[[Any], Any]:
    """A number > ``lo``, or the word "auto"."""
    number = _number(lo)

    def check(v):
        if v == "auto":
            return v
        try:
            return number(v)
        except ValueError:
            raise ValueError(f"must be a number > {lo} or 'auto', got {v!r}") from None

    return check


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``check``, or None (YAML null) for "off"."""
    return lambda v: None if v is None else check(v)


def _choice(*options: Any) -> Callable[[Any], Any]:
    def check(v):
        if v not in options:
            raise ValueError(f"must be one of {', '.join(map(str, options))}, got {v!r}")
        return v

    return check


def _boolean(v):
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false, got {v!r}")
    return v


def _mapping(v):
    if not isinstance(v, Mapping):
        raise ValueError(f"must be a mapping, got {v!r}")
    return dict(v)


def _name(v):
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", v):
        raise ValueError(f"must be 1-100 letters, digits, '-', '_' or '.', starting with a letter or digit, got {v!r}")
    return v


def _text(v):
    if not isinstance(v, str) or not v:
        raise ValueError(f"must be a non-empty string, got {v!r}")
    return v


def _any(v):
    return v


def _at(where: tuple[str, ...]) -> str:
    """'file.yaml: learner.query.samples' from ('file.yaml', 'learner', 'query', 'samples')."""
    return where[0] + (": " + ".".join(where[1:]) if len(where) > 1 else "")


def _fields(data: Any, where: tuple[str, ...], schema: Mapping[str, tuple[Callable, Any]]) -> dict:
    """Validate a mapping against ``schema`` {key: (check, default)}; REQUIRED keys must be given."""
    if not isinstance(data, Mapping):
        raise SpecError(f"{_at(where)}: must be a mapping, got {data!r}")
    unknown = sorted(set(data) - set(schema), key=str)
    if unknown:
        raise SpecError(f"{_at(where + (str(unknown[0]),))}: unknown key (allowed: {', '.join(schema)})")
    out = {}
    for key, (check, default) in schema.items():
        if key not in data:
            if default is REQUIRED:
                raise SpecError(f"{_at(where + (key,))}: required")
            out[key] = default
            continue
        try:
            out[key] = check(data[key])
        except (ValueError, TypeError, OverflowError) as exc:  # overflow: a 400-digit integer
            raise SpecError(f"{_at(where + (key,))}: {exc}") from None
    return out


REQUIRED = object()

SIMULATION_FIELDS: dict[str, dict[str, tuple[Callable, Any]]] = {
    "relax": {
        "optimizer": (_choice("BFGS", "FIRE"), "BFGS"),
        "fmax": (_number(0.0), 0.03),
        "steps": (_integer(1), 500),
    },
    "neb": {
        "images": (_integer(1), 3),
        "climb": (_boolean, True),
        "fmax": (_number(0.0), 0.05),
        "endpoint_fmax": (_optional(_number(0.0)), None),  # eV/Å, the endpoints' relaxation (default: fmax)
        "steps": (_integer(1), 500),
        "interpolation": (_choice("idpp", "linear"), "idpp"),
        "optimizer": (_choice("BFGS", "FIRE"), "BFGS"),
    },
    "md": {
        "temperature_K": (_number(0.0), 300.0),
        "timestep_fs": (_number(0.0), 1.0),
        "steps": (_integer(1), 2000),
        "thermostat": (_choice("langevin", "berendsen"), "langevin"),
        "friction_per_fs": (_number(0.0), 0.02),
        "taut_fs": (_number(0.0), 100.0),
        "seed": (_integer(0, MAX_SEED), None),
        "interval": (_integer(1), 1),
    },
}

ORACLE_KINDS = ("emt", "python", "espresso", "vasp")


# ---------------------------------------------------------------------------------------------
# the spec


@dataclass
class CampaignSpec:
    """A validated campaign. ``images``: the structure(s) the simulation starts from (loaded)."""

    name: str
    path: Path
    kind: str  # relax | neb | md
    images: list[Atoms] = field(repr=False)
    system: dict
    simulation: dict
    oracle: dict
    model: dict
    learner: dict
    results: Path
    report: dict = field(default_factory=dict)  # direct_oracle_calls: the direct run's count, if known

    def to_dict(self) -> dict:
        """JSON-able form (stored with the campaign; structures by path, not by value)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("images", "path", "results")}
        d.update(path=str(self.path), results=str(self.results))
        return d


def _load_structure(base: Path, value: str, where: tuple[str, ...]) -> Atoms:
    path = (base / value).resolve()
    if not path.is_file():
        raise SpecError(f"{_at(where)}: file not found: {path}")
    try:
        atoms = read(path)
    except Exception as exc:  # ASE raises many kinds for unreadable files
        raise SpecError(f"{_at(where)}: cannot read {path} as a structure ({type(exc).__name__}: {exc})") from None
    if len(atoms) == 0:
        raise SpecError(f"{_at(where)}: {path} holds no atoms")
    other = sorted({type(c).__name__ for c in atoms.constraints} - {"FixAtoms"})
    if other:  # the store, the training and fmax know fixed atoms only: never drop a constraint silently
        raise SpecError(f"{_at(where)}: {path} has constraint(s) {', '.join(other)}; alflow supports FixAtoms only")
    return atoms


def _system(raw: Any, base: Path, kind: str, where: tuple[str, ...]) -> tuple[dict, list[Atoms]]:
    keys = ("initial", "final") if kind == "neb" else ("structure",)
    system = _fields(raw, where, {k: (_text, REQUIRED) for k in keys})
    images = [_load_structure(base, system[k], where + (k,)) for k in keys]
    if kind == "neb" and images[0].get_chemical_symbols() != images[1].get_chemical_symbols():
        raise SpecError(f"{_at(where)}: initial and final must have the same atoms in the same order")
    if kind == "neb" and (not np.allclose(images[0].cell.array, images[1].cell.array)
                          or not np.array_equal(images[0].pbc, images[1].pbc)):
        raise SpecError(f"{_at(where)}: initial and final must have the same cell and pbc")
    if kind == "neb" and not np.array_equal(free_mask(images[0]), free_mask(images[1])):
        # the band's images take the initial state's constraints: the final state's relaxation must too
        raise SpecError(f"{_at(where)}: initial and final must fix the same atoms (FixAtoms)")
    return system, images


def _oracle(raw: Any, where: tuple[str, ...], base: Path | None = None) -> dict:
    kind = raw.get("kind") if isinstance(raw, Mapping) else None
    if kind not in ORACLE_KINDS:
        raise SpecError(f"{_at(where + ('kind',))}: unknown oracle {kind!r} (known: {', '.join(ORACLE_KINDS)})")
    if kind in ("espresso", "vasp"):  # flat keys, validated by the oracle's settings (alflow/oracles/<kind>.py)
        from alflow.oracles import dft_settings
        from alflow.oracles.settings import SettingsError

        try:
            return {"kind": kind, **dft_settings(kind, raw, base).to_dict()}
        except SettingsError as exc:
            raise SpecError(f"{_at(where + exc.field)}: {exc.message}") from None
    if kind == "python":
        oracle = _fields(raw, where, {"kind": (_text, REQUIRED), "callable": (_text, REQUIRED), "kwargs": (_mapping, {})})
        if not re.fullmatch(r"[\w.]+:[\w.]+", oracle["callable"]):
            raise SpecError(
                f"{_at(where + ('callable',))}: must look like 'package.module:function', got {oracle['callable']!r}"
            )
        try:  # now, not at the first label: nothing is written or paid for an oracle that cannot exist
            import_callable(oracle["callable"])
        except ValueError as exc:
            raise SpecError(f"{_at(where + ('callable',))}: {exc}") from None
        return oracle
    oracle = _fields(raw, where, {"kind": (_text, REQUIRED), "options": (_mapping, {})})
    try:
        emt_options(oracle["options"])
    except ValueError as exc:
        raise SpecError(f"{_at(where + ('options',))}: {exc}") from None
    return oracle


MAX_NEURONS = 4096  # per hidden layer: beyond it a member's weights alone run to gigabytes


def _hidden(v):
    if not isinstance(v, list) or not v or any(
            isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_NEURONS for n in v):
        raise ValueError(f"must be a non-empty list of integers 1-{MAX_NEURONS} (neurons per hidden layer), got {v!r}")
    return list(v)


def _descriptor(v):
    """G2/G4 settings: ``cutoff`` (Å), ``g2_etas``, ``g4_etas``, ``g4_zetas``, ``g4_lambdas``;
    checked now (the elements come from the structures)."""
    from alflow.model.descriptors import SymmetryFunctions

    table = _mapping(v)
    allowed = [f.name for f in fields(SymmetryFunctions) if f.name != "elements"]
    unknown = sorted(set(table) - set(allowed), key=str)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})")
    number = _number()
    for key, value in table.items():
        values = [value] if key == "cutoff" else value
        try:
            if not isinstance(values, list):
                raise ValueError
            for n in values:
                number(n)  # the spec's own number check: no bool, string, NaN, inf or too-large integer
        except ValueError:
            raise ValueError(f"{key} must be {'a number' if key == 'cutoff' else 'a list of numbers'}, got {value!r}") from None
    SymmetryFunctions(("H",), **table)
    return table


def _morse_params(v):
    """element → {De, re, a[, source]}: checked now, so a bad table never reaches training."""
    from alflow.model.morse import MorseParameters

    table = _mapping(v)
    for element, params in table.items():
        try:
            MorseParameters(**_mapping(params))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{element}: {exc}") from None
    return table


def _model(raw: Any, where: tuple[str, ...]) -> dict:
    model = _fields(
        raw if raw is not None else {},
        where,
        {
            "prior": (_choice("morse", "none"), "morse"),
            "ensemble": (_integer(1), 5),
            "seed": (_integer(0, MAX_SEED), 0),
            "epochs": (_integer(1), 300),
            "force_coefficient": (_number(0.0, strict=False), 0.04),
            "bootstrap": (_boolean, True),
            # the descriptor scaling's least range, a fraction of each feature's magnitude
            # ("auto": max(0.05, 1/n) for n training structures)
            "feature_range_floor": (_number_or_auto(0.0), 0.05),
            # offline rounds continue the previous round's members for warm_epochs (a full refit
            # whenever the training set has doubled since the last one); online refits always do
            "warm_start": (_boolean, False),
            "warm_epochs": (_integer(1), 100),
            "morse_params": (_morse_params, None),
            "hidden": (_hidden, [20, 20]),  # neurons per hidden layer of each element's network
            "descriptor": (_descriptor, {}),  # G2/G4 settings (SymmetryFunctions), the paper's by default
        },
    )
    cutoff = model["descriptor"].get("cutoff")
    if model["prior"] == "morse" and cutoff is not None and cutoff < MORSE_SWITCH_WIDTH:
        raise SpecError(f"{_at(where + ('descriptor', 'cutoff'))}: must be >= {MORSE_SWITCH_WIDTH} Å with prior: morse "
                        f"(the prior is switched off over its last {MORSE_SWITCH_WIDTH} Å), got {cutoff}")
    return model


def _learner(raw: Any, kind: str, where: tuple[str, ...]) -> dict:
    from alflow import query, stop  # validated against the registries they own

    default_strategy = {"relax": "relax_final", "neb": "neb", "md": "random"}[kind]
    learner = _fields(
        raw,
        where,
        {
            "kind": (_choice("offline", "online"), "offline"),
            "query": (_mapping, {}),
            "stop": (_mapping, REQUIRED),
            "threshold": (_number(0.0), 0.05),  # online: uncertainty (eV/Å) above which the oracle is called
            "max_failures_per_iteration": (_integer(0), 3),
            # relax: refine from the best labelled structure once its oracle fmax (eV/Å) is below this
            "refine_below": (_optional(_number(0.0)), None),
            # relax, refining: match the model to the oracle at this many of the best labels below it
            "refine_anchors": (_integer(1), 2),
            # relax, refining: the ML relaxation's fmax (eV/Å; default: simulation.fmax)
            "refine_fmax": (_optional(_number(0.0)), None),
            # neb: Å; the band's model is matched to the oracle at the labels this close (3N distance)
            "match_within": (_optional(_number(0.0)), None),
            # neb, matching: ... where the model's force error there is at most this (eV/Å)
            "match_max_error": (_number(0.0), 1.0),
            # neb: Å; a band's initial state this close to a labelled structure borrows its label
            "reuse_initial_within": (_optional(_number(0.0)), None),
        },
    )
    if "threshold" in raw and learner["kind"] != "online":
        raise SpecError(f"{_at(where + ('threshold',))}: applies only to learner.kind: online; set that or remove it")
    if learner["refine_below"] is not None and (kind != "relax" or learner["kind"] != "offline"):
        raise SpecError(f"{_at(where + ('refine_below',))}: only offline relax campaigns refine; remove it")
    for key, needs in (("refine_anchors", "refine_below"), ("refine_fmax", "refine_below"),
                       ("match_max_error", "match_within")):
        if key in raw and learner[needs] is None:
            raise SpecError(f"{_at(where + (key,))}: applies only with learner.{needs}; set that or remove it")
    for key in ("reuse_initial_within", "match_within"):
        if learner[key] is not None and kind != "neb":
            raise SpecError(f"{_at(where + (key,))}: NEB campaigns only; remove it")
    if learner["match_within"] is not None and learner["kind"] != "offline":
        raise SpecError(f"{_at(where + ('match_within',))}: offline NEB campaigns only; remove it")
    q = dict(learner["query"])
    strategy = q.pop("strategy", default_strategy)
    samples = q.pop("samples", 1)
    for key, check in (("strategy", query.get_strategy), ("samples", _integer(0))):
        try:
            check(strategy if key == "strategy" else samples)
        except (ValueError, TypeError) as exc:
            raise SpecError(f"{_at(where + ('query', key))}: {exc}") from None
    if kind == "md" and samples < 1:  # an integer >= 0 by now
        raise SpecError(f"{_at(where + ('query', 'samples'))}: must be >= 1 for MD (the frames each round labels "
                        f"are those the stop criterion validates on), got {samples}")
    try:
        bad = query.option_error(strategy, q)
    except (ValueError, TypeError) as exc:  # a plug-in whose signature cannot be read
        raise SpecError(f"{_at(where + ('query', 'strategy'))}: {exc}") from None
    if bad is not None:
        raise SpecError(f"{_at(where + ('query', str(bad[0])))}: {bad[1]}")
    learner["query"] = {"strategy": strategy, "samples": samples, "options": q}
    if isinstance(learner["stop"], Mapping) and "endpoint_gap" in learner["stop"] and (
            q.get("endpoints") != "initial" or learner["kind"] != "offline"):
        raise SpecError(f"{_at(where + ('stop', 'endpoint_gap'))}: applies only to an offline NEB between equivalent "
                        "endpoints (learner.query.endpoints: initial); set that or remove it")
    try:
        stop.StopCriteria.from_dict(learner["stop"], kind)
    except ValueError as exc:
        raise SpecError(f"{_at(where + ('stop',))}: {exc}") from None
    return learner


def _report(raw: Any, where: tuple[str, ...]) -> dict:
    """What ``alflow report`` compares against: the oracle calls of the direct run (no learning)."""
    return _fields(raw if raw is not None else {}, where, {"direct_oracle_calls": (_integer(1), None)})


def parse_spec(data: Any, path: Path) -> CampaignSpec:
    """Validate an already-parsed spec mapping; ``path`` locates relative files and names errors."""
    where = (path.name,)
    top = {k: (_any, REQUIRED) for k in ("name", "system", "simulation", "oracle", "learner")}
    top.update(model=(_any, None), results=(_text, None), report=(_any, None))
    raw = _fields(data, where, top)
    try:
        name = _name(raw["name"])
    except ValueError as exc:
        raise SpecError(f"{_at(where + ('name',))}: {exc}") from None
    sim = raw["simulation"]
    kind = sim.get("kind") if isinstance(sim, Mapping) else None
    if not isinstance(kind, str) or kind not in SIMULATION_FIELDS:
        raise SpecError(f"{_at(where + ('simulation', 'kind'))}: must be one of {', '.join(SIMULATION_FIELDS)}, got {kind!r}")
    simulation = _fields({k: v for k, v in sim.items() if k != "kind"}, where + ("simulation",), SIMULATION_FIELDS[kind])
    base = path.parent
    system, images = _system(raw["system"], base, kind, where + ("system",))
    model = _model(raw["model"], where + ("model",))
    if model["prior"] == "morse":
        try:
            lookup(sorted(set(images[0].get_chemical_symbols())), model["morse_params"])
        except MissingMorseParameters as exc:
            raise SpecError(f"{_at(where + ('model', 'prior'))}: {exc}") from None
    results = (base / (raw["results"] or f"results/{name}")).resolve()
    if results.exists() and not results.is_dir():
        raise SpecError(f"{_at(where + ('results',))}: {results} exists and is not a directory")
    learner = _learner(raw["learner"], kind, where + ("learner",))
    if learner["kind"] == "online" and model["ensemble"] < 2:
        raise SpecError(f"{_at(where + ('model', 'ensemble'))}: online learning needs >= 2 members (the oracle is "
                        f"called where they disagree; one member never does), got {model['ensemble']}")
    return CampaignSpec(
        name=name,
        path=path.resolve(),
        kind=kind,
        images=images,
        system=system,
        simulation=simulation,
        oracle=_oracle(raw["oracle"], where + ("oracle",), base),
        model=model,
        learner=learner,
        results=results,
        report=_report(raw["report"], where + ("report",)),
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML forbids it; PyYAML's
    own loader keeps the last silently, so a second ``learner:`` would replace the first)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)  # merge keys (<<: *anchor) first, as the base loader does
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
            except TypeError:  # a list or mapping as a key: nothing a spec can use
                raise yaml.constructor.ConstructorError(None, None, "a key that is a list or mapping",
                                                        key_node.start_mark) from None
            if repeated:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_spec(path: str | Path) -> CampaignSpec:
    """Read and validate a campaign spec file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: spec file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path.name}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{path.name}: YAML syntax error{at}: {getattr(exc, 'problem', exc)}") from None
    return parse_spec(data, path)
