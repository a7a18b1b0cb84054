"""``dpledger sweep --executor ray``: runs as Ray tasks on a local cluster (loopback only)."""

from __future__ import annotations

import json
import os
import sys

import duckdb
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'dpledger[distributed]'")

BASE = ('[base]\ndataset = "digits"\nmodel = "logreg"\nepochs = 1\nn_train = 120\nbatch_size = 20\ntrack = "6"\n'
        'noise_multiplier = 1.0\n')


def _q(db, sql):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module, started as the executor starts its own."""
    from dpledger.ingest.ray_executor import start_local, stop_local

    if ray.is_initialized():
        ray.shutdown()
    saved = start_local(num_cpus=2)
    yield ray
    stop_local(saved)


def test_ray_sweep_matches_local(tmp_path, cli):
    """The CLI starts (and stops) its own local cluster; the rows equal a local sweep's exactly."""
    if ray.is_initialized():
        ray.shutdown()
    before = {k: os.environ.get(k) for k in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_USAGE_STATS_ENABLED")}
    config = tmp_path / "sweep.toml"
    config.write_text(BASE + "[grid]\nseed = [0, 1]\n")
    r = cli("sweep", config, "--executor", "ray", "--db", tmp_path / "ray.duckdb", "--lake", tmp_path / "lake-ray",
            "--json")
    assert r.rc == 0, r
    runs = r.json()["runs"]
    assert [(x["run_id"], x["status"]) for x in runs] == [("s0", "finished"), ("s1", "finished")]
    assert {x["node_ip"] for x in runs} == {"127.0.0.1"}  # the local cluster is on the loopback address
    assert not ray.is_initialized()  # started for the sweep, shut down after it
    assert {k: os.environ.get(k) for k in before} == before  # and the environment put back
    r = cli("sweep", config, "--executor", "local", "--db", tmp_path / "local.duckdb", "--lake",
            tmp_path / "lake-local", "--json")
    assert r.rc == 0, r
    for db in ("ray", "local"):
        assert _q(tmp_path / f"{db}.duckdb", "SELECT run_id, status, committed_step FROM runs ORDER BY 1") == [
            ("s0", "finished", 5), ("s1", "finished", 5)]
    for table, cols in (("point_steps", "run_id, step, point_id, grad_norm, loss, sampled"),
                        ("steps", "run_id, step, batch_size, loss")):
        a = _q(tmp_path / "ray.duckdb", f"SELECT {cols} FROM {table} ORDER BY ALL")
        b = _q(tmp_path / "local.duckdb", f"SELECT {cols} FROM {table} ORDER BY ALL")
        assert len(a) == (72 if table == "point_steps" else 12)
        assert a == b, table  # deterministic workers: bit-identical rows on either executor


def test_unreachable_address_fails_fast(tmp_path, cli):
    """Refused at once (Ray itself would retry for minutes). Runs before the module's cluster starts."""
    assert not ray.is_initialized()
    config = tmp_path / "sweep.toml"
    config.write_text(BASE)
    r = cli("sweep", config, "--executor", "ray", "--address", "127.0.0.1:1", "--db", tmp_path / "w.duckdb")
    assert r.rc == 2, r
    assert r.err.strip() == "error: --address 127.0.0.1:1: no Ray cluster answers there (Connection refused)"
    assert not (tmp_path / "lake").exists()


def test_failing_run_is_reported_and_others_finish(tmp_path, cli, cluster):
    config = tmp_path / "sweep.toml"
    config.write_text(BASE + '[[runs]]\nrun = "ok"\nseed = 0\n'
                      '[[runs]]\nrun = "bad"\nseed = 1\ntrack = "no-such-ids.txt"\n')
    db = tmp_path / "w.duckdb"
    r = cli("sweep", config, "--executor", "ray", "--db", db)
    assert r.rc == 2, r
    assert "ok: finished (6 steps, 36 point-step rows)" in r.out
    assert "bad: failed (--track no-such-ids.txt" in r.out
    line = r.err.strip().splitlines()[-1]
    assert line.startswith("error: 1 of 2 runs failed; first: bad: --track no-such-ids.txt"), r.err
    assert _q(db, "SELECT run_id, status FROM runs") == [("ok", "finished")]
    assert _q(db, "SELECT count(*) FROM point_steps WHERE run_id = 'ok'") == [(36,)]
    assert cluster.is_initialized()  # a cluster the sweep did not start is left running


def test_task_that_raises_gives_a_failed_summary(tmp_path, cluster):
    """A run whose options are refused is one failed run with its one-line message and the
    parameters it names, not a crashed sweep; the others finish."""
    from dpledger.ingest.ray_executor import run_sweep_ray
    from dpledger.ingest.worker import TrainConfig

    good = TrainConfig(run="good", model="logreg", epochs=1, n_train=120, batch_size=20, track="6",
                       noise_multiplier=1.0)
    broken = TrainConfig(run="broken", model="logreg", epochs="one", n_train=120, batch_size=20,  # type: ignore
                         track="6", noise_multiplier=1.0)
    seen = []
    results = run_sweep_ray([broken, good], tmp_path / "lake", on_done=lambda r, i, n: seen.append((i, n)))
    assert seen == [(1, 2), (2, 2)]
    assert [r["run_id"] for r in results] == ["broken", "good"]
    assert results[0]["status"] == "failed" and results[0]["error"] == "epochs 'one' must be a number"
    assert results[0]["error_params"] == ["epochs"]
    assert not (tmp_path / "lake" / "run_id=broken").exists()  # refused before anything was written
    assert results[1]["status"] == "finished" and results[1]["rows"] == 36
    manifest = json.loads((tmp_path / "lake" / "run_id=good" / "manifest.json").read_text())
    assert manifest["status"] == "finished"


def test_any_exception_in_a_task_is_a_failed_summary(tmp_path):
    """Not only a user error: whatever a task raises is one failed run (the task's body, here
    without Ray: options no TrainConfig has make it raise TypeError)."""
    from dpledger.ingest.ray_executor import _ray_task

    result = _ray_task({"run": "broken", "no_such_option": 1}, str(tmp_path / "lake"), "w0", 1, None)
    assert result["status"] == "failed" and result["error"].startswith("TypeError: "), result
    assert result["run_id"] == "broken"


def test_local_cluster_is_loopback_without_usage_stats(cluster):
    @cluster.remote(num_cpus=1)
    def where():
        import os

        import ray as r

        return r.util.get_node_ip_address(), os.environ.get("RAY_USAGE_STATS_ENABLED")

    assert cluster.get(where.remote()) == ("127.0.0.1", "0")
    assert cluster.util.get_node_ip_address() == "127.0.0.1"
    assert {n["NodeManagerAddress"] for n in cluster.nodes()} == {"127.0.0.1"}
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"


@pytest.mark.parametrize("args,fragment", [
    (["--executor", "spark"], "--executor spark: expected one of local, ray"),
    (["--address", "10.0.0.1:6379"], "--address is the location of a Ray cluster: use it with --executor ray"),
    (["--executor", "ray", "--workers", "2"], "--workers 2 is for --executor local"),
    (["--executor", "ray", "--address", "nohost"], "--address nohost: expected HOST:PORT"),
])
def test_bad_executor_options(tmp_path, cli, args, fragment):
    config = tmp_path / "sweep.toml"
    config.write_text(BASE)
    db = tmp_path / "w.duckdb"
    r = cli("sweep", config, *args, "--db", db)
    assert r.rc == 2 and fragment in r.err and "\n" not in r.err.strip(), r
    assert not db.exists()  # refused before anything is written


def test_missing_ray_is_one_line(tmp_path, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    config = tmp_path / "sweep.toml"
    config.write_text(BASE)
    r = cli("sweep", config, "--executor", "ray", "--db", tmp_path / "w.duckdb")
    assert r.rc == 2, r
    assert r.err.strip() == "error: --executor ray needs Ray: pip install 'dpledger[distributed]'"
