"""The ``dpledger`` command line: a thin face over library calls.

Every command parses its flags, calls one library function and prints. Errors the
user can fix (bad files, flags, unknown runs) print one line on stderr and exit 2;
``--json`` output is pure JSON on stdout, with logs and progress on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from dpledger.warehouse.errors import UserError

app = typer.Typer(
    name="dpledger",
    help="A per-example privacy ledger for DP-SGD: ingest per-point gradient norms, account, rank, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
ingest_app = typer.Typer(help="Load files into the warehouse (idempotent: a file already loaded is skipped).",
                         no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")

DbOption = Annotated[
    Optional[Path],
    typer.Option("--db", help="Database file (default: $DPLEDGER_DB or ./dpledger.duckdb)", show_default=False),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _err(message: str) -> None:
    sys.stderr.write(message.rstrip() + "\n")


def _format(fmt: str, json_flag: bool = False) -> str:
    from dpledger.warehouse.output import FORMATS

    if json_flag:
        return "json"
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    return fmt


@app.command()
def init(db: DbOption = None, json: JsonOption = False) -> None:
    """Create the database, or upgrade it to the current schema (idempotent)."""
    from dpledger.warehouse import db as dbmod
    from dpledger.warehouse.output import to_json

    summary = dbmod.init(db)
    if json:
        print(to_json(summary))
        return
    what = "created" if summary["created"] else "opened"
    actions = "; ".join(summary["actions"]) or "already current"
    print(f"{what} {summary['db']}: schema version {summary['schema_version']} ({actions})")


def _print_ingest_results(results: list[dict], json: bool) -> None:
    from dpledger.warehouse.output import to_json

    if json:
        print(to_json(results))
        return
    for r in results:
        if r["status"] == "skipped":
            print(f"{r['path']}: skipped, {r['reason']}")
        else:
            print(f"{r['path']}: {r['rows']} point-step rows into run{'s' if len(r['runs']) > 1 else ''} "
                  f"{', '.join(r['runs'])}")


@ingest_app.command("gla-csv")
def ingest_gla_csv(
    files: Annotated[list[Path], typer.Argument(help="GLA-format per-point CSV files.", show_default=False)],
    run: Annotated[Optional[str], typer.Option(help="Run name for the rows (default: res_name column, else file name).")] = None,
    delta: Annotated[Optional[float], typer.Option(help="Target delta of the run(s) (default: 1e-5).")] = None,
    db: DbOption = None,
    json: JsonOption = False,
) -> None:
    """Ingest per-point CSV files in the GLA format (one run per res_name)."""
    from dpledger.ingest import ingest_gla_csv as do_ingest

    from dpledger.warehouse.db import connect

    con = connect(db)
    try:
        results = do_ingest(con, files, run=run, delta=delta)
    finally:
        con.close()
    _print_ingest_results(results, json)


@ingest_app.command("steps")
def ingest_steps(
    file: Annotated[Path, typer.Argument(help="CSV or Parquet: step, point_id, grad_norm[, loss, sampled].", show_default=False)],
    run: Annotated[str, typer.Option(help="Run name (created if new).", show_default=False)],
    sample_rate: Annotated[Optional[float], typer.Option(help="Poisson sample rate q.")] = None,
    noise_multiplier: Annotated[Optional[float], typer.Option(help="Noise multiplier sigma.")] = None,
    max_grad_norm: Annotated[Optional[float], typer.Option(help="Clipping norm C.")] = None,
    delta: Annotated[Optional[float], typer.Option(help="Target delta (default: 1e-5 for a new run).")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset the point ids index.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Number of steps of the run (default: last step + 1).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Expected batch size.")] = None,
    norms_clipped: Annotated[bool, typer.Option("--norms-clipped", help="grad_norm holds norms already clipped at C.")] = False,
    db: DbOption = None,
    json: JsonOption = False,
) -> None:
    """Ingest per-point, per-step gradient norms from any tool (CSV or Parquet)."""
    from dpledger.ingest import ingest_steps as do_ingest

    from dpledger.warehouse.db import connect

    con = connect(db)
    try:
        result = do_ingest(
            con, file, run,
            sample_rate=sample_rate, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            delta=delta, dataset=dataset, steps=steps, batch_size=batch_size, norms_clipped=norms_clipped,
        )
    finally:
        con.close()
    _print_ingest_results([result], json)


@app.command()
def query(
    sql: Annotated[str, typer.Argument(help="SQL to run (read-only); $name for bound parameters.", show_default=False)],
    param: Annotated[
        Optional[list[str]],
        typer.Option("--param", "-p", help="Bound parameter: -p name value (or -p name=value); repeatable."),
    ] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="table, json or csv.")] = "table",
    allow_files: Annotated[bool, typer.Option("--allow-files", help="Let the SQL read files (read_csv, read_parquet, ...).")] = False,
    lake: Annotated[Optional[Path], typer.Option(help="Query a Parquet lake in place (with the database's rows, if any).")] = None,
    db: DbOption = None,
    json: JsonOption = False,
) -> None:
    """Run SQL on the warehouse, opened read-only; parameters are bound, never pasted."""
    from dpledger.warehouse.output import emit
    from dpledger.warehouse.query import parse_params, run_query

    pairs = []
    for p in param or []:
        name, sep, value = p.partition("=")
        if not sep:
            raise UserError(f"-p {p}: give a parameter as -p name value or -p name=value")
        pairs.append((name, value))
    fmt = _format(format, json)
    table = run_query(sql, parse_params(pairs), db, allow_files=allow_files, lake=lake)
    emit(table, fmt)


@app.command()
def runs(db: DbOption = None, json: JsonOption = False, format: Annotated[str, typer.Option("--format", "-f")] = "table") -> None:
    """List runs with their DP-SGD parameters and row counts."""
    from dpledger.warehouse.db import connect
    from dpledger.warehouse.output import emit
    from dpledger.warehouse.query import list_runs

    fmt = _format(format, json)
    con = connect(db, read_only=True)
    try:
        table = list_runs(con)
    finally:
        con.close()
    if fmt == "table":  # the terminal gets the columns that tell runs apart
        table = table.select(["run_id", "dataset", "model", "sample_rate", "noise_multiplier", "max_grad_norm",
                              "steps", "delta", "private", "status", "point_step_rows", "points_tracked",
                              "steps_recorded"])
    emit(table, fmt, title="runs")


@app.command()
def account(
    run: Annotated[Optional[list[str]], typer.Option("--run", help="Run to account (repeatable) (default: every run with norms).")] = None,
    rule: Annotated[str, typer.Option(help="Composition rule: rdp (per run) or gla (Thudi et al., per configuration).")] = "rdp",
    delta: Annotated[Optional[float], typer.Option(help="Delta for epsilon (default: each run's delta).")] = None,
    exact: Annotated[bool, typer.Option("--exact", help="Exact per-row RDP instead of the tabulated upper bound (slow on big runs).")] = False,
    grid: Annotated[int, typer.Option(help="Cells of r = s/C for the tabulated fast path.")] = 1024,
    legacy_scaling: Annotated[bool, typer.Option("--legacy-scaling", help="gla: the study's scaling (clipped norm / batch size), to reproduce its numbers.")] = False,
    fill: Annotated[str, typer.Option(help="Per-step ratios between recorded steps: step (hold last), linear, pchip, offset or nn.")] = "step",
    lake: Annotated[Optional[Path], typer.Option(help="Compose over a Parquet lake in place; results go to the database.")] = None,
    executor: Annotated[str, typer.Option(help="With --lake: local, or ray (one task per run).")] = "local",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (with --executor ray).")] = None,
    memory_limit: Annotated[str, typer.Option(help="With --lake: DuckDB memory limit before spilling.")] = "4GB",
    db: DbOption = None,
    json: JsonOption = False,
) -> None:
    """Compute per-example epsilon (point_epsilon) for runs under a composition rule."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from dpledger.warehouse.accounting import account as do_account
    from dpledger.warehouse.db import connect
    from dpledger.warehouse.output import to_json

    if lake is not None:
        import tempfile

        from dpledger.ingest.lake_account import account_lake

        with tempfile.TemporaryDirectory(prefix="dpledger-spill-") as spill:
            summaries = account_lake(lake, db, run, executor=executor, address=address, memory_limit=memory_limit,
                                     temp_directory=spill, rule=rule, delta=delta, exact=exact, grid=grid,
                                     legacy_scaling=legacy_scaling, fill=fill)
        con = None
    else:
        con = connect(db)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} runs"),
                      TimeElapsedColumn(), console=_stderr_console(), transient=True, disable=json or con is None) as bar:
            task = bar.add_task(f"accounting ({rule})", total=None)

            def on_run(name: str, i: int, n: int) -> None:
                bar.update(task, description=f"accounting {name} ({rule})", completed=i, total=n)

            if con is not None:
                summaries = do_account(con, run, rule=rule, delta=delta, exact=exact, grid=grid,
                                       legacy_scaling=legacy_scaling, on_run=on_run, fill=fill)
    finally:
        if con is not None:
            con.close()
    if json:
        print(to_json(summaries))
        return
    if not summaries:
        _err("no runs with per-point norms to account")
        return
    for s in summaries:
        if "skipped" in s:
            print(f"{s['run_id']}: skipped ({s['skipped']})")
            continue
        how = "exact" if s["exact"] else "tabulated upper bound"
        print(f"{s['run_id']} [{s['rule']}, {how}, delta={s['delta']:g}]: {s['points']} points, epsilon "
              f"min {s['epsilon_min']:.4g} / median {s['epsilon_median']:.4g} / max {s['epsilon_max']:.4g}; "
              f"data-independent epsilon of the run {s['run_epsilon']:.4g}")
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
    from dpledger.warehouse.db import connect
    from dpledger.warehouse.fitting import fit_run
    from dpledger.warehouse.output import emit, to_json

    import pyarrow as pa

    con = connect(db)
    try:
        results = [fit_run(con, run, m, holdout, seed) for m in method]
    finally:
        con.close()
    if json:
        print(to_json(results))
        return
    if holdout is None:
        for r in results:
            print(f"{r['run_id']}: fitted {r['method']} to {r['n_records']} records of {r['n_points']} points")
        return
    cols = ["cost_mae", "cost_max_abs", "cost_mre_above_floor", "eps_mae", "eps_max_abs", "eps_mre", "eps_max_rel",
            "eps_step_mae"]
    table = pa.table({"method": [r["method"] for r in results],
                      **{c: [r["metrics"].get(c) for r in results] for c in cols}})
    emit(table, "table", title=f"{run}: every checkpoint i with i % {holdout} == {holdout - 1} held out "
                                   "(per-step cost at order 8, per-point epsilon)")


