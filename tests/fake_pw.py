"""Stand-in pw.x for tests: ``fake_pw.py --mode MODE [--pids FILE] -in espresso.pwi``.

Modes: ``ok`` writes a pw.x-style output with EMT energy and forces of the input structure;
``nan`` the same with a NaN energy; ``scf`` the output of an SCF that hit electron_maxstep (exit 2, as pw.x 6.7 does); ``crash`` a
pw.x error (exit 1, MPI_ABORT on stderr); ``empty`` exits 0 without results; ``sleep`` starts a
child process, writes both pids to ``--pids`` and sleeps (for time limits).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np
from ase.calculators.emt import EMT
from ase.io import read
from ase.units import create_units

units = create_units("2006")  # pw.x's units

HEADER = "\n     Program PWSCF v.6.7MaX starts on  1Jan2024 at  0: 0: 0 \n"

SCF_FAILED = """
     iteration #  1     ecut=    25.00 Ry     beta= 0.70
     total energy              =    -213.03523382 Ry
     estimated scf accuracy    <       0.07212371 Ry

     iteration #  2     ecut=    25.00 Ry     beta= 0.70
     total energy              =    -213.10751811 Ry
     estimated scf accuracy    <       0.00329478 Ry

     convergence NOT achieved after   2 iterations: stopping

     Writing output data file ./alflow.save/

     JOB DONE.
"""

CRASH = """
 %%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%
     Error in routine readpp (1):
     file /nonexistent/Cu.missing.UPF not found
 %%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%

     stopping ...
"""


def pw_output(input_file: str, nan: bool = False) -> str:
    """A pw.x output that ASE's espresso-out reader parses, with EMT energy (``nan``: NaN) and forces."""
    atoms = read(input_file, format="espresso-in")
    atoms.calc = EMT()
    energy = float("nan") if nan else atoms.get_potential_energy() / units["Ry"]
    forces = atoms.get_forces() / (units["Ry"] / units["Bohr"])
    alat = np.linalg.norm(atoms.cell[0]) / units["Bohr"]
    scale = alat * units["Bohr"]
    lines = [HEADER, f"     celldm(1)=  {alat:12.6f}  celldm(2)=   0.000000  celldm(3)=   0.000000",
             f"     number of atoms/cell      = {len(atoms):12d}",
             f"     number of atomic types    = {len(set(atoms.numbers)):12d}",
             "     crystal axes: (cart. coord. in units of alat)"]
    lines += [f"               a({i + 1}) = ( {v[0]:10.6f} {v[1]:10.6f} {v[2]:10.6f} )  "
              for i, v in enumerate(atoms.cell.array / scale)]
    lines += ["", "   site n.     atom                  positions (alat units)"]
    lines += [f"         {i + 1}           {a.symbol}  tau(   {i + 1}) = (  {p[0]:10.7f}  {p[1]:10.7f}  {p[2]:10.7f}  )"
              for i, (a, p) in enumerate(zip(atoms, atoms.positions / scale))]
    lines += ["", f"!    total energy              = {energy:17.8f} Ry", "",
              "     Forces acting on atoms (cartesian axes, Ry/au):", ""]
    lines += [f"     atom {i + 1:4d} type  1   force = {f[0]:14.8f} {f[1]:14.8f} {f[2]:14.8f}"
              for i, f in enumerate(forces)]
    lines += ["", "     JOB DONE.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", default="ok")
    parser.add_argument("--pids")
    parser.add_argument("-in", dest="input", default="espresso.pwi")
    args, _ = parser.parse_known_args()
    if args.mode in ("ok", "nan"):
        print(pw_output(args.input, nan=args.mode == "nan"))
        return 0
    print(HEADER)
    if args.mode == "scf":
        print(SCF_FAILED)
        return 2
    if args.mode == "crash":
        print(CRASH)
        print("MPI_ABORT was invoked on rank 0 in communicator MPI_COMM_WORLD", file=sys.stderr)
        return 1
    if args.mode == "sleep":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(args.pids, "w") as fh:
            fh.write(f"{os.getpid()} {child.pid}\n")
        time.sleep(600)
    return 0  # "empty": no results


if __name__ == "__main__":
    sys.exit(main())
