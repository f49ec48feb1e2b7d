"""Command-line interface: ``alflow <command> ...``.

Commands: ``run`` (a campaign to completion on the embedded store), ``resume`` (after a crash), ``submit`` (to a MongoDB server), ``status`` (campaigns in a
store, read-only, ``--watch`` to follow), ``report`` (a campaign's figures and HTML page), ``fit-morse`` (element Morse parameters from an oracle's dimers), ``demo`` (fit
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
from pymongo.errors import PyMongoError, ServerSelectionTimeoutError

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


def _print_summary(summary_path: Path) -> bool:
    """The campaign's one-line outcome and where its results are; whether it converged."""
    summary = json.loads(summary_path.read_text())
    state = "converged" if summary["converged"] else "not converged"
    print(f"{summary['campaign']}: {state} after {summary['iterations']} rounds, {summary['oracle_calls']} oracle "
          f"calls ({summary['reused_labels']} reused, {summary['failed_labels']} failed): {summary['reason']}")
    print(f"results: {summary_path}")
    return bool(summary["converged"])


def cmd_run(args: argparse.Namespace) -> int:
    """``alflow run SPEC``: validate the spec (store untouched on error), run, print the results path."""
    from alflow.spec import load_spec

    spec = load_spec(args.spec)
    from alflow import runner  # imports FireWorks only after the store is chosen

    path = runner.run(spec, args.store, workers=args.workers, launchpad=args.launchpad)
    return 0 if _print_summary(path) else 3


def cmd_submit(args: argparse.Namespace) -> int:
    """``alflow submit SPEC -l LAUNCHPAD``: add the campaign to a MongoDB server's LaunchPad."""
    from alflow.spec import load_spec

    spec = load_spec(args.spec)
    from alflow.fw.launchpad import launchpad_from_file
    from alflow.runner import submit

    launchpad = launchpad_from_file(args.launchpad)
    submit(spec, launchpad)
    print(f"{spec.name}: submitted to database '{launchpad.name}'. Run it with (fw_configs/):\n"
          f"  rlaunch -l LAUNCHPAD -w my_fworker_ml.yaml rapidfire      # train, ML simulation, query, merge\n"
          f"  qlaunch -l LAUNCHPAD -w my_fworker_dft.yaml -q my_qadapter_slurm.yaml rapidfire   # oracle calls\n"
          f"Follow it with: alflow status -l {args.launchpad} --watch")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    """``alflow resume``: finish the store's interrupted campaigns (nothing paid is paid again)."""
    from alflow import runner

    converged = [_print_summary(path) for path in runner.resume(args.store, workers=args.workers)]
    return 0 if all(converged) else 3


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _database(args: argparse.Namespace):
    """The database of ``--store DIR`` or ``-l LAUNCHPAD``, opened read-only."""
    from alflow.store.readonly import open_readonly

    return open_readonly(args.store, args.launchpad)


def cmd_status(args: argparse.Namespace) -> int:
    """``alflow status``: one line per campaign, read without writing; ``--watch``: redrawn until
    Ctrl-C. SIGINT gets its own handler that sets a flag: Python does not turn SIGINT into
    KeyboardInterrupt when the process started with it ignored (a background job of a script), and
    an interrupt raised inside a library's cleanup would be printed and swallowed."""
    import signal
    import threading
    import time

    from alflow.runner import store_in_use
    from alflow.status import format_table, iteration_table, status_rows

    if args.watch is not None and not 0 < args.watch <= 86400:  # also NaN and inf
        raise UsageError(f"--watch: seconds must be > 0 and at most 86400, got {args.watch:g}")
    clear = args.watch is not None and sys.stdout.isatty()
    stop = threading.Event()
    if args.watch is not None:
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.is_set():
        db = _database(args)
        if args.campaign:
            table = iteration_table(db, args.campaign)
        else:  # embedded: whether an alflow process holds the store tells running from interrupted
            owner = None if args.launchpad else store_in_use(args.store)
            table = format_table(status_rows(db, owner), None if args.launchpad else str(args.store))
        if clear:
            print("\033[H\033[2J", end="")
        if args.watch is not None:
            print(time.strftime("%Y-%m-%d %H:%M:%S"), f"(every {args.watch:g} s, Ctrl-C to stop)")
        print(table, flush=True)
        if args.watch is None or stop.wait(args.watch):
            break
        if not clear:
            print()
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``alflow report [CAMPAIGN]``: figures + report.html per campaign (every campaign when none is named)."""
    from alflow.report import write_report
    from alflow.store import Store

    store = Store(_database(args), create_indexes=False)
    names = [args.campaign] if args.campaign else [d["name"] for d in store.campaigns.find({}, {"name": 1}).sort("created_on", 1)]
    if not names:
        raise ValueError("no campaign in this store")
    for name in names:
        print(f"report: {write_report(store, name, args.output / name).resolve()}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``alflow demo``: fit and evaluate the model on the paper's C/Cu(100) system with EMT."""
    from alflow.demo import format_report, run_demo

    print(format_report(run_demo(args.output, args.seed)))
    return 0


