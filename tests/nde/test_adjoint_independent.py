"""The adjoints in independent batch mode: every sample its own steps; gradients equal DirectAdjoint's."""

import pytest
import torch

import nde
from nde.solvers import RK4, AsynchronousLeapfrog, Dopri5, Reversible, ReversibleHeun, Tsit5


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
    "alf": (AsynchronousLeapfrog, dict(controller=nde.PIDController(rtol=1e-3, atol=1e-5))),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("saveat", ["t1", "ts"])
def test_independent_equals_direct(case, saveat):
    net, y0 = _setup()
    make, kw = CASES[case]
    sa = (lambda: nde.SaveAt(t1=True)) if saveat == "t1" else (
        lambda: nde.SaveAt(t0=True, ts=torch.linspace(0, 1.3, 6), t1=True))
    ref, sol = _grads(net, y0, make(), nde.DirectAdjoint(), sa(), **kw)
    if case in ("tsit5", "heun", "alf"):
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


def _per_sample_times(backwards=False):
    t0 = torch.linspace(-0.3, 0.2, 6, dtype=torch.float64)
    t1 = torch.linspace(1.0, 2.0, 6, dtype=torch.float64)
    ts = torch.stack([torch.linspace(float(a) + 0.1, float(b), 4, dtype=torch.float64) for a, b in zip(t0, t1)])
    if backwards:
        t0, t1, ts = t1, t0, ts.flip(-1)
    return t0.requires_grad_(True), t1.requires_grad_(True), ts


@pytest.mark.parametrize("backwards", [False, True])
@pytest.mark.parametrize("saveat", ["t1", "ts"])
def test_independent_backsolve_per_sample_times(saveat, backwards):
    # every sample's augmented solve runs on its own interval and stops at its own save times
    net, y0 = _setup()
    t0, t1, ts = _per_sample_times(backwards)
    sa = nde.SaveAt(t1=True) if saveat == "t1" else nde.SaveAt(t0=True, ts=ts, t1=True)

    def f(t, y, args):
        return net(y) * (1.5 + torch.tanh(y[..., :1])) * (1 + 0.1 * t)

    ctrl = nde.PIDController(rtol=1e-9, atol=1e-11)
    res = []
    for adj in (nde.DirectAdjoint(), nde.BacksolveAdjoint(), nde.BacksolveAdjoint(norm="rms")):
        sol = nde.solve(f, Tsit5(), t0, t1, y0, saveat=sa, adjoint=adj, controller=ctrl, batch_mode="independent")
        loss = (sol.ys**2).sum() + sol.ys.sum()
        res.append(torch.autograd.grad(loss, [y0, t0, t1, *net.parameters()]))
    for got in res[1:]:
        for g, r in zip(got, res[0]):
            assert _rel(g, r) < 1e-7, (g, r)  # measured 1e-9 to 4e-9
    assert adj.backward_stats["stops"] == (1 if saveat == "t1" else 6 * 4 + 1 - 6)  # shared s = 0 and 1


ADJOINTS = {
    "checkpoint": (lambda: nde.CheckpointAdjoint(), Tsit5, dict(controller=nde.PIDController(rtol=1e-7, atol=1e-9)), 1e-10),
    "backsolve": (lambda: nde.BacksolveAdjoint(), Tsit5, dict(controller=nde.PIDController(rtol=1e-10, atol=1e-12)), 1e-7),
    "reversible": (lambda: nde.ReversibleAdjoint(), lambda: Reversible(Tsit5()),
                   dict(controller=nde.PIDController(rtol=1e-7, atol=1e-9)), 1e-10),
    "reversible_heun": (lambda: nde.ReversibleAdjoint(), ReversibleHeun, dict(dt0=0.01), 1e-10),
}


@pytest.mark.parametrize("name", list(ADJOINTS))
@pytest.mark.parametrize("times", ["shared", "per_sample"])
def test_independent_gradients_wrt_args_t0_t1(name, times):
    make_adj, make_solver, kw, tol = ADJOINTS[name]
    net, y0 = _setup()
    if times == "shared":
        t0 = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        t1 = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    else:
        t0, t1, _ = _per_sample_times()
    args = torch.tensor([0.7, -0.3, 0.2], dtype=torch.float64, requires_grad=True)

    def f(t, y, a):
        return net(y) * (1 + a * torch.cos(t))

    sa = nde.SaveAt(ts=[0.4, 0.9], t1=True) if times == "shared" else nde.SaveAt(t1=True)
    res = []
    for adj in (nde.DirectAdjoint(), make_adj()):
        sol = nde.solve(f, make_solver(), t0, t1, y0, args=args, saveat=sa, adjoint=adj, batch_mode="independent", **kw)
        res.append(torch.autograd.grad((sol.ys**2).sum(), [y0, args, t0, t1]))
    for g, r in zip(res[1], res[0]):
        assert r.abs().max() > 0
        assert _rel(g, r) < tol, (name, g, r)


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


@pytest.mark.parametrize("adjoint", ["checkpoint", "reversible", "backsolve"])
def test_gradcheck_independent(adjoint):
    torch.manual_seed(0)
    w = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    t1 = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)

    def fn(y0, w_, t1_):
        adj = {"checkpoint": nde.CheckpointAdjoint, "reversible": nde.ReversibleAdjoint,
               "backsolve": nde.BacksolveAdjoint}[adjoint](params=[w_])
        solver = ReversibleHeun() if adjoint == "reversible" else RK4()
        sol = nde.solve(lambda t, y: torch.tanh(y @ w_), solver, 0.0, t1_, y0, dt0=0.05, adjoint=adj,
                        batch_mode="independent", saveat=nde.SaveAt(ts=[0.3], t1=True))
        return sol.ys

    if adjoint != "reversible":
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


def test_gradcheck_independent_backsolve_per_sample_end_times():
    torch.manual_seed(0)
    w = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    t1 = torch.tensor([0.5, 0.8, 1.0], dtype=torch.float64, requires_grad=True)
    ts = torch.tensor([[0.1, 0.3], [0.2, 0.4], [0.3, 0.5]], dtype=torch.float64)

    def fn(y0, w_, t1_):
        sol = nde.solve(lambda t, y: torch.tanh(y @ w_) * (1 + t), RK4(), 0.0, t1_, y0, dt0=0.025,
                        adjoint=nde.BacksolveAdjoint(params=[w_]), batch_mode="independent",
                        saveat=nde.SaveAt(ts=ts, t1=True))
        return sol.ys

    assert torch.autograd.gradcheck(fn, (y0, w, t1), atol=1e-5, rtol=1e-4)
