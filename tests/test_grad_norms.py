"""models.nets and models.grad_norms against independent references.

The reference for a per-example gradient norm is the naive loop: a deep copy of
the model, one ``backward()`` per example, the norm of the concatenated
``.grad``. In float32 the fast path must match it to 1e-5 relative; in float64
(where rounding cannot hide a wrong formula) to 1e-9.
"""

from __future__ import annotations

import copy
import math
import types
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpledger.models import grad_norms
from dpledger.models.grad_norms import (GradNormTracker, NormResult, _matmul_sq_norm, _use_ghost,
                               per_example_grad_norms)
from dpledger.models.nets import MODELS, ModelError, build_model

# (model, input shape, options): every model on 8x8 digits and 28x28 MNIST; ResNet narrow.
CASES = [
    ("logreg", (1, 8, 8), {}), ("logreg", (1, 28, 28), {}),
    ("mlp", (1, 8, 8), {}), ("mlp", (1, 28, 28), {}),
    ("lenet", (1, 8, 8), {}), ("lenet", (1, 28, 28), {}), ("lenet", (3, 32, 32), {}),
    ("resnet18", (3, 16, 16), {"width": 8}), ("resnet18", (1, 28, 28), {"width": 4}),
]


def case_id(name, shape, opts):
    return f"{name}-{'x'.join(map(str, shape))}" + "".join(f"-{k}{v}" for k, v in opts.items())


def naive_norms(model: nn.Module, x, y) -> torch.Tensor:
    """One backward per example on a copy: the textbook definition."""
    m = copy.deepcopy(model)
    out = []
    for i in range(x.shape[0]):
        m.zero_grad(set_to_none=True)
        F.cross_entropy(m(x[i:i + 1]), y[i:i + 1]).backward()
        sq = sum(p.grad.double().square().sum() for p in m.parameters() if p.grad is not None)
        out.append(torch.sqrt(torch.as_tensor(sq, dtype=torch.float64)))
    return torch.stack(out)


def hook_counts(model: nn.Module) -> list[int]:
    return [len(getattr(m, d)) for m in model.modules()
            for d in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks",
                      "_backward_hooks", "_backward_pre_hooks")]


def snapshot(model: nn.Module):
    return ([p.detach().clone() for p in model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            [m.training for m in model.modules()], hook_counts(model))


def assert_untouched(model: nn.Module, snap) -> None:
    params, grads, modes, hooks = snap
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p.detach(), q)
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None) == (g is None)
        if g is not None:
            assert torch.equal(p.grad, g)
    assert [m.training for m in model.modules()] == modes
    assert hook_counts(model) == hooks


def data(shape, n=6, k=10, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=dtype), torch.randint(0, k, (n,), generator=g)


# Direct conv routes: "forward" (grouped forward convolution), "wgrad" (grouped weight-gradient
# kernel), "chunked" (wgrad a few examples at a time), "unfold" (unfold + bmm, the GPU route).
ROUTES = ["forward", "wgrad", "chunked", "unfold"]


def force_route(monkeypatch, route: str) -> None:
    if route == "unfold":
        monkeypatch.setattr(grad_norms, "_WGRAD_DEVICES", frozenset())
    else:
        monkeypatch.setattr(grad_norms, "_FORWARD_MAX_CIN", 10 ** 9 if route == "forward" else 0)
    if route == "chunked":
        monkeypatch.setattr(grad_norms, "_CHUNK_BYTES", {"forward": 1, "wgrad": 1})   # one example a chunk


def check(model: nn.Module, x, y, rtol=1e-5, **kw) -> NormResult:
    r = per_example_grad_norms(model, x, y, **kw)
    ref = naive_norms(model, x, y)
    torch.testing.assert_close(r.norms.double(), ref, rtol=rtol, atol=0)
    return r


