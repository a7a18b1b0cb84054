"""dpledger.track on real Opacus loops: the example script (per-sample and ghost clipping),
the norms against Opacus's own per-sample gradients and a naive per-example backward, the
run's parameters against Opacus's, per-example ε against Opacus's accountant, the tracked
set against the project's norm tracker, BatchMemoryManager's virtual steps, empty batches,
a loop that raises, SIGKILL and resume from the user's checkpoint, and bit-identical updates
with and without the ledger."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpledger
from dpledger.analysis.rdp import DEFAULT_ORDERS
from dpledger.ingest.shards import ingest_shards
from dpledger.models.grad_norms import GradNormTracker
from dpledger.warehouse.errors import UserError

warnings.filterwarnings("ignore", message="Full backward hook is firing")
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Optimal order is the")

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "opacus_digits.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _example_module():
    spec = importlib.util.spec_from_file_location("opacus_digits_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


EX = _example_module()


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run_example(tmp_path: Path, *args: str, check=True, **popen) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(EXAMPLE), "--device", "cpu", *args]
    out = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def _merge(lake: Path, db: Path):
    con = dpledger.connect(db)
    ingest_shards(con, lake)
    return con


def _rows(con, run: str, table: str = "point_steps"):
    order = "step, point_id" if table == "point_steps" else "step"
    return con.execute(f"SELECT * FROM {table} WHERE run_id = ? ORDER BY {order}", [run]).fetch_df()


def _strip(state: dict) -> dict:
    return {k.removeprefix("_module."): v for k, v in state.items()}


def _opacus_norms(params: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-example gradient norms from Opacus's own per-sample gradients (GradSampleModule's
    ``p.grad_sample``) at ``params``, and the per-example losses."""
    from opacus import GradSampleModule

    net = EX.SampleConvNet()
    net.load_state_dict(params)
    gsm = GradSampleModule(net, loss_reduction="sum")
    losses = F.cross_entropy(gsm(x), y, reduction="none")
    losses.sum().backward()
    per = torch.stack([p.grad_sample.reshape(len(x), -1).norm(2, dim=1) for p in gsm.parameters()], dim=1)
    return per.norm(2, dim=1).double().numpy(), losses.detach().double().numpy()


