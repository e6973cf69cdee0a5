import math

import pytest
import torch

import nde
from nde._logsig import LogODETerm, logsig_windows, logsignature, logsignature_channels
from nde.solvers import RK4, Tsit5

D = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_logsignature_of_simple_paths():
    # first along e1 then along e2: increment (1, 1) and Levy area +1/2
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]], dtype=D)
    torch.testing.assert_close(logsignature(x, 2), torch.tensor([1.0, 1.0, 0.5], dtype=D))
    torch.testing.assert_close(logsignature(x.flip(-1), 2), torch.tensor([1.0, 1.0, -0.5], dtype=D))
    # a straight line has no area, whatever its sampling; area is additive over a closed loop (= enclosed area)
    line = torch.linspace(0, 1, 7, dtype=D).unsqueeze(-1) * torch.tensor([2.0, -1.0, 0.5], dtype=D)
    torch.testing.assert_close(logsignature(line, 2)[3:], torch.zeros(3, dtype=D))
    s = torch.linspace(0, 2 * math.pi, 2001, dtype=D)
    circle = torch.stack([torch.cos(s), torch.sin(s)], -1)
    assert abs(float(logsignature(circle, 2)[2]) - math.pi) < 1e-5
    assert logsignature_channels(4, 2) == 10 and logsignature_channels(4, 1) == 4
    with pytest.raises(ValueError, match="depth"):
        logsignature(x, 0)


def test_logsig_windows_depth_one_is_the_data_at_window_ends():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 21, 2, dtype=D, generator=g).cumsum(1)
    out = logsig_windows(x, 1, 5.0)
    assert out.shape == (3, 5, 2)
    torch.testing.assert_close(out, x[:, ::5])
    out2 = logsig_windows(x, 2, 5.0)
    assert out2.shape == (3, 5, 3)
    torch.testing.assert_close(out2[..., :2], x[:, ::5])
    torch.testing.assert_close(out2[:, 1, 2], logsignature(x[:, :6], 2)[:, 2])


def _field(hidden=4, channels=3, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(hidden, 16), torch.nn.Tanh(), torch.nn.Linear(16, hidden * channels)).to(D)
    return lambda s, z: torch.tanh(net(z)).view(*z.shape[:-1], hidden, channels)


def test_depth_one_equals_the_plain_cde_on_linear_paths():
    g = torch.Generator().manual_seed(1)
    t = torch.linspace(0, 3, 15, dtype=D)
    x = torch.cat([t.expand(2, 15).unsqueeze(-1), torch.randn(2, 15, 2, dtype=D, generator=g).cumsum(1)], -1)
    f = _field()
    z0 = torch.randn(2, 4, dtype=D)
    pid = nde.PIDController(rtol=1e-10, atol=1e-10)
    # one window a sample interval: each window is a piece of the linear path
    term = LogODETerm(f, x, depth=1, window_length=3 / 14, t=t)
    log = nde.solve(term, Tsit5(), t[0], t[-1], z0, controller=pid)
    # the plain CDE, solved by torchcde with its steps restarting at every knot from the right-hand limit
    torchcde = pytest.importorskip("torchcde")
    plain = torchcde.cdeint(torchcde.LinearInterpolation(x, t), lambda s, z: f(s, z), z0, t[[0, -1]], adjoint=False,
                            rtol=1e-10, atol=1e-10, options=dict(jump_t=t))[:, -1]
    torch.testing.assert_close(log.ys[-1], plain, rtol=1e-7, atol=1e-7)
    # a straight-line path: any window length gives the plain CDE
    line = torch.linspace(0, 2, 40, dtype=D).unsqueeze(-1) * torch.tensor([1.0, -0.5, 2.0], dtype=D)
    tl = torch.linspace(0, 2, 40, dtype=D)
    ref = nde.solve(nde.ControlTerm(f, nde.LinearInterpolation(line, tl)), Tsit5(), 0.0, 2.0, z0, controller=pid)
    for w in (0.3, 1.0):
        out = nde.solve(LogODETerm(f, line, depth=1, window_length=w, t=tl), Tsit5(), 0.0, 2.0, z0, controller=pid)
        torch.testing.assert_close(out.ys, ref.ys, rtol=1e-7, atol=1e-7)