# ---------------------------------------------------------------------------------- models
@pytest.mark.parametrize("name", list(MODELS))
def test_models_validate_and_run_on_all_input_sizes(name):
    from opacus.validators import ModuleValidator

    opts = {"width": 8} if name == "resnet18" else {}
    for shape in [(1, 8, 8), (1, 28, 28), (3, 32, 32)]:
        model = build_model(name, shape, 10, seed=0, **opts)
        assert ModuleValidator.validate(model, strict=True) == []
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_resnet18_is_resnet18():
    model = build_model("resnet18", (3, 32, 32), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(m.kernel_size == (3, 3) for m in convs) == 17  # stem + 8 blocks x 2
    assert sorted({m.out_channels for m in convs}) == [64, 128, 256, 512]
    assert all(m.num_groups == 32 for m in model.modules() if isinstance(m, nn.GroupNorm))
    assert 11.0e6 < sum(p.numel() for p in model.parameters()) < 11.3e6  # ResNet-18: ~11.2M


def test_seed_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = build_model("lenet", (1, 28, 28), 10, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = build_model("lenet", (1, 28, 28), 10, seed=3)
    c = build_model("lenet", (1, 28, 28), 10, seed=4)
    for p, q, r in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))


def test_build_model_errors_name_the_problem():
    with pytest.raises(ModelError, match="unknown model 'vgg'; known models: logreg, mlp, lenet, resnet18"):
        build_model("vgg", (1, 8, 8), 10)
    with pytest.raises(ModelError, match="no option width"):
        build_model("mlp", (1, 8, 8), 10, width=8)
    with pytest.raises(ModelError, match="at least 4x4"):
        build_model("lenet", (1, 3, 3), 10)
    with pytest.raises(ModelError, match="input_shape"):
        build_model("mlp", (8, 8), 10)
    with pytest.raises(ModelError, match="num_classes"):
        build_model("mlp", (1, 8, 8), 1)


# --------------------------------------------------------------------- norms of every model
@pytest.mark.parametrize("name,shape,opts", CASES, ids=[case_id(*c) for c in CASES])
def test_norms_match_naive_loop(name, shape, opts):
    model = build_model(name, shape, 10, seed=1, **opts)
    x, y = data(shape)
    # A stale .grad (as between Opacus's backward and step) must survive untouched.
    for p in list(model.parameters())[::2]:
        p.grad = torch.full_like(p, 0.5)
    snap = snapshot(model)
    r = check(model, x, y)
    assert r.norms.shape == r.losses.shape == (6,) and r.logits.shape == (6, 10)
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(r.logits, logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r.losses, F.cross_entropy(logits, y, reduction="none"), rtol=1e-5, atol=1e-6)
    assert not r.logits.requires_grad and not r.norms.requires_grad and not r.losses.requires_grad
    assert_untouched(model, snap)
    # The reusable tracker gives the same numbers, twice, and leaves nothing behind on close.
    with GradNormTracker(model) as tracker:
        assert hook_counts(model) != snap[3]
        for _ in range(2):
            torch.testing.assert_close(tracker(x, y).norms, r.norms, rtol=1e-6, atol=0)
    assert_untouched(model, snap)


F64_CASES = [("mlp", (1, 8, 8), {}), ("lenet", (1, 8, 8), {}), ("lenet", (1, 28, 28), {}),
             ("resnet18", (1, 8, 8), {"width": 4}), ("resnet18", (3, 16, 16), {"width": 8})]


@pytest.mark.parametrize("name,shape,opts", F64_CASES, ids=[case_id(*c) for c in F64_CASES])
def test_float64_matches_to_rounding(name, shape, opts):
    # In float64 only a wrong formula can miss (ResNet on 8x8 is too ill-conditioned for float32).
    model = build_model(name, shape, 10, seed=2, **opts).double()
    x, y = data(shape, dtype=torch.float64)
    r = per_example_grad_norms(model, x, y)
    assert r.norms.dtype == torch.float64
    torch.testing.assert_close(r.norms, naive_norms(model, x, y), rtol=1e-9, atol=0)


def test_eval_mode_is_kept_and_norms_still_match():
    model = build_model("lenet", (1, 28, 28), 10, seed=0).eval()
    x, y = data((1, 28, 28))
    snap = snapshot(model)
    check(model, x, y)
    assert_untouched(model, snap)
    assert not model.training


def test_frozen_parameters_are_left_out_and_unfreezing_is_seen():
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    x, y = data((1, 8, 8))
    with GradNormTracker(model) as tracker:
        model[1].weight.requires_grad_(False)
        model[3].requires_grad_(False)          # a whole layer: its module is still hooked
        frozen = tracker(x, y).norms
        torch.testing.assert_close(frozen.double(), naive_norms(model, x, y), rtol=1e-5, atol=0)
        model.requires_grad_(True)
        torch.testing.assert_close(tracker(x, y).norms.double(), naive_norms(model, x, y), rtol=1e-5, atol=0)
        assert (tracker(x, y).norms > frozen).all()


