"""The Ray executor (``executor="ray"``): the runs of a sweep as Ray tasks.

Each run is one Ray task (``num_cpus=1``; ``num_gpus=1`` when the run asks for a
CUDA device and the driver sees one) whose body is :func:`ingest.tasks.train_in_lake`: it
trains into the lake through :class:`ingest.sinks.ShardSink`, exactly as a local
worker process does, so the shards, the manifest and the merge are the same. On a
cluster of several machines the lake must be shared storage that every node sees
at the same path, and dpledger must be installed on every node.

``address=None`` starts a private local cluster for the sweep and shuts it down
afterwards. It binds to the loopback address (127.0.0.1) with usage statistics
off and no dashboard, and Ray is told it is local-only, so it does not look up a
"reachable" node address by opening a socket towards a public one (Ray 2.60 turns
``_node_ip_address="127.0.0.1"`` into that address otherwise). One thing is out of
our hands: Ray's minimal API server still asks the link-local cloud metadata
service (169.254.169.254, metadata.google.internal) which cloud it runs on, with
a 1 s timeout, even with usage statistics off. ``address="HOST:PORT"`` (or
``"auto"``) connects to a running cluster, which is left running.

A task that raises returns a failed summary (as ``train_in_lake`` does for a
:class:`UserError`); a task whose worker dies is retried by Ray (up to 3 times;
``train_in_lake`` resumes the run from its last committed step) and then reported failed,
so one bad run never stops the others.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from dpledger.warehouse.errors import UserError

from .tasks import failed_summary, train_in_lake
from .worker import TrainConfig

INSTALL_HINT = "executor ray needs Ray: pip install 'dpledger[distributed]'"
AUTH_MODE = "RAY_AUTH_MODE"

# Set before a local cluster starts; the raylet and the workers inherit them.
LOCAL_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray resolves 127.0.0.1 to a "reachable" address by opening a UDP socket
    # towards a public one, unless clustering is off (then it keeps the loopback).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def import_ray():
    """The ``ray`` module, or a UserError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(INSTALL_HINT, "executor") from None
    return ray


def _ray_task(cfg_dict: dict, lake: str, worker: str, threads: int, cwd: str | None) -> dict:
    """One run in a Ray worker: :func:`ingest.tasks.train_in_lake`, with any error as a failed summary."""
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)  # relative paths in the config (--track FILE, --data-path) mean what they did for the driver
    try:
        result = train_in_lake(cfg_dict, lake, worker, threads)
    except UserError as exc:  # e.g. the lake cannot be written from this node
        result = failed_summary(cfg_dict.get("run"), exc)
    except Exception as exc:  # noqa: BLE001 - one run's crash must not end the sweep
        result = failed_summary(cfg_dict.get("run"), exc, f"{type(exc).__name__}: {exc}")
    try:
        import ray

        ctx = ray.get_runtime_context()
        result["node_id"] = ctx.get_node_id()
        result["node_ip"] = ray._private.worker.global_worker.node_ip_address
    except Exception:  # noqa: BLE001 - where it ran is a detail, never a failure
        pass
    return result


def local_init_kwargs(num_cpus: int | None = None) -> dict:
    """Arguments of ``ray.init`` for a private local cluster (loopback only, no dashboard)."""
    return {"num_cpus": num_cpus, "_node_ip_address": "127.0.0.1", "include_dashboard": False,
            "log_to_driver": False, "_temp_dir": tempfile.mkdtemp(prefix="dpledger-ray-"),
            "configure_logging": False}


def start_local(num_cpus: int | None = None) -> dict:
    """Start a private local Ray cluster: 127.0.0.1, usage statistics off, no dashboard.

    Returns what :func:`stop_local` needs to put the process environment back.
    """
    ray = import_ray()
    from ray._private import ray_constants

    kwargs = local_init_kwargs(num_cpus)
    saved = {"env": {key: os.environ.get(key) for key in LOCAL_ENV},
             "enable_cluster": ray_constants.ENABLE_RAY_CLUSTER, "temp_dir": kwargs["_temp_dir"]}
    os.environ.update(LOCAL_ENV)  # the raylet and its workers inherit these
    # Authentication is left to Ray's default for a new local cluster: token mode,
    # the token in ~/.ray/auth_token (made if missing), RAY_AUTH_MODE=token set in
    # this process, and a warning saying so on stderr; RAY_AUTH_MODE=disabled opts out.
    # read when ray is imported, which may have been before the variable was set
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(**kwargs)
    except BaseException:
        _restore(saved)
        raise
    return saved


def stop_local(saved: dict) -> None:
    """Shut down the cluster of :func:`start_local` and restore the environment it changed."""
    import ray

    try:
        ray.shutdown()
    finally:
        _restore(saved)


def _restore(saved: dict) -> None:
    from ray._private import ray_constants

    shutil.rmtree(saved["temp_dir"], ignore_errors=True)  # the session's sockets and logs
    for key, value in saved["env"].items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    ray_constants.ENABLE_RAY_CLUSTER = saved["enable_cluster"]


