"""Checkpointed and continuous adjoints in joint batch mode: agreement with DirectAdjoint and gradcheck."""

import pytest
import torch

import nde
from nde.solvers import RK4, Dopri5, Heun, Tsit5


def _net(dim=3, width=8):
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(dim, width), torch.nn.Tanh(), torch.nn.Linear(width, dim)).double()


def _grads(adjoint, solver, net, y0, saveat, t0=0.0, t1=1.3, **kw):
    def f(t, y, args):
        return net(y) * (1 + 0.1 * t)

    sol = nde.solve(f, solver, t0, t1, y0, saveat=saveat, adjoint=adjoint, **kw)
    loss = (sol.ys**2).sum() + sol.ys.sum()
    g = torch.autograd.grad(loss, [y0, *net.parameters()])
    return torch.cat([x.flatten() for x in g]), sol


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


SAVEATS = {
    "t1": lambda: nde.SaveAt(t1=True),
    "ts": lambda: nde.SaveAt(t0=True, ts=torch.linspace(0.0, 1.3, 6), t1=True),
    "steps": lambda: nde.SaveAt(steps=True),
}
SOLVERS = {
    "tsit5": (Tsit5, dict(controller=nde.PIDController(rtol=1e-7, atol=1e-9))),
    "dopri5": (Dopri5, dict(controller=nde.PIDController(rtol=1e-6, atol=1e-8))),
    "rk4": (RK4, dict(dt0=0.05)),
    "heun": (Heun, dict(controller=nde.PIDController(rtol=1e-4, atol=1e-6))),
}


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("saveat", list(SAVEATS))
@pytest.mark.parametrize("checkpoints", [None, 1, 3])
def test_checkpoint_equals_direct(solver, saveat, checkpoints):
    net = _net()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    cls, kw = SOLVERS[solver]
    ref, sol_d = _grads(nde.DirectAdjoint(), cls(), net, y0, SAVEATS[saveat](), **kw)
    got, sol_c = _grads(nde.CheckpointAdjoint(checkpoints=checkpoints), cls(), net, y0, SAVEATS[saveat](), **kw)
    assert sol_c.stats["num_steps"] == sol_d.stats["num_steps"] > 2
    assert torch.equal(sol_c.ys, sol_d.ys)
    assert _rel(got, ref) < 1e-10


@pytest.mark.parametrize("solver", ["tsit5", "rk4"])
@pytest.mark.parametrize("saveat", ["t1", "ts"])
def test_backsolve_matches_direct(solver, saveat):
    net = _net()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    cls, kw = SOLVERS[solver]
    kw = dict(kw)
    if solver == "tsit5":
        kw["controller"] = nde.PIDController(rtol=1e-9, atol=1e-11)
    ref, _ = _grads(nde.DirectAdjoint(), cls(), net, y0, SAVEATS[saveat](), **kw)
    for norm in ("seminorm", "rms", "mixed"):
        adj = nde.BacksolveAdjoint(norm=norm)
        got, _ = _grads(adj, cls(), net, y0, SAVEATS[saveat](), **kw)
        assert _rel(got, ref) < (1e-7 if solver == "tsit5" else 1e-6)
        assert adj.backward_stats["nfe"] > 0


def test_seminorm_takes_fewer_steps():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                              torch.nn.Linear(64, 16))
    y0 = torch.randn(32, 16, requires_grad=True)
    nfes = {}
    for norm in ("seminorm", "rms"):
        adj = nde.BacksolveAdjoint(norm=norm)
        sol = nde.solve(lambda t, y: net(y), Dopri5(), 0.0, 5.0, y0, adjoint=adj,
                        controller=nde.PIDController(rtol=1e-6, atol=1e-6))
        (sol.ys**2).sum().backward()
        nfes[norm] = adj.backward_stats["nfe"]
    assert nfes["seminorm"] <= 0.9 * nfes["rms"], nfes


