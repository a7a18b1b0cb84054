r"""One DP-SGD update with Opacus: the per-sample path, or clipping by already computed norms.

:class:`DPSGD` holds the model, Opacus's ``GradSampleModule`` + ``DPOptimizer`` (per-
example gradients clipped at C, summed, Gaussian noise of std σC from a seeded
generator, divided by the expected batch size) and, where it applies, Opacus's
ghost-clipping optimizer (``DPOptimizerFastGradientClipping``) for steps whose
batch members' gradient norms are known already (:func:`clipped_step`). Without DP
(``private=False``) it is plain SGD on the batch mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .grad_norms import opacus_hooks_off

# Layers that draw randomness in train mode: the tracked forward and the clipping pass
# would draw different masks, so such models clip with Opacus's own per-sample pass.
STOCHASTIC = (torch.nn.modules.dropout._DropoutNd,)


def has_stochastic_layers(model: torch.nn.Module) -> bool:
    """Whether a module of ``model`` draws randomness in train mode (dropout)."""
    return any(isinstance(m, STOCHASTIC) for m in model.modules())


def clipped_step(model: torch.nn.Module, optimizer, xb: torch.Tensor, yb: torch.Tensor,
                 norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    r"""One DP-SGD update whose clipping factors come from already computed per-example norms.

    With ``n_i`` the norms of the batch's per-example gradients at the current parameters,
    ``w_i = min(1, C / (n_i + 1e-6))`` (Opacus's clip factor, epsilon included) and
    ``∇_θ Σ_i w_i ℓ_i = Σ_i w_i ∇_θ ℓ_i`` is the clipped sum: one weighted backward over
    the batch, the second pass of ghost clipping (Li et al. 2021; Bu et al. 2022). Opacus's
    hooks are off during it. ``optimizer`` (a ``DPOptimizerFastGradientClipping``) adds
    N(0, σ²C²) noise, divides by the expected batch size and steps. Returns the batch's
    summed (unweighted) loss.
    """
    weights = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    with opacus_hooks_off(model):
        losses = F.cross_entropy(model(xb), yb, reduction="none")
        (losses * weights.to(losses.dtype)).sum().backward()
    for p in model.parameters():
        if p.requires_grad and p.grad is None:  # empty batch (or an unused parameter): the sum is zero
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return losses.detach().sum()


@dataclass
class DPSGD:
    """A model and its (DP-)SGD optimizers; :meth:`step` makes one update on a batch.

    ``base`` is the plain SGD optimizer (its state is what a resume state saves);
    ``optimizer`` Opacus's ``DPOptimizer`` over it (or ``base`` itself without DP);
    ``shared`` the ghost-clipping optimizer over the same ``base`` when norms may be
    reused (``None`` otherwise); ``noise`` the generator of the Gaussian noise.
    """

    model: torch.nn.Module
    train_model: torch.nn.Module
    base: torch.optim.Optimizer
    optimizer: torch.optim.Optimizer
    shared: torch.optim.Optimizer | None
    noise: torch.Generator
    private: bool
    max_grad_norm: float

    @classmethod
    def build(cls, model: torch.nn.Module, *, lr: float, momentum: float, private: bool,
              noise_multiplier: float | None, max_grad_norm: float, expected_batch_size: int,
              noise: torch.Generator, reuse_norms: bool) -> "DPSGD":
        """SGD over ``model``; with ``private``, Opacus's DP-SGD with noise from ``noise``.

        ``reuse_norms`` (and no stochastic layer) adds the ghost-clipping optimizer:
        it takes ``p.grad`` as the already clipped sum, adds the same noise from the
        same generator, scales and steps.
        """
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

        base = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        if not private:
            return cls(model, model, base, base, None, noise, False, max_grad_norm)
        dp_args = dict(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                       expected_batch_size=expected_batch_size, loss_reduction="mean", generator=noise)
        train_model = GradSampleModule(model, loss_reduction="sum")
        optimizer = DPOptimizer(base, **dp_args)
        shared = None
        if reuse_norms and not has_stochastic_layers(model):
            shared = DPOptimizerFastGradientClipping(base, **dp_args)
        return cls(model, train_model, base, optimizer, shared, noise, True, max_grad_norm)

    def step(self, xb: torch.Tensor, yb: torch.Tensor, norms: torch.Tensor | None = None) -> float:
        """One update on the batch ``(xb, yb)``; returns its mean loss (NaN for an empty batch).

        ``norms`` (the batch members' per-example gradient norms at the current
        parameters) clips with :func:`clipped_step`; it needs :attr:`shared`.
        """
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n = len(yb)
        if norms is not None:
            loss_sum = clipped_step(self.model, self.shared, xb, yb, norms, self.max_grad_norm)
        elif self.private:
            loss_sum = F.cross_entropy(self.train_model(xb), yb, reduction="sum")
            loss_sum.backward()
            self.optimizer.step()
        elif n:
            loss_sum = F.cross_entropy(self.train_model(xb), yb, reduction="sum")
            (loss_sum / n).backward()
            self.optimizer.step()
        return float(loss_sum.item() / n) if n else float("nan")


__all__ = ["DPSGD", "STOCHASTIC", "clipped_step", "has_stochastic_layers"]
