"""Campaign spec validation: every error is one line naming the file and the field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ase.io import write

from alflow.spec import SpecError, load_spec
from alflow.systems import c_cu100, o_cu100_neb_endpoints

BASE = {
    "name": "c-cu100-relax",
    "system": {"structure": "start.traj"},
    "simulation": {"kind": "relax", "fmax": 0.03},
    "oracle": {"kind": "emt"},
    "model": {"prior": "morse", "ensemble": 5},
    "learner": {"kind": "offline", "query": {"strategy": "relax_final", "samples": 1},
                "stop": {"fmax": 0.03, "max_iterations": 20}},
}


@pytest.fixture
def folder(tmp_path) -> Path:
    write(tmp_path / "start.traj", c_cu100())
    initial, final = o_cu100_neb_endpoints()
    write(tmp_path / "initial.traj", initial)
    write(tmp_path / "final.traj", final)
    return tmp_path


def spec_file(folder: Path, data, name: str = "campaign.yaml") -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def edited(**changes) -> dict:
    """BASE with dotted-path changes; a value of ... deletes the key."""
    d = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = d
        for p in parents:
            node = node[p]
        if value is ...:
            del node[last]
        else:
            node[last] = value
    return d


def test_valid_spec_loads_with_defaults_and_structures(folder):
    spec = load_spec(spec_file(folder, BASE))
    assert spec.kind == "relax" and len(spec.images[0]) == 13
    assert spec.simulation == {"optimizer": "BFGS", "fmax": 0.03, "steps": 500}
    assert spec.learner["query"] == {"strategy": "relax_final", "samples": 1, "options": {}}
    assert spec.results == (folder / "results" / "c-cu100-relax").resolve()
    assert spec.to_dict()["oracle"] == {"kind": "emt", "options": {}}


def test_neb_spec_needs_initial_and_final(folder):
    data = edited(system={"initial": "initial.traj", "final": "final.traj"},
                  simulation={"kind": "neb", "images": 3, "climb": True},
                  learner={"query": {"strategy": "neb"}, "stop": {"energy_tol": 0.01}})
    spec = load_spec(spec_file(folder, data))
    assert spec.kind == "neb" and len(spec.images) == 2 and spec.simulation["images"] == 3
    data["system"] = {"initial": "initial.traj"}
    with pytest.raises(SpecError, match=r"campaign.yaml: system.final: required"):
        load_spec(spec_file(folder, data))


def test_neb_band_matching_keys(folder):
    data = edited(system={"initial": "initial.traj", "final": "final.traj"},
                  simulation={"kind": "neb", "images": 3, "endpoint_fmax": 0.01},
                  learner={"query": {"strategy": "neb"}, "stop": {"energy_tol": 0.01, "saddle_fmax": 0.1},
                           "match_within": 0.5})
    spec = load_spec(spec_file(folder, data))
    assert spec.learner["match_within"] == 0.5 and spec.learner["match_max_error"] == 1.0
    assert spec.simulation["endpoint_fmax"] == 0.01
    for learner, message in (({"match_within": -0.5}, r"learner.match_within: must be a number > 0.0, got -0.5"),
                             ({"match_within": 0.5, "match_max_error": 0}, r"learner.match_max_error: must be a number > 0.0"),
                             ({"match_within": 0.5, "kind": "online"}, r"learner.match_within: offline NEB campaigns only")):
        bad = {**data, "learner": {**data["learner"], **learner}}
        with pytest.raises(SpecError, match="campaign.yaml: " + message):
            load_spec(spec_file(folder, bad))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(bogus=1), r"campaign.yaml: bogus: unknown key"),
        (dict(name=...), r"campaign.yaml: name: required"),
        (dict(name="has space"), r"campaign.yaml: name: must be"),
        (dict(simulation__kind="anneal"), r"campaign.yaml: simulation.kind: must be one of relax, neb, md"),
        (dict(simulation__fmax=-0.1), r"campaign.yaml: simulation.fmax: must be a number > 0.0, got -0.1"),
        (dict(simulation__temperature_K=300), r"campaign.yaml: simulation.temperature_K: unknown key"),
        (dict(system__structure="missing.traj"), r"campaign.yaml: system.structure: file not found: .*missing.traj"),
        (dict(oracle__kind="gaussian"), r"campaign.yaml: oracle.kind: unknown oracle 'gaussian'"),
        (dict(oracle={"kind": "python", "callable": "no_colon"}), r"campaign.yaml: oracle.callable: must look like"),
        (dict(model__ensemble=0), r"campaign.yaml: model.ensemble: must be an integer >= 1, got 0"),
        (dict(model__prior="lj"), r"campaign.yaml: model.prior: must be one of morse, none"),
        (dict(learner__query__strategy="clever"), r"campaign.yaml: learner.query.strategy: .*clever"),
        (dict(learner__query__strategy=5), r"campaign.yaml: learner.query.strategy: .*must be a string"),
        (dict(simulation__fmax=float("nan")), r"campaign.yaml: simulation.fmax: must be a finite number, got nan"),
        (dict(learner__refine_below=float("inf")), r"campaign.yaml: learner.refine_below: must be a finite number"),
        (dict(learner__query__samples=-1), r"campaign.yaml: learner.query.samples: must be an integer >= 0"),
        (dict(learner__stop=...), r"campaign.yaml: learner.stop: required"),
        (dict(learner__stop={"fmx": 0.03}), r"campaign.yaml: learner.stop: .*fmx"),
        (dict(learner__stop={"energy_tol": 0.01}), r"campaign.yaml: learner.stop: .*energy_tol"),  # a NEB criterion
        (dict(learner__kind="semi"), r"campaign.yaml: learner.kind: must be one of offline, online"),
        (dict(model__bootstrap=3), r"campaign.yaml: model.bootstrap: must be true or false, got 3"),
        (dict(model__feature_range_floor=0), r"campaign.yaml: model.feature_range_floor: must be a number > 0.0 or 'auto'"),
        (dict(model__feature_range_floor="big"), r"campaign.yaml: model.feature_range_floor: .*'auto', got 'big'"),
        (dict(learner__refine_below=0), r"campaign.yaml: learner.refine_below: must be a number > 0.0, got 0"),
        (dict(learner__refine_anchors=2), r"campaign.yaml: learner.refine_anchors: applies only with learner.refine_below"),
        (dict(learner__refine_below=1.0, learner__refine_anchors=0),
         r"campaign.yaml: learner.refine_anchors: must be an integer >= 1, got 0"),
        (dict(learner__refine_fmax=0.01), r"campaign.yaml: learner.refine_fmax: applies only with learner.refine_below"),
        (dict(learner__match_within=0.5), r"campaign.yaml: learner.match_within: NEB campaigns only"),
        (dict(learner__match_max_error=1.0),
         r"campaign.yaml: learner.match_max_error: applies only with learner.match_within"),
        (dict(simulation__endpoint_fmax=0.01), r"campaign.yaml: simulation.endpoint_fmax: unknown key"),  # NEB only
        (dict(learner__query={"strategy": "relax_final", "samples": 1, "endpoints": "initial"}),
         r"campaign.yaml: learner.query.endpoints: not an option of query strategy 'relax_final'"),
        (dict(learner__kind="online", learner__refine_below=0.3),
         r"campaign.yaml: learner.refine_below: only offline relax campaigns refine"),
        (dict(model__morse_params={"Cu": {"De": 2.0, "re": 2.2, "a": -1.0}}),
         r"campaign.yaml: model.morse_params: Cu: Morse parameter a must be a positive number, got -1.0"),
        (dict(simulation__kind=["relax"]), r"campaign.yaml: simulation.kind: must be one of relax, neb, md, got \['relax'\]"),
        (dict(oracle={"kind": "python", "callable": "no_such_module.oracles:make"}),
         r"campaign.yaml: oracle.callable: cannot import oracle callable 'no_such_module.oracles:make'"),
        (dict(oracle={"kind": "emt", "options": {"asap_cutoff": True, "cutoff": 6}}),
         r"campaign.yaml: oracle.options: unknown option\(s\) cutoff for the emt oracle"),
        (dict(learner__threshold=0.1), r"campaign.yaml: learner.threshold: applies only to learner.kind: online"),
        (dict(model__seed=2**63 - 5), r"campaign.yaml: model.seed: must be an integer >= 0 and <= 4611686018427387904"),
        (dict(results="start.traj"), r"campaign.yaml: results: .*start.traj exists and is not a directory"),
        (dict(model__hidden=[20, 0]), r"campaign.yaml: model.hidden: must be a non-empty list of integers 1-4096"),
        (dict(model__hidden=20), r"campaign.yaml: model.hidden: must be a non-empty list of integers 1-4096"),
        (dict(model__descriptor={"g2_eta": [1.0]}), r"campaign.yaml: model.descriptor: unknown key 'g2_eta'"),
        (dict(model__descriptor={"g2_etas": [0.05, -1]}),
         r"campaign.yaml: model.descriptor: g2_etas must be a non-empty list of numbers >= 0, got \[0.05, -1.0\]"),
        (dict(model__descriptor={"g4_lambdas": [0.5]}), r"campaign.yaml: model.descriptor: g4_lambdas must be .* -1 or 1"),
        (dict(model__descriptor={"g4_zetas": []}), r"campaign.yaml: model.descriptor: g4_zetas must be a non-empty list"),
        (dict(model__descriptor={"cutoff": "6"}), r"campaign.yaml: model.descriptor: cutoff must be a number, got '6'"),
        (dict(model__descriptor={"cutoff": 0}), r"campaign.yaml: model.descriptor: cutoff must be a positive number"),
        (dict(model__descriptor={"g2_etas": 5.0}), r"campaign.yaml: model.descriptor: g2_etas must be a list of numbers"),
        (dict(model__descriptor={"cutoff": 0.8}),  # inside the Morse prior's switching width
         r"campaign.yaml: model.descriptor.cutoff: must be >= 1.0 Å with prior: morse .*got 0.8"),
        (dict(model__descriptor={"cutoff": 10**400}), r"campaign.yaml: model.descriptor: cutoff must be a number, got 1000"),
        (dict(model__descriptor={"g2_etas": [10**400]}), r"campaign.yaml: model.descriptor: g2_etas must be a list of numbers"),
        (dict(model__descriptor={"g4_zetas": [2000]}),  # 2^(1-ζ) underflows, (1 + λ cos θ)^ζ overflows: NaN
         r"campaign.yaml: model.descriptor: g4_zetas must be a non-empty list of numbers 0 or in \[1, 64\]"),
        (dict(model__hidden=[5000]), r"campaign.yaml: model.hidden: must be a non-empty list of integers 1-4096"),
        (dict(model__force_coefficient=10**400), r"campaign.yaml: model.force_coefficient: must be a finite number"),
        (dict(learner__stop={"fmax": 10**400}), r"campaign.yaml: learner.stop: stop criterion 'fmax' must be a finite"),
        (dict(learner__stop={"fmax": 0.05, "max_oracle_calls": 2**64}),  # past a stored (64-bit) integer
         r"campaign.yaml: learner.stop: stop criterion 'max_oracle_calls' must be an integer >= 1 \(and <= 2\^62"),
        (dict(learner__kind="online", model__ensemble=1),
         r"campaign.yaml: model.ensemble: online learning needs >= 2 members .*got 1"),
        (dict(model__epochs=2**64), r"campaign.yaml: model.epochs: must be an integer >= 1 and <= 4611686018427387904, got"),
        (dict(learner__query={"strategy": "random", "samples": 1, 3: "x"}),
         r"campaign.yaml: learner.query.3: not an option of query strategy 'random'"),
        (dict(learner__query__strategy="broken_plugin:pick"),  # the module raises as it is imported
         r"campaign.yaml: learner.query.strategy: .*cannot import module 'broken_plugin' \(RuntimeError: this plug-in"),
    ],
)
def test_bad_fields_give_one_line_errors_naming_them(folder, changes, message):
    with pytest.raises(SpecError, match=message) as err:
        load_spec(spec_file(folder, edited(**changes)))
    assert "\n" not in str(err.value)


def test_yaml_syntax_error_names_file_and_line(folder):
    with pytest.raises(SpecError, match=r"campaign.yaml: YAML syntax error at line 2, column 9") as err:
        load_spec(spec_file(folder, "name: x\nsystem: : {structure: a}\n"))
    assert "\n" not in str(err.value)


def test_missing_spec_file_and_unreadable_structure(folder):
    with pytest.raises(SpecError, match="nowhere.yaml: spec file not found"):
        load_spec(folder / "nowhere.yaml")
    (folder / "junk.traj").write_text("not a structure")
    with pytest.raises(SpecError, match=r"system.structure: cannot read .*junk.traj"):
        load_spec(spec_file(folder, edited(system__structure="junk.traj")))


def test_a_constraint_alflow_cannot_keep_is_refused_not_dropped(folder):
    from ase.constraints import FixAtoms, FixCartesian

    atoms = c_cu100()
    atoms.set_constraint([FixAtoms(indices=[0]), FixCartesian(12, mask=(True, True, False))])
    write(folder / "cartesian.traj", atoms)
    with pytest.raises(SpecError, match=r"system.structure: .*cartesian.traj has constraint\(s\) FixCartesian; "
                                        r"alflow supports FixAtoms only"):
        load_spec(spec_file(folder, edited(system__structure="cartesian.traj")))


def test_validation_writes_nothing(folder):
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(SpecError):
        load_spec(spec_file(folder, edited(model__ensemble=0), "bad.yaml"))
    assert sorted(p.name for p in folder.iterdir()) == sorted(before + ["bad.yaml"])


def test_what_would_fail_only_after_paying_is_refused_first(folder):
    """Spec errors that used to surface at the first label or training, after calls were paid."""
    from ase.build import bulk

    write(folder / "fe.traj", bulk("Fe", cubic=True))
    with pytest.raises(SpecError, match=r"campaign.yaml: model.prior: no Morse parameters for element\(s\) Fe"):
        load_spec(spec_file(folder, edited(system__structure="fe.traj")))
    load_spec(spec_file(folder, edited(system__structure="fe.traj", model__prior="none")))
    neb = edited(system={"initial": "initial.traj", "final": "stretched.traj"},
                 simulation={"kind": "neb", "images": 3}, learner={"stop": {"energy_tol": 0.01}})
    _, final = o_cu100_neb_endpoints()
    final.set_cell(final.cell * 1.01, scale_atoms=True)
    write(folder / "stretched.traj", final)
    with pytest.raises(SpecError, match=r"campaign.yaml: system: initial and final must have the same cell and pbc"):
        load_spec(spec_file(folder, neb))
    _, final = o_cu100_neb_endpoints()
    final.set_constraint()  # e.g. an .xyz final state, which keeps no constraints: its slab would relax freely
    write(folder / "stretched.traj", final)
    with pytest.raises(SpecError, match=r"campaign.yaml: system: initial and final must fix the same atoms"):
        load_spec(spec_file(folder, neb))


def test_a_key_given_twice_or_bytes_that_are_not_utf8_are_refused(folder):
    text = yaml.safe_dump(BASE) + "learner: {stop: {fmax: 0.5}}\n"  # a second learner: would replace the first
    with pytest.raises(SpecError, match=r"campaign.yaml: YAML syntax error at line \d+, column 1: key 'learner' given twice"):
        load_spec(spec_file(folder, text))
    (folder / "latin1.yaml").write_bytes(("# r\u00e9sum\u00e9\n" + yaml.safe_dump(BASE)).encode("latin-1"))
    with pytest.raises(SpecError, match=r"latin1.yaml: not UTF-8 text"):
        load_spec(folder / "latin1.yaml")


def test_yaml_merge_keys_load_and_a_list_as_key_is_one_line(folder):
    base = yaml.safe_dump({k: v for k, v in BASE.items() if k != "model"})
    spec = load_spec(spec_file(folder, base + "model: {<<: {ensemble: 2, epochs: 5}, seed: 1}\n"))
    assert (spec.model["ensemble"], spec.model["epochs"], spec.model["seed"]) == (2, 5, 1)
    with pytest.raises(SpecError, match=r"YAML syntax error at line \d+, column \d+: a key that is a list or mapping"):
        load_spec(spec_file(folder, yaml.safe_dump(BASE) + "? [a, b]\n: 1\n"))


def test_an_oracle_module_that_fails_on_import_is_a_spec_error(folder, monkeypatch):
    (folder / "needs_env.py").write_text("import os\nSCRATCH = os.environ['ALFLOW_TEST_NO_SUCH_VARIABLE']\n")
    monkeypatch.syspath_prepend(str(folder))
    with pytest.raises(SpecError, match=r"oracle.callable: cannot import oracle callable 'needs_env:make': "
                                        r"KeyError: 'ALFLOW_TEST_NO_SUCH_VARIABLE'"):
        load_spec(spec_file(folder, edited(oracle={"kind": "python", "callable": "needs_env:make"})))


@pytest.mark.parametrize("zetas", [[0.5], [-1.0]])
def test_descriptor_zetas_below_one_are_refused_but_zero_is_allowed(folder, zetas):
    """0 < ζ < 1 gives an infinite force at collinear triplets; ζ = 0 (a radial pair product) is fine."""
    with pytest.raises(SpecError, match=r"model.descriptor: g4_zetas must be a non-empty list of numbers 0 or in \[1, 64\]"):
        load_spec(spec_file(folder, edited(model__descriptor={"g4_zetas": zetas})))
    assert load_spec(spec_file(folder, edited(model__descriptor={"g4_zetas": [0, 2]}))).model["descriptor"] == {
        "g4_zetas": [0, 2]}


def test_a_short_descriptor_cutoff_is_fine_without_the_morse_prior(folder):
    spec = load_spec(spec_file(folder, edited(model__prior="none", model__descriptor={"cutoff": 0.8})))
    assert spec.model["descriptor"] == {"cutoff": 0.8}


def test_an_md_campaign_must_label_at_least_one_frame_a_round(folder):
    md = dict(simulation={"kind": "md", "steps": 100},
              learner={"kind": "offline", "query": {"strategy": "random", "samples": 0}, "stop": {"force_mae": 0.05}})
    with pytest.raises(SpecError, match=r"campaign.yaml: learner.query.samples: must be >= 1 for MD .*got 0"):
        load_spec(spec_file(folder, edited(**md)))
