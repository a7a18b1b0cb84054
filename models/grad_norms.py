r"""Per-example gradient norms without materialising per-example gradients.

For a batch of tracked points ``(x_i, y_i)`` this computes, at the current
parameters θ, the L2 norm of each point's own gradient
``‖∇_θ ℓ(f_θ(x_i), y_i)‖₂`` (cross-entropy, *not* divided by the batch size;
the norm before DP-SGD clipping) and the loss ``ℓ_i``.

How. One forward pass records, for every module with trainable parameters, its
input ``a`` and the autograd edge of its output; one ``torch.autograd.grad`` of
``Σ_i ℓ_i`` with respect to those outputs gives ``g = ∂Σℓ/∂out``, whose row i
depends on example i only (no layer here mixes examples). Parameter gradients
are never formed, so ``param.grad`` is untouched. Per layer, with ``A_i`` the
``(T, d)`` input rows and ``G_i`` the ``(T, p)`` output gradients of example i:

* ``nn.Linear`` on ``(B, d)`` inputs (T = 1):
  ``‖∇W_i‖² = ‖a_i‖² ‖g_i‖²`` and ``‖∇b_i‖² = ‖g_i‖²`` (Goodfellow 2015,
  "Efficient Per-Example Gradient Computations").
* ``nn.Linear`` on ``(B, T, d)`` inputs and ``nn.Conv1d``/``nn.Conv2d`` (inputs
  unfolded to ``(B, T, d_in·k)`` patches, per group): ``∇W_i = G_iᵀ A_i`` and
  either the ghost norm ``‖G_iᵀ A_i‖²_F = ⟨A_i A_iᵀ, G_i G_iᵀ⟩`` (two T×T Gram
  matrices, cost O(T²(d + p)); Li et al. 2021, "Large Language Models Can Be
  Strong Differentially Private Learners") or the per-example gradient itself
  (cost O(T d p)), whichever costs fewer FLOPs for that layer and input --
  "mixed ghost clipping" (Bu et al. 2022, "Scalable and Efficient Training of
  Large Convolutional Neural Networks with Differential Privacy"). For a
  convolution on CPU the per-example gradients come from one backend
  convolution kernel per chunk of examples, no patch matrix: the weight
  gradient of a grouped convolution with the batch folded into the channels,
  or -- when each group has one input channel (a grey-scale first layer,
  depthwise layers), where that kernel is slowest -- a grouped *forward*
  convolution of the input with the output gradients as kernels. Chunks are
  cache-sized (~2 MiB; 8 MiB for the forward route). Measured on the 2-core
  CPU this was written on (LeNet on 256 28x28 points, 1 thread): first conv
  1->16 5x5, forward route 6.9 ms vs grouped wgrad 9.1 ms vs unfold + bmm
  12.4 ms; second conv 16->32 5x5 at 14x14, wgrad in 2 MiB chunks 17 ms vs
  unchunked 29 ms vs forward route 23-42 ms vs unfold + bmm 45 ms; the plain
  weight gradients of the same layers, which this path does not compute, take
  ~2.5 and ~12 ms. On GPUs it is ``bmm(G_iᵀ, A_i)`` over unfolded patches.
  Bias:
  ``‖Σ_t g_{i,t}‖²``. A module called several times in one forward (weight
  sharing, recurrence) has its calls concatenated along T: the identity holds
  for the summed gradient.
* ``nn.GroupNorm`` / ``nn.LayerNorm``: ``∇γ_i = Σ_spatial x̂_i ⊙ g_i`` and
  ``∇β_i = Σ_spatial g_i`` with x̂ the normalised input: they are as small as
  the parameters. A plain ``nn.GroupNorm`` runs, inside the tracker's forward,
  with the batch folded into the channels (one "example" of B·C channels in
  B·groups groups: the same normalisation) and per-example copies of γ and β,
  so the GroupNorm backward, which forms those per-channel sums for the input
  gradient anyway, leaves each example's ∇γ_i, ∇β_i on the copies: no pass of
  their own. A GroupNorm subclass, or one whose forward is someone else's
  override, takes the mean and 1/std its forward saved,
  ``∇γ_i[c] = rstd_{i,k} Σ_s (x − μ_{i,k}) g``, from PyTorch's backward kernel
  with the batch folded into the channels (one pass, no input gradient);
  LayerNorm (statistics per position) and a GroupNorm whose statistics cannot be
  read recompute x̂, ~1 MiB of examples at a time.
* Any other module with trainable parameters of its own: per-example
  vector-Jacobian products of that module alone, ``vmap(vjp)`` over examples
  with ``torch.func.functional_call`` (a Python loop if vmap cannot trace it).
* Models where the layer view does not hold -- a parameter shared by two
  modules, a parametrised module whose output is not one tensor or whose
  input/output has no leading batch dimension -- use the whole-model
  ``vmap(grad)`` over examples.

Squared norms are summed over all parameter tensors in float64 (float32 on
MPS); ``norms`` is their square root, in that dtype. Assumptions (as in Opacus): batch-first activations,
parameters used only inside the forward of the module that owns them, and no
layer that mixes examples (BatchNorm in training mode is refused). Stochastic
layers (dropout in ``train()`` mode) draw their own masks in this forward.

Opacus. A ``GradSampleModule`` (what ``PrivacyEngine.make_private`` returns)
is unwrapped to its ``_module``, and the hooks Opacus installed on the
submodules (found on them, so ``wrap_model=False`` works too) are switched
off for the duration of the call and restored, so ``p.grad_sample``, the
recorded activations and the accumulation counters are left as they were.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.func import functional_call, grad, vjp, vmap

_LOSSES = {
    "cross_entropy": lambda logits, y: F.cross_entropy(logits, y, reduction="none"),
}


@dataclass
class NormResult:
    """Per-example results for one batch of tracked points (on the device of ``x``)."""

    norms: torch.Tensor   # (B,) L2 norms of the per-example gradients, before clipping
    losses: torch.Tensor  # (B,) per-example losses
    logits: torch.Tensor  # (B, K) detached model outputs


@dataclass
class _Call:
    """One recorded forward call of a parametrised module."""

    args: tuple
    kwargs: dict
    edge: object            # GradientEdge of the output, or None when no gradient can flow
    out_shape: torch.Size
    versions: tuple          # version counters of the saved tensor args: in-place edits are caught
    stats: tuple | None = None  # GroupNorm: the forward's own (mean, rstd), each (B, groups), if found


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside Opacus's GradSampleModule (duck-typed: importing opacus costs seconds)."""
    while (type(model).__module__.startswith("opacus.") and hasattr(model, "_module")
           and isinstance(model._module, nn.Module)):
        model = model._module
    return model


