r"""Input loss curvature per example: a Hutchinson estimate of the trace of the
Hessian of each example's loss with respect to its *input*, from finite
differences of input gradients along Rademacher probes.

References
----------
* Garg, Ravikumar & Roy, "Memorization Through the Lens of Curvature of Loss
  Function Around Samples" (ICML 2024): the curvature of the loss around a
  training sample, averaged over training checkpoints, tracks its memorization
  score (Feldman & Zhang).
* Ravikumar, Soufleri, Hashemi & Roy, "Unveiling Privacy, Memorization, and
  Input Curvature Links" (ICML 2024): bounds linking differential privacy,
  memorization and input loss curvature; the same estimator.

Formulas
--------
For an example (x, y) with loss L(x) = ℓ(f(x), y), g(x) = ∇_x L(x) and
H(x) = ∇²_x L(x). Draw probes v_1..v_K with i.i.d. Rademacher (±1) entries, of
the shape of one input. With the finite difference

    Δ_k = g(x + h v_k) − g(x)  ≈  h H v_k          (exact for a quadratic L),

this module returns, per example,

    trace = (1/K) Σ_k v_k · Δ_k / h      ≈ (1/K) Σ_k v_kᵀ H v_k,   E[·] = tr(H)
    score = (1/K) Σ_k ‖Δ_k‖₂             ≈ (h/K) Σ_k ‖H v_k‖₂

``trace`` is Hutchinson's estimator (Hutchinson 1990); for Rademacher probes its
variance is Var = 2 (‖H‖_F² − Σ_i H_ii²) / K. ``score`` is the quantity the
papers' published code saves as the curvature score ("regr": the norm of the
gradient difference, *not* divided by h, averaged over probes), which is
≈ h · E‖H v‖ and so (by Jensen) a lower bound proxy of h·sqrt(tr(H²)).

Differences from the papers' code, on purpose:

* per-example losses (``reduction="none"``) are summed before autograd, so each
  row of the input gradient is exactly that example's own ∇_x L: the papers'
  code differentiates the batch *mean*, which scales every score by 1/batch size
  (and a smaller last batch differently). Their ``regr`` = our ``score`` / B.
* the probe is ``h·v`` (their code adds 1e-7 to v, a negligible bias we omit);
* the base gradient g(x) is computed once, not once per probe.

Probes and determinism
----------------------
Probes come from a local ``torch.Generator`` (CPU) seeded with ``seed``, never
the global RNG: v_k is the k-th draw, in order, of a ±1 tensor shaped like
*one* input (``x.shape[1:]``), then moved to x's device. Every example of every
batch uses the same v_1..v_K. Hence an example's result depends only on
(model, x_i, y_i, seed, n_probes, h): it is the same alone or in any batch, in
any position, with any ``chunk_size`` (up to floating-point summation order in
the model's kernels), and a larger ``n_probes`` extends the same sequence of
probes. Each example's estimate is unbiased with the variance above; the
estimates of different examples share probe directions (their errors are
correlated), which does not change any single example's distribution.
:func:`rademacher_probes` returns the probes, for checks.

Cost
----
1 + K forward+backward passes' worth of work: g(x) once, then one pass at
x + h v_k per probe. The probes are stacked into the batch dimension (rows
ordered probe-major: (k, i)), so this is a few large passes, not Python loops
over examples; ``chunk_size`` bounds the rows of any single pass (base and
probe passes alike; default ``max(B, min(K·B, 512))``, see
:func:`default_chunk_size`). Gradients are taken with ``torch.autograd.grad``
with respect to the input only: parameters' ``.grad`` is never touched, and autograd
skips the weight-gradient kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Curvature", "input_curvature", "rademacher_probes", "per_example_loss", "default_chunk_size"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Curvature:
    """Per-example input-curvature estimates (tensors on x's device, detached)."""

    trace: torch.Tensor  # (batch,) mean_k v_k·(∇L(x+h v_k) − ∇L(x))/h  ≈ tr(∇²_x L)
    score: torch.Tensor  # (batch,) mean_k ‖∇L(x+h v_k) − ∇L(x)‖₂ (the papers' saved score)
    n_probes: int
    h: float


def rademacher_probes(shape: tuple[int, ...] | torch.Size, n_probes: int, seed: int = 0, *,
                      device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The probes ``input_curvature`` uses: ``(n_probes, *shape)`` of ±1.

    Drawn from a fresh CPU ``torch.Generator`` seeded with ``seed``, one probe after
    another (so the first k probes do not depend on ``n_probes``), then moved to
    ``device``. The global RNG is not touched.
    """
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    shape = tuple(int(s) for s in shape)
    probes = [torch.randint(0, 2, shape, generator=g, dtype=torch.int8) for _ in range(n_probes)]
    v = torch.stack(probes).to(dtype).mul_(2).sub_(1)
    return v.to(device) if device is not None else v


def per_example_loss(out: torch.Tensor, y: torch.Tensor, loss: str | LossFn) -> torch.Tensor:
    """Per-example losses, shape ``(batch,)``.

    ``"cross_entropy"``: ``F.cross_entropy(out, y, reduction="none")``;
    ``"mse"``: mean over the non-batch dims of ``(out − y)²`` (y reshaped to out's shape);
    a callable ``(out, y) -> (batch,)`` is used as given.
    """
    if callable(loss):
        val = loss(out, y)
    elif loss == "cross_entropy":
        val = F.cross_entropy(out, y, reduction="none")
    elif loss == "mse":
        diff = out - y.reshape(out.shape).to(out.dtype)
        val = diff.pow(2).reshape(out.shape[0], -1).mean(dim=1)
    else:
        raise ValueError(f"unknown loss {loss!r}; use 'cross_entropy', 'mse' or a callable")
    if val.shape != (out.shape[0],):
        raise ValueError(f"the loss must give one value per example, shape ({out.shape[0]},), "
                         f"got {tuple(val.shape)}")
    return val


STACK_ROWS = 512


def default_chunk_size(batch: int, n_probes: int) -> int:
    """Rows per pass when ``chunk_size`` is None: ``max(batch, min(n_probes·batch, 512))``.

    Never more than the caller's own batch (which they sized to fit a forward+backward)
    unless that batch is small, where probes are stacked up to 512 rows so that small
    batches still make large passes. On CPU, passes of a few hundred rows are also the
    fastest per row (cache-resident activations); pass ``chunk_size`` explicitly to stack
    more on a GPU.
    """
    return max(batch, min(n_probes * batch, STACK_ROWS))


def _input_grad(model: torch.nn.Module, xin: torch.Tensor, y: torch.Tensor,
                loss: str | LossFn) -> torch.Tensor:
    """∇_x of the *sum* of per-example losses: row i is example i's own input gradient."""
    xin = xin.detach().requires_grad_(True)
    total = per_example_loss(model(xin), y, loss).sum()
    (g,) = torch.autograd.grad(total, xin)
    return g


def input_curvature(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, n_probes: int = 10,
                    h: float = 1e-3, seed: int = 0, loss: str | LossFn = "cross_entropy",
                    chunk_size: int | None = None) -> Curvature:
    """Per-example Hutchinson estimate of tr(∇²_x L(x, y)) and the papers' curvature score.

    ``model`` maps a batch ``x`` ``(B, ...)`` to outputs; ``y`` holds B targets (class
    indices for cross-entropy). The model runs in eval mode and every submodule's
    mode is restored afterwards; parameters' ``.grad`` and the global RNG are left
    alone. ``chunk_size`` (rows per forward/backward pass, base and probe passes alike)
    bounds memory; ``None`` means :func:`default_chunk_size`. Results do not depend on
    it. See the module docstring for the formulas, probes and cost.
    """
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes must be a positive integer, got {n_probes!r}")
    if not h > 0:
        raise ValueError(f"h must be > 0, got {h!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    if x.dim() < 1 or y.shape[:1] != x.shape[:1]:
        raise ValueError(f"x and y need the same batch size, got {tuple(x.shape)} and {tuple(y.shape)}")
    if not callable(loss) and loss not in ("cross_entropy", "mse"):
        raise ValueError(f"unknown loss {loss!r}; use 'cross_entropy', 'mse' or a callable")

    x = x.detach()
    y = y.detach()
    batch, device = x.shape[0], x.device
    if batch == 0:
        empty = torch.zeros(0, dtype=x.dtype, device=device)
        return Curvature(trace=empty, score=empty.clone(), n_probes=n_probes, h=float(h))

    v = rademacher_probes(x.shape[1:], n_probes, seed, device=device, dtype=x.dtype)  # (K, *shape)
    rows = int(chunk_size) if chunk_size is not None else default_chunk_size(batch, n_probes)

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.enable_grad():
            # ∇L(x), once, in chunks of at most `rows` examples.
            g0 = torch.cat([_input_grad(model, x[s:s + rows], y[s:s + rows], loss)
                            for s in range(0, batch, rows)])
            # One stacked pass per chunk of (probe k, example i) rows, probe-major.
            # Per-(probe, example) values land in fixed slots and are averaged at the end, so
            # the summation order (hence the result) does not depend on the chunking.
            total = n_probes * batch
            vdiff = torch.empty(total, dtype=x.dtype, device=device)
            norms = torch.empty(total, dtype=x.dtype, device=device)
            for s in range(0, total, rows):
                idx = torch.arange(s, min(s + rows, total), device=device)
                k, i = idx // batch, idx % batch
                vk = v[k]
                gp = _input_grad(model, x[i] + h * vk, y[i], loss)
                diff = (gp - g0[i]).reshape(idx.numel(), -1)
                vdiff[idx] = (diff * vk.reshape(idx.numel(), -1)).sum(dim=1)
                norms[idx] = torch.linalg.vector_norm(diff, dim=1)
    finally:
        for m, mode in modes:
            m.training = mode
    trace = vdiff.reshape(n_probes, batch).mean(dim=0) / h
    score = norms.reshape(n_probes, batch).mean(dim=0)
    return Curvature(trace=trace, score=score, n_probes=n_probes, h=float(h))
