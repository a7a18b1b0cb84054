"""What every command shares: the typer apps, common options, the one way to open the
warehouse for a command, the one progress bar, and printing to stderr.

The library speaks of parameters by their Python names (``sample_rate``); the CLI
speaks of flags (``--sample-rate``): :func:`flagged` turns one into the other in
error messages.
"""

from __future__ import annotations

import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Callable, Iterator, Optional

import typer

from dpledger.warehouse.errors import UserError

from .output import FORMATS, to_json

app = typer.Typer(
    name="dpledger",
    help="A per-example privacy ledger for DP-SGD: ingest per-point gradient norms, account, rank, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help as written: [base] stays [base], flags show no "<bool>" metavar
)
ingest_app = typer.Typer(help="Load files into the warehouse (idempotent: a file already loaded is skipped).",
                         no_args_is_help=True, rich_markup_mode=None)
app.add_typer(ingest_app, name="ingest")


def _version(value: bool) -> None:
    if value:
        from dpledger import __version__

        print(f"dpledger {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                   help="Print the version and exit.")] = False) -> None:
    """A per-example privacy ledger for DP-SGD: ingest per-point gradient norms, account, rank, report."""

DbOption = Annotated[
    Optional[Path],
    typer.Option("--db", help="Database file (default: $DPLEDGER_DB or ./dpledger.duckdb)", show_default=False),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]
# DP-SGD's parameters, named as Opacus names them, with one help text each
SampleRateOption = Annotated[Optional[float], typer.Option(help="Poisson sample rate q (batch size / n).")]
NoiseMultiplierOption = Annotated[Optional[float], typer.Option(help="Noise multiplier sigma.")]
MaxGradNormOption = Annotated[Optional[float], typer.Option(help="Clipping norm C.")]
StepsOption = Annotated[Optional[int], typer.Option(help="Number of steps (of the run).")]
EpochsHelp = "Epochs (steps = floor(epochs / q), as Opacus counts them)."


FormatOption = Annotated[str, typer.Option("--format", "-f", help="table, json or csv.")]


def err(message: str) -> None:
    """One line on stderr."""
    sys.stderr.write(message.rstrip() + "\n")


# library parameters whose flag is not simply --the-same-name
FLAGS = {"run_ids": "--run", "run_id": "--run", "png_dir": "--png", "n_probes": "--probes"}


def flag(param: str) -> str:
    """``sample_rate`` -> ``--sample-rate`` (and the few renamed ones, ``run_ids`` -> ``--run``)."""
    return FLAGS.get(param, "--" + param.replace("_", "-"))


def flagged(message: str, params) -> str:
    """The library's message with the first mention of each parameter it names (``params``)
    written as its flag: a whole word, never inside a path or a longer name (``/tmp/out/x``,
    ``max_steps``); later mentions stay words (``dataset x: unknown dataset 'x'``)."""
    for param in params or ():
        message = re.sub(rf"(?<![\w\-/.]){re.escape(param)}(?![\w\-/]|\.\w)", flag(param), message, count=1)
    return message


def user_message(exc: Exception) -> str:
    """What the CLI prints for a library error: its parameters as flags, and, for work not yet
    done, the command that does it."""
    from dpledger.warehouse.epsilon_tables import NotAccounted

    message = flagged(str(exc), getattr(exc, "params", ()))
    if isinstance(exc, NotAccounted):
        run = f" --run {exc.run_id}" if exc.run_id is not None else ""
        message = message.replace("; account it first", f"; run `dpledger account{run} --rule {exc.rule}` first")
    return message


def output_format(fmt: str, json_flag: bool = False) -> str:
    """``--format`` checked (``--json`` wins)."""
    if json_flag:
        return "json"
    if fmt not in FORMATS:
        raise UserError(f"format {fmt}: expected one of {', '.join(FORMATS)}", "format")
    return fmt


@contextmanager
def connected(db, read_only: bool = False) -> Iterator:
    """The warehouse at ``db`` (``--db``), closed when the command is done.

    Read-only: the live view (database + the lake's unmerged committed shards). Read-write
    (commands that compute from the rows: account, fit, curvature, norms): the lake's
    committed shards are merged into the database first (idempotent), so they see every
    committed row too.
    """
    if read_only:
        from dpledger.warehouse.db import connect

        con = connect(db, read_only=True)
    else:
        from dpledger.workflows import connect_merged  # imports the trainer (torch): writers only

        con = connect_merged(db, on_merge=lambda lake, rows: err(
            f"merged {rows} new point-step rows from {lake} into the database"))
    try:
        yield con
    finally:
        con.close()


@contextmanager
def progress(description: str, unit: str, *, disable: bool = False, info: bool = False,
             remaining: bool = False) -> Iterator[Callable[..., None]]:
    """Progress on stderr; yields ``update(completed=, total=, description=, info=)``.

    On a terminal: a transient bar. In a pipe or a log file: one line per phase, printed
    when the phase starts working (a new description, or the first step of the first one),
    so a long silent phase still says what it is doing and an early error stays one line.
    ``disable`` (e.g. under ``--json``): nothing.
    """
    from rich.console import Console

    console = Console(stderr=True)
    if disable or not console.is_terminal:
        state = {"pending": description, "said": None}

        def say(**fields) -> None:
            if disable or not (fields.get("description") or fields.get("completed")):
                return  # a phase's line waits for its first finished unit of work
            text = fields.get("description") or state["pending"]
            if text and text != state["said"]:
                state["said"], state["pending"] = text, None
                err(f"{text}...")

        yield say
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn(f"{{task.completed}}/{{task.total}} {unit}")]
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    columns.append(TimeElapsedColumn())
    if remaining:
        columns.append(TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=None, info="")

        def update(**fields) -> None:
            bar.update(task, **{k: v for k, v in fields.items() if v is not None})

        yield update


def print_json(obj) -> None:
    print(to_json(obj))