def _long_problem(n):
    t = torch.linspace(0, 1, n + 1, dtype=D)
    s = t.unsqueeze(-1)
    x = torch.cat([s, torch.sin(2 * math.pi * 3 * s) + 0.3 * torch.cos(2 * math.pi * 11 * s), torch.cos(2 * math.pi * 5 * s)], -1)
    x = x * torch.tensor([[1.0], [0.5], [1.5]], dtype=D).unsqueeze(-1) ** torch.tensor([0.0, 1.0, 1.0], dtype=D)
    return t, x


def _saved_bytes(fn):
    total = [0]

    def pack(x):
        total[0] += x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return total[0]


@pytest.mark.parametrize("n", [pytest.param(1000), pytest.param(10000, marks=pytest.mark.slow)])
def test_long_series_depth_two_log_ode_takes_far_fewer_steps_at_similar_accuracy(n):
    t, x = _long_problem(n)
    h = 1.0 / n
    f = _field(hidden=4, channels=3, seed=2)
    z0 = torch.full((3, 4), 0.3, dtype=D)
    # reference: the CDE on the piecewise-linear path, every piece solved with 4 RK4 steps
    ref = nde.solve(LogODETerm(f, x, depth=1, window_length=h, t=t), RK4(), 0.0, 1.0, z0, dt0=h / 4).ys[-1]
    plain = nde.solve(nde.ControlTerm(f, nde.LinearInterpolation(x, t)), RK4(), 0.0, 1.0, z0, dt0=h)
    w = 32 * h
    log2 = nde.solve(LogODETerm(f, x, depth=2, window_length=w, t=t), RK4(), 0.0, 1.0, z0, dt0=w)
    log1 = nde.solve(LogODETerm(f, x, depth=1, window_length=w, t=t), RK4(), 0.0, 1.0, z0, dt0=w)
    err_plain = float((plain.ys[-1] - ref).abs().max())
    err2 = float((log2.ys[-1] - ref).abs().max())
    err1 = float((log1.ys[-1] - ref).abs().max())
    assert plain.stats["num_steps"] >= 10 * log2.stats["num_steps"]
    assert err_plain < 1e-8, err_plain  # RK4 on every knot of the piecewise-linear path is near exact
    # the plain CDE given the log-ODE's step budget is far less accurate than the log-ODE
    coarse = nde.solve(nde.ControlTerm(f, nde.LinearInterpolation(x, t)), RK4(), 0.0, 1.0, z0, dt0=w,
                       controller=nde.ConstantStepSize(land_on_jumps=False))
    err_coarse = float((coarse.ys[-1] - ref).abs().max())
    assert coarse.stats["num_steps"] == log2.stats["num_steps"]
    assert err2 < err_coarse / 5 and err2 < 2e-3, (err2, err_coarse)
    # at the log-ODE's accuracy the plain CDE needs a step on every knot: with steps over two pieces
    # (half the steps) it is already less accurate
    half = nde.solve(nde.ControlTerm(f, nde.LinearInterpolation(x, t)), RK4(), 0.0, 1.0, z0, dt0=2 * h,
                     controller=nde.ConstantStepSize(land_on_jumps=False))
    assert err2 < float((half.ys[-1] - ref).abs().max()), err2
    assert err2 < err1 / 5, (err1, err2)  # the Levy areas matter
    # peak autograd memory: what the backward pass keeps
    z = z0.clone().requires_grad_(True)
    mem_plain = _saved_bytes(lambda: nde.solve(nde.ControlTerm(f, nde.LinearInterpolation(x, t)), RK4(), 0.0, 1.0, z, dt0=h))
    mem_log = _saved_bytes(lambda: nde.solve(LogODETerm(f, x, depth=2, window_length=w, t=t), RK4(), 0.0, 1.0, z, dt0=w))
    assert mem_log < mem_plain / 3, (mem_log, mem_plain)


def test_log_ode_independent_mode_and_gradients():
    t, x = _long_problem(200)
    f = _field(hidden=3, channels=3, seed=3)
    z0 = torch.randn(3, 3, dtype=D)
    w = 0.05
    term = LogODETerm(f, x, depth=2, window_length=w, t=t)
    joint = nde.solve(term, RK4(), 0.0, 1.0, z0, dt0=w)
    term2 = LogODETerm(f, x, depth=2, window_length=w, t=t)
    ind = nde.solve(term2, RK4(), 0.0, 1.0, z0, dt0=w, batch_mode="independent")
    torch.testing.assert_close(ind.ys, joint.ys, rtol=1e-10, atol=1e-10)
    xs = x[:1, :11].clone().requires_grad_(True)
    z1 = z0[:1].clone().requires_grad_(True)

    def run(z, data):
        return nde.solve(LogODETerm(f, data, depth=2, window_length=0.025, t=t[:11]), RK4(), 0.0, float(t[10]), z,
                         dt0=0.025).ys[-1]

    assert torch.autograd.gradcheck(run, (z1, xs))


