"""``dpledger account``, ``budget``, ``rank``, ``fit``: per-example privacy from the warehouse."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (DbOption, EpochsHelp, FormatOption, JsonOption, NoiseMultiplierOption, StepsOption, app, connected,
                     err, output_format, print_json, progress)


def rule_of(rule: str, accountant: str) -> str:
    """The composition label of ``point_epsilon`` that (--rule, --accountant) read: ``pld`` for the PLD
    accountant (of rule rdp's per-step sum), else the rule."""
    from dpledger.warehouse.errors import UserError

    if accountant not in ("rdp", "pld"):
        raise UserError(f"accountant {accountant}: expected one of rdp, pld", "accountant")
    if accountant == "pld":
        if rule not in ("rdp", "pld"):
            raise UserError(f"accountant pld goes with rule rdp only (rule {rule} has its own composition)",
                            "accountant", "rule")
        return "pld"
    return rule


@app.command()
def account(
    run: Annotated[Optional[list[str]], typer.Option("--run", help="Run to account (repeatable) (default: every run with norms).")] = None,
    rule: Annotated[str, typer.Option(help="Composition rule: rdp (per run) or gla (Thudi et al., per configuration).")] = "rdp",
    delta: Annotated[Optional[float], typer.Option(help="Delta for epsilon (default: each run's delta).")] = None,
    exact: Annotated[bool, typer.Option("--exact", help="Exact per-row RDP instead of the tabulated upper bound (slow on big runs).")] = False,
    grid: Annotated[int, typer.Option(help="Cells of the tabulated fast path's grid (2 to 65536).")] = 1024,
    legacy_scaling: Annotated[bool, typer.Option("--legacy-scaling", help="gla: the study's scaling (clipped norm / batch size), to reproduce its numbers.")] = False,
    fill: Annotated[str, typer.Option(help="Per-step ratios between recorded steps: step (hold last), linear, pchip, offset or nn.")] = "step",
    accountant: Annotated[str, typer.Option(help="rdp, or pld: the tight privacy-loss-distribution accountant of the same per-step sum (rule rdp only; stored as rule pld beside the rdp rows).")] = "rdp",
    lake: Annotated[Optional[Path], typer.Option(help="Compose over a Parquet lake in place; results go to the database.")] = None,
    executor: Annotated[str, typer.Option(help="With --lake: local, or ray (one task per run).")] = "local",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (with --executor ray).")] = None,
    memory_limit: Annotated[str, typer.Option(help="With --lake: DuckDB memory limit before spilling.")] = "4GB",
    db: DbOption = None,
    json: JsonOption = False,
) -> None:
    """Compute per-example epsilon (point_epsilon) for runs under a composition rule."""
    options = dict(rule=rule, delta=delta, exact=exact, grid=grid, legacy_scaling=legacy_scaling, fill=fill)
    if accountant != "rdp":
        options["accountant"] = accountant
    if lake is not None:
        if accountant != "rdp":
            from dpledger.warehouse.errors import UserError

            raise UserError("--accountant pld reads the database, not --lake (ingest or merge the lake first)",
                            "accountant", "lake")
        import tempfile

        from dpledger.lake_accounting import account_lake

        with tempfile.TemporaryDirectory(prefix="dpledger-spill-") as spill:
            summaries = account_lake(lake, db, run, executor=executor, address=address, memory_limit=memory_limit,
                                     temp_directory=spill, **options)
    else:
        from dpledger.warehouse.accounting import account as do_account

        label = "pld" if accountant == "pld" else rule
        with connected(db) as con, progress(f"accounting ({label})", "runs", disable=json) as update:
            summaries = do_account(con, run, on_run=lambda name, i, n: update(
                description=f"accounting {name} ({label})", completed=i, total=n), **options)
    if json:
        print_json(summaries)
        return
    if not summaries:
        err("no runs with per-point norms to account")
        return
    for s in summaries:
        if "skipped" in s:
            print(f"{s['run_id']}: skipped ({s['skipped']})")
            continue
        how = ("pessimistic upper bound" if s["rule"] == "pld" else "exact" if s["exact"]
               else "tabulated upper bound")
        print(f"{s['run_id']} [{s['rule']}, {how}, delta={s['delta']:g}]: {s['points']} points, epsilon "
              f"min {s['epsilon_min']:.4g} / median {s['epsilon_median']:.4g} / max {s['epsilon_max']:.4g}; "
              f"data-independent {'PLD ' if s['rule'] == 'pld' else ''}epsilon of the run {s['run_epsilon']:.4g}")
        if s.get("meaning"):
            print(f"  {s['meaning']}")
        if s["points_partially_covered"]:
            print(f"  note: {s['points_partially_covered']} points have norms for only part of the run's "
                  f"{s['steps']} steps; their epsilon covers the recorded part")
        for note in s["notes"]:
            print(f"  note: {note}")


@app.command()
def fit(
    run: Annotated[str, typer.Option(help="Run whose per-step ratios to fit.", show_default=False)],
    method: Annotated[list[str], typer.Option(help="step, linear, pchip, offset or nn (repeatable).")] = ["linear"],
    holdout: Annotated[Optional[int], typer.Option(help="Hold out every K-th checkpoint and report the errors.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the nn method.")] = 0,
    db: DbOption = None,
    json: JsonOption = False,
) -> None:
    """Fit per-step cost curves between checkpoints; with --holdout, how well each predicts held-out ones."""
    from dpledger.analysis.fits import METRICS, format_table
    from dpledger.warehouse.fit_table import fit_run

    with connected(db) as con:
        results = [fit_run(con, run, m, holdout, seed) for m in method]
    if json:
        print_json(results)
        return
    if holdout is None:
        for r in results:
            print(f"{r['run_id']}: fitted {r['method']} to {r['n_records']} records of {r['n_points']} points")
        return
    # one line a method, named columns (no wrapping), only the metrics that are defined
    keys = [k for k, _ in METRICS if any(r["metrics"].get(k) is not None for r in results)]
    print(f"{run}: every checkpoint i with i % {holdout} == {holdout - 1} held out "
          "(per-step cost at order 8, per-point epsilon)")
    print(format_table([{"method": r["method"], **r["metrics"]} for r in results], columns=("method", *keys)))


@app.command()
def rank(
    run: Annotated[str, typer.Option(help="Run to rank.", show_default=False)],
    lowest: Annotated[Optional[int], typer.Option(help="The N points with the lowest epsilon.")] = None,
    highest: Annotated[Optional[int], typer.Option(help="The N points with the highest epsilon.")] = None,
    rule: Annotated[str, typer.Option(help="Composition rule the epsilons were computed with.")] = "rdp",
    accountant: Annotated[str, typer.Option(help="rdp, or pld: the PLD epsilons (account --accountant pld), beside the run's PLD epsilon.")] = "rdp",
    format: FormatOption = "table",
    db: DbOption = None,
    json: JsonOption = False,
) -> None:
    """Points of a run ranked by per-example epsilon, beside the run's data-independent epsilon."""
    from dpledger.warehouse.rank import rank as do_rank
    from dpledger.warehouse.rank import rank_summary

    from .output import emit

    rule = rule_of(rule, accountant)
    fmt = output_format(format, json)
    with connected(db, read_only=True) as con:
        table = do_rank(con, run, rule=rule, lowest=lowest, highest=highest)
        summary = rank_summary(con, run, rule)
    which = f"highest {highest}" if highest is not None else (f"lowest {lowest}" if lowest is not None else "all")
    emit(table, fmt, title=f"{run}: points by epsilon ({rule}, {which})")
    if fmt == "table":  # ties at the top or bottom, coverage, gla's looser bound: what the table alone hides
        for note in summary["notes"]:
            print(f"note: {note}")


@app.command()
def budget(
    sample_rate: Annotated[float, typer.Option(help="Poisson sample rate q.", show_default=False)],
    delta: Annotated[float, typer.Option(help="Target delta.", show_default=False)],
    noise_multiplier: NoiseMultiplierOption = None,
    target_epsilon: Annotated[Optional[float], typer.Option(help="Target epsilon (gives the noise multiplier).")] = None,
    steps: StepsOption = None,
    epochs: Annotated[Optional[float], typer.Option(help=EpochsHelp)] = None,
    accountant: Annotated[str, typer.Option(help="rdp, prv, gdp or pld (tight privacy loss distributions; no --target-epsilon).")] = "rdp",
    json: JsonOption = False,
) -> None:
    """Epsilon of DP-SGD (or the noise multiplier for a target epsilon), no training needed."""
    from dpledger.analysis.budget import budget as do_budget

    out = do_budget(sample_rate, delta, noise_multiplier=noise_multiplier, steps=steps, epochs=epochs,
                    accountant=accountant, target_epsilon=target_epsilon)
    if json:
        print_json(out)
        return
    line = (f"epsilon = {out['epsilon']:.6g} at delta = {out['delta']:g} after {out['steps']} steps "
            f"(q = {out['sample_rate']:g}, noise multiplier = {out['noise_multiplier']:.6g}, {out['accountant']} accountant")
    if "order" in out:
        line += f", optimal order {out['order']:g}"
    print(line + ")")
