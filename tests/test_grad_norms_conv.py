"""Every conv route of models.grad_norms against Opacus's per-sample gradients.

Direct per-example conv norms on CPU come from a grouped *forward* convolution
(input channels of a group as the batch, output gradients as the kernels) or
from the grouped weight-gradient kernel, a few examples at a time; the ghost
norm from unfolded patches where the cost model picks it; unfold + bmm on GPUs.
Each is forced here on small conv nets (stride, padding, dilation, groups,
bias or not, 1-d and 2-d) and compared with the norms of the per-example
gradients that ``opacus.GradSampleModule`` instantiates (an independent code
path: its own unfold/einsum grad samplers).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpledger.models import grad_norms
from dpledger.models.grad_norms import per_example_grad_norms

ROUTES = ["forward", "wgrad", "chunked", "ghost", "unfold"]


def force_route(monkeypatch, route: str) -> None:
    if route == "unfold":
        monkeypatch.setattr(grad_norms, "_WGRAD_DEVICES", frozenset())
        monkeypatch.setattr(grad_norms, "_use_ghost", lambda t, d, p: False)
    elif route == "ghost":
        monkeypatch.setattr(grad_norms, "_use_ghost", lambda t, d, p: True)
    else:
        monkeypatch.setattr(grad_norms, "_use_ghost", lambda t, d, p: False)
        monkeypatch.setattr(grad_norms, "_FORWARD_MAX_CIN", 10 ** 9 if route == "forward" else 0)
    if route == "chunked":
        monkeypatch.setattr(grad_norms, "_CHUNK_BYTES", {"forward": 1, "wgrad": 1})


def opacus_norms(model: nn.Module, x, y) -> torch.Tensor:
    from opacus import GradSampleModule
    gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        F.cross_entropy(gsm(x), y, reduction="sum").backward()
    sq = sum(p.grad_sample.reshape(x.shape[0], -1).double().square().sum(dim=1)
             for p in gsm.parameters() if p.requires_grad)
    return sq.sqrt()


CONV2D = {
    "first-layer-1ch": lambda: nn.Conv2d(1, 6, 5, padding=2),
    "stride2-pad1": lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1),
    "stride-dilation": lambda: nn.Conv2d(3, 5, 3, stride=2, padding=2, dilation=2),
    "rect-stride-dilation": lambda: nn.Conv2d(2, 4, (3, 2), stride=(2, 3), padding=(1, 0), dilation=(1, 2)),
    "groups-no-bias": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False),
    "depthwise": lambda: nn.Conv2d(3, 6, 3, groups=3),
    "stride3-uneven": lambda: nn.Conv2d(3, 4, 4, stride=3),       # output stops short of the input's end
}
CONV1D = {
    "1d-stride-pad": lambda: nn.Conv1d(3, 6, 4, stride=3, padding=2),
    "1d-groups-dilation-no-bias": lambda: nn.Conv1d(4, 8, 3, padding=2, dilation=2, groups=4, bias=False),
    "1d-first-layer": lambda: nn.Conv1d(1, 4, 5),
}


def net(conv: nn.Module, in_shape) -> nn.Module:
    with torch.no_grad():
        out = conv(torch.zeros(1, *in_shape))
    groups = 2 if out.shape[1] % 2 == 0 else 1
    return nn.Sequential(conv, nn.GroupNorm(groups, out.shape[1]), nn.Tanh(), nn.Flatten(),
                         nn.Linear(out[0].numel(), 5))


def data(shape, n=7, k=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=dtype), torch.randint(0, k, (n,), generator=g)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kind", [*CONV2D, *CONV1D])
def test_conv_routes_match_opacus_per_sample(kind, route, monkeypatch):
    force_route(monkeypatch, route)
    torch.manual_seed(0)
    conv = (CONV2D | CONV1D)[kind]()
    shape = (conv.in_channels, 11, 10) if isinstance(conv, nn.Conv2d) else (conv.in_channels, 23)
    model = net(conv, shape)
    x, y = data(shape)
    ours = per_example_grad_norms(model, x, y).norms.double()
    torch.testing.assert_close(ours, opacus_norms(model, x, y), rtol=1e-5, atol=0)
    m64 = model.double()
    ours64 = per_example_grad_norms(m64, x.double(), y).norms
    torch.testing.assert_close(ours64, opacus_norms(m64, x.double(), y), rtol=1e-9, atol=0)


@pytest.mark.parametrize("route", ROUTES)
def test_two_conv_net_with_frozen_first_layer(route, monkeypatch):
    """A frozen first conv: the second is still hooked; the frozen one is skipped."""
    force_route(monkeypatch, route)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 8, 3, stride=2, padding=1),
                          nn.Tanh(), nn.Flatten(), nn.Linear(8 * 5 * 5, 3))
    model[0].weight.requires_grad_(False)
    x, y = data((1, 10, 10), k=3)
    torch.testing.assert_close(per_example_grad_norms(model, x, y).norms.double(), opacus_norms(model, x, y),
                               rtol=1e-5, atol=0)


def test_default_routes_on_lenet_shapes():
    """The measured choice: forward convolution for one input channel a group, wgrad otherwise."""
    x, g = torch.zeros(2, 1, 28, 28), torch.zeros(2, 16, 28, 28)
    assert grad_norms._direct_method(nn.Conv2d(1, 16, 5, padding=2), x, g) == "forward"
    x, g = torch.zeros(2, 16, 14, 14), torch.zeros(2, 32, 14, 14)
    assert grad_norms._direct_method(nn.Conv2d(16, 32, 5, padding=2), x, g) == "wgrad"
    assert grad_norms._direct_method(nn.Conv2d(16, 32, 5, padding=2, groups=16), x, g) == "forward"
