"""Command-line interface: ``alflow <command> ...``.

Commands: ``run`` (a campaign to completion on the embedded store), ``status`` (campaigns in a
store, read-only), ``fit-morse`` (element Morse parameters from an oracle's dimers), ``demo`` (fit
the Δ-ML ensemble to EMT-labelled C/Cu(100) structures and report its accuracy and cost).
Errors print one line ``alflow: error: ...`` on stderr; exit code 2 for usage errors, 1 for runtime ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, NoReturn, Sequence

from ase.calculators.calculator import CalculatorError

from alflow import oracles
from alflow.model.morse import MorseParameters
from alflow.model.morse_fit import check_element, fit_table


class UsageError(Exception):
    """A command-line usage error (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser that raises UsageError instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _element(text: str) -> str:
    try:
        return check_element(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` → (KEY, VALUE parsed as JSON, or the plain string if it is not JSON)."""
    key, sep, value = text.partition("=")
    if not (key and sep):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got '{text}'")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _oracle_options(args: argparse.Namespace) -> dict[str, Any]:
    """Options of ``--oracle`` from ``--oracle-option`` (the callable's kwargs for ``python``) and ``--callable``."""
    options = dict(args.oracle_option)
    if args.oracle == "python":
        return {"callable": args.callable, "kwargs": options}
    if args.callable:
        raise UsageError("--callable is only used with --oracle python")
    return options


def format_table(table: Mapping[str, MorseParameters]) -> str:
    """Plain-text table: element, De, re, a, source."""
    rows = [f"{'element':<8}{'De (eV)':>10}{'re (Å)':>10}{'a (1/Å)':>10}  source"]
    rows += [f"{el:<8}{p.De:>10.4f}{p.re:>10.4f}{p.a:>10.4f}  {p.source}" for el, p in table.items()]
    return "\n".join(rows)


def table_json(table: Mapping[str, MorseParameters]) -> str:
    """The table in the format of ``alflow/model/morse_parameters.json`` (values to 4 decimals)."""
    entries = ",\n".join(
        f"    {json.dumps(el)}: "
        + json.dumps({"De": round(p.De, 4), "re": round(p.re, 4), "a": round(p.a, 4), "source": p.source})
        for el, p in table.items()
    )
    return f'{{\n  "format": "alflow-morse-table",\n  "version": 1,\n  "elements": {{\n{entries}\n  }}\n}}\n'


def _check_writable(path: Path) -> None:
    directory = path.parent
    if not directory.is_dir() or not os.access(directory, os.W_OK) or path.is_dir():
        raise OSError(f"cannot write {path}: not a writable file location")


def cmd_fit_morse(args: argparse.Namespace) -> int:
    """``alflow fit-morse``: fit, print the table, optionally write it as JSON."""
    options = _oracle_options(args)
    factory = oracles.calculator_factory(args.oracle, options)
    source = f"{oracles.describe(args.oracle, options)} dimer fit, alflow fit-morse"
    if args.output:
        _check_writable(args.output)
    table = fit_table(args.elements, factory, source)
    print(format_table(table))
    if args.output:
        args.output.write_text(table_json(table))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """``alflow run SPEC``: validate the spec (store untouched on error), run, print the results path."""
    from alflow.spec import load_spec

    spec = load_spec(args.spec)
    from alflow import runner  # imports FireWorks only after the store is chosen

    summary_path = runner.run(spec, args.store)
    summary = json.loads(summary_path.read_text())
    state = "converged" if summary["converged"] else "not converged"
    print(f"{spec.name}: {state} after {summary['iterations']} rounds, {summary['oracle_calls']} oracle calls "
          f"({summary['reused_labels']} reused, {summary['failed_labels']} failed): {summary['reason']}")
    print(f"results: {summary_path}")
    return 0 if summary["converged"] else 3


def cmd_status(args: argparse.Namespace) -> int:
    """``alflow status``: one line per campaign, read from the store snapshot without writing it."""
    from bson import json_util

    path = args.store / "store.json"
    if not path.is_file():
        raise OSError(f"{path}: no alflow store here")
    data = json_util.loads(path.read_text() or "{}")
    campaigns = [doc for _, doc in data.get("alflow", {}).get("campaigns", {}).get("documents", [])]
    print(f"{'campaign':<28}{'kind':<7}{'status':<11}{'round':>6}{'paid':>7}{'reused':>8}{'failed':>8}")
    for c in campaigns:
        n = c.get("counters", {})
        print(f"{c['name']:<28}{c.get('kind', '?'):<7}{c.get('status', '?'):<11}{c.get('iteration', 0):>6}"
              f"{n.get('oracle_calls', 0):>7}{n.get('reused_labels', 0):>8}{n.get('failed_labels', 0):>8}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``alflow demo``: fit and evaluate the model on the paper's C/Cu(100) system with EMT."""
    from alflow.demo import format_report, run_demo

    print(format_report(run_demo(args.output, args.seed)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="alflow", description="Active-learning Δ-ML interatomic potentials.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a campaign to completion on the embedded store")
    run.add_argument("spec", type=Path, metavar="SPEC", help="campaign spec (YAML)")
    run.add_argument("--store", type=Path, default=Path("alflow-store"), metavar="DIR", help="embedded store directory")
    run.set_defaults(func=cmd_run)

    status = commands.add_parser("status", help="campaigns in a store (read-only)")
    status.add_argument("--store", type=Path, default=Path("alflow-store"), metavar="DIR", help="embedded store directory")
    status.set_defaults(func=cmd_status)

    fit = commands.add_parser("fit-morse", help="fit element Morse parameters to an oracle's dimers")
    fit.add_argument("elements", nargs="+", type=_element, metavar="ELEMENT", help="chemical symbols")
    fit.add_argument("--oracle", required=True, metavar="KIND", help=f"oracle kind ({', '.join(oracles.KINDS)})")
    fit.add_argument(
        "--oracle-option", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
        help="oracle option (VALUE parsed as JSON if possible); for --oracle python, a keyword argument of the callable",
    )
    fit.add_argument("--callable", metavar="MODULE:FUNCTION", help="function returning an ASE calculator (--oracle python)")
    fit.add_argument("--output", type=Path, metavar="FILE.json", help="write the table as JSON")
    fit.set_defaults(func=cmd_fit_morse)

    demo = commands.add_parser("demo", help="fit the Δ-ML ensemble to EMT-labelled C/Cu(100) and report")
    demo.add_argument("--output", type=Path, default=Path("alflow-demo"), metavar="DIR", help="where the model is saved")
    demo.add_argument("--seed", type=int, default=0, help="ensemble seed")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: sys.argv[1:]); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except UsageError as exc:
        print(f"alflow: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError, NotImplementedError, CalculatorError) as exc:
        print(f"alflow: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