def test_backsolve_norms_and_first_steps():
    from nde._backsolve import _mixed, _rms_head

    x = torch.tensor([3.0, 4.0, 0.0, 1.0, 1.0, 1.0, 12.0])
    assert float(_rms_head(4)(x)) == pytest.approx((26 / 4) ** 0.5)  # y and a only
    assert float(_mixed([2, 2, 2, 1])(x)) == pytest.approx(12.0)  # torchdiffeq's default: the largest piece
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                              torch.nn.Linear(64, 16))
    y0 = torch.randn(32, 16, requires_grad=True)
    stats = {}
    for norm in ("seminorm", "rms", "mixed"):
        adj = nde.BacksolveAdjoint(norm=norm)
        sol = nde.solve(lambda t, y: net(y), Dopri5(), 0.0, 5.0, y0, adjoint=adj,
                        controller=nde.PIDController(rtol=1e-6, atol=1e-6), saveat=nde.SaveAt(ts=torch.linspace(0, 5, 11)))
        (sol.ys**2).sum().backward()
        stats[norm] = adj.backward_stats
    # each of the 10 stretches between outputs starts from the forward's step there and takes one step;
    # starting every stretch from the forward's shortened last step took 20 steps, 130 evaluations
    assert stats["seminorm"]["num_steps"] == 10 and stats["seminorm"]["nfe"] == 70, stats


@pytest.mark.parametrize("adjoint", ["checkpoint", "backsolve"])
@pytest.mark.parametrize("solver", [RK4, Tsit5])
def test_gradcheck_joint(adjoint, solver):
    torch.manual_seed(0)
    w = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    args = torch.randn(2, dtype=torch.float64, requires_grad=True)
    t0 = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    t1 = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)

    def f(t, y, a):
        return torch.tanh(y @ w) + a * torch.cos(t)

    def fn(y0, w_, a, t0, t1):
        adj = nde.CheckpointAdjoint(params=[w_]) if adjoint == "checkpoint" else nde.BacksolveAdjoint(params=[w_])
        g = (lambda t, y, aa: torch.tanh(y @ w_) + aa * torch.cos(t))
        sol = nde.solve(g, solver(), t0, t1, y0, dt0=0.04, args=a, adjoint=adj,
                        saveat=nde.SaveAt(ts=[0.3, 0.5], t1=True))
        return sol.ys

    # the time derivatives are those of the exact flow: finite differences of a fine fixed-step solve
    assert torch.autograd.gradcheck(fn, (y0, w, args, t0, t1), atol=1e-5, rtol=1e-4)
    del f


def test_gradients_backwards_in_time_and_wrt_times():
    net = _net(2, 6)
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    t0 = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    t1 = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)

    def f(t, y):
        return net(y) * torch.cos(t)

    ctrl = nde.PIDController(rtol=1e-10, atol=1e-12)
    res = {}
    for name, adj in (("checkpoint", nde.CheckpointAdjoint()), ("backsolve", nde.BacksolveAdjoint())):
        sol = nde.solve(f, Tsit5(), t0, t1, y0, adjoint=adj, controller=ctrl)
        res[name] = torch.stack(torch.autograd.grad((sol.ys**2).sum(), [t0, t1]))

    def loss(a, b):
        with torch.no_grad():
            return (nde.solve(f, Tsit5(), a, b, y0, controller=ctrl).ys ** 2).sum()

    eps = 1e-5
    fd = torch.stack([(loss(1 + eps, 0.2) - loss(1 - eps, 0.2)) / (2 * eps),
                      (loss(1.0, 0.2 + eps) - loss(1.0, 0.2 - eps)) / (2 * eps)])
    for v in res.values():
        assert torch.allclose(v, fd, rtol=1e-6, atol=1e-8)


def test_closure_parameters_found_and_errors():
    w = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    y0 = torch.randn(2, dtype=torch.float64)
    for adj in (nde.CheckpointAdjoint(), nde.BacksolveAdjoint()):
        sol = nde.solve(lambda t, y: torch.tanh(w @ y), RK4(), 0.0, 1.0, y0, dt0=0.1, adjoint=adj)
        (g,) = torch.autograd.grad(sol.ys.sum(), [w])
        sol = nde.solve(lambda t, y: torch.tanh(w @ y), RK4(), 0.0, 1.0, y0, dt0=0.1)
        (g_ref,) = torch.autograd.grad(sol.ys.sum(), [w])
        assert torch.allclose(g, g_ref, rtol=1e-4 if isinstance(adj, nde.BacksolveAdjoint) else 1e-10)
    with pytest.raises(ValueError, match="checkpoints"):
        nde.CheckpointAdjoint(checkpoints=0)
    with pytest.raises(ValueError, match="norm"):
        nde.BacksolveAdjoint(norm="l2")
    with pytest.raises(ValueError, match="dense"):
        nde.solve(lambda t, y: -y, RK4(), 0.0, 1.0, y0, dt0=0.1, saveat=nde.SaveAt(dense=True),
                  adjoint=nde.CheckpointAdjoint())