def test_logsignatures_agree_with_pysiglib_and_go_deeper_through_it():
    pysiglib = pytest.importorskip("pysiglib")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 9, 3, dtype=D, generator=g).cumsum(1)
    pysiglib.prepare_log_sig(3, 2, 1)
    torch.testing.assert_close(logsignature(x, 2), pysiglib.log_sig(x.contiguous(), 2, method=1), rtol=1e-12, atol=1e-12)
    deep = logsignature(x, 3)
    assert deep.shape == (4, logsignature_channels(3, 3)) == (4, 14)
    torch.testing.assert_close(deep[:, :6], logsignature(x, 2), rtol=1e-12, atol=1e-12)
    xr = x.clone().requires_grad_(True)
    logsignature(xr, 3).sum().backward()
    assert torch.isfinite(xr.grad).all() and xr.grad.abs().sum() > 0
    w = logsig_windows(x, 3, 4.0)
    assert w.shape == (4, 3, 14)
    torch.testing.assert_close(w[..., :6], logsig_windows(x, 2, 4.0), rtol=1e-12, atol=1e-12)


def test_log_ode_adjoints():
    t, x = _long_problem(100)
    x = x.clone().requires_grad_(True)
    f = _field(hidden=3, channels=3, seed=3)
    z0 = torch.randn(3, 3, dtype=D, requires_grad=True)

    def grads(adjoint, dt):
        sol = nde.solve(LogODETerm(f, x, depth=2, window_length=0.1, t=t), RK4(), 0.0, 1.0, z0, dt0=dt, adjoint=adjoint)
        return torch.autograd.grad(sol.ys[-1].pow(2).sum(), [z0, x])

    direct = grads(nde.DirectAdjoint(), 0.025)
    for a, b in zip(grads(nde.CheckpointAdjoint(), 0.025), direct):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the continuous adjoint differs from the discrete gradient by the discretisation error only
    for a, b in zip(grads(nde.BacksolveAdjoint(), 0.025), direct):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_depth_three_log_ode_converges_faster_than_depth_two():
    pytest.importorskip("pysiglib")
    # one window over a wiggly path: the log-ODE's error is local error of order (path size)^(depth + 1)
    t = torch.linspace(0, 1, 65, dtype=D)
    s = t.unsqueeze(-1)
    f = _field(hidden=3, channels=3, seed=5)
    z0 = torch.full((1, 3), 0.3, dtype=D)
    errs = {1: [], 2: [], 3: []}
    for scale in (0.5, 0.25):
        x = scale * torch.cat([s, torch.sin(2 * math.pi * 2 * s), torch.cos(2 * math.pi * 3 * s)], -1).unsqueeze(0)
        ref = nde.solve(nde.ControlTerm(f, nde.LinearInterpolation(x, t)), RK4(), 0.0, 1.0, z0, dt0=1 / 256).ys[-1]
        for depth in errs:
            y = nde.solve(LogODETerm(f, x, depth=depth, window_length=1.0, t=t), RK4(), 0.0, 1.0, z0, dt0=1 / 4).ys[-1]
            errs[depth].append(float((y - ref).abs().max()))
    orders = {d: math.log2(e[0] / e[1]) for d, e in errs.items()}
    for d in errs:
        assert d + 1 - 0.5 < orders[d] < d + 1 + 0.7, (errs, orders)
    assert errs[3][-1] < errs[2][-1] / 3 < errs[1][-1] / 9, errs
    # gradients reach the data through pysiglib
    xg = x.clone().requires_grad_(True)
    y = nde.solve(LogODETerm(f, xg, depth=3, window_length=0.5, t=t), RK4(), 0.0, 1.0, z0, dt0=1.0 / 2).ys[-1]
    (g,) = torch.autograd.grad(y.pow(2).sum(), xg)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