def _source_options(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--store", type=Path, default=Path("alflow-store"), metavar="DIR", help="embedded store directory")
    source.add_argument("-l", "--launchpad", type=Path, metavar="LAUNCHPAD", help="FireWorks LaunchPad file (MongoDB server)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="alflow", description="Active-learning Δ-ML interatomic potentials.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a campaign to completion on the embedded store")
    run.add_argument("spec", type=Path, metavar="SPEC", help="campaign spec (YAML)")
    workers_help = "worker processes for the oracle calls (0: in this process)"
    run.add_argument("--store", type=Path, default=Path("alflow-store"), metavar="DIR", help="embedded store directory")
    run.add_argument("--workers", type=_workers, default=0, metavar="N", help=workers_help)
    run.add_argument("-l", "--launchpad", type=Path, metavar="LAUNCHPAD",
                     help="drive this MongoDB server's LaunchPad instead of the embedded store")
    run.set_defaults(func=cmd_run)

    submit = commands.add_parser("submit", help="add a campaign to a MongoDB server (run by rlaunch / qlaunch)")
    submit.add_argument("spec", type=Path, metavar="SPEC", help="campaign spec (YAML)")
    submit.add_argument("-l", "--launchpad", type=Path, required=True, metavar="LAUNCHPAD",
                        help="FireWorks launchpad file (${VARIABLE}s from the environment)")
    submit.set_defaults(func=cmd_submit)

    resume = commands.add_parser("resume", help="finish a store's campaigns after a crash or kill")
    resume.add_argument("--store", type=Path, default=Path("alflow-store"), metavar="DIR", help="embedded store directory")
    resume.add_argument("--workers", type=_workers, default=0, metavar="N", help=workers_help)
    resume.set_defaults(func=cmd_resume)

    status = commands.add_parser("status", help="campaigns in a store: a live table (read-only)")
    status.add_argument("campaign", nargs="?", metavar="CAMPAIGN",
                        help="one row per iteration of this campaign: calls paid, reused, failed by class")
    _source_options(status)
    status.add_argument("--watch", type=float, nargs="?", const=5.0, metavar="SECONDS",
                        help="redraw every SECONDS (default 5) until Ctrl-C")
    status.set_defaults(func=cmd_status)

    report = commands.add_parser("report", help="figures and a self-contained HTML page of a campaign (read-only)")
    report.add_argument("campaign", nargs="?", metavar="CAMPAIGN", help="campaign name (default: every campaign)")
    _source_options(report)
    report.add_argument("--output", type=Path, default=Path("alflow-report"), metavar="DIR",
                        help="reports go to DIR/CAMPAIGN/ (default alflow-report)")
    report.set_defaults(func=cmd_report)

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
    args = None
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
    except KeyboardInterrupt:
        store = getattr(args, "store", None)
        hint = f"; `alflow resume --store {store}` goes on from here" if store and getattr(args, "func", None) in (
            cmd_run, cmd_resume) else ""
        print(f"alflow: interrupted{hint}", file=sys.stderr)
        return 130
    except PyMongoError as exc:  # a server that cannot be reached or refuses: one line, naming the launchpad file
        where = getattr(args, "launchpad", None)
        print(f"alflow: error: {where or 'MongoDB'}: {_mongo_error(exc)}", file=sys.stderr)
        return 1


def _mongo_error(exc: Exception) -> str:
    """pymongo's message in one short line (a server-selection timeout lists the whole topology)."""
    text = " ".join(str(exc).split())
    if isinstance(exc, ServerSelectionTimeoutError):
        return f"cannot reach the MongoDB server ({text.split(' (configured timeouts')[0].split(', Timeout')[0]})"
    return f"{type(exc).__name__}: {text[:300]}"


if __name__ == "__main__":
    sys.exit(main())