# ------------------------------------------------------------------- layer types and paths
@pytest.mark.parametrize("t,d,p", [(3, 40, 24), (50, 6, 5), (1, 8, 8)])
def test_ghost_and_direct_agree_with_explicit_per_example_gradients(t, d, p):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, t, d, generator=g, dtype=torch.float64)
    b = torch.randn(4, t, p, generator=g, dtype=torch.float64)
    ref = torch.einsum("ntp,ntd->npd", b, a).square().sum(dim=(1, 2))
    torch.testing.assert_close(_matmul_sq_norm(a, b, torch.float64), ref, rtol=1e-12, atol=0)


def test_cost_model_picks_ghost_for_small_maps_and_direct_for_large():
    assert _use_ghost(t=16, d=512 * 9, p=512)       # ResNet last stage on 32x32: 4x4 maps
    assert not _use_ghost(t=784, d=25, p=16)        # LeNet first conv on 28x28
    assert _use_ghost(t=1, d=784, p=256)            # T = 1: the ‖a‖²‖g‖² identity of a 2-D Linear


CONVS = {
    "stride2-pad-dilation": lambda: nn.Conv2d(3, 6, 3, stride=2, padding=2, dilation=2),
    "stride-rect-kernel": lambda: nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 0)),
    "ghost-regime": lambda: nn.Conv2d(3, 32, 3, stride=3),     # T=9 patches, D=27, P=32
    "groups": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
    "depthwise-no-bias": lambda: nn.Conv2d(3, 6, 3, groups=3, bias=False),
    "same-padding": lambda: nn.Conv2d(3, 4, 4, padding="same", dilation=2),
    "reflect": lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
    "circular-stride": lambda: nn.Conv2d(3, 4, 3, stride=2, padding=2, padding_mode="circular"),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kind", list(CONVS))
def test_conv2d_variants(kind, route, monkeypatch):
    # Direct norms use a grouped weight-gradient or forward convolution on CPU and unfold + bmm on GPUs:
    # test all here.
    force_route(monkeypatch, route)
    torch.manual_seed(0)
    conv = CONVS[kind]()
    c_in = conv.in_channels
    with torch.no_grad():
        out = conv(torch.zeros(1, c_in, 9, 9))
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(out[0].numel(), 5))
    x, y = data((c_in, 9, 9), k=5)
    check(model, x, y)
    check(model.double(), x.double(), y, rtol=1e-9)


@pytest.mark.parametrize("route", ROUTES)
def test_conv1d_and_layernorm_on_sequences(route, monkeypatch):
    force_route(monkeypatch, route)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(3, 8, 3, stride=2, padding=1),        # (B, 8, 10)
        nn.GroupNorm(2, 8), nn.ReLU(),
        nn.Flatten(), nn.Unflatten(1, (10, 8)),           # a (B, T=10, d=8) sequence
        nn.LayerNorm(8), nn.Linear(8, 16), nn.Tanh(),
        nn.LayerNorm((10, 16)), nn.Flatten(), nn.Linear(160, 4))
    x, y = data((3, 20), k=4)
    check(model, x, y)
    check(model.double(), x.double(), y, rtol=1e-9)


class SeqHead(nn.Module):
    """Linear layers on (B, T, d) and (B, T1, T2, d) inputs, then a mean over positions."""

    def __init__(self, d, p, k):
        super().__init__()
        self.lin = nn.Linear(d, p)
        self.lin4 = nn.Linear(p, p)
        self.out = nn.Linear(p, k)

    def forward(self, x):
        h = torch.tanh(self.lin(x))                                  # (B, T, p)
        h = self.lin4(h.view(h.shape[0], 2, -1, h.shape[-1]))        # (B, 2, T/2, p)
        return self.out(torch.tanh(h).mean(dim=(1, 2)))


@pytest.mark.parametrize("t,d,p", [(4, 24, 16), (40, 3, 4)], ids=["ghost", "direct"])
def test_sequence_linear(t, d, p):
    torch.manual_seed(0)
    model = SeqHead(d, p, 3)
    x, y = data((t, d), k=3)
    check(model, x, y)
    check(model.double(), x.double(), y, rtol=1e-9)


