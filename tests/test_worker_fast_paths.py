"""The training loop's fast paths (issue #15): the clipped sum taken from the norm tracker's
own pass, and the recorder's background writer. Each must give exactly what the plain path
gives."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

warnings.filterwarnings("ignore", message="Full backward hook")


def _dpsgd(model_name: str, seed: int = 0, clip: float = 1.0):
    from dpledger.models.dp_step import DPSGD
    from dpledger.models.nets import build_model

    model = build_model(model_name, (1, 8, 8), 10, seed=seed)
    return DPSGD.build(model, lr=0.5, momentum=0.0, private=True, noise_multiplier=1.0, max_grad_norm=clip,
                       expected_batch_size=16, noise=torch.Generator().manual_seed(5), reuse_norms=True)


@pytest.mark.parametrize("model_name", ["mlp", "logreg"])
def test_captured_clipped_sum_equals_the_weighted_backward(model_name):
    from dpledger.ingest.worker import _captured_step, _LinearCapture
    from dpledger.models.grad_norms import GradNormTracker, per_example_grad_norms

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 1, 8, 8, generator=gen) * torch.rand(40, 1, 1, 1, generator=gen) * 3
    y = torch.randint(0, 10, (40,), generator=gen)
    rows = torch.tensor([3, 7, 8, 20, 33, 39, 0])     # the batch: rows of the tracked input
    clip = float(per_example_grad_norms(_dpsgd(model_name).model, x, y).norms[rows].median())  # some above C
    ours, ref = _dpsgd(model_name, clip=clip), _dpsgd(model_name, clip=clip)
    capture = _LinearCapture(ours.model)
    assert capture.usable
    with GradNormTracker(ours.model) as tracker:
        capture.start()
        res = tracker(x, y)
        capture.stop()
    norms = res.norms[rows]
    assert (norms > clip).any() and (norms < clip).any()
    grads = capture.grads(rows, norms, clip, len(x))
    assert grads is not None  # the capture agreed with the tracker's norms: the fast path is taken
    loss = _captured_step(ours, grads, len(rows), res.losses[rows].sum())
    ref_loss = ref.step(x[rows], y[rows], norms)  # the weighted backward over the batch
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for (name, p), q in zip(ref.model.named_parameters(), ours.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def test_capture_falls_back_when_it_saw_nothing_or_the_model_does_not_fit():
    from dpledger.ingest.worker import _LinearCapture
    from dpledger.models.grad_norms import GradNormTracker

    dp = _dpsgd("mlp")
    capture = _LinearCapture(dp.model)
    x, y = torch.randn(10, 1, 8, 8), torch.randint(0, 10, (10,))
    with GradNormTracker(dp.model) as tracker:
        res = tracker(x, y)  # capture not started
    assert capture.grads(torch.arange(3), res.norms[:3], 1.0, 10) is None
    with GradNormTracker(dp.model) as tracker:
        capture.start()
        res = tracker(x, y)
        capture.stop()
    assert capture.grads(torch.arange(3), res.norms[:3] * 1.5, 1.0, 10) is None  # norms that do not agree
    assert not _LinearCapture(_dpsgd("lenet").model).usable  # convolutions: the weighted backward


def test_tracked_run_uses_the_fast_path_and_matches_the_per_sample_run(tmp_path, monkeypatch):
    """A whole tracked run through the captured clipped sums equals the run clipped by Opacus's
    per-sample pass (norms, losses and sampled flags of every row), and it did take that path."""
    import dpledger.ingest.worker as worker
    from dpledger.ingest.sinks import ShardSink

    taken = []
    grads = worker._LinearCapture.grads
    monkeypatch.setattr(worker._LinearCapture, "grads",
                        lambda self, *a, **k: taken.append(grads(self, *a, **k)) or taken[-1])
    out = {}
    for reuse in (True, False):
        cfg = worker.TrainConfig(run=f"r{int(reuse)}", dataset="digits", model="mlp", epochs=1, n_train=200,
                                 n_test=50, batch_size=20, noise_multiplier=1.0, track="all", seed=3,
                                 reuse_norms=reuse, commit_every=3)
        sink = ShardSink(tmp_path / "lake")
        try:
            worker.train(cfg, sink, db_dir=tmp_path)
        finally:
            sink.close()
        import pyarrow.parquet as pq

        d = tmp_path / "lake" / f"run_id=r{int(reuse)}"
        t = pq.read_table(sorted((d / "point_steps").glob("part-*.parquet"))).to_pandas()
        out[reuse] = t.sort_values(["step", "point_id"])[["step", "point_id", "grad_norm", "loss", "sampled"]]
    assert len(taken) == 10 and all(g is not None for g in taken)
    a, b = out[True].to_numpy(float), out[False].to_numpy(float)
    assert a.shape == (10 * 200, 5)
    np.testing.assert_array_equal(a[:, [0, 1, 4]], b[:, [0, 1, 4]])
    np.testing.assert_allclose(a[:, 2:4], b[:, 2:4], rtol=1e-4)