def _opacus_owner(hook) -> object | None:
    """The Opacus hooks object (GradSampleModule, GradSampleHooks) a hook is a bound method of, if any."""
    owner = getattr(getattr(hook, "func", hook), "__self__", None)  # backward hooks are functools.partials
    if owner is not None and hasattr(owner, "hooks_enabled") and hasattr(owner, "capture_activations_hook"):
        return owner
    return None


@contextmanager
def opacus_hooks_off(module: nn.Module) -> Iterator[None]:
    """Pause the Opacus hooks on ``module``'s submodules; everything is restored on exit.

    Their ``hooks_enabled`` flags are cleared (so no activations are recorded and no
    ``grad_sample`` is written), and their full backward hooks -- no-ops while
    disabled -- are taken out of the modules' hook dicts, because the autograd.Function
    that wraps the outputs of a module with such hooks cannot run under ``torch.func``.
    """
    owners: dict[int, object] = {}
    swapped: list[tuple[nn.Module, dict]] = []
    for m in module.modules():
        for h in m._forward_hooks.values():
            if (o := _opacus_owner(h)) is not None:
                owners[id(o)] = o
        if any(_opacus_owner(h) is not None for h in m._backward_hooks.values()):
            swapped.append((m, m._backward_hooks))
    saved = [(o, o.hooks_enabled) for o in owners.values()]
    try:
        for o, _ in saved:
            o.hooks_enabled = False
        for m, hooks in swapped:
            # A filtered copy, and the original dict object put back afterwards, keeps the order of
            # (and the handles to) any other backward hooks.
            m._backward_hooks = type(hooks)((k, h) for k, h in hooks.items() if _opacus_owner(h) is None)
        yield
    finally:
        for m, hooks in swapped:
            m._backward_hooks = hooks
        for o, enabled in saved:
            o.hooks_enabled = enabled


