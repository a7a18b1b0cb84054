"""``dpledger train``, ``sweep``, ``demo``, ``norms``, ``curvature``: commands that run models.

torch and opacus are imported inside the commands, so the other commands start fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dpledger.warehouse.errors import UserError

from .common import (DbOption, EpochsHelp, JsonOption, NoiseMultiplierOption, app, connected, flagged, print_json,
                     progress)


@app.command()
def train(
    run: Annotated[Optional[str], typer.Option(help="Run name (default: from dataset, model, seed, noise).")] = None,
    dataset: Annotated[str, typer.Option(help="digits, mnist5k, synthetic, mnist, fashion-mnist, cifar10, fairface, npz.")] = "digits",
    data_path: Annotated[Optional[str], typer.Option(help="Local files of the dataset (mnist, cifar10, fairface, npz).")] = None,
    model: Annotated[str, typer.Option(help="logreg, mlp, lenet or resnet18.")] = "mlp",
    epochs: Annotated[float, typer.Option(help=EpochsHelp)] = 5.0,
    batch_size: Annotated[int, typer.Option(help="Expected (Poisson) batch size; q = batch_size / n.")] = 64,
    lr: Annotated[float, typer.Option(help="Learning rate (SGD).")] = 0.5,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.0,
    max_grad_norm: Annotated[float, typer.Option(help="Clipping norm C.")] = 1.0,
    noise_multiplier: NoiseMultiplierOption = None,
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
    threads: Annotated[Optional[int], typer.Option(
        help="Torch threads (default: 1 for logreg/mlp, else all; the norm tracker takes all "
             "when it tracks 512+ points).")] = None,
    resume: Annotated[Optional[str], typer.Option(help="Continue run RUN from its last committed step.")] = None,
    sink: Annotated[str, typer.Option(help="lake: committed shards in lake/ beside the database, merged at the end "
                                           "(readers never wait); database: straight into the database file.")] = "lake",
    db: DbOption = None,
    json: JsonOption = False,
) -> None:
    """Train with DP-SGD (Opacus), recording per-point gradient norms and losses into the warehouse."""
    from dpledger.analysis.rdp import epsilon_from_rdp, rdp_sgm
    from dpledger.ingest.worker import TrainConfig
    from dpledger.workflows import train as do_train

    cfg = TrainConfig(run=resume or run, dataset=dataset, data_path=data_path, model=model, epochs=epochs,
                      batch_size=batch_size, lr=lr, momentum=momentum, max_grad_norm=max_grad_norm,
                      noise_multiplier=noise_multiplier, target_epsilon=target_epsilon, delta=delta, seed=seed,
                      disable_dp=disable_dp, track=track, track_every=track_every, reuse_norms=reuse_norms,
                      eval_every=eval_every,
                      commit_every=commit_every, n_train=n_train, n_test=n_test, subset_ratio=subset_ratio,
                      device=device, threads=threads)
    per_step_rdp = {}  # (q, sigma) -> RDP of one step: computed once (about a second), then scaled
    with progress(f"training {cfg.run or ''}", "steps", disable=json, info=True, remaining=True) as update:

        def on_progress(p: dict) -> None:
            if json:  # no bar to show
                return
            info = f"loss {p['loss']:.3f}"
            if p["sigma"]:
                key = (p["q"], p["sigma"])
                if key not in per_step_rdp:
                    per_step_rdp[key] = rdp_sgm(p["q"], p["sigma"])
                info += f"  eps {epsilon_from_rdp(per_step_rdp[key] * p['step'], p['delta'])[0]:.2f}"
            update(completed=p["step"], total=p["total"], info=info)

        summary = do_train(cfg, db, resume=resume is not None, sink=sink, on_progress=on_progress)
    if json:
        print_json(summary)
        return
    acc = f", test accuracy {summary['test_accuracy']:.3f}" if summary.get("test_accuracy") is not None else ""
    print(f"{summary['run_id']}: {summary['status']} after {summary['steps']} steps "
          f"({summary['rows']} point-step rows{', resumed at step ' + str(summary['resumed_from']) if summary['resumed_from'] else ''}{acc})")
    if not summary.get("merged", True):
        print(f"note: the run is committed in the lake but not merged into the database yet "
              f"({summary['merge_error']}); the next `dpledger account` or `ingest shards` merges it")
    if summary.get("epsilon") is not None:
        calibrated = (f"; noise multiplier {summary['noise_multiplier']:.6g} calibrated for target epsilon "
                      f"{target_epsilon:g}" if target_epsilon is not None else "")
        print(f"data-independent epsilon of the run: {summary['epsilon']:.4g} at delta {summary['delta']:g}"
              + (f" (q = {summary['sample_rate']:.4g}, noise multiplier {summary['noise_multiplier']:.4g}, "
                 f"{summary['steps']} steps)" if "sample_rate" in summary else "") + calibrated)
    elif summary.get("private") is False:
        print("not private (--disable-dp): no epsilon")


@app.command()
def sweep(
    config: Annotated[Path, typer.Argument(help="TOML: [base] train options, [grid] lists, optional [[runs]].", show_default=False)],
    workers: Annotated[int, typer.Option(help="Local worker processes (--executor local).")] = 1,
    lake: Annotated[Optional[Path], typer.Option(help="Folder for the runs' Parquet shards (default: lake/ next to the database).")] = None,
    executor: Annotated[str, typer.Option(help="local: worker processes here; ray: one Ray task per run.")] = "local",
    address: Annotated[Optional[str], typer.Option(help="HOST:PORT of a running Ray cluster (--executor ray); without it a local one is started. The lake must be storage every node sees.", show_default=False)] = None,
    max_runs: Annotated[Optional[int], typer.Option(help="Refuse a grid of more runs than this, checked before expanding it (default: 10,000).", show_default=False)] = None,
    db: DbOption = None,
    json: JsonOption = False,
) -> None:
    """Train a grid of runs across local processes or a Ray cluster into a Parquet lake, then merge it into the database."""
    from dpledger.ingest.sweep import check_executor, load_config
    from dpledger.workflows import sweep as do_sweep

    check_executor(executor, workers, address)
    # a bad config is one line, before any progress; the library holds the default limit
    configs = load_config(config) if max_runs is None else load_config(config, max_runs=max_runs)
    with progress(f"sweep ({workers} workers)" if executor == "local" else "sweep (ray)", "runs",
                  disable=json) as update:
        out = do_sweep(configs, db, lake=lake, executor=executor, workers=workers, address=address,
                       on_done=lambda r, i, n: update(completed=i, total=n, description=f"done {r['run_id']}"))
    results, merged = out["runs"], out["merged"]
    failed = [r for r in results if r.get("status") == "failed"]
    if json:
        print_json({"runs": results, "merged": merged})
    else:
        for r in results:
            what = (r.get("skipped") or (r.get("error") and flagged(r["error"], r.get("error_params")))
                    or f"{r['steps']} steps, {r['rows']} point-step rows")
            print(f"{r['run_id']}: {r['status']} ({what})")
        print(f"merged {sum(m['rows'] for m in merged)} new point-step rows from {out['lake']} into {out['db']}")
    if failed:
        first = failed[0]
        raise UserError(f"{len(failed)} of {len(results)} runs failed; first: {first['run_id']}: "
                        f"{flagged(first['error'], first.get('error_params'))}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo database, report and charts.")] = Path("dpledger-demo"),
    epochs: Annotated[float, typer.Option(help="Training epochs.")] = 8.0,
    json: JsonOption = False,
) -> None:
    """Train DP-SGD on the bundled digits tracking every point, account per-example epsilon, rank, report."""
    from dpledger.demo import run_demo

    from .output import emit, records

    with progress("training MLP on digits with DP-SGD", "steps", disable=json, info=True) as update:
        summary = run_demo(out, epochs, on_progress=lambda p: update(
            completed=p["step"], total=p["total"], info=f"loss {p['loss']:.3f}"),
            on_phase=lambda text: update(description=text))
    if json:
        print_json({**summary, "lowest": records(summary["lowest"]), "highest": records(summary["highest"])})
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
    for note in summary["rank_notes"]:
        print(f"note: {note}")
    rep = summary["report"]
    print(f"report: {rep['html']} (opens offline), charts: {len(rep['pngs'])} PNGs in "
          f"{Path(rep['pngs'][0]).parent if rep['pngs'] else '-'}")
    print(f"explore: dpledger query \"select * from point_rank limit 5\" --db {summary['db']}")


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
    from dpledger.ingest.norm_scoring import score_norms

    with connected(db) as con, progress("scoring norms", "ranges", disable=json) as update:
        result = score_norms(con, run, checkpoints, points, chunk, executor, address,
                             on_range=lambda i, n: update(completed=i, total=n))
    if json:
        print_json(result)
        return
    print(f"{result['run_id']}: {result['rows']} norms of {result['points']} points at {len(result['steps'])} "
          f"checkpoints ({result['ranges']} range{'s' if result['ranges'] > 1 else ''}, {result['executor']}); "
          "compose with `dpledger account`")


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
    from dpledger.ingest.curvature_scoring import score_run

    with connected(db) as con, progress("curvature", "checkpoints", disable=json) as update:
        result = score_run(con, run, checkpoints, probes, h, seed, on_checkpoint=lambda s, i, n: update(
            completed=i, total=n, description=f"curvature at step {s}"))
    if json:
        print_json(result)
        return
    print(f"{result['run_id']}: scored {result['points']} points at {len(result['checkpoints'])} checkpoints "
          f"({result['n_probes']} probes, h={result['h']:g}); mean curvature {result['mean_curvature']:.4g}; "
          f"averages in view point_curvature")