@app.command()
def curvature(
    run: Annotated[str, typer.Option(help="Run whose checkpoints to score.", show_default=False)],
    checkpoints: Annotated[str, typer.Option(help="all, last, or a comma-separated list of steps.")] = "all",
    probes: Annotated[int, typer.Option(help="Rademacher probes per point.")] = 10,
    h: Annotated[float, typer.Option(help="Finite-difference step.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed of the probes.")] = 0,
    db: DbOption = None,
    json: JsonOption = False,
) -> None:
    """Input-loss curvature (Hutchinson trace of the input Hessian) of the run's points at its checkpoints."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from dpledger.ingest.curvature import score_run

    from dpledger.warehouse.db import connect
    from dpledger.warehouse.output import to_json

    con = connect(db)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=_stderr_console(), transient=True, disable=json) as bar:
            task = bar.add_task("curvature", total=None)
            result = score_run(con, run, checkpoints, probes, h, seed, on_checkpoint=lambda s, i, n: bar.update(
                task, completed=i, total=n, description=f"curvature at step {s}"))
    finally:
        con.close()
    if json:
        print(to_json(result))
        return
    print(f"{result['run_id']}: scored {result['points']} points at {len(result['checkpoints'])} checkpoints "
          f"({result['n_probes']} probes, h={result['h']:g}); mean curvature {result['mean_curvature']:.4g}; "
          f"averages in view point_curvature")


@app.command()
def norms(
    run: Annotated[str, typer.Option(help="Run whose checkpoints to score.", show_default=False)],
    checkpoints: Annotated[str, typer.Option(help="all, last, or a comma-separated list of steps.")] = "all",
    points: Annotated[str, typer.Option(help="Points to score: all, N (the first N), or a file of point ids.")] = "all",
    chunk: Annotated[int, typer.Option(help="Points per task.")] = 50_000,
    executor: Annotated[str, typer.Option(help="local, or ray (one task per range of points).")] = "local",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (with --executor ray).")] = None,
    db: DbOption = None,
    json: JsonOption = False,
) -> None:
    """Per-point gradient norms at a run's checkpoints, split by point ranges across tasks."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from dpledger.ingest.norm_scoring import score_norms

    from dpledger.warehouse.db import connect
    from dpledger.warehouse.output import to_json

    con = connect(db)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} ranges"),
                      TimeElapsedColumn(), console=_stderr_console(), transient=True, disable=json) as bar:
            task = bar.add_task("scoring norms", total=None)
            result = score_norms(con, run, checkpoints, points, chunk, executor, address,
                                 on_range=lambda i, n: bar.update(task, completed=i, total=n))
    finally:
        con.close()
    if json:
        print(to_json(result))
        return
    print(f"{result['run_id']}: {result['rows']} norms of {result['points']} points at {len(result['steps'])} "
          f"checkpoints ({result['ranges']} range{'s' if result['ranges'] > 1 else ''}, {result['executor']}); "
          "compose with `dpledger account`")


