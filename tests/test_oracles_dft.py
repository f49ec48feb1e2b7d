"""DFT oracles (Quantum ESPRESSO, VASP under custodian): settings, inputs, classified failures,
scratch directories, the label-cache key. Stand-in executables by default; the real pw.x with
``pytest -m dft``."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase.build import bulk, fcc100
from ase.calculators.emt import EMT
from ase.io import write

from alflow.oracles import cache_settings, compute_label, describe, oracle_options
from alflow.oracles.espresso import (
    DEBIAN_PSEUDO_DIR,
    EspressoOracle,
    EspressoSettings,
    check_output,
)
from alflow.oracles.external import RunSettings, child_environment
from alflow.oracles.failures import CodeCrashed, SCFNotConverged
from alflow.spec import SpecError, load_spec
from alflow.systems import c_cu100

HERE = Path(__file__).parent
PYTHON = shlex.quote(sys.executable)


def fake_pw(mode: str, *extra: str) -> str:
    return f"{PYTHON} {shlex.quote(str(HERE / 'fake_pw.py'))} --mode {mode} " + " ".join(extra)


@pytest.fixture
def pseudo(tmp_path) -> Path:
    """A pseudopotential folder with (stand-in) files for Cu and C."""
    folder = tmp_path / "pseudo"
    folder.mkdir()
    (folder / "Cu.pbe.UPF").write_text("<UPF version='2.0.1'> stand-in Cu </UPF>\n")
    (folder / "C.pbe.UPF").write_text("<UPF version='2.0.1'> stand-in C </UPF>\n")
    return folder


def qe(pseudo: Path, **changes) -> dict:
    """A validated espresso oracle section (as a spec holds it), with ``changes``."""
    raw = {"kind": "espresso", "pseudo_dir": str(pseudo),
           "pseudopotentials": {"Cu": "Cu.pbe.UPF", "C": "C.pbe.UPF"},
           "input_data": {"ecutwfc": 25, "ecutrho": 200, "occupations": "smearing", "smearing": "mv",
                          "degauss": 0.02},
           "kpts": [2, 2, 1], "command": fake_pw("ok")}
    raw.update(changes)
    return {"kind": "espresso", **EspressoSettings.from_mapping(raw).to_dict()}


# ---------------------------------------------------------------------------------------------
# settings in the campaign spec


def spec_with_oracle(folder: Path, oracle: dict) -> Path:
    write(folder / "start.traj", c_cu100())
    data = {"name": "dft", "system": {"structure": "start.traj"}, "simulation": {"kind": "relax"},
            "oracle": oracle, "learner": {"stop": {"fmax": 0.05, "max_iterations": 2}}}
    path = folder / "campaign.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


QE_OK = {"kind": "espresso", "pseudopotentials": {"Cu": "Cu.UPF"}, "input_data": {"ecutwfc": 30}}


@pytest.mark.parametrize("changes, message", [
    (dict(bogus=1), r"oracle.bogus: unknown key \(allowed: command, mpi_ranks"),
    (dict(pseudopotentials=...), r"oracle.pseudopotentials: required"),
    (dict(pseudopotentials={"Xx": "a.UPF"}), r"oracle.pseudopotentials.Xx: not a chemical element"),
    (dict(input_data={"ecutrho": 200}), r"oracle.input_data.ecutwfc: required"),
    (dict(input_data={"ecutwfc": -1}), r"oracle.input_data.ecutwfc: must be a number > 0, got -1"),
    (dict(input_data={"ecutwfc": 30, "ecutwcf": 3}), r"oracle.input_data.ecutwcf: not a pw.x parameter"),
    (dict(input_data={"system": {"ecutwfc": 30}, "electrons": {"electron_maxstep": 0}}),
     r"oracle.input_data.electrons.electron_maxstep: must be an integer >= 1"),
    (dict(input_data={"ecutwfc": 30, "calculation": "relax"}), r"oracle.input_data.calculation: set by alflow"),
    (dict(input_data={"ecutwfc": 30, "pseudo_dir": "x"}), r"oracle.input_data.pseudo_dir: set by alflow"),
    (dict(input_data={"ecutwfc": 30, "celldm(1)": 10.0}), r"oracle.input_data.celldm\(1\): set by alflow"),
    (dict(input_data={"ecutwfc": 30, "Ecutwfc": 40}), r"oracle.input_data.[Ee]cutwfc: given twice"),
    (dict(input_data={"ecutwfc": 30, "system": {"ecutwfc": 40}}), r"oracle.input_data.system.ecutwfc: given twice"),
    (dict(input_data={"ions": {"ion_dynamics": "bfgs"}, "ecutwfc": 30}), r"oracle.input_data.ions: not a namelist"),
    (dict(kpts=[2, 2]), r"oracle.kpts: must be three integers >= 1"),
    (dict(mpi_ranks=0), r"oracle.mpi_ranks: must be an integer >= 1, got 0"),
    (dict(launcher="srun -n {nprocs}"), r"oracle.launcher: may only use the placeholder \{ranks\}"),
    (dict(timeout_s=-5), r"oracle.timeout_s: must be a number > 0"),
    (dict(keep_scratch="yes"), r"oracle.keep_scratch: must be true or false"),
])
def test_espresso_settings_errors_name_the_field(tmp_path, changes, message):
    oracle = dict(QE_OK)
    for key, value in changes.items():
        if value is ...:
            del oracle[key]
        else:
            oracle[key] = value
    with pytest.raises(SpecError, match=r"^campaign.yaml: " + message) as info:
        load_spec(spec_with_oracle(tmp_path, oracle))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("changes, message", [
    (dict(incar=...), r"oracle.incar: required"),
    (dict(incar={"ENCUT": 400, "NSW": 10}), r"oracle.incar.NSW: set by alflow"),
    (dict(incar={"ENCUT": {"a": 1}}), r"oracle.incar.ENCUT: must be a number, string or true/false"),
    (dict(handlers=["NoSuchHandler"]), r"oracle.handlers: must be a list of custodian VASP handlers"),
    (dict(kpts="2 2 1"), r"oracle.kpts: must be three integers"),
])
def test_vasp_settings_errors_name_the_field(tmp_path, changes, message):
    oracle = {"kind": "vasp", "incar": {"ENCUT": 400}}
    for key, value in changes.items():
        if value is ...:
            del oracle[key]
        else:
            oracle[key] = value
    with pytest.raises(SpecError, match=r"^campaign.yaml: " + message):
        load_spec(spec_with_oracle(tmp_path, oracle))


def test_spec_normalises_the_oracle_and_resolves_paths_against_the_spec_file(tmp_path):
    oracle = dict(QE_OK, pseudo_dir="pp", scratch="scratch", input_data={"system": {"ECUTWFC": 30}})
    spec = load_spec(spec_with_oracle(tmp_path, oracle))
    o = spec.oracle
    assert o["kind"] == "espresso" and o["pseudo_dir"] == str(tmp_path.resolve() / "pp")
    assert o["scratch"] == str(tmp_path.resolve() / "scratch")
    assert o["input_data"] == {"ecutwfc": 30.0} and o["kpts"] == [1, 1, 1] and o["mpi_ranks"] == 1
    assert load_spec(spec_with_oracle(tmp_path, dict(QE_OK))).oracle["pseudo_dir"] == DEBIAN_PSEUDO_DIR
    assert EspressoSettings.from_mapping(o).to_dict() == {k: v for k, v in o.items() if k != "kind"}  # idempotent
    vasp = load_spec(spec_with_oracle(tmp_path, {"kind": "vasp", "incar": {"encut": 400}, "pp_path": "potcars"})).oracle
    assert vasp["incar"] == {"ENCUT": 400} and vasp["pp_path"] == str(tmp_path.resolve() / "potcars")


def test_launcher_ranks_and_environment():
    assert RunSettings(command="pw.x").argv() == ["pw.x"]
    assert RunSettings(command="pw.x -nk 2", mpi_ranks=4).argv() == ["mpirun", "-np", "4", "pw.x", "-nk", "2"]
    assert RunSettings(command="pw.x", mpi_ranks=2, launcher="srun -n {ranks} --exclusive").argv()[:4] == \
        ["srun", "-n", "2", "--exclusive"]
    assert RunSettings(command="pw.x", mpi_ranks=8, launcher="").argv() == ["pw.x"]
    env = child_environment()
    assert env["OMP_NUM_THREADS"] == os.environ.get("OMP_NUM_THREADS", "1")
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # Open MPI refuses root without these
        assert env["OMPI_ALLOW_RUN_AS_ROOT"] == "1" and env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"


# ---------------------------------------------------------------------------------------------
# the label-cache key


def test_cache_key_ignores_how_the_code_runs_but_not_the_physics(tmp_path, pseudo):
    from alflow.store.hashing import settings_hash

    def key(oracle):
        return settings_hash(cache_settings(oracle))

    base = qe(pseudo)
    same = qe(pseudo, mpi_ranks=8, command="/opt/qe/bin/pw.x -nk 2", launcher="srun -n {ranks}", timeout_s=60,
              keep_scratch=True, scratch=str(tmp_path / "elsewhere"))
    assert key(same) == key(base)
    moved = tmp_path / "moved"
    shutil.copytree(pseudo, moved)  # the same files in another folder: the same labels
    assert key(qe(moved)) == key(base)
    assert key(qe(pseudo, kpts=[3, 3, 1])) != key(base)
    assert key(qe(pseudo, input_data={"ecutwfc": 30, "ecutrho": 200, "occupations": "smearing", "smearing": "mv",
                                      "degauss": 0.02})) != key(base)
    (moved / "Cu.pbe.UPF").write_text("<UPF> another Cu </UPF>\n")  # same name, other content
    assert key(qe(moved)) != key(base)
    vasp = {"kind": "vasp", "incar": {"ENCUT": 400}}
    assert key(dict(vasp, mpi_ranks=4, max_errors=9, pp_path="/x", command="vasp_gam")) == key(vasp)
    assert key(dict(vasp, incar={"ENCUT": 500})) != key(vasp)


def test_vasp_cache_key_holds_each_elements_potcar_by_content(tmp_path):
    from alflow.store.hashing import settings_hash

    def library(name: str, cu: str) -> str:
        for element, text in (("Cu", cu), ("C", "PAW_PBE C 08Apr2002")):
            (tmp_path / name / "potpaw_PBE" / element).mkdir(parents=True, exist_ok=True)
            (tmp_path / name / "potpaw_PBE" / element / "POTCAR").write_text(text + "\n")
        return str(tmp_path / name)

    def key(pp_path, elements=("Cu", "C")):
        return settings_hash(cache_settings({"kind": "vasp", "incar": {"ENCUT": 400}, "pp_path": pp_path}, elements))

    v52, v54 = library("52", "PAW_PBE Cu 22Jun2005"), library("54", "PAW_PBE Cu 05Jan2001 (another release)")
    assert key(library("copy", "PAW_PBE Cu 22Jun2005")) == key(v52)  # the same files elsewhere: the same labels
    assert key(v54) != key(v52)  # the same names, other potentials: other labels
    vasp = {"kind": "vasp", "incar": {"ENCUT": 400}}
    potcars = cache_settings({**vasp, "pp_path": v52}, ["Cu", "C", "Cu"])["potcars"]
    assert potcars["Cu"]["file"] == "Cu/POTCAR" and len(potcars["C"]["sha256"]) == 64
    assert cache_settings({**vasp, "pp_path": str(tmp_path / "none")}, ["Cu"])["potcars"] == {"Cu": None}
    assert cache_settings({"kind": "emt", "options": {}}) == {"kind": "emt", "options": {}}  # unchanged for emt


# ---------------------------------------------------------------------------------------------
# Quantum ESPRESSO: input, output checks, scratch, classified failures (stand-in pw.x)


def test_pw_input_is_written_with_the_settings(tmp_path, pseudo):
    settings = EspressoSettings.from_mapping(qe(pseudo, input_data={"ecutwfc": 27.5, "conv_thr": 1e-8},
                                                koffset=[1, 1, 0]))
    atoms = c_cu100()  # bottom layer fixed: the oracle still wants every force
    text = EspressoOracle(settings).write_input(atoms, tmp_path).read_text()
    assert f"pseudo_dir       = '{pseudo}'" in text
    assert "ecutwfc          = 27.5" in text and "conv_thr         = 1e-08" in text
    assert "calculation      = 'scf'" in text and "tprnfor          = .true." in text
    assert "outdir           = '.'" in text
    assert "K_POINTS automatic\n2 2 1  1 1 0" in text
    assert "Cu 63.546 Cu.pbe.UPF" in text and "C 12.011 C.pbe.UPF" in text
    positions = text.split("ATOMIC_POSITIONS angstrom\n")[1].split("\n\n")[0].splitlines()
    assert len(positions) == len(atoms) and all(len(line.split()) == 4 for line in positions)  # no if_pos masks
    gamma = EspressoSettings.from_mapping(qe(pseudo, kpts=None))
    assert "K_POINTS gamma" in EspressoOracle(gamma).write_input(atoms, tmp_path).read_text()
    assert describe(*oracle_options(qe(pseudo))) == \
        "Quantum ESPRESSO pw.x (ecutwfc=25 Ry, kpts 2x2x1, C.pbe.UPF, Cu.pbe.UPF)"


SCF_NOT_CONVERGED = """
     total energy              =    -213.10751811 Ry
     estimated scf accuracy    <       0.00329478 Ry

     convergence NOT achieved after 100 iterations: stopping

     JOB DONE.
