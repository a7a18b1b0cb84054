"""``dpledger init``, ``query``, ``runs``, ``links``, ``report``: reading the warehouse."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from dpledger.warehouse.errors import UserError

from .common import DbOption, FormatOption, JsonOption, app, connected, output_format, print_json

_PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_param_value(text: str):
    """A parameter from the command line: an integer, a float, or else the string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_params(pairs: list[tuple[str, str]] | None) -> dict:
    params = {}
    for name, value in pairs or []:
        if not _PARAM_NAME.match(name):
            raise UserError(f"-p {name}: a parameter name is letters, digits and _ (used as ${name} in the SQL)")
        params[name] = parse_param_value(value)
    return params


@app.command()
def init(db: DbOption = None, json: JsonOption = False) -> None:
    """Create the database, or upgrade it to the current schema (idempotent)."""
    from dpledger.warehouse.db import init as do_init

    summary = do_init(db)
    if json:
        print_json(summary)
        return
    what = "created" if summary["created"] else "opened"
    actions = "; ".join(summary["actions"]) or "already current"
    print(f"{what} {summary['db']}: schema version {summary['schema_version']} ({actions})")


@app.command()
def query(
    sql: Annotated[str, typer.Argument(help="SQL to run (read-only); $name for bound parameters.", show_default=False)],
    param: Annotated[
        Optional[list[str]],
        typer.Option("--param", "-p", help="Bound parameter: -p name value (or -p name=value); repeatable."),
    ] = None,
    format: FormatOption = "table",
    allow_files: Annotated[bool, typer.Option("--allow-files", help="Let the SQL read files (read_csv, read_parquet, ...).")] = False,
    lake: Annotated[Optional[Path], typer.Option(help="Query a Parquet lake in place (with the database's rows, if any).")] = None,
    db: DbOption = None,
    json: JsonOption = False,
) -> None:
    """Run SQL on the warehouse, opened read-only; parameters are bound, never pasted."""
    from dpledger.warehouse.query import run_query

    from .output import emit

    pairs = []
    for p in param or []:
        name, sep, value = p.partition("=")
        if not sep:
            raise UserError(f"-p {p}: give a parameter as -p name value or -p name=value")
        pairs.append((name, value))
    fmt = output_format(format, json)
    table = run_query(sql, parse_params(pairs), db, allow_files=allow_files, lake=lake)
    emit(table, fmt)


@app.command()
def runs(db: DbOption = None, json: JsonOption = False, format: FormatOption = "table") -> None:
    """List runs with their DP-SGD parameters and row counts."""
    from dpledger.warehouse.query import list_runs

    from .output import emit

    fmt = output_format(format, json)
    with connected(db, read_only=True) as con:
        table = list_runs(con)
    if fmt == "table":  # the terminal gets the columns that tell runs apart
        table = table.select(["run_id", "dataset", "model", "sample_rate", "noise_multiplier", "max_grad_norm",
                              "steps", "delta", "epsilon", "private", "status", "point_step_rows", "points_tracked",
                              "steps_recorded", "covered"])
    emit(table, fmt, title="runs")


@app.command()
def links(
    run: Annotated[Optional[list[str]], typer.Option("--run", help="Run(s) to link (repeatable).")] = None,
    config: Annotated[Optional[str], typer.Option(help="All runs of a config_key or study_key.")] = None,
    rule: Annotated[str, typer.Option(help="Composition rule of the epsilons.")] = "rdp",
    accountant: Annotated[str, typer.Option(help="rdp, or pld: the PLD epsilons (account --accountant pld).")] = "rdp",
    k: Annotated[int, typer.Option(help="k of the top-k overlap.")] = 10,
    by: Annotated[Optional[str], typer.Option(help="Also summarise per group: label or an attribute (e.g. race).")] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="table or json.")] = "table",
    db: DbOption = None,
    json: JsonOption = False,
) -> None:
    """Per-example epsilon vs curvature, memorization and MIA: correlations, top-k overlap, bound check."""
    import pyarrow as pa

    from dpledger.warehouse.point_links import links as do_links

    from .accounting import rule_of
    from .output import print_table, records

    rule = rule_of(rule, accountant)
    fmt = output_format(format, json)
    if fmt == "csv":
        raise UserError("format csv: links prints several tables; use table or json", "format")
    with connected(db, read_only=True) as con:
        out = do_links(con, run, config, rule, k, by)
    tables = {name: out[name] for name in ("pairs", "bound", "per_target_epsilon", "groups", "points")}
    if fmt == "json":
        print_json({**{k2: v for k2, v in out.items() if k2 not in tables},
                    **{name: records(pa.Table.from_pandas(t, preserve_index=False)) for name, t in tables.items()}})
        return
    print(f"runs: {', '.join(out['runs'])}; rule {out['rule']}; scores present: {', '.join(out['scores'])}")
    titles = {"pairs": f"correlations and top-{out['k']} overlap", "bound": "memorization <= 1 - exp(-epsilon)",
              "per_target_epsilon": "mean scores per target epsilon", "groups": f"per {out['by']}",
              "points": "per point (highest epsilon first, 20 shown)"}
    for name, t in tables.items():
        if t is None or t.empty:
            continue
        shown = t.head(20) if name == "points" else t
        print_table(pa.Table.from_pandas(shown, preserve_index=False), title=titles[name])


@app.command()
def report(
    run: Annotated[str, typer.Option(help="Run to report on.", show_default=False)],
    out: Annotated[Path, typer.Option(help="HTML file to write (self-contained, opens offline).")] = Path("report.html"),
    png: Annotated[Optional[Path], typer.Option(help="Also write each chart as a PNG into this folder.")] = None,
    rule: Annotated[str, typer.Option(help="Composition rule of the epsilons shown.")] = "rdp",
    accountant: Annotated[str, typer.Option(help="rdp, or pld: show the PLD epsilons (account --accountant pld) beside the run's PLD epsilon.")] = "rdp",
    k: Annotated[int, typer.Option(help="Points in the lowest/highest gallery.")] = 10,
    db: DbOption = None,
    json: JsonOption = False,
) -> None:
    """Write an HTML report (Altair charts inlined) of a run's per-example privacy."""
    from dpledger.warehouse.report_frames import report as do_report

    from .accounting import rule_of

    rule = rule_of(rule, accountant)
    result = do_report(db, run, out, png, rule=rule, k=k)
    if json:
        print_json(result)
        return
    print(f"wrote {result['html']} ({len(result['sections'])} sections"
          + (f", {len(result['pngs'])} PNGs in {png}" if png else "") + ")")
    if result["summary"].get("private") is False:
        print("no per-example epsilon: the run was trained without DP (training curves and losses only)")
    for item in result.get("left_out", []):
        print(f"left out: {item['section']}: {item['reason']}")