class Scale(nn.Module):
    """A raw nn.Parameter: no fast rule, so the per-module vmap(vjp) fallback."""

    def __init__(self, n):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, n))
        self.inner = nn.Linear(n, n)   # a child handled by the fast path, held fixed in the fallback

    def forward(self, x):
        return self.inner(x) * self.gain + x


class DataDependent(nn.Module):
    """A parameter behind data-dependent Python control flow: vmap cannot trace it, so a loop."""

    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, n) / n)

    def forward(self, x):
        h = x @ self.w
        return h if float(h.detach().sum()) > -1e9 else -h


class EmbedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.scale = Scale(6)
        self.dd = DataDependent(6)
        self.head = nn.Linear(6, 4)

    def forward(self, idx):
        return self.head(torch.tanh(self.dd(self.scale(self.emb(idx)))).mean(dim=1))


def test_fallback_modules_embedding_raw_parameter_untraceable():
    torch.manual_seed(0)
    model = EmbedNet()
    idx = torch.randint(0, 20, (5, 7))
    y = torch.randint(0, 4, (5,))
    snap = snapshot(model)
    check(model, idx, y)
    assert_untouched(model, snap)
    check(model.double(), idx, y, rtol=1e-9)


class Gain(nn.Module):
    """Only a raw parameter: the per-module fallback."""

    def __init__(self, n):
        super().__init__()
        self.g = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return x * self.g


class Shared(nn.Module):
    """Modules applied twice (their calls combined) or a weight tied across two modules (whole model)."""

    def __init__(self, tie: bool):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        if tie:
            self.b.weight = self.a.weight
        self.gain = Gain(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.a(torch.tanh(self.a(x)))) + self.b(x)
        return self.head(self.gain(torch.tanh(self.gain(h))))


@pytest.mark.parametrize("tie", [False, True], ids=["reused-modules", "tied-weights"])
def test_weight_sharing(tie):
    torch.manual_seed(0)
    model = Shared(tie)
    x, y = data((8,), k=3)
    check(model, x, y)
    check(model.double(), x.double(), y, rtol=1e-9)


class RecurrentConv(nn.Module):
    """One convolution applied twice: per-example gradients of both calls add up before the norm."""

    def __init__(self, c, stride):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=stride, padding=1)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        h = self.conv(torch.tanh(self.conv(x)))
        return self.head(h.mean(dim=(2, 3)))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("c,size,stride", [(4, 10, 1), (24, 6, 2)], ids=["direct", "ghost"])
def test_conv_applied_twice(c, size, stride, route, monkeypatch):
    force_route(monkeypatch, route)
    torch.manual_seed(0)
    model = RecurrentConv(c, stride)
    length = sum(math.ceil(size / stride ** k) ** 2 for k in (1, 2))   # output positions of both calls
    assert grad_norms._use_ghost(length, c * 9, c) == (stride == 2)
    x, y = data((c, size, size), k=3)
    check(model, x, y)
    check(model.double(), x.double(), y, rtol=1e-9)


class TwiceGroupNorm(nn.Module):
    """A GroupNorm applied twice (its per-example gradients of both calls add up), then a head."""

    def __init__(self, offset: float = 3.0):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.norm = nn.GroupNorm(4, 8)
        self.head = nn.Linear(8, 3)
        self.offset = offset

    def forward(self, x):
        h = self.norm(torch.tanh(self.norm(self.conv(x) + self.offset)))  # an offset: the centred form matters
        return self.head(h.mean(dim=(2, 3)))


@contextmanager
def _no_folding(modules, leaves):
    yield