def _naive_norms(params: dict, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """One backward per example (float64), the reference with no Opacus in it."""
    net = EX.SampleConvNet().double()
    net.load_state_dict({k: v.double() for k, v in params.items()})
    out = []
    for i in range(len(x)):
        net.zero_grad()
        F.cross_entropy(net(x[i:i + 1].double()), y[i:i + 1]).backward()
        out.append(torch.sqrt(sum(p.grad.square().sum() for p in net.parameters())).item())
    return np.asarray(out)


# ---------------------------------------------------------------------------------------------
# The example script, as a user runs it
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_example_script_records_what_opacus_clipped(tmp_path, mode):
    from opacus.accountants import RDPAccountant

    from dpledger.warehouse.accounting import account

    run = f"ex-{mode}"
    _run_example(tmp_path, "--epochs", "2", "-c", "0.5", "--sigma", "1.1", "--grad-sample-mode", mode,
                 "--accountant", "rdp", "--checkpoint-dir", "ck", "--ledger-lake", "lake", "--run", run)
    con = _merge(tmp_path / "lake", tmp_path / "w.duckdb")
    r = con.execute("SELECT sample_rate, noise_multiplier, max_grad_norm, steps, batch_size, delta, private, status, "
                    "source, dataset, n_train, config FROM runs WHERE run_id = ?", [run]).fetchone()
    train_set, _ = EX.digits_datasets()
    x_all, y_all = train_set.tensors
    batches = -(-len(train_set) // 64)
    ck1 = torch.load(tmp_path / "ck" / "epoch-0001.pt", weights_only=False)
    ck2 = torch.load(tmp_path / "ck" / "epoch-0002.pt", weights_only=False)
    history = ck2["privacy_accountant_state_dict"]["history"]
    opacus_steps = sum(h[2] for h in history)
    # q, sigma, C and steps are Opacus's
    assert r[0] == pytest.approx(1 / batches, rel=1e-12) and r[0] == history[0][1]
    assert (r[1], r[2]) == (1.1, 0.5) and history[0][0] == 1.1
    assert r[3] == opacus_steps == 2 * batches
    assert r[4] == int(len(train_set) / batches) and r[5] == 1e-5 and r[6] is True
    assert (r[7], r[8], r[9], r[10]) == ("finished", "track", "sklearn-digits", len(train_set))
    cfg = json.loads(r[11])
    assert cfg["opacus"]["grad_sample_mode"] == mode and cfg["coverage"] == "batch"
    assert cfg["opacus"]["accountant_history"] == [list(h) for h in history]

    rows = _rows(con, run)
    steps = _rows(con, run, "steps")
    assert list(steps["step"]) == list(range(opacus_steps))
    assert rows.groupby("step").size().reindex(range(opacus_steps), fill_value=0).tolist() == steps["batch_size"].tolist()
    assert rows["sampled"].all() and not rows.duplicated(["step", "point_id"]).any()

    # the norms of step `batches` (the first of epoch 2), at the parameters of the epoch-1 checkpoint,
    # from Opacus's own per-sample gradients and from a naive per-example backward
    t = batches
    at = rows[rows.step == t].sort_values("point_id")
    pids = torch.as_tensor(at.point_id.to_numpy().copy())
    params = _strip(ck1["module_state_dict"])
    opacus_norms, losses = _opacus_norms(params, x_all[pids], y_all[pids])
    np.testing.assert_allclose(at.grad_norm.to_numpy(), opacus_norms, rtol=1e-6)
    np.testing.assert_allclose(at.grad_norm.to_numpy(), _naive_norms(params, x_all[pids], y_all[pids]), rtol=1e-5)
    np.testing.assert_allclose(at.loss.to_numpy(), losses, rtol=1e-5)

    # per-example epsilon of a point clipped at every record, first recorded at step 0: Opacus's epsilon
    first = rows.groupby("point_id").step.min()
    low = rows.groupby("point_id").grad_norm.min()
    always = [p for p in first.index if first[p] == 0 and low[p] >= 0.5]
    assert always, "no point sampled at step 0 and clipped at every record"
    account(con, [run], exact=True)
    eps = con.execute("SELECT epsilon FROM point_epsilon WHERE run_id = ? AND point_id = ? AND rule = 'rdp'",
                      [run, int(always[0])]).fetchone()[0]
    acc = RDPAccountant()
    acc.history = [(1.1, 1 / batches, opacus_steps)]
    assert eps == pytest.approx(acc.get_epsilon(delta=1e-5, alphas=list(DEFAULT_ORDERS)), rel=1e-6)


def test_example_sigkill_and_resume_from_checkpoint(tmp_path):
    run, epochs = "killed", 10
    args = ["--epochs", str(epochs), "--checkpoint-dir", "ck", "--ledger-lake", "lake", "--run", run,
            "--ledger-commit-every", "4", "--accountant", "rdp"]
    proc = subprocess.Popen([sys.executable, str(EXAMPLE), "--device", "cpu", *args], cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = tmp_path / "lake" / f"run_id={run}" / "manifest.json"
    batches = -(-int(0.8 * 1797) // 64)
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        try:
            step = json.loads(manifest.read_text()).get("committed_step")
        except (OSError, ValueError):
            step = None
        if step is not None and step >= 2 * batches + 9 and len(list((tmp_path / "ck").glob("*.pt"))) >= 2:
            proc.send_signal(signal.SIGKILL)
            killed_at = step
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert killed_at is not None, "the run ended before it could be killed"
    assert json.loads(manifest.read_text())["status"] == "running"
    out = _run_example(tmp_path, *args, "--resume")
    assert "Resumed from" in out.stdout
    con = _merge(tmp_path / "lake", tmp_path / "w.duckdb")
    total = epochs * batches
    steps = _rows(con, run, "steps")
    rows = _rows(con, run)
    assert list(steps["step"]) == list(range(total))              # every step once: none missing, none twice
    assert not rows.duplicated(["step", "point_id"]).any()
    per_step = rows.groupby("step").size().reindex(range(total), fill_value=0)
    assert per_step.tolist() == steps["batch_size"].tolist()      # every sampled example of every step
    status, n_steps = con.execute("SELECT status, steps FROM runs WHERE run_id = ?", [run]).fetchone()
    assert (status, n_steps) == ("finished", total)


# ---------------------------------------------------------------------------------------------
# In process: every step against Opacus, bit-identical updates, tracked set, virtual steps
# ---------------------------------------------------------------------------------------------

def _train(tmp_path: Path | None, mode: str = "hooks", *, epochs: int = 1, physical: int | None = None,
           ledger: dict | None = None, every_params: bool = True, raise_at: int | None = None, workers: int = 0):
    """The example's loop in process. Returns per real step: the batch's inputs, Opacus's norms
    (hooks: from p.grad_sample; ghost: the model's per_sample_gradient_norms), the parameters
    before the step and after it; and the ledger (closed)."""
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    torch.manual_seed(0)
    train_set, _ = EX.digits_datasets()
    loader = torch.utils.data.DataLoader(train_set, batch_size=64, num_workers=workers,
                                         multiprocessing_context="fork" if workers else None)
    model = EX.SampleConvNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    criterion = nn.CrossEntropyLoss()
    engine = PrivacyEngine(accountant="rdp")
    out = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
                              noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode)
    if mode == "ghost":
        model, optimizer, criterion, loader = out
    else:
        model, optimizer, loader = out
    led = None
    if ledger is not None:
        led = dpledger.track(engine, model, optimizer, loader, criterion=criterion, lake=tmp_path / "lake",
                             **ledger)
    record = {"x": [], "norms": [], "before": [], "after": [], "steps": 0}
    phys_x, phys_n = [], []

    def loop(batches):
        for x, y in batches:
            if raise_at is not None and record["steps"] == raise_at:
                raise RuntimeError("the loop failed")
            if not phys_x and every_params:
                record["before"].append({k: v.detach().clone() for k, v in _strip(model.state_dict()).items()})
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            if mode == "hooks":
                gs = [p.grad_sample for p in model.parameters()]
                n = (torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in gs], dim=1).norm(2, dim=1)
                     if len(x) else torch.zeros(0))
            else:
                n = model.per_sample_gradient_norms.detach().clone()
            phys_x.append(x)
            phys_n.append(n)
            steps_before = sum(h[2] for h in engine.accountant.history)
            optimizer.step()
            if sum(h[2] for h in engine.accountant.history) > steps_before:   # a real (logical) step
                record["steps"] += 1
                record["x"].append(torch.cat(phys_x))
                record["norms"].append(torch.cat(phys_n).double().numpy())
                phys_x.clear()
                phys_n.clear()
                if every_params:
                    record["after"].append([p.detach().clone() for p in model.parameters()])

    def epochs_loop():
        for _ in range(epochs):
            if physical:
                with BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical,
                                        optimizer=optimizer) as small:
                    loop(small)
            else:
                loop(loader)

    if led is not None:
        with led:
            epochs_loop()
    else:
        epochs_loop()
    return record, led, engine


