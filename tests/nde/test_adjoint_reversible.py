"""ReversibleAdjoint: exact gradients through reconstructed states, fixed and adaptive steps."""

import pytest
import torch

import nde
from nde.solvers import RK4, AsynchronousLeapfrog, Dopri5, Reversible, ReversibleHeun, Tsit5


def _setup():
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(3, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).double()
    y0 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    return net, y0


CASES = {
    "heun_fixed": (ReversibleHeun, dict(dt0=0.02)),
    "heun_adaptive": (ReversibleHeun, dict(controller=nde.PIDController(rtol=1e-5, atol=1e-7))),
    "alf_fixed": (AsynchronousLeapfrog, dict(dt0=0.02)),
    "tsit5_adaptive": (lambda: Reversible(Tsit5()), dict(controller=nde.PIDController(rtol=1e-7, atol=1e-9))),
    "dopri5_adaptive": (lambda: Reversible(Dopri5()), dict(controller=nde.PIDController(rtol=1e-6, atol=1e-8))),
    "rk4_fixed": (lambda: Reversible(RK4(), coupling=0.9), dict(dt0=0.05)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("saveat", ["t1", "ts"])
def test_reversible_equals_direct(case, saveat):
    net, y0 = _setup()
    make, kw = CASES[case]

    def f(t, y, args):
        return net(y) * (1 + 0.2 * torch.sin(t))

    sa = nde.SaveAt(t1=True) if saveat == "t1" else nde.SaveAt(t0=True, ts=torch.linspace(0, 2.0, 7), t1=True)
    out = {}
    for name, adj in (("direct", nde.DirectAdjoint()), ("reversible", nde.ReversibleAdjoint())):
        sol = nde.solve(f, make(), 0.0, 2.0, y0, saveat=sa, adjoint=adj, **kw)
        loss = (sol.ys**2).sum() + sol.ys.sum()
        g = torch.autograd.grad(loss, [y0, *net.parameters()])
        out[name] = (torch.cat([x.flatten() for x in g]), sol)
        if name == "reversible":
            stats = adj.backward_stats
    ref, got = out["direct"][0], out["reversible"][0]
    assert out["direct"][1].stats["num_steps"] > 3
    assert torch.equal(out["direct"][1].ys, out["reversible"][1].ys)
    assert stats["reconstruction_error"] <= 1e-12
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-10


@pytest.mark.parametrize("solver", ["heun", "tsit5"])
def test_gradcheck_reversible(solver):
    torch.manual_seed(0)
    w = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def fn(y0, w_, a_):
        s = ReversibleHeun() if solver == "heun" else Reversible(Tsit5())
        sol = nde.solve(lambda t, y, aa: torch.tanh(y @ w_) + aa, s, 0.0, 1.0, y0, dt0=0.1, args=a_,
                        adjoint=nde.ReversibleAdjoint(params=[w_]), saveat=nde.SaveAt(ts=[0.25, 0.6], t1=True))
        return sol.ys

    assert torch.autograd.gradcheck(fn, (y0, w, a))


def test_reversible_backwards_in_time():
    net, y0 = _setup()
    res = []
    for adj in (nde.DirectAdjoint(), nde.ReversibleAdjoint()):
        sol = nde.solve(lambda t, y: net(y), ReversibleHeun(), 1.0, -0.5, y0, dt0=-0.01, adjoint=adj)
        (g,) = torch.autograd.grad(sol.ys.pow(2).sum(), [y0])
        res.append(g)
    assert torch.allclose(res[0], res[1], rtol=1e-10, atol=1e-13)


def test_reversible_and_checkpoint_on_an_sde():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    g = torch.nn.Linear(3, 3).double()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    bm = nde.BrownianInterval(0.0, 1.0, shape=(4, 3), dtype=torch.float64, seed=3)
    terms = nde.MultiTerm(nde.ODETerm(lambda t, y: net(y)),
                          nde.ControlTerm(lambda t, y: torch.tanh(g(y)), bm, noise="diagonal"))
    res = []
    for adj in (nde.DirectAdjoint(), nde.ReversibleAdjoint(), nde.CheckpointAdjoint(checkpoints=4)):
        sol = nde.solve(terms, ReversibleHeun(), 0.0, 1.0, y0, dt0=0.02, adjoint=adj,
                        saveat=nde.SaveAt(ts=torch.linspace(0, 1, 5)))
        gr = torch.autograd.grad((sol.ys**2).sum(), [y0, *net.parameters(), *g.parameters()])
        res.append(torch.cat([x.flatten() for x in gr]))
    for r in res[1:]:
        assert float((r - res[0]).abs().max() / res[0].abs().max()) < 1e-10


@pytest.mark.parametrize("noise", ["diagonal", "general", "additive", "scalar"])
def test_reversible_heun_sde_backward_is_fused(noise):
    # a MultiTerm's vector field is a tuple: its backward pass still costs one evaluation a step
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    g = torch.nn.Linear(3, 6).double()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    m = {"diagonal": 3, "scalar": 1}.get(noise, 2)
    bm = nde.BrownianInterval(0.0, 1.0, shape=(4, m), dtype=torch.float64, seed=3)

    def diffusion(t, y):
        if noise == "diagonal":
            return torch.tanh(g(y))[:, :3]
        if noise == "additive":
            return g.bias.reshape(3, 2).expand(4, 3, 2)
        if noise == "scalar":
            return torch.tanh(g(y))[:, :3, None]
        return torch.tanh(g(y)).reshape(4, 3, 2)

    terms = nde.MultiTerm(nde.ODETerm(lambda t, y: net(y) * (1 + t)), nde.ControlTerm(diffusion, bm, noise=noise))
    res, adj = [], nde.ReversibleAdjoint()
    for a in (nde.DirectAdjoint(), adj):
        sol = nde.solve(terms, ReversibleHeun(), 0.0, 1.0, y0, dt0=1 / 32, adjoint=a,
                        saveat=nde.SaveAt(ts=torch.tensor([0.0, 0.3, 0.5, 1.0])))
        gr = torch.autograd.grad((sol.ys**2).sum(), [y0, *net.parameters(), g.bias])
        res.append(torch.cat([x.flatten() for x in gr]))
    assert float((res[1] - res[0]).abs().max() / res[0].abs().max()) < 1e-12  # measured 5e-16
    assert adj.backward_stats["nfe"] == 32 + 1


def test_checkpoint_across_jump_times():
    net, y0 = _setup()
    res = []
    for adj in (nde.DirectAdjoint(), nde.CheckpointAdjoint()):
        sol = nde.solve(lambda t, y: net(y) * torch.sign(t - 0.5), Tsit5(), 0.0, 1.0, y0, adjoint=adj,
                        controller=nde.PIDController(rtol=1e-6, atol=1e-8, jump_ts=[0.5]))
        gr = torch.autograd.grad((sol.ys**2).sum(), [y0, *net.parameters()])
        res.append(torch.cat([x.flatten() for x in gr]))
    assert float((res[1] - res[0]).abs().max() / res[0].abs().max()) < 1e-10
    with pytest.raises(ValueError, match="jump_ts"):
        nde.solve(lambda t, y: net(y), ReversibleHeun(), 0.0, 1.0, y0, adjoint=nde.ReversibleAdjoint(),
                  controller=nde.PIDController(rtol=1e-4, atol=1e-6, jump_ts=[0.5]))


# f = net(y) - lam y on [0, 10]: reversing the steps amplifies errors exponentially (measured relative
# reconstruction errors of y0: about 1e-11 at lam = 1, 3e-5 to 7e-2 at lam = 2, 1e19 to 1e25 at lam = 5)
DISSIPATIVE = {
    "heun": (ReversibleHeun, dict(dt0=0.05)),
    "alf": (AsynchronousLeapfrog, dict(dt0=0.05)),
    "rk4": (lambda: Reversible(RK4()), dict(dt0=0.05)),
    "tsit5_adaptive": (lambda: Reversible(Tsit5()), dict(controller=nde.PIDController(rtol=1e-6, atol=1e-8))),
}


def _dissipative(case, lam, saveat=None, **extra):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    make, kw = DISSIPATIVE[case]
    adj = nde.ReversibleAdjoint(**extra)
    sol = nde.solve(lambda t, y: net(y) - lam * y, make(), 0.0, 10.0, y0, adjoint=adj,
                    saveat=saveat or nde.SaveAt(t1=True), **kw)
    return adj, lambda: torch.autograd.grad((sol.ys**2).sum(), [y0, *net.parameters()])


@pytest.mark.parametrize("case", list(DISSIPATIVE))
def test_unstable_reconstruction_warns_or_raises(case):
    import warnings

    adj, grad = _dissipative(case, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grad()
    assert adj.backward_stats["reconstruction_rel_error"] < 1e-9
    adj, grad = _dissipative(case, 2.0)
    with pytest.warns(RuntimeWarning, match=r"reconstructed the state at t=0 with a relative error of .*CheckpointAdjoint"):
        grad()
    assert 1e-6 < adj.backward_stats["reconstruction_rel_error"] < 1
    # the tolerance is the user's to set
    adj, grad = _dissipative(case, 2.0, reconstruction_tol=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grad()
    adj, grad = _dissipative(case, 5.0)
    with pytest.raises(RuntimeError, match="no correct digit|relative error of [0-9.]+e\\+"):
        grad()


def test_unstable_reconstruction_through_interpolated_outputs_and_independent_mode():
    # interpolated outputs take the generic reverse-step path; independent mode names the sample
    _, grad = _dissipative("rk4", 5.0, saveat=nde.SaveAt(ts=[2.525, 10.0]))
    with pytest.raises(RuntimeError, match="reconstructed"):
        grad()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor([0.0, 0.0, 2.0, 0.0], dtype=torch.float64)[:, None]
    sol = nde.solve(lambda t, y: net(y) - lam * y, ReversibleHeun(), 0.0, 10.0, y0, dt0=0.05,
                    adjoint=nde.ReversibleAdjoint(), batch_mode="independent")
    with pytest.warns(RuntimeWarning, match=r"\(sample 2\)"):
        torch.autograd.grad((sol.ys**2).sum(), [y0])


def test_reconstruction_monitor_checks_saved_step_ends():
    from nde._reversible_adjoint import ReconstructionMonitor

    T = [0.0, 1.0, 2.0, 3.0]
    per_step = [[], [(0, None)], [(1, None)]]
    ys = torch.tensor([[2.0, 1.0], [4.0, -4.0]])
    y0 = torch.tensor([1.0, 1.0])
    mon = ReconstructionMonitor(T, per_step, ys, y0, ys[1])
    mon.at(2, ys[1])  # the last step's end is the exact final state: not checked
    mon.at(1, torch.tensor([2.0, 1.5]))  # the saved state at t = 2, off by 0.5
    mon.at(0, torch.tensor([9.0, 9.0]))  # nothing saved at t = 1
    mon.finish(torch.tensor([1.0, 1.0 + 1e-9]))
    err, rel, t = mon.report()
    assert (err, rel, t) == (0.5, 0.25, 2.0)


@pytest.mark.parametrize("case", ["heun_fixed", "alf_fixed", "tsit5_adaptive"])
def test_reversible_gradients_wrt_times_and_args(case):
    # joint mode; d/dt0 and d/dt1 are the exact flow's (the same formula as DirectAdjoint's)
    net, y0 = _setup()
    make, kw = CASES[case]
    args = torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64, requires_grad=True)

    def f(t, y, a):
        return net(y) * (1 + a * torch.sin(t))

    res = []
    for adj in (nde.DirectAdjoint(), nde.ReversibleAdjoint()):
        t0 = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
        t1 = torch.tensor(1.8, dtype=torch.float64, requires_grad=True)
        sol = nde.solve(f, make(), t0, t1, y0, args=args, adjoint=adj, saveat=nde.SaveAt(ts=[0.5, 1.0], t1=True), **kw)
        res.append(torch.autograd.grad((sol.ys**2).sum(), [t0, t1, args, y0]))
    for g, r in zip(*res):
        assert r.abs().max() > 0
        assert float((g - r).abs().max() / r.abs().max()) < 1e-10


def test_time_gradients_are_the_flow_derivative_not_the_discrete_one():
    # documented: every adjoint returns dL/dt1 = <dL/dy(t1), f(t1, y(t1))> and dL/dt0 = -<a(t0), f(t0, y0)>;
    # finite differences of the coarse discrete solve differ from it by about 4e-4 relative
    torch.manual_seed(0)
    w = torch.randn(2, 2, dtype=torch.float64)
    y0 = torch.randn(3, 2, dtype=torch.float64)

    def f(t, y):
        return torch.tanh(y @ w) * (1 + t)

    def loss(a, b):
        with torch.no_grad():
            return float(nde.solve(f, ReversibleHeun(), a, b, y0, dt0=0.02).ys.sum())

    eps = 1e-6
    fd = [(loss(0.1 + eps, 0.9) - loss(0.1 - eps, 0.9)) / (2 * eps), (loss(0.1, 0.9 + eps) - loss(0.1, 0.9 - eps)) / (2 * eps)]
    for adj in (nde.DirectAdjoint(), nde.ReversibleAdjoint(), nde.CheckpointAdjoint()):
        t0 = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        t1 = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
        sol = nde.solve(f, ReversibleHeun(), t0, t1, y0, dt0=0.02, adjoint=adj)
        g0, g1 = torch.autograd.grad(sol.ys.sum(), [t0, t1])
        with torch.no_grad():
            flow1 = float(f(torch.tensor(0.9, dtype=torch.float64), sol.ys[-1]).sum())
        assert abs(float(g1) - flow1) < 1e-13
        for g, d in zip((g0, g1), fd):
            assert 1e-5 < abs(float(g) - d) / abs(d) < 1e-3