def _sq(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Per-row squared L2 norm of ``t`` (B, ...), returned in ``acc``.

    Summed in ``t``'s own dtype, then widened: the sum of squares of a row is within
    ~1e-7 relative in float32, and converting whole activations to float64 first took
    a third of the tracker's time on small models (measured on an MLP, 1,437 points).
    """
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1).to(acc).square()


def _conv_bias_grad(grads: list[torch.Tensor], cout: int) -> torch.Tensor:
    """Per-example bias gradients (N, C_out) of a conv: ``Σ_t g_t`` over its calls' output gradients."""
    gb = grads[0].reshape(grads[0].shape[0], cout, -1).sum(dim=2)
    for gr in grads[1:]:
        gb += gr.reshape(gr.shape[0], cout, -1).sum(dim=2)
    return gb


def _sq_sum(parts, b: int, acc: torch.dtype, device) -> torch.Tensor:
    """Per-row squared L2 norms of the non-None tensors in ``parts``, added up: (b,) in ``acc``."""
    total = torch.zeros(b, dtype=acc, device=device)
    for t in parts:
        if t is not None:
            total += _sq(t, acc)
    return total


def _use_ghost(t: int, d: int, p: int) -> bool:
    """Ghost norm (T²·(D + P) FLOPs) cheaper than the per-example gradient (T·D·P FLOPs)?"""
    return t * (d + p) < d * p


def _ghost_sq(a: torch.Tensor, g: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``‖G_nᵀ A_n‖²_F = ⟨A_n A_nᵀ, G_n G_nᵀ⟩`` for ``a`` (N, T, D), ``g`` (N, T, P) (Li et al. 2021)."""
    aa = torch.bmm(a, a.transpose(1, 2))
    gg = torch.bmm(g, g.transpose(1, 2))
    return (aa * gg).sum(dim=(1, 2), dtype=acc)


def _matmul_sq_norm(a: torch.Tensor, g: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``‖G_nᵀ A_n‖²_F`` for ``a`` (N, T, D), ``g`` (N, T, P): ghost norm or the gradient itself, by FLOPs.

    When ghost wins, T < min(D, P), so its T×T buffers are also smaller than the
    D×P per-example gradients.
    """
    if _use_ghost(a.shape[1], a.shape[2], g.shape[2]):
        return _ghost_sq(a, g, acc)
    return _sq(torch.bmm(g.transpose(1, 2), a), acc)


def _conv_geometry(module: nn.Module, x: torch.Tensor):
    """A Conv1d/Conv2d call as 2-D: (input (B, C, H, W), kernel, dilation, stride, padding).

    A 1-D convolution is a 2-D one of height 1. String padding ('same'/'valid') and
    non-zero padding modes are applied here as the layer's forward does, leaving padding 0.
    """
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, dil, stride = (1, *module.kernel_size), (1, *module.dilation), (1, *module.stride)
        pad = (0, module.padding[0]) if not isinstance(module.padding, str) else None
    else:
        kernel, dil, stride = module.kernel_size, module.dilation, module.stride
        pad = module.padding if not isinstance(module.padding, str) else None
    if pad is None or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        pad = (0, 0)
    return x, tuple(kernel), tuple(dil), tuple(stride), tuple(pad)


def _conv_patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input patches of a conv call: (B, C_in·k, L), rows ordered like ``weight.view(C_out, -1)``."""
    x, kernel, dil, stride, pad = _conv_geometry(module, x)
    return F.unfold(x, kernel, dilation=dil, padding=pad, stride=stride)


def _conv_grads_by_wgrad(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example weight gradients (B, C_out·C_in/groups·k) as the weight gradient of one grouped conv.

    Folding the batch into the channels -- input (1, B·C_in, H, W), output gradient
    (1, B·C_out, H', W'), groups B·groups -- makes the weight gradient of that grouped
    convolution exactly the stack of per-example gradients, computed by the
    backend's convolution-backward kernel; no patch matrix is built, which on CPU
    is the expensive part of the unfold route.
    """
    x, kernel, dil, stride, pad = _conv_geometry(module, x)
    b, cin = x.shape[:2]
    cout = module.out_channels
    gw = torch.nn.grad.conv2d_weight(
        x.reshape(1, b * cin, *x.shape[2:]), (b * cout, cin // module.groups, *kernel),
        g.reshape(1, b * cout, *(g.shape[2:] if g.dim() == 4 else (1, g.shape[-1]))),
        stride=stride, padding=pad, dilation=dil, groups=b * module.groups)
    return gw.reshape(b, -1)


def _conv_grads_by_forward(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example weight gradients as the output of one grouped *forward* convolution.

    ``∇W_i[o, c, κ] = Σ_t g_i[o, t] · x_i[c, stride·t + dilation·κ]`` is a correlation of
    the input with the output gradient used as the kernel: input ``(C_in/groups, B·groups,
    H, W)`` (each input channel of a group becomes a batch entry, shared by every kernel),
    weight ``(B·C_out, 1, H', W')`` (the output gradients), ``groups = B·groups``, the
    layer's dilation as the stride and its stride as the dilation; the first ``k`` positions
    of each output dimension are the kernel taps. Returned as ``(C_in/groups, B, C_out·k)``
    -- a permutation of each example's gradient entries, which is all a norm needs.
    On CPU this beats the grouped weight-gradient kernel when the groups have one input
    channel (the first layer of a grey-scale image model, depthwise layers); see _direct_method.
    """
    x, kernel, dil, stride, pad = _conv_geometry(module, x)
    b, cin = x.shape[:2]
    groups = module.groups
    cg = cin // groups
    if g.dim() == 3:  # Conv1d output gradient (B, C_out, L) as height 1
        g = g.unsqueeze(2)
    inp = x.reshape(b, groups, cg, *x.shape[2:]).permute(2, 0, 1, 3, 4).reshape(cg, b * groups, *x.shape[2:])
    out = F.conv2d(inp, g.reshape(b * module.out_channels, 1, *g.shape[2:]), stride=dil, padding=pad,
                   dilation=stride, groups=b * groups)
    return out[:, :, :kernel[0], :kernel[1]].reshape(cg, b, -1)


def _conv_direct_sq(module: nn.Module, calls: list[_Call], grads: list[torch.Tensor], b: int,
                    acc: torch.dtype, with_bias: bool) -> torch.Tensor:
    """Squared norms of the per-example weight (and bias) gradients, formed on CPU, in chunks of examples.

    A chunk's inputs, output gradients and per-example gradients are kept to about
    ``_CHUNK_BYTES`` per thread so they stay in cache between the kernel and the norm
    (on the 2-core test machine, conv 16->32 5x5 at 14x14 over 256 examples, 1 thread:
    28.6 ms in one piece, 16-17 ms in 1-2 MiB chunks; 2 threads: 21.6 ms vs 8.1 ms in
    4 MiB chunks; a plain weight gradient of the same layer: 11.8 / 5.9 ms). The bias
    gradient ``Σ_t g_t`` is summed from the same chunk while it is in cache: a separate
    pass over the whole output gradient cost LeNet's first conv more than a third of its
    handler time.
    """
    x0, g0 = calls[0].args[0], grads[0]
    method = _direct_method(module, x0, g0)
    kernel = _conv_grads_by_forward if method == "forward" else _conv_grads_by_wgrad
    per_ex = sum(c.args[0][0].numel() + gr[0].numel() for c, gr in zip(calls, grads)) + module.weight.numel()
    budget = _CHUNK_BYTES[method] * (torch.get_num_threads() if g0.device.type == "cpu" else 1)
    step = max(1, min(b, budget // (per_ex * g0.element_size())))
    cout = module.out_channels
    out = []
    for s in range(0, b, step):
        gs = [gr[s:s + step] for gr in grads]
        per = kernel(module, calls[0].args[0][s:s + step], gs[0])
        for c, gr in zip(calls[1:], gs[1:]):   # a module called several times: its gradients add up
            per += kernel(module, c.args[0][s:s + step], gr)
        if method == "forward":
            part = torch.linalg.vector_norm(per, dim=(0, 2)).to(acc).square()
        else:
            part = _sq(per, acc)
        if with_bias:
            part += _sq(_conv_bias_grad(gs, cout), acc)
        out.append(part)
    return torch.cat(out)


def _linear_sq(module: nn.Linear, calls: list[_Call], grads: list[torch.Tensor], b: int,
               acc: torch.dtype) -> torch.Tensor:
    w, bias = module.weight, module.bias
    total = torch.zeros(b, dtype=acc, device=grads[0].device)
    if len(calls) == 1 and calls[0].args[0].dim() == 2:
        a, g = calls[0].args[0], grads[0]
        g2 = _sq(g, acc)
        if w.requires_grad:
            total += _sq(a, acc) * g2
        if bias is not None and bias.requires_grad:
            total += g2
        return total
    # Sequence input (B, ..., d) and/or several calls: rows of all calls along one T axis.
    a = torch.cat([c.args[0].reshape(b, -1, module.in_features) for c in calls], dim=1)
    g = torch.cat([gr.reshape(b, -1, module.out_features) for gr in grads], dim=1)
    if w.requires_grad:
        total += _matmul_sq_norm(a, g, acc)
    if bias is not None and bias.requires_grad:
        total += _sq(g.sum(dim=1), acc)
    return total


def _conv_sq(module: nn.Module, calls: list[_Call], grads: list[torch.Tensor], b: int,
             acc: torch.dtype) -> torch.Tensor:
    w, bias, groups = module.weight, module.bias, module.groups
    total = torch.zeros(b, dtype=acc, device=grads[0].device)
    cout = module.out_channels
    bias_done = False
    if w.requires_grad:
        length = sum(gr[0, 0].numel() for gr in grads)   # T: output positions of all calls
        d, p = w[0].numel(), cout // groups                # per group: C_in/groups·k inputs, outputs
        if _use_ghost(length, d, p):
            # A (B·groups, T, d), G (B·groups, T, p); calls concatenated along T. unfold orders rows
            # (C_in, k), so the layer's groups are contiguous blocks of rows.
            a = torch.cat([_conv_patches(module, c.args[0]).reshape(b * groups, d, -1) for c in calls], dim=2)
            g = torch.cat([gr.reshape(b * groups, p, -1) for gr in grads], dim=2)
            total += _ghost_sq(a.transpose(1, 2), g.transpose(1, 2), acc).view(b, groups).sum(dim=1)
        elif grads[0].device.type in _WGRAD_DEVICES:
            # Direct on CPU: one backend convolution kernel per chunk of examples (measured 1.5-5x
            # faster than unfold + bmm there, whose patch copy dominates).
            bias_done = bias is not None and bias.requires_grad
            total += _conv_direct_sq(module, calls, grads, b, acc, bias_done)
        else:
            # Direct elsewhere (GPU): unfold + batched matmul, the usual GPU route.
            per = sum(torch.bmm(gr.reshape(b * groups, p, -1),
                                _conv_patches(module, c.args[0]).reshape(b * groups, d, -1).transpose(1, 2))
                      for c, gr in zip(calls, grads))
            total += _sq(per.reshape(b, -1), acc)
    if bias is not None and bias.requires_grad and not bias_done:
        total += _sq(_conv_bias_grad(grads, cout), acc)
    return total


def _group_norm_stats(edge, b: int, groups: int) -> tuple | None:
    """The (mean, rstd) a GroupNorm forward saved for its backward, each (B, groups); None if not found.

    Read from the output's autograd node before the backward frees them. Only the
    node of ``native_group_norm`` itself is trusted (autocast casts, decompositions on
    other backends: None, and the statistics are recomputed).
    """
    node = getattr(edge, "node", None)
    if node is None or node.name() != "NativeGroupNormBackward0":
        return None
    try:
        mean, rstd = node._saved_result1, node._saved_result2
    except (AttributeError, RuntimeError):
        return None
    if not all(isinstance(t, torch.Tensor) and t.shape == (b, groups) for t in (mean, rstd)):
        return None
    return mean.detach(), rstd.detach()


def _group_norm_saved_sq(module: nn.GroupNorm, calls: list[_Call], grads: list[torch.Tensor], b: int,
                         acc: torch.dtype) -> torch.Tensor:
    r"""GroupNorm from the statistics its forward saved (``μ``, ``rstd``, each (B, groups)).

    ``∇γ_i[c] = rstd_{i,k} · (Σ_s x_{i,c,s} g_{i,c,s} − μ_{i,k} Σ_s g_{i,c,s})`` and
    ``∇β_i[c] = Σ_s g_{i,c,s}`` (k the group of channel c), from PyTorch's own GroupNorm
    backward kernel with the batch folded into the channels -- one "example" of B·C
    channels in B·groups groups -- so that its per-channel sums are per example: one pass
    over ``x`` and ``g``, no input gradient. It is how PyTorch forms the plain ∇γ, so the
    per-example norms are as precise as the model's own gradients (a group mean far
    from zero costs float32 digits in the forward already: 10^3 standard deviations
    give ~1e-5 relative either way). LeNet's GroupNorms, 256 points: about a third of
    the time of the centred product ``Σ_s (x − μ) g`` formed in cache-sized chunks (measured).
    """
    groups, ch = module.num_groups, module.num_channels
    want_w = module.weight is not None and module.weight.requires_grad
    want_b = module.bias is not None and module.bias.requires_grad
    pairs = []
    for c, g in zip(calls, grads):
        x = c.args[0]
        mean, rstd = c.stats
        hw = x[0].numel() // ch
        # the weight only enters the input gradient, which is not asked for
        weight = module.weight.detach().repeat(b) if module.weight is not None else x.new_ones(b * ch)
        _, w, bb = torch.ops.aten.native_group_norm_backward(
            g.reshape(1, b * ch, hw), x.reshape(1, b * ch, hw), mean.reshape(1, b * groups),
            rstd.reshape(1, b * groups), weight, 1, b * ch, hw, b * groups, [False, want_w, want_b])
        pairs.append((w if want_w else None, bb if want_b else None))
    return _affine_sq(pairs, b, ch, acc, grads[0].device)


def _per_example_copy(p: torch.Tensor | None, b: int) -> torch.Tensor | None:
    """``p`` repeated for ``b`` examples, a leaf that takes gradients where ``p`` does."""
    if p is None:
        return None
    t = p.detach().repeat(b)
    return t.requires_grad_() if p.requires_grad else t


def _folded_group_norm(module: nn.GroupNorm, leaves: dict, x: torch.Tensor) -> torch.Tensor:
    r"""``module(x)`` with the batch folded into the channels and per-example copies of γ, β.

    One "example" of B·C channels in B·groups groups is the same normalisation, group by
    group (the same kernel, the same numbers), and the gradient the backward leaves on the
    copy of γ at ``i·C + c`` is example i's ``∇γ_i[c] = Σ_s x̂ g``: the GroupNorm backward
    forms those per-channel sums for the input gradient anyway, so per-example GroupNorm
    gradients cost no pass of their own. The copies are recorded in ``leaves[module]``.
    """
    ch = module.num_channels
    if not (isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] > 0 and x.shape[1] == ch):
        return nn.GroupNorm.forward(module, x)  # not the batch-first shape: the handler's routes
    b = x.shape[0]
    w, bb = _per_example_copy(module.weight, b), _per_example_copy(module.bias, b)
    out = F.group_norm(x.reshape(1, b * ch, *x.shape[2:]), b * module.num_groups, w, bb, module.eps)
    leaves.setdefault(module, []).append((w, bb))
    return out.reshape(x.shape)


@contextmanager
def _folding_group_norms(modules: list[nn.Module], leaves: dict) -> Iterator[None]:
    """Run every plain ``nn.GroupNorm`` among ``modules`` as :func:`_folded_group_norm` while inside."""
    patched = []
    try:
        for m in modules:
            if type(m) is nn.GroupNorm and "forward" not in m.__dict__:  # no one else's override
                m.forward = lambda x, m=m: _folded_group_norm(m, leaves, x)
                patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward


def _affine_sq(pairs: list[tuple], b: int, ch: int, acc: torch.dtype, device) -> torch.Tensor:
    """Squared norms from a GroupNorm's per-example ``(∇γ, ∇β)`` of each call, each (B·C,) or None
    (not trainable); a module called several times has its calls' gradients added up."""
    sums = [None, None]
    for gs in pairs:
        for k, g in enumerate(gs):
            if g is not None:
                g = g.reshape(b, ch)
                sums[k] = g if sums[k] is None else sums[k] + g
    return _sq_sum(sums, b, acc, device)


def _norm_layer_sq(module: nn.Module, calls: list[_Call], grads: list[torch.Tensor], b: int,
                   acc: torch.dtype) -> torch.Tensor:
    """GroupNorm / LayerNorm, a few examples at a time.

    GroupNorm uses the statistics its forward saved when they were found
    (``_group_norm_saved_sq``). Otherwise, and for LayerNorm, whose statistics are
    per position and do not factor out of the spatial sum, the normalised input is
    recomputed per chunk, as follows.

    The normalised input is recomputed per chunk of about ``_NORM_CHUNK_BYTES``: the
    temporaries then stay in cache and the allocator reuses one small block for every
    chunk instead of mapping fresh pages for a batch-sized buffer, which on the test
    VM cost more than the arithmetic (LeNet's first GroupNorm, 256 points: 17 ms in
    one piece inside the tracker, ~2 ms chunked).
    """
    if isinstance(module, nn.GroupNorm) and all(c.stats is not None for c in calls):
        return _group_norm_saved_sq(module, calls, grads, b, acc)
    per_ex = sum(c.args[0][0].numel() for c in calls) * calls[0].args[0].element_size()
    step = max(1, min(b, _NORM_CHUNK_BYTES // max(per_ex, 1)))
    if step >= b:
        return _norm_layer_sq_chunk(module, calls, grads, b, acc)
    parts = []
    for s in range(0, b, step):
        sub = [_Call((c.args[0][s:s + step],), c.kwargs, c.edge, c.out_shape, c.versions) for c in calls]
        parts.append(_norm_layer_sq_chunk(module, sub, [g[s:s + step] for g in grads],
                                          min(step, b - s), acc))
    return torch.cat(parts)


def _norm_layer_sq_chunk(module: nn.Module, calls: list[_Call], grads: list[torch.Tensor], b: int,
                         acc: torch.dtype) -> torch.Tensor:
    gw = gb = None
    for c, g in zip(calls, grads):
        x = c.args[0]
        if isinstance(module, nn.GroupNorm):
            xhat = F.group_norm(x, module.num_groups, None, None, module.eps)
            shape = (b, module.num_channels, -1)   # per channel: sum over the spatial positions
            red = 2
        else:
            ns = tuple(module.normalized_shape)
            if x.dim() <= len(ns):
                raise ValueError("LayerNorm normalising over the batch dimension mixes examples; "
                                 "per-example gradients are undefined")
            xhat = F.layer_norm(x, ns, None, None, module.eps)
            shape = (b, -1, *ns)                  # per element of normalized_shape: sum over positions
            red = 1
        if module.weight is not None and module.weight.requires_grad:
            t = xhat.mul_(g).reshape(shape).sum(dim=red)   # xhat is this call's own buffer
            gw = t if gw is None else gw + t
        if module.bias is not None and module.bias.requires_grad:
            t = g.reshape(shape).sum(dim=red)
            gb = t if gb is None else gb + t
    return _sq_sum((gw, gb), b, acc, grads[0].device)


def _generic_sq(module: nn.Module, calls: list[_Call], grads: list[torch.Tensor], b: int,
                acc: torch.dtype) -> torch.Tensor:
    """Per-example VJPs of this module's own parameters (its children are held fixed and handled apart)."""
    names = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    params = tuple(getattr(module, n).detach() for n in names)
    summed: list[torch.Tensor] | None = None
    for c, g in zip(calls, grads):
        batched = [isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == b for a in c.args]

        def one(g_i, *args_i, c=c, batched=batched):
            full = tuple(a.unsqueeze(0) if bt else a for a, bt in zip(args_i, batched))
            _, pull = vjp(lambda *pv: functional_call(module, dict(zip(names, pv)), full, c.kwargs), *params)
            return pull(g_i.unsqueeze(0))

        try:
            per = vmap(one, in_dims=(0, *[0 if bt else None for bt in batched]), randomness="different")(g, *c.args)
        except Exception:  # untraceable by vmap (data-dependent control flow, .item(), ...): loop
            per = _generic_loop(module, names, c, g, b, batched)
        summed = list(per) if summed is None else [s + q for s, q in zip(summed, per)]
    total = torch.zeros(b, dtype=acc, device=grads[0].device)
    for t in summed or ():
        total += _sq(t, acc)
    return total


def _generic_loop(module, names, c: _Call, g, b, batched) -> list[torch.Tensor]:
    ps = [getattr(module, n) for n in names]
    rows = []
    with torch.enable_grad():
        for i in range(b):
            args_i = tuple(a[i:i + 1] if bt else a for a, bt in zip(c.args, batched))
            out = module(*args_i, **c.kwargs)
            gs = torch.autograd.grad(out, ps, g[i:i + 1], allow_unused=True)
            rows.append([torch.zeros_like(p) if q is None else q for p, q in zip(ps, gs)])
    return [torch.stack([r[k] for r in rows]) for k in range(len(ps))]


def _direct_method(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> str:
    """Which CPU kernel forms a conv layer's per-example gradients: "forward" or "wgrad"."""
    return "forward" if module.in_channels // module.groups <= _FORWARD_MAX_CIN else "wgrad"


# Per-group input channels up to which the forward-convolution route is used (see _direct_method).
_FORWARD_MAX_CIN = 1

# Bytes per CPU thread (each core has its own L2) of one chunk's inputs + output gradients +
# per-example gradients in _conv_direct_sq, by
# kernel (measured: the grouped weight-gradient kernel gains up to 2x from cache-sized chunks, the
# forward route loses a little).
_CHUNK_BYTES = {"forward": 8 << 20, "wgrad": 2 << 20}

# Bytes of one chunk of a norm layer's input in _norm_layer_sq.
_NORM_CHUNK_BYTES = 1 << 20

# Devices where direct conv norms use the grouped weight-gradient kernel; elsewhere unfold + bmm.
_WGRAD_DEVICES = frozenset({"cpu"})

_HANDLERS = {
    nn.Linear: _linear_sq,
    nn.Conv1d: _conv_sq,
    nn.Conv2d: _conv_sq,
    nn.GroupNorm: _norm_layer_sq,
    nn.LayerNorm: _norm_layer_sq,
}


class GradNormTracker:
    """Per-example gradient norms of a model, hooks registered once.

    ``tracker(x, y)`` -> ``NormResult``; ``close()`` (or leaving the ``with``
    block) removes the hooks. The hooks do nothing outside a call, so the model
    can be trained normally in between. The model's mode, parameters,
    ``.grad`` and Opacus ``.grad_sample`` are left unchanged.

    ``chunk_size`` bounds memory: the points are processed that many at a time
    (each chunk is moved to the model's device; results come back on ``x``'s).

    The modules owning parameters when the tracker is made are hooked; a
    module added later is not seen (make a new tracker). For an Opacus
    ``GradSampleModule`` the wrapped ``_module`` is hooked and run.
    """

    def __init__(self, model: nn.Module, chunk_size: int | None = None):
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        self.model = model
        self.module = _unwrap(model)
        self.chunk_size = chunk_size
        self._active = False
        self._closed = False
        self._calls: dict[nn.Module, list[_Call]] = {}
        # Every module owning parameters is hooked once; whether they are trainable is read at each
        # call, so freezing or unfreezing layers between calls is fine.
        owners = [m for m in self.module.modules() if next(m.parameters(recurse=False), None) is not None]
        self._handles = [m.register_forward_hook(self._record, with_kwargs=True) for m in owners]
        self._group_norms = [m for m in owners if type(m) is nn.GroupNorm]

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._calls = {}
        self._closed = True

    def __enter__(self) -> GradNormTracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- recording -------------------------------------------------------------------------------
    def _record(self, module, args, kwargs, output):
        if not self._active or not any(p.requires_grad for p in module.parameters(recurse=False)):
            return
        if not isinstance(output, torch.Tensor):
            self._calls.setdefault(module, []).append(None)  # not one tensor: whole-model path
            return
        saved = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        versions = tuple(a._version for a in saved if isinstance(a, torch.Tensor))
        edge = get_gradient_edge(output) if output.requires_grad else None
        self._calls.setdefault(module, []).append(_Call(saved, kwargs, edge, output.shape, versions))

    # -- computing -------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, loss: str = "cross_entropy") -> NormResult:
        if self._closed:
            raise RuntimeError("GradNormTracker is closed")
        if loss not in _LOSSES:
            raise ValueError(f"unknown loss {loss!r}; known: {', '.join(_LOSSES)}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
        for m in self.module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                raise ValueError(f"{type(m).__name__} in training mode mixes the examples of a batch: "
                                 "per-example gradients are undefined (use GroupNorm, or eval mode)")
        n = x.shape[0]
        step = self.chunk_size or max(n, 1)
        dev = next((p.device for p in self.module.parameters()), x.device)
        parts = []
        with opacus_hooks_off(self.module):
            for s in range(0, n, step):
                xc = x[s:s + step].to(dev, non_blocking=True)
                yc = y[s:s + step].to(dev, non_blocking=True)
                parts.append(self._chunk(xc, yc, _LOSSES[loss]))
        if not parts:  # no points
            return NormResult(torch.zeros(0, dtype=torch.float64, device=x.device),
                              torch.zeros(0, device=x.device), torch.zeros(0, 0, device=x.device))
        return NormResult(*(torch.cat([p[k] for p in parts]).to(x.device) for k in range(3)))

    def _chunk(self, x, y, loss_fn):
        acc = torch.float32 if x.device.type == "mps" else torch.float64
        b = x.shape[0]
        if self._tied_parameters():
            return self._whole_model(x, y, loss_fn, acc)
        self._calls = {}
        leaves: dict[nn.Module, list[tuple]] = {}  # GroupNorms run folded: their per-example γ, β copies
        try:
            with torch.enable_grad():
                self._active = True
                try:
                    with _folding_group_norms(self._group_norms, leaves):
                        logits = self.module(x)
                finally:
                    self._active = False
                losses = loss_fn(logits, y)
                if not self._layerwise_ok(b):
                    self._calls = {}
                    return self._whole_model(x, y, loss_fn, acc)
                # a GroupNorm every call of which ran folded takes its gradients from the copies
                folded = {m: ls for m, ls in leaves.items() if len(ls) == len(self._calls.get(m, ()))}
                mods = [m for m, cs in self._calls.items()
                        if m not in folded and any(c.edge is not None for c in cs)]
                for m in mods:  # before the backward frees them
                    if type(m) is nn.GroupNorm:
                        for c in self._calls[m]:
                            c.stats = _group_norm_stats(c.edge, b, m.num_groups)
                edges = [c.edge for m in mods for c in self._calls[m] if c.edge is not None]
                copies = [t for ls in folded.values() for pair in ls for t in pair if t is not None and t.requires_grad]
                inputs = edges + [get_gradient_edge(t) for t in copies]
                gs = (torch.autograd.grad(losses.sum(), inputs, allow_unused=True)
                      if inputs and losses.requires_grad else (None,) * len(inputs))
            total = torch.zeros(b, dtype=acc, device=x.device)
            with torch.no_grad():
                by_copy = dict(zip(map(id, copies), gs[len(edges):]))  # a frozen copy: no gradient, None
                for m, ls in folded.items():
                    pairs = [tuple(by_copy.get(id(t)) for t in pair) for pair in ls]
                    total += _affine_sq(pairs, b, m.num_channels, acc, x.device)
                k = 0
                for m in mods:
                    calls = [c for c in self._calls[m] if c.edge is not None]
                    grads = list(gs[k:k + len(calls)])
                    k += len(calls)
                    keep = [(c, g) for c, g in zip(calls, grads) if g is not None]  # unused outputs: no gradient
                    if not keep:
                        continue
                    for c, _ in keep:
                        if tuple(a._version for a in c.args if isinstance(a, torch.Tensor)) != c.versions:
                            raise RuntimeError(f"the input of {type(m).__name__} was modified in place after "
                                               "its forward; per-example norms need it unchanged")
                    calls, grads = [c for c, _ in keep], [g for _, g in keep]
                    total += _HANDLERS.get(type(m), _generic_sq)(m, calls, grads, b, acc)
        finally:
            self._calls = {}
        return total.sqrt(), losses.detach(), logits.detach()

    def _tied_parameters(self) -> bool:
        """A trainable parameter owned by two modules? Per-module norms would miss the cross terms."""
        owner: dict[int, nn.Module] = {}
        for m in self.module.modules():
            for p in m.parameters(recurse=False):
                if p.requires_grad and owner.setdefault(id(p), m) is not m:
                    return True
        return False

    def _layerwise_ok(self, b: int) -> bool:
        """Whether every recorded call fits the per-layer view (one tensor output, batch-first)."""
        for m, calls in self._calls.items():
            for c in calls:
                if c is None or len(c.out_shape) == 0 or c.out_shape[0] != b:
                    return False
                if any(isinstance(v, torch.Tensor) for v in c.kwargs.values()):
                    return False  # tensor keyword arguments: no way to tell which are per-example
                if type(m) in _HANDLERS:
                    a = c.args[0] if c.args else None
                    if (not isinstance(a, torch.Tensor) or a.dim() == 0 or a.shape[0] != b
                            or len(c.args) != 1 or c.kwargs):
                        return False
        return True

    def _whole_model(self, x, y, loss_fn, acc):
        """Whole-model per-example gradients: vmap(grad) over examples, a loop if vmap cannot trace."""
        module = self.module
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
        frozen = {n: p.detach() for n, p in module.named_parameters() if not p.requires_grad}
        buffers = dict(module.named_buffers())

        def loss_i(pv, x_i, y_i):
            out = functional_call(module, ({**pv, **frozen}, buffers), (x_i.unsqueeze(0),))
            l = loss_fn(out, y_i.unsqueeze(0))[0]
            return l, (l, out[0])

        try:
            gs, (losses, logits) = vmap(grad(loss_i, has_aux=True), in_dims=(None, 0, 0),
                                        randomness="different")(params, x, y)
            sq = sum((_sq(gs[n], acc) for n in names), torch.zeros(x.shape[0], dtype=acc, device=x.device))
        except Exception:  # untraceable by vmap: one example at a time
            ps = [p for _, p in module.named_parameters() if p.requires_grad]
            sq_l, loss_l, logit_l = [], [], []
            with torch.enable_grad():
                for i in range(x.shape[0]):
                    out = module(x[i:i + 1])
                    l = loss_fn(out, y[i:i + 1])[0]
                    g = torch.autograd.grad(l, ps, allow_unused=True) if ps else ()
                    sq_l.append(sum((q.to(acc).square().sum() for q in g if q is not None),
                                    torch.zeros((), dtype=acc, device=x.device)))
                    loss_l.append(l.detach())
                    logit_l.append(out[0].detach())
            sq, losses, logits = torch.stack(sq_l), torch.stack(loss_l), torch.stack(logit_l)
        return sq.sqrt(), losses.detach(), logits.detach()


def per_example_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, chunk_size: int | None = None,
                           loss: str = "cross_entropy") -> NormResult:
    """L2 norms of the per-example gradients of ``loss(model(x_i), y_i)`` w.r.t. all trainable parameters.

    One-shot form of ``GradNormTracker`` (hooks added and removed in this call).
    ``model`` may be a plain module or an Opacus ``GradSampleModule`` (its
    ``_module`` is used; Opacus's hooks are paused). See the module docstring.
    """
    with GradNormTracker(model, chunk_size=chunk_size) as tracker:
        return tracker(x, y, loss=loss)


__all__ = ["NormResult", "GradNormTracker", "opacus_hooks_off", "per_example_grad_norms"]