@pytest.mark.parametrize("mode", ["joint", "independent"])
def test_binomial_schedule_recomputation_bound(mode):
    import math

    from nde._checkpoint import default_checkpoints

    # count the vector-field evaluations of the real backward pass: every step is re-taken at most r
    # times with C(c - 1 + r, r) >= n (the initial state holds one of the c checkpoints)
    w = torch.randn(2, 2, dtype=torch.float64)
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    count = [0]

    def f(t, y):
        count[0] += 1
        return torch.tanh(y @ w)

    for n, c in ((100, 4), (1000, 12), (57, 2), (200, None)):
        adj = nde.CheckpointAdjoint(checkpoints=c)
        sol = nde.solve(f, RK4(), 0.0, 1.0, y0, dt0=1.0 / n, adjoint=adj, batch_mode=mode)
        count[0] = 0
        sol.ys.sum().backward()
        st = adj.backward_stats
        c = c or default_checkpoints(n)
        r = 1
        while math.comb(c - 1 + r, r) < n:
            r += 1
        # RK4: 4 evaluations a step, re-taken once without a graph per recomputation, once for its VJP
        assert count[0] == st["nfe"] == 4 * (st["recomputed_steps"] + n), (count[0], st)
        assert st["recomputed_steps"] <= r * n, (n, c, r, st)
        assert st["checkpoints"] == c and st["max_checkpoints"] <= c
        if n > c:
            assert st["recomputed_steps"] >= n - 1  # with fewer checkpoints than steps, states are rebuilt
    assert default_checkpoints(1000) == 45


def test_backsolve_with_an_implicit_solver():
    from nde.solvers import Kvaerno5

    A = torch.tensor([[-2.0, 1.0], [-1.0, -3.0]], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)

    def f(t, y):
        return A @ y + 0.1 * torch.sin(t)

    ctrl = nde.PIDController(rtol=1e-8, atol=1e-10)
    res = []
    for solver, adj in ((Tsit5(), nde.DirectAdjoint()), (Kvaerno5(), nde.BacksolveAdjoint())):
        sol = nde.solve(f, solver, 0.0, 2.0, y0, adjoint=adj, saveat=nde.SaveAt(ts=[0.5, 1.0, 2.0]), controller=ctrl)
        g = torch.autograd.grad((sol.ys**2).sum(), [y0, A])
        res.append(torch.cat([x.flatten() for x in g]))
    assert _rel(res[1], res[0]) < 1e-6


@pytest.mark.parametrize("name", ["Trapezoid", "TRBDF2", "SDIRK2"])
def test_backsolve_with_fixed_step_implicit_solvers_converges_at_second_order(name):
    # the backward solve reuses the forward's implicit solver, whose Newton Jacobian and first stage
    # must see the true augmented field (the adjoint and parameter channels included)
    import nde.solvers as solvers

    torch.manual_seed(0)
    A = (torch.randn(3, 3, dtype=torch.float64) * 0.5).requires_grad_(True)
    y0 = torch.randn(3, dtype=torch.float64)
    exact = torch.autograd.grad((torch.linalg.matrix_exp(A) @ y0).sum(), A)[0]
    errs = []
    for dt in (0.02, 0.01):
        sol = nde.solve(nde.ODETerm(lambda t, y: A @ y), getattr(solvers, name)(), 0, 1, y0, dt0=dt,
                        adjoint=nde.BacksolveAdjoint(params=[A]))
        errs.append(float((torch.autograd.grad(sol.ys[-1].sum(), A)[0] - exact).abs().max()))
    # before the fix: 8e-3 (Trapezoid), 6e-3 (TRBDF2) at dt = 0.02; now about 1e-4 and falling as dt^2
    assert errs[0] < 3e-4
    assert errs[0] / errs[1] > 3.0