@pytest.mark.parametrize("trainable", ["both", "weight", "bias"])
def test_group_norm_folded_saved_statistics_and_recomputed(trainable, monkeypatch):
    # Three routes for a GroupNorm: folded into the forward (per-example copies of γ, β), else the
    # statistics the forward saved, else recomputed. Each must match the naive loop, be the route
    # actually taken, and agree with the others. The module is called twice: its gradients add up.
    torch.manual_seed(0)
    model = TwiceGroupNorm()
    model.norm.weight.requires_grad_(trainable != "bias")
    model.norm.bias.requires_grad_(trainable != "weight")
    x, y = data((2, 6, 6), k=3)
    taken = []  # the GroupNorm routes called, and the gradient pairs formed
    for name in ("_group_norm_saved_sq", "_norm_layer_sq_chunk", "_affine_sq"):
        real = getattr(grad_norms, name)
        monkeypatch.setattr(grad_norms, name, lambda *a, real=real, name=name: taken.append(name) or real(*a))
    folded_result = check(model, x, y)
    folded = folded_result.norms
    assert torch.equal(folded_result.logits, model(x))  # the folded forward is the same computation
    check(model.double(), x.double(), y, rtol=1e-9)
    assert taken == ["_affine_sq"] * 2  # no handler: the backward left them on the copies
    model.float()
    monkeypatch.setattr(grad_norms, "_folding_group_norms", _no_folding)
    saved = check(model, x, y).norms
    check(model.double(), x.double(), y, rtol=1e-9)
    assert taken[2:] == ["_group_norm_saved_sq", "_affine_sq"] * 2
    model.float()
    monkeypatch.setattr(grad_norms, "_group_norm_stats", lambda *a: None)
    slow = check(model, x, y).norms
    assert taken[6:] and set(taken[6:]) == {"_norm_layer_sq_chunk"}
    torch.testing.assert_close(folded, saved, rtol=1e-6, atol=0)
    torch.testing.assert_close(folded, slow, rtol=1e-6, atol=0)
    assert "forward" not in model.norm.__dict__  # the fold is undone after each call


def test_group_norm_with_its_own_forward_override_is_not_folded(monkeypatch):
    # A GroupNorm whose forward someone else replaced keeps it: the tracker runs it, then uses the
    # saved-statistics route.
    torch.manual_seed(0)
    model = TwiceGroupNorm()
    seen = []

    def counted(self, x):
        seen.append(1)
        return nn.GroupNorm.forward(self, x)

    model.norm.forward = types.MethodType(counted, model.norm)  # bound: a deep copy binds to its copy
    x, y = data((2, 6, 6), k=3)
    taken = []
    real = grad_norms._group_norm_saved_sq
    monkeypatch.setattr(grad_norms, "_group_norm_saved_sq", lambda *a: taken.append(1) or real(*a))
    per_example_grad_norms(model, x, y)
    assert len(seen) == 2 and taken == [1] and "forward" in model.norm.__dict__
    check(model, x, y)


def test_group_norm_far_from_zero_as_precise_as_the_models_own_gradients(monkeypatch):
    # Both the folded and the saved-statistics routes form Σxg − μΣg, as PyTorch's own GroupNorm backward
    # does. A group mean 10^3 standard deviations from zero costs float32 digits in the forward already;
    # the tracker's norms must stay as close to a float64 reference as the plain per-example backward's
    # (a formula that cancelled worse, or statistics recomputed as E[x²] − E[x]², would not).
    torch.manual_seed(0)
    model = TwiceGroupNorm(offset=1e3)
    for p in (*model.conv.parameters(), *model.head.parameters()):
        p.requires_grad_(False)  # the GroupNorm's own gradients alone
    x, y = data((2, 6, 6), k=3)
    exact = naive_norms(model.double(), x.double(), y)
    model.float()
    own = ((naive_norms(model, x, y) - exact).abs() / exact).max()
    assert 1e-6 < own < 1e-4  # the forward's own float32 error at this offset
    for route in ("folded", "saved statistics"):
        if route == "saved statistics":
            monkeypatch.setattr(grad_norms, "_folding_group_norms", _no_folding)
        got = ((per_example_grad_norms(model, x, y).norms.double() - exact).abs() / exact).max()
        assert got <= 2 * own, route


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("trainable", ["weight", "bias"])
def test_conv_weight_or_bias_alone(trainable, route, monkeypatch):
    # The direct CPU routes sum the bias gradient from each chunk; a frozen weight or bias must leave
    # exactly its own part out.
    force_route(monkeypatch, route)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 49, 3))
    getattr(model[0], "bias" if trainable == "weight" else "weight").requires_grad_(False)
    x, y = data((1, 7, 7), k=3)
    check(model, x, y)
    check(model.double(), x.double(), y, rtol=1e-9)


