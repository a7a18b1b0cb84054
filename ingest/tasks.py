"""One run of a sweep as a task: train one config into a lake, as a summary dict.

The body of both executors' tasks (a local worker process of :mod:`ingest.sweep`, a
Ray task of :mod:`ingest.ray_executor`): it trains through
:class:`ingest.sinks.ShardSink`, skips a run the lake has finished, and resumes one
it holds unfinished, so a sweep can simply be run again after a crash. A run another
live writer holds (its lock, :class:`ingest.sinks.RunLock`) is skipped too, with status
``skipped`` and the reason "locked by pid N on host H": the same sweep started twice
runs each run once.
"""

from __future__ import annotations

import os
import warnings

from dpledger.analysis.validate import ParameterError
from dpledger.warehouse.errors import UserError

from .sinks import RunLocked, ShardSink
from .worker import TrainConfig, differing_options, train, validate


def train_in_lake(cfg_dict: dict, lake: str, worker: str, threads: int) -> dict:
    """Run the config ``cfg_dict`` (a :class:`TrainConfig` as a dict) into ``lake`` as
    writer ``worker`` with ``threads`` torch threads (unless the config sets them);
    a :class:`UserError`, a ``ParameterError`` or an ``OSError`` is a failed summary, not an exception (its
    ``error_params``: the parameters the error names, see :func:`failed_summary`)."""
    warnings.filterwarnings("ignore", message="Full backward hook")
    cfg = TrainConfig(**cfg_dict)
    if cfg.threads is None and threads < (os.cpu_count() or 1):
        cfg.threads = threads  # workers share the cores
    try:
        validate(cfg)  # options refused before anything is written (not even the run's folder)
        sink = ShardSink(lake, worker=worker)
        stored = (sink.stored_config(cfg.run) or {}).get("train") if sink.run_exists(cfg.run) else None
        changed = differing_options(stored, cfg) if stored else []
        if changed:  # the same name, another configuration: never reuse (nor extend) the stale run
            raise UserError(f"run {cfg.run} exists in the lake with other options ({'; '.join(changed)}); "
                            f"give the run another name or remove {sink.run_dir(cfg.run)}")
        if _finished(sink, cfg.run):  # nothing written, not even a lock
            return {"run_id": cfg.run, "status": "finished", "skipped": "finished already"}
    except (UserError, ParameterError) as exc:
        return failed_summary(cfg.run, exc)
    try:
        sink.acquire(cfg.run)
        if _finished(sink, cfg.run):  # by the writer that held the lock until now
            return {"run_id": cfg.run, "status": "finished", "skipped": "finished already"}
        if cfg.run_dir is None:  # checkpoints and resume state live with the run's shards
            cfg.run_dir = str(sink.run_dir(cfg.run))
        return train(cfg, sink, resume=sink.run_exists(cfg.run))
    except RunLocked as exc:
        return {"run_id": cfg.run, "status": "skipped", "skipped": exc.owner}
    except (UserError, ParameterError, OSError) as exc:  # OSError: e.g. a read-only lake (the error names the path)
        return failed_summary(cfg.run, exc)
    finally:
        sink.close()


def _finished(sink: ShardSink, run_id: str) -> bool:
    manifest = sink.manifest(run_id)
    return manifest is not None and manifest.get("status") == "finished"


def failed_summary(run_id: str | None, exc: BaseException, error: str | None = None) -> dict:
    """The summary of a run that failed with ``exc``: ``error`` (default ``str(exc)``) and
    ``error_params``, the parameters a :class:`UserError` names (a front end writes them
    its own way, as the CLI writes flags)."""
    return {"run_id": run_id, "status": "failed", "error": str(exc) if error is None else error,
            "error_params": list(getattr(exc, "params", ()))}


__all__ = ["failed_summary", "train_in_lake"]