def test_augmented_field_is_right_under_torch_func():
    from nde._backsolve import augmented_field
    from nde.solvers import _newton

    torch.manual_seed(0)
    A = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    f = augmented_field(nde.ODETerm(lambda t, y: torch.tanh(A @ y)), [A], None, (3,), 3)
    z, t = torch.randn(15, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    J, fz = _newton.jacobian(lambda x: f(t, x), z, "full")
    torch.testing.assert_close(fz, f(t, z), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(J, torch.autograd.functional.jacobian(lambda x: f(t, x), z), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["joint", "independent"])
def test_time_gradient_with_an_output_saved_at_t0(mode):
    # y(ts) at a fixed ts = t0 depends on t0 (dy/dt0 = -f there); only SaveAt(t0=True) is y0 whatever t0 is.
    # Before: Checkpoint, Backsolve and Reversible treated it as y0 (-11.80 instead of -16.11).
    from nde.solvers import Reversible

    net = _net()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    ctrl = nde.PIDController(rtol=1e-10, atol=1e-12)

    def f(t, y):
        return net(y) * (1 + 0.1 * t)

    def loss(t0, adj=None, solver=None, saveat=None):
        sol = nde.solve(f, solver or Tsit5(), t0, 1.0, y0, saveat=saveat, adjoint=adj or nde.DirectAdjoint(),
                        batch_mode=mode, controller=ctrl)
        return (sol.ys**2).sum()

    for saveat in (nde.SaveAt(ts=[0.1, 0.5, 1.0]), nde.SaveAt(t0=True, ts=[0.1, 0.5], t1=True)):
        res = []
        for adj, solver in ((nde.DirectAdjoint(), None), (nde.CheckpointAdjoint(), None), (nde.BacksolveAdjoint(), None),
                            (nde.ReversibleAdjoint(), Reversible(Tsit5()))):
            t0 = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
            res.append(float(torch.autograd.grad(loss(t0, adj, solver, saveat), t0)[0]))
        with torch.no_grad():  # one-sided: t0 - eps keeps ts inside [t0, t1]
            fd = (loss(0.1, saveat=saveat) - loss(0.1 - 1e-6, saveat=saveat)) / 1e-6
        for r in res:
            assert abs(r - float(fd)) < 1e-4 * abs(float(fd)), (res, float(fd))


def test_backsolve_options_for_odes():
    net = _net()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    tight = dict(controller=nde.PIDController(rtol=1e-11, atol=1e-13))
    ref, _ = _grads(nde.DirectAdjoint(), Tsit5(), net, y0, nde.SaveAt(t1=True), **tight)
    errs, nfes = {}, {}
    for name, adj in (("forward tolerances", nde.BacksolveAdjoint()),
                      ("loose", nde.BacksolveAdjoint(rtol=1e-4, atol=1e-6)),
                      ("heun", nde.BacksolveAdjoint(solver=Heun(), rtol=1e-6, atol=1e-8))):
        got, _ = _grads(adj, Tsit5(), net, y0, nde.SaveAt(t1=True), **tight)
        errs[name], nfes[name] = _rel(got, ref), adj.backward_stats["nfe"]
    assert errs["forward tolerances"] < 1e-9
    assert 1e-9 < errs["loose"] < 1e-3 and nfes["loose"] < nfes["forward tolerances"] / 2, (errs, nfes)
    assert errs["heun"] < 1e-5 and nfes["heun"] > nfes["loose"], (errs, nfes)  # a second-order backward solve
    # after fixed steps: without tolerances the backward solve takes the forward's steps; with them and an
    # adaptive backward solver it adapts
    fixed = dict(dt0=0.05)
    ref, _ = _grads(nde.DirectAdjoint(), RK4(), net, y0, nde.SaveAt(t1=True), **fixed)
    adj = nde.BacksolveAdjoint()
    got, _ = _grads(adj, RK4(), net, y0, nde.SaveAt(t1=True), **fixed)
    assert _rel(got, ref) < 1e-5 and adj.backward_stats["num_steps"] == 26
    adj = nde.BacksolveAdjoint(solver=Tsit5(), rtol=1e-10, atol=1e-12)
    got, _ = _grads(adj, RK4(), net, y0, nde.SaveAt(t1=True), **fixed)
    exact, _ = _grads(nde.DirectAdjoint(), Tsit5(), net, y0, nde.SaveAt(t1=True), **tight)
    assert _rel(got, exact) < 1e-8 and adj.backward_stats["num_steps"] != 26
    adj = nde.BacksolveAdjoint(rtol=1e-6)  # RK4 has no error estimate: its backward solve keeps fixed steps
    _grads(adj, RK4(), net, y0, nde.SaveAt(t1=True), **fixed)
    assert adj.backward_stats["num_steps"] == 26
    with pytest.raises(ValueError, match="rtol"):
        nde.BacksolveAdjoint(rtol=-1.0)
    with pytest.raises(TypeError, match="solver"):
        nde.BacksolveAdjoint(solver=Tsit5)
