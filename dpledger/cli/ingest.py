"""``dpledger ingest …``: files into the warehouse (each a library call in :mod:`dpledger.ingest`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (DbOption, JsonOption, MaxGradNormOption, NoiseMultiplierOption, SampleRateOption, StepsOption,
                     connected, ingest_app, print_json)


def _print_ingest_results(results: list[dict], json: bool) -> None:
    if json:
        print_json(results)
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
    points_per_query: Annotated[int, typer.Option(
        help="k, the points whose mean loss gave each recorded gradient in the study's code (10 in the "
             "published one): the per-example clipped norm is min(k x distance x batch_size, C).")] = 1,
    db: DbOption = None,
    json: JsonOption = False,
) -> None:
    """Ingest per-point CSV files in the GLA format (one run per res_name)."""
    from dpledger.ingest.gla_csv import ingest_gla_csv as do_ingest

    with connected(db) as con:
        results = do_ingest(con, files, run=run, delta=delta, points_per_query=points_per_query)
    _print_ingest_results(results, json)


@ingest_app.command("steps")
def ingest_steps(
    file: Annotated[Path, typer.Argument(help="CSV or Parquet: step, point_id, grad_norm[, loss, sampled].", show_default=False)],
    run: Annotated[str, typer.Option(help="Run name (created if new).", show_default=False)],
    sample_rate: SampleRateOption = None,
    noise_multiplier: NoiseMultiplierOption = None,
    max_grad_norm: MaxGradNormOption = None,
    delta: Annotated[Optional[float], typer.Option(help="Target delta (default: 1e-5 for a new run).")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset the point ids index.")] = None,
    steps: StepsOption = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Expected batch size.")] = None,
    norms_clipped: Annotated[bool, typer.Option("--norms-clipped", help="grad_norm holds norms already clipped at C.")] = False,
    db: DbOption = None,
    json: JsonOption = False,
) -> None:
    """Ingest per-point, per-step gradient norms from any tool (CSV or Parquet)."""
    from dpledger.ingest.steps_file import ingest_steps as do_ingest

    with connected(db) as con:
        result = do_ingest(
            con, file, run,
            sample_rate=sample_rate, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            delta=delta, dataset=dataset, steps=steps, batch_size=batch_size, norms_clipped=norms_clipped,
        )
    _print_ingest_results([result], json)


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

    with connected(db) as con:
        result = do_ingest(con, file, dataset, index, source)
    if json:
        print_json(result)
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

    with connected(db) as con:
        results = do_merge(con, lake)
    if json:
        print_json(results)
        return
    if not results:
        print(f"{lake}: no committed runs")
    for r in results:
        print(f"{r['run_id']}: {r['rows']} point-step rows merged from {r['files_merged']} files "
              f"({r['files_skipped']} merged before); run {r['status']} at step {r['committed_step']}")
