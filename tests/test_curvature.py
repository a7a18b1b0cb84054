"""analysis.curvature against analytic input Hessians.

References: for a softmax linear model f(x) = W x + b under cross-entropy the input
Hessian is H = Wᵀ (diag(p) − p pᵀ) W, p = softmax(W x + b); for a quadratic
L(x) = ½ xᵀ A x + bᵀ x it is A (and finite differences of gradients are exact);
for a linear model under per-example MSE, (2/m) MᵀM; for a small CNN, exact
Hessian-vector products by double backward, per example, one at a time.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpledger.models.curvature import Curvature, default_chunk_size, input_curvature, rademacher_probes


def softmax_hessian(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, d, d) analytic input Hessians of CE(W x + b, y) (independent of y)."""
    p = torch.softmax(x @ W.T + b, dim=1)  # (B, c)
    S = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return W.T @ S @ W


def hutchinson_sd(H: torch.Tensor, n: int) -> torch.Tensor:
    """Standard deviation of the Rademacher Hutchinson estimator with n probes."""
    off = (H ** 2).sum(dim=(-2, -1)) - (torch.diagonal(H, dim1=-2, dim2=-1) ** 2).sum(-1)
    return torch.sqrt(2 * off / n)


def linear_model(d: int, c: int, seed: int, scale: float = 1.0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    m = nn.Linear(d, c).double()
    with torch.no_grad():
        m.weight.copy_(torch.randn(c, d, generator=g, dtype=torch.float64) * scale)
        m.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
    return m


class Quadratic(nn.Module):
    """Per-example output ½ xᵀ A x + bᵀ x (A symmetric, indefinite allowed)."""

    def __init__(self, A: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.A = nn.Parameter(A)
        self.b = nn.Parameter(b)

    def forward(self, x):
        return 0.5 * torch.einsum("bi,ij,bj->b", x, self.A, x) + x @ self.b


def identity_loss(out, y):
    return out


class SmallCNN(nn.Module):
    """conv + GroupNorm + tanh + pool, then a linear head; 1x28x28 -> 10."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 5, padding=2), nn.GroupNorm(2, 4), nn.Tanh(), nn.AvgPool2d(4),
            nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.Tanh(), nn.AvgPool2d(7),
            nn.Flatten(), nn.Linear(8, 10),
        )

    def forward(self, x):
        return self.net(x)


def small_cnn(seed: int = 0, dtype=torch.float32) -> SmallCNN:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SmallCNN().to(dtype)


# --- softmax linear model: the analytic Hessian ------------------------------------------------

def test_softmax_linear_trace_matches_analytic_hessian():
    d, c, B, K, h = 10, 5, 6, 2000, 1e-5
    model = linear_model(d, c, seed=1, scale=0.8)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (B,), generator=g)
    res = input_curvature(model, x, y, n_probes=K, h=h, seed=3)
    assert isinstance(res, Curvature) and res.n_probes == K and res.h == h
    assert res.trace.shape == (B,) and res.score.shape == (B,)
    assert res.trace.dtype == torch.float64

    W, b = model.weight.detach(), model.bias.detach()
    H = softmax_hessian(W, b, x)
    tr = torch.diagonal(H, dim1=1, dim2=2).sum(-1)

    # 1) Same probes, exact Hessian: only the O(h) finite-difference error remains.
    v = rademacher_probes((d,), K, seed=3, dtype=torch.float64)  # (K, d)
    Hv = torch.einsum("bij,kj->bki", H, v)  # (B, K, d)
    same_probe_trace = (Hv * v[None]).sum(-1).mean(1)
    same_probe_score = h * torch.linalg.vector_norm(Hv, dim=-1).mean(1)
    # The FD error of v·Δ/h is (h/2)·D³L[v,v,v] + O(h²); along u = W v the third derivative
    # of log-sum-exp is the third cumulant of u under p, |κ₃| ≤ (max u − min u)³. Twice that:
    u = v @ W.T  # (K, c)
    fd_tol = float(h * ((u.max(1).values - u.min(1).values) ** 3).mean())
    assert fd_tol < 0.2 * float(tr.min())  # the tolerance is meaningful
    torch.testing.assert_close(res.trace, same_probe_trace, rtol=0, atol=fd_tol)
    torch.testing.assert_close(res.score, same_probe_score, rtol=1e-3, atol=0)
    # Much tighter in fact (the cubic term averages out over probes):
    assert (res.trace - same_probe_trace).abs().max() < 1e-3 * tr.abs().max()

    # 2) Against tr(H) itself: Monte-Carlo error of K Rademacher probes.
    sd = hutchinson_sd(H, K)
    assert bool(((res.trace - tr).abs() < 4 * sd + fd_tol).all()), (res.trace, tr, sd)
    # ... and the estimator is not trivially loose: 4 sd is well below tr(H).
    assert bool((4 * sd < 0.5 * tr).all())


def test_softmax_linear_wrong_scaling_would_fail():
    """A batch-mean loss (the papers' code) would be off by the batch size: ours is not."""
    d, c, B = 6, 3, 8
    model = linear_model(d, c, seed=5)
    x = torch.randn(B, d, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    y = torch.zeros(B, dtype=torch.long)
    res = input_curvature(model, x, y, n_probes=64, h=1e-5, seed=0)
    H = softmax_hessian(model.weight.detach(), model.bias.detach(), x)
    v = rademacher_probes((d,), 64, seed=0, dtype=torch.float64)
    expect = torch.einsum("ki,bij,kj->bk", v, H, v).mean(1)
    torch.testing.assert_close(res.trace, expect, rtol=1e-4, atol=1e-8)


# --- quadratics: finite differences are exact ---------------------------------------------------

def test_quadratic_exact_with_same_probes_and_unbiased():
    d, B, K, h = 12, 4, 3000, 1e-3
    g = torch.Generator().manual_seed(11)
    M = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = (M + M.T) / 2  # symmetric, indefinite
    bvec = torch.randn(d, generator=g, dtype=torch.float64)
    model = Quadratic(A, bvec)
    x = torch.randn(B, d, generator=g, dtype=torch.float64) * 3
    y = torch.zeros(B)
    res = input_curvature(model, x, y, n_probes=K, h=h, seed=7, loss=identity_loss)

    v = rademacher_probes((d,), K, seed=7, dtype=torch.float64)
    same = torch.einsum("ki,ij,kj->k", v, A, v).mean()
    score = h * torch.linalg.vector_norm(v @ A, dim=1).mean()
    # Exact for a quadratic, the same for every x.
    torch.testing.assert_close(res.trace, same.expand(B), rtol=0, atol=1e-6)
    torch.testing.assert_close(res.score, score.expand(B), rtol=1e-6, atol=0)
    # Expectation tr(A), within 4 standard deviations of the Hutchinson estimator.
    sd = float(hutchinson_sd(A, K))
    assert abs(float(res.trace[0]) - float(torch.trace(A))) < 4 * sd
    assert 4 * sd < 3.0  # ... which is a real constraint (‖A‖_F² ≈ 70 here)


def test_mse_linear_regression_hessian():
    d, m, B, K = 7, 3, 5, 50
    model = linear_model(d, m, seed=21)
    g = torch.Generator().manual_seed(22)
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    y = torch.randn(B, m, generator=g, dtype=torch.float64)
    res = input_curvature(model, x, y, n_probes=K, h=1e-3, seed=1, loss="mse")
    M = model.weight.detach()
    H = 2.0 / m * M.T @ M  # per-example loss = mean_j (M x + c − y)_j²
    v = rademacher_probes((d,), K, seed=1, dtype=torch.float64)
    expect = torch.einsum("ki,ij,kj->k", v, H, v).mean()
    torch.testing.assert_close(res.trace, expect.expand(B), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(res.score, (1e-3 * torch.linalg.vector_norm(v @ H, dim=1).mean()).expand(B),
                               rtol=1e-8, atol=0)


# --- a small CNN: exact Hessian-vector products by double backward -------------------------------

def exact_hvp_trace(model, x, y, v):
    """mean_k v_kᵀ H_i v_k per example, H_i by double backward on example i alone."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1].clone().requires_grad_(True)
        loss = F.cross_entropy(model(xi), y[i:i + 1])
        (gi,) = torch.autograd.grad(loss, xi, create_graph=True)
        vals = []
        for vk in v:
            (hv,) = torch.autograd.grad((gi * vk).sum(), xi, retain_graph=True)
            vals.append((hv * vk).sum())
        out.append(torch.stack(vals).mean())
    return torch.stack(out)


def test_cnn_groupnorm_matches_double_backward_and_shapes():
    model = small_cnn(0, torch.float64).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1, 28, 28, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 4, 9])
    K = 4
    res = input_curvature(model, x, y, n_probes=K, h=1e-5, seed=2)
    assert res.trace.shape == (3,) and res.score.shape == (3,)
    v = rademacher_probes((1, 28, 28), K, seed=2, dtype=torch.float64)
    ref = exact_hvp_trace(model, x, y, v)
    torch.testing.assert_close(res.trace, ref, rtol=1e-3, atol=1e-6)
    assert bool((res.score > 0).all())


def test_cnn_float32_28x28_finite():
    model = small_cnn(1)
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))
    res = input_curvature(model, x, y, n_probes=5)
    assert res.trace.dtype == torch.float32 and res.trace.shape == (16,)
    assert bool(torch.isfinite(res.trace).all()) and bool(torch.isfinite(res.score).all())
    assert bool((res.score > 0).all())
    assert not res.trace.requires_grad and not res.score.requires_grad
    # float32 against float64 of the same model: FD in float32 at h=1e-3 is accurate to ~1e-3.
    res64 = input_curvature(small_cnn(1, torch.float64), x.double(), y, n_probes=5, h=1e-5)
    torch.testing.assert_close(res.trace.double(), res64.trace, rtol=2e-2,
                               atol=2e-2 * float(res64.trace.abs().max()))


# --- per-example independence, chunking ---------------------------------------------------------

def test_per_example_independent_of_batch_and_chunking():
    model = small_cnn(2, torch.float64)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(7, 1, 28, 28, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (7,), generator=g)
    full = input_curvature(model, x, y, n_probes=3, seed=5)
    for i in (0, 4, 6):
        alone = input_curvature(model, x[i:i + 1], y[i:i + 1], n_probes=3, seed=5)
        torch.testing.assert_close(alone.trace, full.trace[i:i + 1], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(alone.score, full.score[i:i + 1], rtol=1e-9, atol=1e-12)
    # Batches of 4 + a smaller last batch of 3; and chunk sizes that split probes unevenly.
    parts = [input_curvature(model, x[:4], y[:4], n_probes=3, seed=5),
             input_curvature(model, x[4:], y[4:], n_probes=3, seed=5)]
    torch.testing.assert_close(torch.cat([p.trace for p in parts]), full.trace, rtol=1e-9, atol=1e-12)
    for cs in (1, 5, 8, 100):
        ch = input_curvature(model, x, y, n_probes=3, seed=5, chunk_size=cs)
        torch.testing.assert_close(ch.trace, full.trace, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ch.score, full.score, rtol=1e-9, atol=1e-12)
    # The default stacks probes for small batches and never exceeds a large caller batch.
    assert default_chunk_size(7, 3) == 21 and default_chunk_size(64, 10) == 512
    assert default_chunk_size(2000, 10) == 2000
    # Reordering the batch permutes the results.
    perm = torch.tensor([6, 2, 0, 5, 1, 3, 4])
    shuffled = input_curvature(model, x[perm], y[perm], n_probes=3, seed=5)
    torch.testing.assert_close(shuffled.trace, full.trace[perm], rtol=1e-9, atol=1e-12)


def test_more_probes_extend_the_same_sequence():
    v3 = rademacher_probes((5,), 3, seed=4)
    v10 = rademacher_probes((5,), 10, seed=4)
    assert torch.equal(v3, v10[:3])
    assert set(v10.unique().tolist()) == {-1.0, 1.0}
    model = linear_model(5, 3, seed=0)
    x = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 2])
    r3 = input_curvature(model, x, y, n_probes=3, seed=4, h=1e-6)
    r10 = input_curvature(model, x, y, n_probes=10, seed=4, h=1e-6)
    H = softmax_hessian(model.weight.detach(), model.bias.detach(), x)
    for r, v in ((r3, v3), (r10, v10)):
        expect = torch.einsum("ki,bij,kj->bk", v.double(), H, v.double()).mean(1)
        torch.testing.assert_close(r.trace, expect, rtol=1e-4, atol=1e-7)


# --- side effects, determinism ------------------------------------------------------------------

def test_mode_grads_and_global_rng_untouched():
    model = small_cnn(3)
    model.train()
    model.net[1].eval()  # a mixed mode must come back as it was
    modes = {n: m.training for n, m in model.named_modules()}
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 0.5)
    grads_before = [None if p.grad is None else p.grad.clone() for p in params]
    requires = [p.requires_grad for p in params]
    x = torch.rand(4, 1, 28, 28)
    y = torch.tensor([1, 2, 3, 4])
    seen_modes = []
    hook = model.register_forward_pre_hook(lambda m, inp: seen_modes.append(m.training))
    rng = torch.get_rng_state()
    input_curvature(model, x, y, n_probes=2)
    hook.remove()
    assert torch.equal(torch.get_rng_state(), rng)
    assert seen_modes and not any(seen_modes)  # computed in eval mode
    assert {n: m.training for n, m in model.named_modules()} == modes
    for p, before, req in zip(params, grads_before, requires):
        assert p.requires_grad == req
        if before is None:
            assert p.grad is None
        else:
            assert torch.equal(p.grad, before)
    assert not x.requires_grad


def test_seed_determinism_and_difference():
    model = small_cnn(4)
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    y = torch.arange(5)
    a = input_curvature(model, x, y, n_probes=3, seed=1)
    b = input_curvature(model, x, y, n_probes=3, seed=1)
    c = input_curvature(model, x, y, n_probes=3, seed=2)
    assert torch.equal(a.trace, b.trace) and torch.equal(a.score, b.score)
    assert not torch.allclose(a.trace, c.trace)


def test_works_under_no_grad_and_bad_input():
    model = linear_model(4, 3, seed=0)
    x = torch.randn(3, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    with torch.no_grad():
        r = input_curvature(model, x, y, n_probes=2)
    assert torch.isfinite(r.trace).all()
    empty = input_curvature(model, x[:0], y[:0])
    assert empty.trace.shape == (0,)
    with pytest.raises(ValueError):
        input_curvature(model, x, y[:2])
    with pytest.raises(ValueError):
        input_curvature(model, x, y, n_probes=0)
    with pytest.raises(ValueError):
        input_curvature(model, x, y, h=0.0)
    with pytest.raises(ValueError):
        input_curvature(model, x, y, loss="hinge")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    model = small_cnn(5, torch.float64)
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([3, 1, 4, 1])
    cpu = input_curvature(model, x, y, n_probes=3)
    gpu = input_curvature(model.cuda(), x.cuda(), y.cuda(), n_probes=3)
    assert gpu.trace.device.type == "cuda"
    torch.testing.assert_close(gpu.trace.cpu(), cpu.trace, rtol=1e-6, atol=1e-8)