"""


def test_output_check_classifies_canned_outputs(tmp_path):
    out, err = tmp_path / "espresso.pwo", tmp_path / "espresso.err"
    out.write_text(SCF_NOT_CONVERGED)
    for status in (2, 0):  # pw.x 6.7 exits 2; with another exit status it is still an SCF failure
        with pytest.raises(SCFNotConverged, match="convergence NOT achieved after 100 iterations"):
            check_output(out, status)
    out.write_text("\n     Error in routine cdiaghg (117):\n     S matrix not positive definite\n")
    with pytest.raises(CodeCrashed, match=r"status 1: Error in routine cdiaghg \(117\): S matrix not positive"):
        check_output(out, 1)
    out.write_text("     Program PWSCF\n")
    err.write_text("line 1\nforrtl: severe (174): SIGSEGV, segmentation fault occurred\n")
    with pytest.raises(CodeCrashed, match="status 139: line 1 | forrtl: severe"):
        check_output(out, 139, err)
    check_output(out, 0)  # exit 0 and no failure message: ASE reads the results next


def test_successful_call_labels_and_removes_its_scratch(tmp_path, pseudo, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the launch directory
    atoms = c_cu100()
    result = compute_label(atoms, qe(pseudo))
    ref = atoms.copy()
    ref.calc = EMT()
    assert result["status"] == "ok"
    assert result["energy"] == pytest.approx(ref.get_potential_energy(), abs=1e-6)
    np.testing.assert_allclose(result["forces"], ref.get_forces(apply_constraint=False), atol=1e-5)
    assert list((tmp_path / "oracle_scratch").iterdir()) == []  # removed after success
    kept = compute_label(atoms, qe(pseudo, keep_scratch=True, scratch=str(tmp_path / "keep")))
    assert kept["status"] == "ok"
    (directory,) = (tmp_path / "keep").iterdir()
    assert {"espresso.pwi", "espresso.pwo"} <= {p.name for p in directory.iterdir()}


@pytest.mark.parametrize("mode, failure_class, reason", [
    ("scf", "scf", "SCFNotConverged: pw.x SCF not converged: convergence NOT achieved after   2 iterations"),
    ("crash", "crash", r"CodeCrashed: pw.x exited with status 1: Error in routine readpp \(1\): file /nonexistent"),
    ("empty", "crash", "CodeCrashed: pw.x output holds no readable results"),
    ("nan", "nonfinite", "NonFiniteResult: espresso returned energy or forces that are not finite"),
])
def test_failed_call_is_classified_and_keeps_its_scratch(tmp_path, pseudo, monkeypatch, mode, failure_class, reason):
    monkeypatch.chdir(tmp_path)
    result = compute_label(c_cu100(), qe(pseudo, command=fake_pw(mode)))
    assert result["status"] == "failed" and result["failure_class"] == failure_class
    assert "energy" not in result and result["seconds"] > 0
    import re

    assert re.match(reason, result["reason"]), result["reason"]
    kept = Path(result["reason"].rsplit("(scratch kept: ", 1)[1].rstrip(")"))
    assert kept.parent == tmp_path / "oracle_scratch" and (kept / "espresso.pwi").is_file()
    assert (kept / "espresso.pwo").is_file()


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for a parent that does not reap it does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no /proc here, or the process has just gone
        return not Path("/proc").is_dir()


def assert_stopped(pids_file: Path) -> None:
    for pid in map(int, pids_file.read_text().split()):
        for _ in range(50):
            if not running(pid):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"process {pid} still runs")


def test_timeout_stops_the_whole_process_group(tmp_path, pseudo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pids = tmp_path / "pids.txt"
    start = time.perf_counter()
    result = compute_label(c_cu100(), qe(pseudo, command=fake_pw("sleep", "--pids", str(pids)), timeout_s=2))
    assert time.perf_counter() - start < 20
    assert result["status"] == "failed" and result["failure_class"] == "timeout"
    assert "ran past timeout_s = 2 s" in result["reason"] and "(scratch kept: " in result["reason"]
    assert_stopped(pids)  # the code and the process it started


def test_terminated_worker_stops_the_code_it_started(tmp_path, pseudo):
    """A worker killed with SIGTERM (the default signal of kill, queue systems) takes the code's
    process group with it: no orphaned ranks."""
    import signal
    import subprocess

    pids = tmp_path / "pids.txt"
    oracle = qe(pseudo, command=fake_pw("sleep", "--pids", str(pids)))
    script = (f"import sys; sys.path.insert(0, {str(HERE)!r}); from alflow.systems import c_cu100; "
              f"from alflow.oracles import compute_label; compute_label(c_cu100(), {oracle!r})")
    worker = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path)
    for _ in range(300):
        if pids.is_file() and len(pids.read_text().split()) == 2:
            break
        time.sleep(0.1)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == -signal.SIGTERM  # killed by the signal, as by default, not an exception
    assert_stopped(pids)


def test_missing_executable_or_pseudopotential(tmp_path, pseudo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = compute_label(c_cu100(), qe(pseudo, command="no-such-pw.x"))
    assert result["failure_class"] == "crash" and "cannot start pw.x" in result["reason"]
    (pseudo / "C.pbe.UPF").unlink()
    before = set((tmp_path / "oracle_scratch").iterdir())
    result = compute_label(c_cu100(), qe(pseudo))
    assert result["failure_class"] == "exception" and "pseudopotential of C not found" in result["reason"]
    assert set((tmp_path / "oracle_scratch").iterdir()) == before  # refused before anything ran
    result = compute_label(c_cu100(), qe(pseudo, pseudopotentials={"Cu": "Cu.pbe.UPF"}))
    assert "oracle.pseudopotentials has no file for C" in result["reason"]


# ---------------------------------------------------------------------------------------------
# VASP under custodian (stand-in VASP)


@pytest.fixture
def potcars(tmp_path) -> Path:
    """A VASP_PP_PATH-style folder with stand-in PBE POTCARs for Cu and C."""
    root = tmp_path / "potcars"
    for symbol, zval, mass in (("Cu", 11, 63.546), ("C", 4, 12.011)):
        folder = root / "potpaw_PBE" / symbol
        folder.mkdir(parents=True)
        (folder / "POTCAR").write_text(
            f"  PAW_PBE {symbol} 01Jan2000\n {zval}.0000000000000\n parameters from PSCTR are:\n"
            f"   VRHFIN ={symbol}: stand-in\n   LEXCH  = PE\n   TITEL  = PAW_PBE {symbol} 01Jan2000\n"
            f"   POMASS =  {mass}; ZVAL   =   {zval}.000    mass and valenz\n"
            "   ENMAX  =  400.000; ENMIN  =  300.000 eV\n END of PSCTR-controll parameters\n local part\n"
            "  1.0 2.0 3.0 4.0 5.0\n End of Dataset\n")
    return root


def vasp_oracle(potcars: Path, **changes) -> dict:
    oracle = {"kind": "vasp", "incar": {"ENCUT": 400, "ISMEAR": 1, "SIGMA": 0.1}, "kpts": [2, 2, 1],
              "pp_path": str(potcars), "command": f"{PYTHON} {shlex.quote(str(HERE / 'fake_vasp.py'))}"}
    oracle.update(changes)
    return oracle


def test_vasp_inputs_are_written_by_ase(tmp_path, potcars):
    from alflow.oracles.vasp import VaspOracle, VaspSettings

    settings = VaspSettings.from_mapping(vasp_oracle(potcars, incar={"encut": 420, "ediff": 1e-6}))
    VaspOracle(settings).write_input(c_cu100(), tmp_path)
    incar = (tmp_path / "INCAR").read_text()
    assert "ENCUT = 420" in incar and "NSW = 0" in incar and "IBRION = -1" in incar and "GGA = PE" in incar
    assert (tmp_path / "KPOINTS").read_text().splitlines()[3].split() == ["2", "2", "1"]
    assert "Selective" not in (tmp_path / "POSCAR").read_text()  # all forces wanted
    assert (tmp_path / "POTCAR").read_text().count("End of Dataset") == 2


def test_vasp_without_custodian_says_how_to_install(monkeypatch, potcars):
    for name in ("custodian", "custodian.vasp", "custodian.vasp.jobs", "custodian.vasp.handlers"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    result = compute_label(c_cu100(), vasp_oracle(potcars))
    assert result["status"] == "failed" and result["failure_class"] == "exception"
    assert 'pip install "alflow[vasp]"' in result["reason"]


@pytest.mark.filterwarnings("ignore::UserWarning")  # pymatgen on the stand-in POTCARs
@pytest.mark.filterwarnings("ignore:.*is an unconverged VASP run")  # custodian's check of the NELM = 2 run
def test_vasp_under_custodian_labels_and_classifies_failures(tmp_path, potcars, monkeypatch):
    pytest.importorskip("custodian", reason='custodian is an optional extra: pip install "alflow[vasp]"')
    pytest.importorskip("pymatgen.io.vasp")
    monkeypatch.chdir(tmp_path)
    atoms = c_cu100()
    ok = compute_label(atoms, vasp_oracle(potcars))
    ref = atoms.copy()
    ref.calc = EMT()
    assert ok["status"] == "ok" and ok["energy"] == pytest.approx(ref.get_potential_energy(), abs=1e-6)
    np.testing.assert_allclose(ok["forces"], ref.get_forces(apply_constraint=False), atol=1e-6)  # atom order kept
    assert list((tmp_path / "oracle_scratch").iterdir()) == []

    scf = compute_label(atoms, vasp_oracle(potcars, incar={"ENCUT": 400, "NELM": 2}, max_errors=2))
    assert scf["failure_class"] == "scf" and "not converged in NELM = 2" in scf["reason"]
    kept = Path(scf["reason"].rsplit("(scratch kept: ", 1)[1].rstrip(")"))
    assert "ALGO" in (kept / "INCAR").read_text()  # custodian's corrections were tried first
    assert (kept / "custodian.json").is_file()

    crash = compute_label(atoms, vasp_oracle(potcars, incar={"SYSTEM": "crash"}))
    assert crash["failure_class"] == "crash" and "custodian" in crash["reason"]

    start = time.perf_counter()
    timeout = compute_label(atoms, vasp_oracle(potcars, incar={"SYSTEM": "sleep"}, timeout_s=2))
    assert timeout["failure_class"] == "timeout" and time.perf_counter() - start < 30


# ---------------------------------------------------------------------------------------------
# the real pw.x (opt in: pytest -m dft)

PW = shutil.which("pw.x")
REAL_CU = Path(DEBIAN_PSEUDO_DIR) / "Cu.pbe-kjpaw.UPF"
needs_qe = pytest.mark.skipif(PW is None or not REAL_CU.is_file(),
                              reason="needs pw.x and quantum-espresso-data (apt-get install quantum-espresso "
                                     "quantum-espresso-data)")


def real_qe(**changes) -> dict:
    raw = {"kind": "espresso", "pseudopotentials": {"Cu": REAL_CU.name},
           "input_data": {"ecutwfc": 25, "ecutrho": 200, "occupations": "smearing", "smearing": "mv",
                          "degauss": 0.02, "conv_thr": 1e-9, "mixing_beta": 0.3},
           "kpts": [2, 2, 1], "mpi_ranks": 2, "timeout_s": 900}
    raw.update(changes)
    return {"kind": "espresso", **EspressoSettings.from_mapping(raw).to_dict()}


@pytest.mark.dft
@needs_qe
def test_real_pw_forces_match_a_finite_difference_of_the_energy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    slab = fcc100("Cu", size=(1, 1, 4), a=3.63, vacuum=4.0)  # 4 Cu atoms, one displaced off its site
    slab.positions[3] += [0.15, 0.05, -0.10]
    oracle = real_qe()
    result = compute_label(slab, oracle)
    assert result["status"] == "ok", result.get("reason")
    forces = np.array(result["forces"])
    assert np.isfinite(result["energy"]) and np.isfinite(forces).all() and forces.shape == (4, 3)
    assert np.abs(forces[3]).max() > 0.1  # a force worth checking
    h, atom, axis = 0.01, 3, 2
    energies = []
    for sign in (1, -1):
        moved = slab.copy()
        moved.positions[atom, axis] += sign * h
        r = compute_label(moved, oracle)
        assert r["status"] == "ok", r.get("reason")
        energies.append(r["energy"])
    fd = -(energies[0] - energies[1]) / (2 * h)
    print(f"pw.x force on atom {atom} along {'xyz'[axis]}: {forces[atom, axis]:.4f} eV/Å, "
          f"finite difference: {fd:.4f} eV/Å, |F| max {np.abs(forces).max():.3f} eV/Å")
    assert forces[atom, axis] == pytest.approx(fd, abs=0.02)
    assert list((tmp_path / "oracle_scratch").iterdir()) == []


@pytest.mark.dft
@needs_qe
def test_real_pw_scf_that_cannot_converge_is_recorded_as_scf_failure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    atoms = bulk("Cu", "fcc", a=3.63)
    oracle = real_qe(input_data={"ecutwfc": 25, "ecutrho": 200, "occupations": "smearing", "smearing": "mv",
                                 "degauss": 0.02, "electron_maxstep": 2}, kpts=[4, 4, 4])
    result = compute_label(atoms, oracle)
    assert result["status"] == "failed" and result["failure_class"] == "scf"
    assert "convergence NOT achieved after   2 iterations" in result["reason"]
    kept = Path(result["reason"].rsplit("(scratch kept: ", 1)[1].rstrip(")"))
    assert "convergence NOT achieved" in (kept / "espresso.pwo").read_text()