@pytest.mark.parametrize("mode,physical,workers", [("hooks", None, 0), ("ghost", None, 0), ("hooks", 16, 0),
                                                   ("ghost", 16, 0), ("hooks", 16, 2)])
def test_every_step_matches_opacus_and_updates_are_bit_identical(tmp_path, mode, physical, workers):
    """Per-sample and ghost clipping, with and without BatchMemoryManager's virtual steps, and a
    loader whose worker processes draw batches ahead."""
    ledger = {"run": "r", "every": 5, "points": 40, "commit_every": 7}
    with_ledger, led, engine = _train(tmp_path, mode, physical=physical, ledger=ledger, workers=workers)
    without, _, engine0 = _train(None, mode, physical=physical, workers=workers)
    # zero side effects: every update bit-identical, the same accounting
    assert len(with_ledger["after"]) == len(without["after"]) > 10
    for a, b in zip(with_ledger["after"], without["after"]):
        assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert engine.accountant.history == engine0.accountant.history
    con = _merge(tmp_path / "lake", tmp_path / "w.duckdb")
    rows = _rows(con, "r")
    steps = _rows(con, "r", "steps")
    n_steps = len(with_ledger["after"])
    assert led.step == n_steps and list(steps["step"]) == list(range(n_steps))  # one step per logical batch
    assert not rows.duplicated(["step", "point_id"]).any()
    train_x = EX.digits_datasets()[0].tensors[0]
    tracked = np.arange(40)
    for t in range(n_steps):
        got = rows[(rows.step == t) & rows.sampled]          # in write order: the batch's order
        pids = got.point_id.to_numpy()
        assert len(pids) == steps.batch_size[t] == len(with_ledger["x"][t])
        assert torch.equal(train_x[torch.as_tensor(pids.copy())], with_ledger["x"][t])   # the batch's own examples
        np.testing.assert_allclose(got.grad_norm.to_numpy(), with_ledger["norms"][t], rtol=1e-6)
        assert got.loss.notna().all()
        if t % 5 == 0:   # the tracked set, at this step's parameters: the project's tracker
            net = EX.SampleConvNet()
            net.load_state_dict(with_ledger["before"][t])
            res = GradNormTracker(net)(train_x[:40], EX.digits_datasets()[0].tensors[1][:40])
            at = rows[(rows.step == t) & rows.point_id.isin(tracked)].sort_values("point_id")
            assert list(at.point_id) == list(tracked)
            np.testing.assert_allclose(at.grad_norm.to_numpy(), res.norms.numpy(), rtol=1e-5)
            unsampled = ~at.sampled.to_numpy()
            np.testing.assert_allclose(at.grad_norm.to_numpy()[unsampled], res.norms.numpy()[unsampled], rtol=1e-9)
            np.testing.assert_allclose(at.loss.to_numpy(), res.losses.double().numpy(), rtol=1e-5)
        else:
            assert rows[rows.step == t].sampled.all()
    # a naive per-example backward agrees at a few steps too
    y_all = EX.digits_datasets()[0].tensors[1]
    for t in (0, n_steps // 2, n_steps - 1):
        got = rows[(rows.step == t) & rows.sampled]
        pids = torch.as_tensor(got.point_id.to_numpy().copy())
        np.testing.assert_allclose(got.grad_norm.to_numpy(),
                                   _naive_norms(with_ledger["before"][t], train_x[pids], y_all[pids]), rtol=1e-5)
    cfg = json.loads(con.execute("SELECT config FROM runs WHERE run_id = 'r'").fetchone()[0])
    assert cfg["coverage"] == "batch+tracked" and cfg["track"]["mismatched_steps"] == 0


def test_empty_batches_train_eval_switches_and_ids(tmp_path):
    from opacus import PrivacyEngine

    torch.manual_seed(3)
    x, y = torch.randn(40, 1, 8, 8), torch.randint(0, 10, (40,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=1)  # q = 1/40: empties
    model = EX.SampleConvNet()
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                                   data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
    criterion = nn.CrossEntropyLoss()
    ids = np.arange(1000, 1040)
    sizes = []
    with dpledger.track(engine, model, optimizer, loader, run="sparse", criterion=criterion, ids=ids,
                        lake=tmp_path / "lake", dataset="noise") as ledger:
        for epoch in range(2):
            model.train()
            for xb, yb in loader:
                optimizer.zero_grad()
                criterion(model(xb), yb).backward()
                optimizer.step()
                sizes.append(len(xb))
            model.eval()
            with torch.no_grad():
                criterion(model(x), y)              # evaluation: not recorded
    assert 0 in sizes and ledger.step == len(sizes) == 80
    con = _merge(tmp_path / "lake", tmp_path / "w.duckdb")
    steps = _rows(con, "sparse", "steps")
    rows = _rows(con, "sparse")
    assert steps.batch_size.tolist() == sizes
    assert steps.loss[steps.batch_size == 0].isna().all()
    assert len(rows) == sum(sizes) and rows.point_id.between(1000, 1039).all()
    assert con.execute("SELECT count(*) FROM points WHERE dataset = 'noise'").fetchone()[0] == 40


def test_a_loop_that_raises_marks_the_run_failed_and_keeps_committed_rows(tmp_path):
    with pytest.raises(RuntimeError, match="the loop failed"):
        _train(tmp_path, ledger={"run": "boom", "commit_every": 3}, raise_at=8, every_params=False)
    manifest = json.loads((tmp_path / "lake" / "run_id=boom" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["committed_step"] == 7
    con = _merge(tmp_path / "lake", tmp_path / "w.duckdb")
    assert _rows(con, "boom", "steps").step.tolist() == list(range(8))
    # resuming without restoring a checkpoint continues Opacus's count: nothing is written twice
    assert con.execute("SELECT status FROM runs WHERE run_id = 'boom'").fetchone()[0] == "failed"


def test_resume_drops_rows_of_committed_steps(tmp_path):
    with pytest.raises(RuntimeError):
        _train(tmp_path, ledger={"run": "again", "commit_every": 2}, raise_at=6, every_params=False)
    with pytest.raises(UserError, match="exists already"):
        _train(tmp_path, ledger={"run": "again"})
    # a restart from scratch (a checkpoint of step 0) with resume=True: steps 0..5 are not written again
    _train(tmp_path, ledger={"run": "again", "resume": True}, every_params=False)
    con = _merge(tmp_path / "lake", tmp_path / "w.duckdb")
    steps = _rows(con, "again", "steps")
    assert steps.step.tolist() == list(range(len(steps))) and len(steps) > 6
    assert not _rows(con, "again").duplicated(["step", "point_id"]).any()


def test_db_sink_and_refusals(tmp_path):
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    train_set, _ = EX.digits_datasets()

    def private(**kw):
        model = EX.SampleConvNet()
        engine = PrivacyEngine(accountant="rdp")
        loader = torch.utils.data.DataLoader(train_set, batch_size=64)
        out = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                  data_loader=loader, noise_multiplier=1.0, **kw)
        return engine, out

    engine, (model, optimizer, loader) = private(max_grad_norm=1.0)
    with pytest.raises(UserError, match="optimizer SGD: not an Opacus DPOptimizer"):
        dpledger.track(engine, model, optimizer.original_optimizer, loader, run="x", lake=tmp_path / "lake")
    with pytest.raises(UserError, match="criterion MSELoss"):
        dpledger.track(engine, model, optimizer, loader, run="x", lake=tmp_path / "lake", points=5,
                       criterion=nn.MSELoss())
    with pytest.raises(UserError, match="give db or lake"):
        dpledger.track(engine, model, optimizer, loader, run="x", lake=tmp_path / "lake", db=tmp_path / "d.duckdb")
    with pytest.raises(UserError, match="run name"):
        dpledger.track(engine, model, optimizer, loader, run="a/b", lake=tmp_path / "lake")
    e2, (m2, o2, l2) = private(max_grad_norm=[1.0] * 8, clipping="per_layer")
    with pytest.raises(UserError, match="DPPerLayerOptimizer"):
        dpledger.track(e2, m2, o2, l2, run="x", lake=tmp_path / "lake")
    # a refusal leaves nothing attached: the loader's sampler is Opacus's own class again
    assert type(loader.batch_sampler).__name__ == "UniformWithReplacementSampler"
    assert "pre_step" not in vars(optimizer)
    # db=: straight into DuckDB
    db = tmp_path / "direct.duckdb"
    criterion = nn.CrossEntropyLoss()
    with dpledger.track(engine, model, optimizer, loader, run="direct", db=db, criterion=criterion) as ledger:
        for i, (x, y) in enumerate(loader):
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
            if i == 4:
                break
    assert type(loader.batch_sampler).__module__.startswith("opacus") and "pre_step" not in vars(optimizer)
    con = dpledger.connect(db)
    assert con.execute("SELECT count(DISTINCT step), min(status) FROM point_steps JOIN runs USING (run_id) "
                       "WHERE run_id = 'direct'").fetchone() == (5, "finished")
    assert ledger.step == 5


def test_opacus_objects_by_hand_tracked_ids_and_a_layer_the_tracker_refuses(tmp_path):
    """GradSampleModule + DPOptimizer + DPDataLoader made by hand (no PrivacyEngine), make_private_with_epsilon,
    a tracked set given as the user's own point ids, and BatchNorm refused for the tracked set."""
    from opacus import GradSampleModule, PrivacyEngine
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer

    torch.manual_seed(0)
    train_set, _ = EX.digits_datasets()
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(), nn.Linear(4 * 36, 10))
    gsm = GradSampleModule(net, strict=False)
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=64)
    loader = DPDataLoader.from_data_loader(torch.utils.data.DataLoader(train_set, batch_size=64))
    with pytest.raises(UserError, match=r"layer 1 \(BatchNorm2d\)"):
        dpledger.track(None, gsm, opt, loader, run="bn", lake=tmp_path / "lake", points=5)

    model = EX.SampleConvNet()
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=torch.utils.data.DataLoader(train_set, batch_size=64), target_epsilon=3.0, target_delta=1e-5,
        epochs=2, max_grad_norm=1.0)
    ids = np.arange(len(train_set)) * 10 + 7
    criterion = nn.CrossEntropyLoss()
    with dpledger.track(engine, model, optimizer, loader, run="eps", criterion=criterion, ids=ids, epochs=2,
                        target_delta=1e-5, target_epsilon=3.0, points=[17, 27, 1007], every=4,
                        lake=tmp_path / "lake") as ledger:
        for _ in range(2):
            for x, y in loader:
                optimizer.zero_grad()
                criterion(model(x), y).backward()
                optimizer.step()
    con = _merge(tmp_path / "lake", tmp_path / "w.duckdb")
    sigma, steps, delta, target = con.execute(
        "SELECT noise_multiplier, steps, delta, target_epsilon FROM runs WHERE run_id = 'eps'").fetchone()
    assert sigma == optimizer.noise_multiplier and steps == ledger.step == 2 * len(loader)
    assert (delta, target) == (1e-5, 3.0)
    rows = _rows(con, "eps")
    assert set(rows.point_id) <= set(ids.tolist())
    tracked = rows[rows.step % 4 == 0].groupby("step").point_id.apply(lambda p: {17, 27, 1007} <= set(p))
    assert tracked.all() and len(tracked) == -(-steps // 4)
