import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from nde.models.deq import DEQ, DEQInfo, MonotoneDEQ
from nde.solvers.fixed_point import Anderson, Broyden, FixedPointWarning


def rings(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.where(torch.arange(n) % 2 == 0, 1.0, 2.0)
    theta = 2 * torch.pi * torch.rand(n, generator=g)
    x = torch.stack([r * theta.cos(), r * theta.sin()], dim=1) + 0.1 * torch.randn(n, 2, generator=g)
    y = (torch.arange(n) % 2).long()
    return x, y


class TanhCell(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.lin = nn.Linear(hidden, hidden)

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


def train(model, x, y, steps=150, lr=1e-2):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("backward", ["implicit", "phantom", "jfb"])
def test_deq_learns_rings(backward):
    torch.manual_seed(0)
    x, y = rings()
    h = 16
    deq = DEQ(TanhCell(h), backward=backward, norm="spectral", rtol=1e-4, atol=1e-6, max_steps=40)
    model = nn.Sequential(nn.Linear(2, h), deq, nn.Linear(h, 2))
    acc = train(model, x, y)
    assert acc >= 0.98, acc
    assert deq.last_info.result.all_converged


def test_monotone_deq_learns_rings():
    torch.manual_seed(0)
    x, y = rings()
    model = nn.Sequential(MonotoneDEQ(2, 16, rtol=1e-4, atol=1e-6, max_steps=60), nn.Linear(16, 2))
    acc = train(model, x, y, steps=200)
    assert acc >= 0.98, acc


def test_monotone_deq_unique_equilibrium():
    torch.manual_seed(1)
    deq = MonotoneDEQ(3, 12, m=0.2, solver=Anderson(rtol=0, atol=1e-12, max_steps=300)).double()
    with torch.no_grad():
        deq.cell.A.mul_(3.0)  # a strongly coupled W: the guarantee does not depend on scale
        deq.cell.B.mul_(3.0)
    x = torch.randn(5, 3, dtype=torch.float64)
    z1 = deq(x)
    z2 = deq(x, z0=10 * torch.randn(5, 12, dtype=torch.float64))
    torch.testing.assert_close(z1, z2, rtol=0, atol=1e-9)
    # it solves the equilibrium equation z = relu(W z + U x + b)
    torch.testing.assert_close(deq.cell(z1, x), z1, rtol=0, atol=1e-9)
    W = deq.cell.weight().detach()
    sym = 0.5 * ((torch.eye(12, dtype=W.dtype) - W) + (torch.eye(12, dtype=W.dtype) - W).T)
    assert torch.linalg.eigvalsh(sym).min() >= 0.2 - 1e-9
    # the splitting map's linear part (reflected resolvent) is a strict contraction
    R = torch.linalg.inv(torch.eye(12, dtype=W.dtype) + deq.cell.alpha * (torch.eye(12, dtype=W.dtype) - W))
    assert torch.linalg.matrix_norm(2 * R - torch.eye(12, dtype=W.dtype), ord=2) < 1


def test_implicit_gradient_of_deq_module_matches_unrolled():
    torch.manual_seed(2)
    cell = TanhCell(8).double()
    with torch.no_grad():
        cell.lin.weight.mul_(0.6 / torch.linalg.matrix_norm(cell.lin.weight, ord=2))
    x = torch.randn(4, 8, dtype=torch.float64)
    tight = dict(rtol=0, atol=1e-13, max_steps=500, throw=True)
    grads = []
    for backward in ("implicit", "unrolled"):
        deq = DEQ(cell, solver=Broyden(**tight), backward=backward, backward_solver="gmres", rtol=1e-12, atol=1e-13)
        loss = deq(x).pow(2).sum()
        grads.append(torch.autograd.grad(loss, cell.lin.weight)[0])
    assert (grads[0] - grads[1]).abs().max() <= 1e-6


def test_info_jacobian_loss_and_norms():
    torch.manual_seed(3)
    deq = DEQ(TanhCell(6), norm="spectral", jacobian_samples=2)
    assert parametrize.is_parametrized(deq.cell.lin, "weight")
    x = torch.randn(7, 6)
    z, info = deq(x, return_info=True)
    assert isinstance(info, DEQInfo) and info is deq.last_info
    assert info.result.iterations.shape == (7,) and info.result.converged.all()
    assert info.jacobian_loss.ndim == 0 and info.jacobian_loss.requires_grad
    (info.jacobian_loss + z.sum()).backward()
    assert deq.cell.lin.parametrizations.weight.original.grad is not None
    # spectral normalisation: the layer is (about) 1-Lipschitz
    assert abs(torch.linalg.matrix_norm(deq.cell.lin.weight.detach(), ord=2).item() - 1) < 0.2
    deq.eval()
    _, info = deq(x, return_info=True)
    assert info.jacobian_loss is None
    wdeq = DEQ(TanhCell(6), norm="weight", state_shape=(6,))
    assert parametrize.is_parametrized(wdeq.cell.lin, "weight")
    assert wdeq(torch.randn(3, 6)).shape == (3, 6)


def test_errors():
    with pytest.raises(ValueError, match="norm"):
        DEQ(TanhCell(3), norm="batch")
    with pytest.raises(ValueError, match="backward"):
        DEQ(TanhCell(3), backward="adjoint")
    with pytest.raises(TypeError, match="cell"):
        DEQ(3)
    with pytest.raises(ValueError, match="m"):
        MonotoneDEQ(2, 4, m=0.0)


class ConvCell(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, z, x):
        return torch.tanh(self.conv(z) + x)


def test_convolutional_deq_image_state():
    torch.manual_seed(4)
    cell = ConvCell(3).double()
    with torch.no_grad():
        cell.conv.weight.mul_(0.3)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    tight = dict(rtol=0, atol=1e-12, max_steps=300, throw=True)
    grads = []
    for backward in ("implicit", "unrolled"):
        deq = DEQ(cell, solver=Anderson(**tight), backward=backward)
        z, info = deq(x, return_info=True)
        assert z.shape == x.shape and info.result.converged.shape == (2,)
        torch.testing.assert_close(cell(z, x), z, rtol=0, atol=1e-10)
        grads.append(torch.autograd.grad(z.pow(2).sum(), cell.conv.weight)[0])
    assert (grads[0] - grads[1]).abs().max() <= 1e-6
    sdeq = DEQ(ConvCell(3), norm="spectral")
    assert parametrize.is_parametrized(sdeq.cell.conv, "weight")
    assert sdeq(torch.randn(2, 3, 5, 5)).shape == (2, 3, 5, 5)


def test_weight_norm_reparametrises_the_cell_and_trains():
    torch.manual_seed(5)
    x, y = rings()
    h = 16
    deq = DEQ(TanhCell(h), norm="weight", jacobian_samples=1, rtol=1e-4, atol=1e-6, max_steps=40)
    lin = deq.cell.lin
    g, v = lin.parametrizations.weight.original0, lin.parametrizations.weight.original1
    torch.testing.assert_close(lin.weight, g * v / v.norm(dim=1, keepdim=True))
    model = nn.Sequential(nn.Linear(2, h), deq, nn.Linear(h, 2))
    # the layer sees the normalised weight: scaling the direction v changes nothing
    out = model(x)
    with torch.no_grad():
        v.mul_(3.0)
    torch.testing.assert_close(model(x), out, rtol=0, atol=1e-5)
    g0, v0 = g.detach().clone(), (v / v.norm(dim=1, keepdim=True)).detach().clone()
    # weight normalisation does not bound the Lipschitz constant: the Jacobian regulariser keeps the
    # equilibrium well posed while the cell trains
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FixedPointWarning)  # every equilibrium of training converges
        for _ in range(150):
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y) + 5.0 * deq.last_info.jacobian_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.98, acc
    # both the magnitude g and the direction v / ||v|| were trained through the implicit gradient
    assert (g.detach() - g0).abs().max() > 1e-2
    assert (v / v.norm(dim=1, keepdim=True) - v0).detach().abs().max() > 1e-2