@app.command()
def links(
    run: Annotated[Optional[list[str]], typer.Option("--run", help="Run(s) to link (repeatable).")] = None,
    config: Annotated[Optional[str], typer.Option(help="All runs of a config_key or study_key.")] = None,
    rule: Annotated[str, typer.Option(help="Composition rule of the epsilons.")] = "rdp",
    k: Annotated[int, typer.Option(help="k of the top-k overlap.")] = 10,
    by: Annotated[Optional[str], typer.Option(help="Also summarise per group: label or an attribute (e.g. race).")] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="table or json.")] = "table",
    db: DbOption = None,
    json: JsonOption = False,
) -> None:
    """Per-example epsilon vs curvature, memorization and MIA: correlations, top-k overlap, bound check."""
    from dpledger.warehouse.db import connect
    from dpledger.warehouse.links import links as do_links
    from dpledger.warehouse.output import print_table, records, to_json

    import pyarrow as pa

    fmt = _format(format, json)
    if fmt == "csv":
        raise UserError("--format csv: links prints several tables; use table or json")
    con = connect(db, read_only=True)
    try:
        out = do_links(con, run, config, rule, k, by)
    finally:
        con.close()
    tables = {name: out[name] for name in ("pairs", "bound", "per_target_epsilon", "groups", "points")}
    if fmt == "json":
        print(to_json({**{k2: v for k2, v in out.items() if k2 not in tables},
                       **{name: records(pa.Table.from_pandas(t, preserve_index=False)) for name, t in tables.items()}}))
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
def rank(
    run: Annotated[str, typer.Option(help="Run to rank.", show_default=False)],
    lowest: Annotated[Optional[int], typer.Option(help="The N points with the lowest epsilon.")] = None,
    highest: Annotated[Optional[int], typer.Option(help="The N points with the highest epsilon.")] = None,
    rule: Annotated[str, typer.Option(help="Composition rule the epsilons were computed with.")] = "rdp",
    format: Annotated[str, typer.Option("--format", "-f", help="table, json or csv.")] = "table",
    db: DbOption = None,
    json: JsonOption = False,
) -> None:
    """Points of a run ranked by per-example epsilon, beside the run's data-independent epsilon."""
    from dpledger.warehouse.accounting import rank as do_rank
    from dpledger.warehouse.db import connect
    from dpledger.warehouse.output import emit

    fmt = _format(format, json)
    con = connect(db, read_only=True)
    try:
        table = do_rank(con, run, rule=rule, lowest=lowest, highest=highest)
    finally:
        con.close()
    which = f"highest {highest}" if highest is not None else (f"lowest {lowest}" if lowest is not None else "all")
    emit(table, fmt, title=f"{run}: points by epsilon ({rule}, {which})")


