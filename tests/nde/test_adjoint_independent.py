"""The adjoints in independent batch mode: every sample its own steps; gradients equal DirectAdjoint's."""

import pytest
import torch

import nde
from nde.solvers import RK4, Dopri5, Reversible, ReversibleHeun, Tsit5


def _setup():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    y0 = (torch.randn(6, 3, dtype=torch.float64) * torch.linspace(0.1, 3, 6, dtype=torch.float64)[:, None])
    return net, y0.requires_grad_(True)


def _grads(net, y0, solver, adjoint, saveat, t1=1.3, **kw):
    def f(t, y, args):
        return net(y) * (1.5 + torch.tanh(y[..., :1]))

    sol = nde.solve(f, solver, 0.0, t1, y0, saveat=saveat, adjoint=adjoint, batch_mode="independent", **kw)
    loss = (sol.ys**2).sum() + sol.ys.sum()
    g = torch.autograd.grad(loss, [y0, *net.parameters()])
    return torch.cat([x.flatten() for x in g]), sol


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


CASES = {
    "tsit5": (Tsit5, dict(controller=nde.PIDController(rtol=1e-7, atol=1e-9))),
    "rk4": (RK4, dict(dt0=0.05)),
    "heun": (ReversibleHeun, dict(controller=nde.PIDController(rtol=1e-5, atol=1e-7))),
    "rev_tsit5": (lambda: Reversible(Tsit5()), dict(controller=nde.PIDController(rtol=1e-6, atol=1e-8))),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("saveat", ["t1", "ts"])
def test_independent_equals_direct(case, saveat):
    net, y0 = _setup()
    make, kw = CASES[case]
    sa = (lambda: nde.SaveAt(t1=True)) if saveat == "t1" else (
        lambda: nde.SaveAt(t0=True, ts=torch.linspace(0, 1.3, 6), t1=True))
    ref, sol = _grads(net, y0, make(), nde.DirectAdjoint(), sa(), **kw)
    if case in ("tsit5", "heun"):
        assert len(set(sol.stats["num_steps"].tolist())) > 2  # samples really took different steps
    adjs = [nde.CheckpointAdjoint(), nde.CheckpointAdjoint(checkpoints=2 if case != "heun" else 6)]
    if make().reversible:
        adjs.append(nde.ReversibleAdjoint())
    for adj in adjs:
        got, sol2 = _grads(net, y0, make(), adj, sa(), **kw)
        assert torch.equal(sol2.ys, sol.ys)
        assert _rel(got, ref) <= 1e-10, adj


def test_independent_backsolve():
    net, y0 = _setup()
    ctrl = nde.PIDController(rtol=1e-9, atol=1e-11)
    ref, _ = _grads(net, y0, Tsit5(), nde.DirectAdjoint(), nde.SaveAt(ts=[0.4, 1.3]), controller=ctrl)
    got, _ = _grads(net, y0, Tsit5(), nde.BacksolveAdjoint(), nde.SaveAt(ts=[0.4, 1.3]), controller=ctrl)
    assert _rel(got, ref) < 1e-6
    with pytest.raises(ValueError, match="shared"):
        _grads(net, y0, Tsit5(), nde.BacksolveAdjoint(), nde.SaveAt(t1=True),
               t1=torch.linspace(1, 2, 6, dtype=torch.float64), controller=ctrl)


def test_independent_per_sample_end_times():
    net, y0 = _setup()
    t1 = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)
    ctrl = nde.PIDController(rtol=1e-6, atol=1e-8)
    ref, _ = _grads(net, y0, Dopri5(), nde.DirectAdjoint(), nde.SaveAt(t1=True), t1=t1, controller=ctrl)
    got, _ = _grads(net, y0, Dopri5(), nde.CheckpointAdjoint(), nde.SaveAt(t1=True), t1=t1, controller=ctrl)
    assert _rel(got, ref) <= 1e-10
    got, _ = _grads(net, y0, Reversible(Dopri5()), nde.ReversibleAdjoint(), nde.SaveAt(t1=True), t1=t1,
                    controller=ctrl)
    ref, _ = _grads(net, y0, Reversible(Dopri5()), nde.DirectAdjoint(), nde.SaveAt(t1=True), t1=t1, controller=ctrl)
    assert _rel(got, ref) <= 1e-10


@pytest.mark.parametrize("adjoint", ["checkpoint", "reversible"])
def test_gradcheck_independent(adjoint):
    torch.manual_seed(0)
    w = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    t1 = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)

    def fn(y0, w_, t1_):
        adj = nde.CheckpointAdjoint(params=[w_]) if adjoint == "checkpoint" else nde.ReversibleAdjoint(params=[w_])
        solver = RK4() if adjoint == "checkpoint" else ReversibleHeun()
        sol = nde.solve(lambda t, y: torch.tanh(y @ w_), solver, 0.0, t1_, y0, dt0=0.05, adjoint=adj,
                        batch_mode="independent", saveat=nde.SaveAt(ts=[0.3], t1=True))
        return sol.ys

    if adjoint == "checkpoint":
        # d/dt1 is the continuous-time derivative; a fourth-order solve matches finite differences
        assert torch.autograd.gradcheck(fn, (y0, w, t1), atol=1e-5, rtol=1e-4)
    else:
        assert torch.autograd.gradcheck(lambda a, b: fn(a, b, t1.detach()), (y0, w))


def test_per_sample_end_time_gradients():
    net, y0 = _setup()
    t1 = torch.tensor([0.5, 0.8, 1.0, 1.2, 0.7, 0.9], dtype=torch.float64, requires_grad=True)

    def f(t, y):
        return net(y)

    ctrl = nde.PIDController(rtol=1e-10, atol=1e-12)
    sol = nde.solve(f, Tsit5(), 0.0, t1, y0, controller=ctrl, adjoint=nde.CheckpointAdjoint(),
                    batch_mode="independent")
    (g,) = torch.autograd.grad((sol.ys**2).sum(), [t1])
    with torch.no_grad():
        y1 = sol.ys[-1]
        expect = (2 * y1 * net(y1)).sum(-1)  # d/dt1 of |y(t1)|^2 per sample
    assert torch.allclose(g, expect, rtol=1e-8, atol=1e-10)