def test_inplace_activation_after_a_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.Flatten(),
                          nn.Linear(4 * 36, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    x, y = data((1, 8, 8), k=3)
    check(model, x, y)


def test_batchnorm_in_training_mode_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 3))
    x, y = data((1, 8, 8), k=3)
    with pytest.raises(ValueError, match="BatchNorm2d in training mode"):
        per_example_grad_norms(model, x, y)
    check(model.eval(), x, y)  # in eval mode it is per-example (running statistics): the fallback


def test_chunked_equals_unchunked():
    model = build_model("lenet", (1, 28, 28), 10, seed=0)
    x, y = data((1, 28, 28), n=11)
    whole = per_example_grad_norms(model, x, y)
    for chunk in (1, 4, 11, 50):
        part = per_example_grad_norms(model, x, y, chunk_size=chunk)
        for k in ("norms", "losses", "logits"):
            torch.testing.assert_close(getattr(part, k), getattr(whole, k), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chunk_size"):
        GradNormTracker(model, chunk_size=0)


def test_bad_calls():
    model = build_model("logreg", (1, 8, 8), 10, seed=0)
    x, y = data((1, 8, 8))
    with pytest.raises(ValueError, match="unknown loss 'mse'"):
        per_example_grad_norms(model, x, y, loss="mse")
    with pytest.raises(ValueError, match="examples"):
        per_example_grad_norms(model, x, y[:3])
    tracker = GradNormTracker(model)
    tracker.close()
    with pytest.raises(RuntimeError, match="closed"):
        tracker(x, y)
    r = per_example_grad_norms(model, x[:0], y[:0])
    assert r.norms.shape == (0,)


# ------------------------------------------------------------------------------- Opacus
class WithCustom(nn.Module):
    """A small CNN with a module Opacus handles via functorch and we via the fallback."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(),
                                      nn.Flatten())
        self.gain = Scale(256)
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        return self.head(self.gain(self.features(x)))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing", "ignore:Secure RNG turned off")
@pytest.mark.parametrize("arch,wrap", [("lenet", True), ("custom", True), ("lenet", False)],
                         ids=["lenet", "custom", "lenet-hooks-only"])
def test_opacus_wrapped_model_between_backward_and_step(arch, wrap):
    from opacus import GradSampleModule, PrivacyEngine

    torch.manual_seed(0)
    shape = (1, 16, 16) if arch == "lenet" else (1, 8, 8)
    model = build_model("lenet", shape, 10, seed=0) if arch == "lenet" else WithCustom()
    reference = copy.deepcopy(model)  # a clean twin without Opacus's hooks, for the naive loop
    x_all, y_all = data(shape, n=64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_all, y_all), batch_size=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    private, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
        poisson_sampling=True, wrap_model=wrap)
    if wrap:
        assert isinstance(private, GradSampleModule) and private._module is model
    else:  # Opacus's hooks sit on the plain model, which is trained (and tracked) directly
        hooks, private = private, model
    tracked_x, tracked_y = x_all[:12], y_all[:12]
    opacus_hooks = hook_counts(model)
    with GradNormTracker(private, chunk_size=5) as tracker:
        tracker_hooks = hook_counts(model)
        steps = 0
        for xb, yb in loader:
            if len(xb) == 0:
                continue
            optimizer.zero_grad()
            F.cross_entropy(private(xb), yb).backward()
            grads = [p.grad.clone() for p in model.parameters()]
            samples = [p.grad_sample.clone() for p in model.parameters()]
            assert samples[0].shape[0] == len(xb)
            reference.load_state_dict(model.state_dict())
            ref = naive_norms(reference, tracked_x, tracked_y)
            for r in (tracker(tracked_x, tracked_y), per_example_grad_norms(private, tracked_x, tracked_y)):
                torch.testing.assert_close(r.norms.double(), ref, rtol=1e-5, atol=0)
            assert (private if wrap else hooks).hooks_enabled and hook_counts(model) == tracker_hooks
            for p, g, s in zip(model.parameters(), grads, samples):
                assert torch.equal(p.grad, g) and torch.equal(p.grad_sample, s)
            before = [p.detach().clone() for p in model.parameters()]
            optimizer.step()  # Opacus clips and noises exactly the batch it saw
            assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
            steps += 1
            if steps == 2:
                break
    assert steps == 2
    assert hook_counts(model) == opacus_hooks
