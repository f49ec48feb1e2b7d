"""Stand-in VASP executable for tests (VASP itself is licensed and not installed).

Reads INCAR and POSCAR from the current directory and writes what custodian and ASE read from a
VASP single point: vasprun.xml, OSZICAR and stdout, with EMT energies and forces. The INCAR tag
SYSTEM selects a failure: ``crash`` (exit 1, no output), ``sleep`` (sleep 600 s). A run with
NELM <= 3 does not converge: it writes NELM electronic steps, as VASP does when it hits the limit.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from ase.calculators.emt import EMT
from ase.data import atomic_masses
from ase.io import read


def incar(path: Path = Path("INCAR")) -> dict[str, str]:
    tags = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            tags[key.strip().upper()] = value.split("#")[0].split("!")[0].strip()
    return tags


def xml_type(value: str) -> str:
    """vasprun.xml's type attribute of an INCAR value (none for a float)."""
    for kind, convert in (("int", int), ("", float)):
        try:
            convert(value)
            return f' type="{kind}"' if kind else ""
        except ValueError:
            pass
    return ' type="logical"' if value.upper().strip(".") in ("TRUE", "FALSE", "T", "F") else ' type="string"'


def vec(values) -> str:
    return "<v>" + " ".join(f"{x:16.8f}" for x in values) + " </v>"


def structure(atoms, name: str | None = None) -> str:
    cell = atoms.cell.array
    rec = np.linalg.inv(cell).T
    head = f'<structure name="{name}" >' if name else "<structure>"
    return "\n".join([
        head, " <crystal>", '  <varray name="basis" >', *(vec(v) for v in cell), "  </varray>",
        f'  <i name="volume">{atoms.get_volume():16.8f} </i>',
        '  <varray name="rec_basis" >', *(vec(v) for v in rec), "  </varray>", " </crystal>",
        ' <varray name="positions" >', *(vec(v) for v in atoms.get_scaled_positions(wrap=False)), " </varray>",
        "</structure>",
    ])


def energies(e_fr: float, e0: float) -> str:
    return (f'<energy>\n <i name="e_fr_energy">{e_fr:16.8f} </i>\n <i name="e_wo_entrp">{e0:16.8f} </i>\n'
            f' <i name="e_0_energy">{e0:16.8f} </i>\n</energy>')


def vasprun(atoms, tags: dict, energy: float, forces: np.ndarray, nsteps: int, nelm: int) -> str:
    symbols = atoms.get_chemical_symbols()
    species = list(dict.fromkeys(symbols))
    atom_rows = "\n".join(f"<rc><c>{s}</c><c>{species.index(s) + 1}</c></rc>" for s in symbols)
    type_rows = "\n".join(
        f"<rc><c>{symbols.count(s)}</c><c>{s}</c><c>{atomic_masses[atoms[symbols.index(s)].number]:.8f}</c>"
        f"<c>1.0</c><c>  PAW_PBE {s} 01Jan2000</c></rc>" for s in species)
    scsteps = "\n".join(f"<scstep>\n{energies(energy + 10.0 ** (-k), energy + 10.0 ** (-k))}\n</scstep>"
                        for k in range(nsteps))
    incar_xml = "\n".join(f'<i{xml_type(v)} name="{k}">{v}</i>' for k, v in tags.items())
    return "\n".join([
        '<?xml version="1.0" encoding="ISO-8859-1"?>', "<modeling>",
        "<generator>", '<i name="program" type="string">vasp </i>',
        '<i name="version" type="string">6.4.2 </i>', '<i name="subversion" type="string">stand-in </i>',
        '<i name="platform" type="string">stand-in </i>', '<i name="date" type="string">2024 01 01 </i>',
        '<i name="time" type="string">00:00:00 </i>', "</generator>",
        "<incar>", incar_xml, "</incar>",
        "<kpoints>", '<generation param="Monkhorst-Pack">', '<v type="int" name="divisions">1 1 1 </v>',
        '<v name="usershift">0 0 0 </v>', "</generation>",
        '<varray name="kpointlist" >', vec([0, 0, 0]), "</varray>",
        '<varray name="weights" >', vec([1.0]), "</varray>", "</kpoints>",
        "<parameters>", '<separator name="electronic" >', f'<i type="int" name="NELM">{nelm}</i>',
        '<i type="int" name="ISPIN">1</i>', f'<i name="NELECT">{float(len(atoms)):.8f}</i>',
        f'<i type="int" name="NBANDS">{len(atoms)}</i>', '<i type="logical" name="LSORBIT"> F  </i>', "</separator>",
        '<separator name="ionic" >', '<i type="int" name="NSW">0</i>', '<i type="int" name="IBRION">-1</i>',
        "</separator>", "</parameters>",
        "<atominfo>", f"<atoms>{len(atoms)}</atoms>", f"<types>{len(species)}</types>",
        '<array name="atoms" >', '<dimension dim="1">ion</dimension>', '<field type="string">element</field>',
        '<field type="int">atomtype</field>', "<set>", atom_rows, "</set>", "</array>",
        '<array name="atomtypes" >', '<dimension dim="1">type</dimension>',
        '<field type="int">atomspertype</field>', '<field type="string">element</field>', "<field>mass</field>",
        "<field>valence</field>", '<field type="string">pseudopotential</field>', "<set>", type_rows, "</set>",
        "</array>", "</atominfo>",
        structure(atoms, "initialpos"),
        "<calculation>", scsteps, structure(atoms),
        '<varray name="forces" >', *(vec(f) for f in forces), "</varray>",
        '<varray name="stress" >', *(vec(v) for v in np.zeros((3, 3))), "</varray>",
        energies(energy, energy), '<time name="totalsc">1.00 1.00</time>', "</calculation>",
        structure(atoms, "finalpos"), "</modeling>", "",
    ])


def main() -> int:
    tags = incar()
    mode = tags.get("SYSTEM", "").lower()
    print(" running on    1 total cores\n vasp.6.4.2 stand-in", flush=True)
    if mode == "crash":
        print("stand-in VASP: simulated crash", file=sys.stderr)
        return 1
    if mode == "sleep":
        time.sleep(600)
    atoms = read("POSCAR", format="vasp")
    atoms.set_constraint()
    atoms.calc = EMT()
    energy = float(atoms.get_potential_energy())
    forces = atoms.get_forces()
    nelm = int(tags.get("NELM", 60))
    nsteps = nelm if nelm <= 3 else 5
    Path("vasprun.xml").write_text(vasprun(atoms, tags, energy, forces, nsteps, nelm))
    lines = [f"DAV: {k + 1:3d}    {energy:.8E}    {0.1:.5E}   {0.1:.5E}   100   0.1E+00" for k in range(nsteps)]
    lines.append(f"   1 F= {energy:.8E} E0= {energy:.8E}  d E =0.000000E+00")
    Path("OSZICAR").write_text("       N       E                     dE             d eps       ncg     rms\n"
                               + "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
