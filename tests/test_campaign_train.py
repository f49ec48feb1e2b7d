"""The Train step of an offline round: from scratch, or continuing the last round's ensemble."""

from __future__ import annotations

import pytest
from ase.io import write

from alflow import campaign as steps
from alflow.oracles import compute_label
from alflow.spec import load_spec
from alflow.store import Store
from alflow.systems import c_cu100

mongomock = pytest.importorskip("mongomock")


@pytest.fixture(scope="module", autouse=True)
def _gridfs():
    import mongomock.gridfs

    mongomock.gridfs.enable_gridfs_integration()


def new_campaign(tmp_path, warm: bool):
    write(tmp_path / "start.traj", c_cu100())
    (tmp_path / "spec.yaml").write_text(
        "name: warm\nsystem: {structure: start.traj}\nsimulation: {kind: relax}\noracle: {kind: emt}\n"
        f"model: {{ensemble: 2, epochs: 40, warm_start: {str(warm).lower()}, warm_epochs: 6}}\n"
        "learner: {stop: {fmax: 0.05, max_iterations: 9}}\n")
    spec = load_spec(tmp_path / "spec.yaml")
    store = Store(mongomock.MongoClient()["alflow"])
    steps.start(store, spec)
    return store, spec


def add_labels(store, spec, iteration: int, seeds) -> None:
    computed = []
    for s in seeds:
        atoms = c_cu100()
        atoms.rattle(0.05, seed=s)
        computed.append({"candidate": steps.Candidate.of(atoms, "query").to_dict(),
                         "result": compute_label(atoms, spec.oracle)})
    steps.merge(store, store.campaign(spec.name), iteration, computed, [])


def train_round(store, spec, iteration: int):
    pot, model_id = steps.train(store, store.campaign(spec.name), iteration)
    return pot, store.model(model_id)["metrics"]


def test_warm_start_continues_until_the_set_has_doubled(tmp_path):
    store, spec = new_campaign(tmp_path, warm=True)
    add_labels(store, spec, 0, [0])
    sizes_and_warm = []
    for iteration, new in ((1, [1, 2]), (2, [3]), (3, [4, 5]), (4, [6])):
        pot, metrics = train_round(store, spec, iteration)
        sizes_and_warm.append((metrics["n_structures"], metrics["warm_start"]))
        if metrics["warm_start"]:
            assert max(metrics["epochs"]) <= 6  # warm_epochs, not epochs
            # continuing a fitted ensemble keeps it fitted: the new structures are learnt too
            assert metrics["energy_mae_per_atom"] < 0.01 and metrics["force_mae"] < 0.15
        add_labels(store, spec, iteration, new)
    # full fit at 1, then at 3 (>= 2 x 1); warm at 4 (< 6); full at 6; warm at 7 (< 12)
    assert sizes_and_warm == [(1, False), (3, False), (4, True), (6, False)]
    pot, metrics = train_round(store, spec, 5)
    assert (metrics["n_structures"], metrics["warm_start"]) == (7, True)


def test_without_warm_start_every_round_fits_from_scratch(tmp_path):
    store, spec = new_campaign(tmp_path, warm=False)
    add_labels(store, spec, 0, [0, 1, 2])
    train_round(store, spec, 1)
    add_labels(store, spec, 1, [3])
    assert steps.warm_start_model(store, store.campaign(spec.name), 4) is None


def test_the_spec_model_settings_reach_the_ensemble(tmp_path):
    store, spec = new_campaign(tmp_path, warm=False)
    assert steps.new_potential(store.campaign(spec.name), 1).training.feature_range_floor == 0.05
    text = (tmp_path / "spec.yaml").read_text().replace("warm_epochs: 6", "warm_epochs: 6, feature_range_floor: 1.0")
    (tmp_path / "floor.yaml").write_text(text.replace("name: warm", "name: floor"))
    steps.start(store, load_spec(tmp_path / "floor.yaml"))
    training = steps.new_potential(store.campaign("floor"), 1).training
    assert (training.feature_range_floor, training.epochs, training.warm_epochs) == (1.0, 40, 6)


def test_the_spec_network_and_descriptor_reach_the_model_and_its_file(tmp_path):
    """``model.hidden`` and ``model.descriptor`` shape the ensemble; the stored model keeps them,
    and the ``diversity`` query compares frames in that same descriptor space."""
    store, spec = new_campaign(tmp_path, warm=False)
    default = steps.new_potential(store.campaign(spec.name), 1)
    assert default.hidden == (20, 20) and default.descriptor.n_features == 20  # the paper's
    text = (tmp_path / "spec.yaml").read_text().replace(
        "warm_epochs: 6", "warm_epochs: 6, hidden: [8], descriptor: {cutoff: 5.0, g2_etas: [0.05, 5, 80]}")
    (tmp_path / "custom.yaml").write_text(text.replace("name: warm", "name: custom"))
    spec = load_spec(tmp_path / "custom.yaml")
    steps.start(store, spec)
    add_labels(store, spec, 0, [0, 1])
    pot, model_id = steps.train(store, store.campaign("custom"), 1)
    assert pot.hidden == (8,) and pot.descriptor.cutoff == 5.0 and pot.descriptor.g2_etas == (0.05, 5.0, 80.0)
    assert pot.descriptor.n_features == 2 * 3 + 3 * 4
    loaded = store.load_model(model_id)
    assert (loaded.hidden, loaded.descriptor) == (pot.hidden, pot.descriptor)
    assert steps.descriptor(store.campaign("custom")) == pot.descriptor
