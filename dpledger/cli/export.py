"""``dpledger export``: a run of the ledger in other tools' formats (``tensorboard``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import DbOption, JsonOption, app, connected, print_json, progress

export_app = typer.Typer(help="Export runs to other tools' formats (TensorBoard).", no_args_is_help=True,
                         rich_markup_mode=None)
app.add_typer(export_app, name="export")


@export_app.command()
def tensorboard(
    run: Annotated[str, typer.Argument(help="Run to export.", show_default=False)],
    logdir: Annotated[Path, typer.Option(help="TensorBoard log folder; the run's events go to LOGDIR/RUN/.", show_default=False)],
    max_points: Annotated[int, typer.Option(help="Steps (evenly spaced, plus the checkpoints) with per-example epsilon quantiles.")] = 200,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the event files of an earlier export of the run.")] = False,
    db: DbOption = None,
    json: JsonOption = False,
) -> None:
    """Write a run's scalars (loss, test accuracy, data-independent and per-example epsilon so far,
    fraction of sampled points clipped) per step and histograms (per-example gradient norms and
    epsilon) at its checkpoints as TensorBoard event files (needs the extra: pip install
    'dpledger[tensorboard]'). The warehouse is read only; files are written under --logdir only."""
    from dpledger.tensorboard_export import export_tensorboard, summary_writer

    summary_writer()  # refuse before reading anything when tensorboard is missing
    with connected(db, read_only=True) as con, progress(f"exporting {run}", "steps", disable=json) as update:
        out = export_tensorboard(con, run, logdir, max_points=max_points, overwrite=overwrite,
                                 on_step=lambda i, n: update(completed=i, total=n))
    if json:
        print_json(out)
        return
    scalars = sum(out["scalars"].values())
    hists = sum(out["histograms"].values())
    print(f"{run}: {out['steps']} steps to {out['logdir']} ({scalars} scalar points in {len(out['scalars'])} tags, "
          f"{hists} histograms); view with: tensorboard --logdir {Path(out['logdir']).parent}")