def run_sweep_ray(configs: list[TrainConfig], lake: str | Path, address: str | None = None,
                  num_cpus: int | None = None,
                  on_done: Callable[[dict, int, int], None] | None = None) -> list[dict]:
    """Run every config as a Ray task into ``lake``; returns their summaries in config order.

    ``address=None`` starts a local cluster (``num_cpus`` CPUs, default all) and
    shuts it down afterwards, unless Ray is already initialised in this process,
    which is then used as it is. An address connects to that cluster.
    """
    ray = import_ray()
    if address is not None and num_cpus is not None:
        raise UserError("num_cpus applies to a local Ray cluster only, not with an address", "address")
    lake = Path(lake).resolve()  # workers may run elsewhere: absolute paths only
    for cfg in configs:
        if cfg.run_dir is None:
            cfg.run_dir = str(lake / f"run_id={cfg.run}")
    with _cluster(ray, address, num_cpus):
        try:
            lake.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the lake folder {lake}: {exc.strerror or exc}") from None
        return _submit(ray, configs, lake, on_done)


@contextmanager
def _cluster(ray, address: str | None, num_cpus: int | None) -> Iterator[None]:
    """Ray ready for tasks inside the block: the cluster this process already has, else a
    local one started here (``address`` None) or the one at ``address`` connected here;
    what was started is shut down, and what was connected disconnected, on exit."""
    if ray.is_initialized():
        yield
        return
    if address is None:
        local = start_local(num_cpus)
        try:
            yield
        finally:
            stop_local(local)
        return
    connected = _connect(ray, address)
    try:
        yield
    finally:
        try:
            ray.shutdown()  # disconnects this driver; the cluster keeps running
        finally:
            _set_enable_cluster(connected["enable_cluster"])


def _set_enable_cluster(value: bool) -> bool:
    """Set Ray's ENABLE_RAY_CLUSTER (False: local only, loopback addresses kept); returns the old value."""
    from ray._private import ray_constants

    previous = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = value
    return previous


def parse_address(address: str) -> tuple[str, int] | None:
    """(host, port) of a HOST:PORT address; None for ``auto`` and ``ray://...``; a UserError otherwise."""
    if address == "auto" or "://" in address:
        return None
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"address {address}: expected HOST:PORT (the head node's GCS port, 6379 by default), "
                        "auto, or ray://HOST:PORT", "address")
    return host, int(port)


def _connect(ray, address: str) -> dict:
    """Connect to the cluster at ``address`` (HOST:PORT of its GCS, ``auto``, or ``ray://``)."""
    host_port = parse_address(address)
    host = None
    if host_port is not None:
        host, port = host_port
        try:  # Ray itself retries an unreachable address for minutes
            socket.create_connection((host, port), timeout=5).close()
        except OSError as exc:
            raise UserError(f"address {address}: no Ray cluster answers there "
                            f"({exc.strerror or type(exc).__name__})", "address") from None
    # Ray replaces a loopback host by this machine's "reachable" address, found by
    # opening a socket towards a public one; a cluster on 127.0.0.1 is local-only.
    loopback = host in ("127.0.0.1", "localhost", "::1")
    from ray._private import ray_constants

    previous = _set_enable_cluster(False) if loopback else ray_constants.ENABLE_RAY_CLUSTER
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        _set_enable_cluster(previous)
        text = str(exc).strip()
        hint = ""
        if os.environ.get(AUTH_MODE) is None:
            hint = (f"; if the cluster uses token authentication (Ray's default), set {AUTH_MODE}=token and "
                    "RAY_AUTH_TOKEN (or ~/.ray/auth_token) to its token")
        raise UserError(f"address {address}: cannot connect to a Ray cluster "
                        f"({text.splitlines()[0] if text else type(exc).__name__}){hint}", "address") from None
    except BaseException:
        _set_enable_cluster(previous)
        raise
    return {"enable_cluster": previous}


def _submit(ray, configs, lake: Path, on_done) -> list[dict]:
    try:
        import torch

        cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        cuda = False
    remote = ray.remote(_ray_task)
    cwd = os.getcwd()
    pending = {}
    for i, cfg in enumerate(configs):
        gpus = 1 if cuda and str(cfg.device).startswith("cuda") else 0
        ref = remote.options(num_cpus=1, num_gpus=gpus, name=f"dpledger:{cfg.run}").remote(
            asdict(cfg), str(lake), f"ray{i}", 1, cwd)
        pending[ref] = cfg
    results = []
    waiting = list(pending)
    while waiting:
        done, waiting = ray.wait(waiting, num_returns=1)
        for ref in done:
            cfg = pending[ref]
            try:
                result = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - the worker died (retries spent), or the task was cancelled
                cause = getattr(exc, "cause", None) or exc
                text = str(cause).strip().splitlines()
                result = failed_summary(cfg.run, cause, f"{type(cause).__name__}: {text[-1] if text else ''}")
            results.append(result)
            if on_done:
                on_done(result, len(results), len(configs))
    order = {cfg.run: i for i, cfg in enumerate(configs)}
    return sorted(results, key=lambda r: order.get(r["run_id"], 0))


def _call(fn, args, cwd: str | None):
    if cwd:
        os.chdir(cwd)
    return fn(*args)


def map_tasks(fn: Callable, args_list: list[tuple], address: str | None = None) -> list:
    """``[fn(*args) for args in args_list]`` as one Ray task each (the same local-cluster
    rules as sweeps); results in order. A task's UserError is raised again here."""
    ray = import_ray()
    with _cluster(ray, address, None):
        remote = ray.remote(_call)
        refs = [remote.options(num_cpus=1).remote(fn, args, os.getcwd()) for args in args_list]
        try:
            return ray.get(refs)
        except Exception as exc:  # noqa: BLE001
            cause = getattr(exc, "cause", None) or exc
            if isinstance(cause, UserError):
                raise cause from None
            raise


__all__ = ["INSTALL_HINT", "import_ray", "local_init_kwargs", "map_tasks", "parse_address", "run_sweep_ray", "start_local",
           "stop_local"]