@app.command()
def budget(
    sample_rate: Annotated[float, typer.Option(help="Poisson sample rate q.", show_default=False)],
    delta: Annotated[float, typer.Option(help="Target delta.", show_default=False)],
    noise_multiplier: Annotated[Optional[float], typer.Option(help="Noise multiplier sigma (gives epsilon).")] = None,
    target_epsilon: Annotated[Optional[float], typer.Option(help="Target epsilon (gives the noise multiplier).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Number of steps.")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Epochs (steps = epochs x ceil(1/q)).")] = None,
    accountant: Annotated[str, typer.Option(help="rdp, prv or gdp.")] = "rdp",
    json: JsonOption = False,
) -> None:
    """Epsilon of DP-SGD (or the noise multiplier for a target epsilon), no training needed."""
    from dpledger.warehouse.accounting import budget as do_budget
    from dpledger.warehouse.output import to_json

    out = do_budget(sample_rate, delta, noise_multiplier=noise_multiplier, steps=steps, epochs=epochs,
                    accountant=accountant, target_epsilon=target_epsilon)
    if json:
        print(to_json(out))
        return
    line = (f"epsilon = {out['epsilon']:.6g} at delta = {out['delta']:g} after {out['steps']} steps "
            f"(q = {out['sample_rate']:g}, noise multiplier = {out['noise_multiplier']:.6g}, {out['accountant']} accountant")
    if "order" in out:
        line += f", optimal order {out['order']:g}"
    print(line + ")")


@app.command()
def train(
    run: Annotated[Optional[str], typer.Option(help="Run name (default: from dataset, model, seed, noise).")] = None,
    dataset: Annotated[str, typer.Option(help="digits, mnist5k, synthetic, mnist, fashion-mnist, cifar10, fairface, npz.")] = "digits",
    data_path: Annotated[Optional[str], typer.Option(help="Local files of the dataset (mnist, cifar10, fairface, npz).")] = None,
    model: Annotated[str, typer.Option(help="logreg, mlp, lenet or resnet18.")] = "mlp",
    epochs: Annotated[float, typer.Option(help="Epochs (steps = ceil(epochs x floor(1/q))).")] = 5.0,
    batch_size: Annotated[int, typer.Option(help="Expected (Poisson) batch size; q = batch_size / n.")] = 64,
    lr: Annotated[float, typer.Option(help="Learning rate (SGD).")] = 0.5,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.0,
    max_grad_norm: Annotated[float, typer.Option(help="Clipping norm C.")] = 1.0,
    noise_multiplier: Annotated[Optional[float], typer.Option(help="Noise multiplier sigma.")] = None,
    target_epsilon: Annotated[Optional[float], typer.Option(help="Target epsilon (Opacus calibrates sigma).")] = None,
    delta: Annotated[float, typer.Option(help="Delta.")] = 1e-5,
    seed: Annotated[int, typer.Option(help="Seed of initialisation, sampling and noise.")] = 0,
    disable_dp: Annotated[bool, typer.Option("--disable-dp", help="Train without DP (a baseline).")] = False,
    track: Annotated[str, typer.Option(help="Points to track: all, N (the first N), or a file of point ids.")] = "all",
    track_every: Annotated[int, typer.Option(help="Record norms every K steps.")] = 1,
    reuse_norms: Annotated[bool, typer.Option(
        help="At tracked steps, clip the batch with the tracked norms (Opacus's ghost-clipping optimizer adds "
             "the noise) instead of a second, per-sample pass; the same update.")] = True,
    eval_every: Annotated[Optional[int], typer.Option(help="Evaluate and checkpoint every K steps (default: each epoch).")] = None,
    commit_every: Annotated[Optional[int], typer.Option(help="Commit rows every K steps (default: every 5 seconds).")] = None,
    n_train: Annotated[Optional[int], typer.Option(help="Use only the first N training points.")] = None,
    n_test: Annotated[Optional[int], typer.Option(help="Use only the first N test points.")] = None,
    subset_ratio: Annotated[Optional[float], typer.Option(help="Train on a random subset (membership recorded).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    threads: Annotated[Optional[int], typer.Option(help="Torch threads (default: 1 for logreg/mlp, else all).")] = None,
    resume: Annotated[Optional[str], typer.Option(help="Continue run RUN from its last committed step.")] = None,
    db: DbOption = None,
    json: JsonOption = False,
) -> None:
    """Train with DP-SGD (Opacus), recording per-point gradient norms and losses into the warehouse."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from dpledger.analysis.rdp import epsilon_from_rdp, rdp_sgm
    from dpledger.ingest.sinks import DuckDBSink
    from dpledger.ingest.worker import TrainConfig, train as do_train

    from dpledger.warehouse.db import resolve_db_path
    from dpledger.warehouse.output import to_json

    cfg = TrainConfig(run=resume or run, dataset=dataset, data_path=data_path, model=model, epochs=epochs,
                      batch_size=batch_size, lr=lr, momentum=momentum, max_grad_norm=max_grad_norm,
                      noise_multiplier=noise_multiplier, target_epsilon=target_epsilon, delta=delta, seed=seed,
                      disable_dp=disable_dp, track=track, track_every=track_every, reuse_norms=reuse_norms,
                      eval_every=eval_every,
                      commit_every=commit_every, n_train=n_train, n_test=n_test, subset_ratio=subset_ratio,
                      device=device, threads=threads)
    db_path = resolve_db_path(db)
    sink = DuckDBSink(db_path)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                      console=_stderr_console(), transient=True, disable=json) as bar:
            task = bar.add_task(f"training {cfg.run or ''}", total=None, info="")

            per_step_rdp = {}  # (q, sigma) -> RDP of one step: computed once (about a second), then scaled

            def on_progress(p: dict) -> None:
                if json:  # no bar to show
                    return
                info = f"loss {p['loss']:.3f}"
                if p["sigma"]:
                    key = (p["q"], p["sigma"])
                    if key not in per_step_rdp:
                        per_step_rdp[key] = rdp_sgm(p["q"], p["sigma"])
                    info += f"  eps {epsilon_from_rdp(per_step_rdp[key] * p['step'], p['delta'])[0]:.2f}"
                bar.update(task, completed=p["step"], total=p["total"], info=info)

            summary = do_train(cfg, sink, resume=resume is not None, db_dir=db_path.resolve().parent,
                               on_progress=on_progress)
    finally:
        sink.close()
    if json:
        print(to_json(summary))
        return
    acc = f", test accuracy {summary['test_accuracy']:.3f}" if summary.get("test_accuracy") is not None else ""
    print(f"{summary['run_id']}: {summary['status']} after {summary['steps']} steps "
          f"({summary['rows']} point-step rows{', resumed at step ' + str(summary['resumed_from']) if summary['resumed_from'] else ''}{acc})")


@ingest_app.command("memorization")
def ingest_memorization(
    file: Annotated[Path, typer.Argument(help="Feldman-Zhang .npz (tr_mem, tr_labels[, tt_labels]).", show_default=False)],
    dataset: Annotated[str, typer.Option(help="Dataset the scores index (as in points.dataset).", show_default=False)],
    index: Annotated[Optional[Path], typer.Option(help="Point id of each position (.npy or text), if the file's order differs.")] = None,
    source: Annotated[Optional[str], typer.Option(help="Name of this set of scores (default: the file name).")] = None,
    db: DbOption = None,
    json: JsonOption = False,
) -> None:
    """Import published memorization scores; the index order is the file's own (see --index)."""
    from dpledger.ingest.memorization import ingest_memorization as do_ingest

    from dpledger.warehouse.db import connect
    from dpledger.warehouse.output import to_json

    con = connect(db)
    try:
        result = do_ingest(con, file, dataset, index, source)
    finally:
        con.close()
    if json:
        print(to_json(result))
    elif result["status"] == "skipped":
        print(f"{result['path']}: skipped, {result['reason']}")
    else:
        print(f"{result['path']}: {result['rows']} memorization scores for dataset {dataset} (source {result['source']}); "
              "position i is point i of the file's own order")


@ingest_app.command("shards")
def ingest_shards(
    lake: Annotated[Path, typer.Argument(help="Lake folder (run_id=<id>/ folders of Parquet shards).", show_default=False)],
    db: DbOption = None,
    json: JsonOption = False,
) -> None:
    """Merge the committed Parquet shards of a lake into the database (idempotent)."""
    from dpledger.ingest.shards import ingest_shards as do_merge

    from dpledger.warehouse.db import connect
    from dpledger.warehouse.output import to_json

    con = connect(db)
    try:
        results = do_merge(con, lake)
    finally:
        con.close()
    if json:
        print(to_json(results))
        return
    if not results:
        print(f"{lake}: no committed runs")
    for r in results:
        print(f"{r['run_id']}: {r['rows']} point-step rows merged from {r['files_merged']} files "
              f"({r['files_skipped']} merged before); run {r['status']} at step {r['committed_step']}")


@app.command()
def sweep(
    config: Annotated[Path, typer.Argument(help="TOML: [base] train options, [grid] lists, optional [[runs]].", show_default=False)],
    workers: Annotated[int, typer.Option(help="Local worker processes (--executor local).")] = 1,
    lake: Annotated[Optional[Path], typer.Option(help="Folder for the runs' Parquet shards (default: lake/ next to the database).")] = None,
    executor: Annotated[str, typer.Option(help="local: worker processes here; ray: one Ray task per run.")] = "local",
    address: Annotated[Optional[str], typer.Option(help="HOST:PORT of a running Ray cluster (--executor ray); without it a local one is started. The lake must be storage every node sees.", show_default=False)] = None,
    db: DbOption = None,
    json: JsonOption = False,
) -> None:
    """Train a grid of runs across local processes or a Ray cluster into a Parquet lake, then merge it into the database."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from dpledger.ingest.shards import ingest_shards as do_merge
    from dpledger.ingest.sweep import check_executor, load_config
    from dpledger.ingest.sweep import run as run_sweep

    from dpledger.warehouse.db import connect, resolve_db_path
    from dpledger.warehouse.output import to_json

    check_executor(executor, workers, address)
    configs = load_config(config)
    db_path = resolve_db_path(db)
    lake_dir = lake or db_path.resolve().parent / "lake"
    connect(db_path).close()  # a bad database path fails now, not after training
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} runs"),
                  TimeElapsedColumn(), console=_stderr_console(), transient=True, disable=json) as bar:
        task = bar.add_task(f"sweep ({workers} workers)" if executor == "local" else "sweep (ray)", total=len(configs))
        results = run_sweep(configs, lake_dir, executor, workers, address,
                            on_done=lambda r, i, n: bar.update(task, completed=i, description=f"done {r['run_id']}"))
    con = connect(db_path)
    try:
        merged = do_merge(con, lake_dir)
    finally:
        con.close()
    failed = [r for r in results if r.get("status") == "failed"]
    if json:
        print(to_json({"runs": results, "merged": merged}))
    else:
        for r in results:
            what = r.get("skipped") or r.get("error") or f"{r['steps']} steps, {r['rows']} point-step rows"
            print(f"{r['run_id']}: {r['status']} ({what})")
        print(f"merged {sum(m['rows'] for m in merged)} new point-step rows from {lake_dir} into {db_path}")
    if failed:
        raise UserError(f"{len(failed)} of {len(results)} runs failed; first: {failed[0]['run_id']}: {failed[0]['error']}")


@app.command()
def report(
    run: Annotated[str, typer.Option(help="Run to report on.", show_default=False)],
    out: Annotated[Path, typer.Option(help="HTML file to write (self-contained, opens offline).")] = Path("report.html"),
    png: Annotated[Optional[Path], typer.Option(help="Also write each chart as a PNG into this folder.")] = None,
    rule: Annotated[str, typer.Option(help="Composition rule of the epsilons shown.")] = "rdp",
    k: Annotated[int, typer.Option(help="Points in the lowest/highest gallery.")] = 10,
    db: DbOption = None,
    json: JsonOption = False,
) -> None:
    """Write an HTML report (Altair charts inlined) of a run's per-example privacy."""
    from dpledger.warehouse.output import to_json
    from dpledger.warehouse.report import report as do_report

    result = do_report(db, run, out, png, rule=rule, k=k)
    if json:
        print(to_json(result))
        return
    print(f"wrote {result['html']} ({len(result['sections'])} sections"
          + (f", {len(result['pngs'])} PNGs in {png}" if png else "") + ")")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo database, report and charts.")] = Path("dpledger-demo"),
    epochs: Annotated[float, typer.Option(help="Training epochs.")] = 8.0,
    json: JsonOption = False,
) -> None:
    """Train DP-SGD on the bundled digits tracking every point, account per-example epsilon, rank, report."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from dpledger.ingest.demo import run_demo

    from dpledger.warehouse.output import emit, records, to_json

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=_stderr_console(),
                  transient=True, disable=json) as bar:
        task = bar.add_task("training MLP on digits with DP-SGD", total=None, info="")
        summary = run_demo(out, epochs, on_progress=lambda p: bar.update(
            task, completed=p["step"], total=p["total"], info=f"loss {p['loss']:.3f}"))
    if json:
        print(to_json({**summary, "lowest": records(summary["lowest"]), "highest": records(summary["highest"])}))
        return
    t, a = summary["train"], summary["account"]
    if t.get("reused"):
        print(f"{t['run_id']}: trained before, reusing it ({summary['db']})")
    else:
        print(f"{t['run_id']}: trained {t['steps']} DP-SGD steps on digits, {t['tracked_points']} points tracked "
              f"every step, test accuracy {t['test_accuracy']:.3f}")
    print(f"per-example epsilon: min {a['epsilon_min']:.3f} / median {a['epsilon_median']:.3f} / max "
          f"{a['epsilon_max']:.3f}; the run's data-independent epsilon is {a['run_epsilon']:.3f} (delta {a['delta']:g})")
    emit(summary["lowest"], "table", title="5 points paying the least privacy")
    emit(summary["highest"], "table", title="5 points paying the most privacy")
    rep = summary["report"]
    print(f"report: {rep['html']} (opens offline), charts: {len(rep['pngs'])} PNGs in "
          f"{Path(rep['pngs'][0]).parent if rep['pngs'] else '-'}")
    print(f"explore: dpledger query \"select * from point_rank limit 5\" --db {summary['db']}")


def _normalise_param_pairs(argv: list[str]) -> list[str]:
    """``-p name value`` -> ``-p name=value`` (typer options take one value each)."""
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        if tok in ("-p", "--param") and i + 2 < len(argv) and "=" not in argv[i + 1]:
            out += [tok, f"{argv[i + 1]}={argv[i + 2]}"]
            i += 3
            continue
        out.append(tok)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    """Console entry point: runs the app, turning user errors into one line and exit 2."""
    from typer.exceptions import Abort, TyperException

    args = _normalise_param_pairs(list(sys.argv[1:] if argv is None else argv))
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=args, prog_name="dpledger", standalone_mode=False)
    except UserError as exc:
        _err(f"error: {exc}")
        return 2
    except Abort:
        _err("aborted")
        return 130
    except TyperException as exc:
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        _err(f"error: {message}{hint}")
        return 2
    except BrokenPipeError:
        return 0
    return rv if isinstance(rv, int) else 0


def entry() -> None:  # pragma: no cover - console script
    sys.exit(main())


if __name__ == "__main__":  # python -m dpledger
    entry()
