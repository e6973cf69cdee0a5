"""Events in nde.solve: location against analytic times, per-sample events, gradients of event times."""

import math

import pytest
import torch

import nde
from nde._event import Event

G = 9.81
F64 = torch.float64


def ball(t, y, args):
    return torch.stack([y[..., 1], torch.full_like(y[..., 1], -G)], -1)


def fall_time(h, v):
    return (v + math.sqrt(v * v + 2 * G * h)) / G


def tight():
    return nde.PIDController(rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("solver", [nde.solvers.Tsit5(), nde.solvers.Dopri5(), nde.solvers.Bosh3()])
def test_bouncing_ball_joint(solver):
    y0 = torch.tensor([1.3, 0.4], dtype=F64)
    sol = nde.solve(ball, solver, 0.0, 5.0, y0, controller=tight(), event=Event(lambda t, y, a: y[0]))
    assert abs(float(sol.event_t) - fall_time(1.3, 0.4)) < 1e-6
    assert int(sol.result) == int(nde.RESULTS.event_occurred)
    assert bool(sol.event_mask)
    assert abs(float(sol.ys[-1, 0])) < 1e-8
    assert sol.success


def test_event_truncates_saved_outputs():
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    ts = torch.linspace(0, 2, 21, dtype=F64)
    sol = nde.solve(ball, nde.solvers.Tsit5(), 0.0, 2.0, y0, saveat=nde.SaveAt(ts=ts), controller=tight(),
                    event=Event(lambda t, y, a: y[0]))
    te = fall_time(1.0, 0.0)
    assert sol.ys.shape == (21, 2)
    before = ts < te
    exact = 1.0 - 0.5 * G * ts[before] ** 2
    assert torch.allclose(sol.ys[before, 0], exact, atol=1e-7)
    # after the event every output holds the state at the event
    assert torch.allclose(sol.ys[~before], sol.event_y.expand(int((~before).sum()), 2))


def test_bounces_by_restarting():
    """Several bounces with a coefficient of restitution: each restart begins at the event."""
    y = torch.tensor([1.0, 0.0], dtype=F64)
    t, e = 0.0, 0.8
    times = []
    for _ in range(4):
        sol = nde.solve(ball, nde.solvers.Tsit5(), t, t + 10.0, y, controller=tight(),
                        event=Event(lambda t, y, a: y[0], direction=-1))
        t = float(sol.event_t)
        times.append(t)
        y = torch.stack([torch.zeros((), dtype=F64), -e * sol.event_y[1]])
    expect, tt, v = [], 0.0, 0.0
    h = 1.0
    for _ in range(4):
        dt = fall_time(h, v)
        tt += dt
        expect.append(tt)
        v, h = e * (G * dt - v), 0.0
    assert max(abs(a - b) for a, b in zip(times, expect)) < 1e-6


def test_per_sample_events_independent():
    h = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=F64)
    v = torch.tensor([0.0, 0.0, 1.0, -1.0], dtype=F64)
    y0 = torch.stack([h, v], 1)
    sol = nde.solve(ball, nde.solvers.Tsit5(), 0.0, 0.6, y0, controller=tight(), batch_mode="independent",
                    event=Event(lambda t, y, a: y[:, 0]), saveat=nde.SaveAt(ts=torch.linspace(0, 0.6, 7, dtype=F64)))
    exact = torch.tensor([fall_time(a, b) for a, b in zip(h.tolist(), v.tolist())], dtype=F64)
    hit = exact < 0.6
    assert hit.tolist() == [True, False, True, True]
    assert sol.event_mask.tolist() == hit.tolist()
    assert torch.allclose(sol.event_t[hit], exact[hit], atol=1e-6, rtol=0)
    assert float(sol.event_t[~hit]) == 0.6
    assert sol.result.tolist() == [4, 0, 4, 4]
    # the sample without an event went on to t1 and matches the exact parabola
    assert abs(float(sol.ys[-1, 1, 0]) - (2.0 - 0.5 * G * 0.36)) < 1e-7
    assert torch.allclose(sol.ys[-1, hit, 0], torch.zeros(3, dtype=F64), atol=1e-8)


def test_event_time_gradient_matches_finite_differences_and_analytic():
    def event_time(y0):
        sol = nde.solve(ball, nde.solvers.Tsit5(), 0.0, 5.0, y0, controller=tight(), event=Event(lambda t, y, a: y[0] - 0.2))
        return sol.event_t

    y0 = torch.tensor([1.5, 0.7], dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(event_time(y0), y0)
    eps = 1e-6
    fd = []
    for i in range(2):
        d = torch.zeros(2, dtype=F64)
        d[i] = eps
        fd.append((float(event_time(y0.detach() + d)) - float(event_time(y0.detach() - d))) / (2 * eps))
    assert torch.allclose(g, torch.tensor(fd, dtype=F64), rtol=1e-5, atol=1e-7)
    disc = math.sqrt(0.7**2 + 2 * G * 1.3)
    analytic = [1 / disc, (1 + 0.7 / disc) / G]
    assert torch.allclose(g, torch.tensor(analytic, dtype=F64), rtol=1e-6)


def test_event_time_gradient_independent_and_through_parameters():
    k = torch.tensor(0.5, dtype=F64, requires_grad=True)

    def decay(t, y, args):
        return -k * y

    y0 = torch.tensor([[1.0], [2.0], [4.0]], dtype=F64, requires_grad=True)
    sol = nde.solve(decay, nde.solvers.Dopri5(), 0.0, 10.0, y0, controller=tight(), batch_mode="independent",
                    event=Event(lambda t, y, a: y[:, 0] - 0.5))
    exact = torch.log(y0.detach()[:, 0] / 0.5) / 0.5
    assert torch.allclose(sol.event_t, exact, atol=1e-6)
    gy, gk = torch.autograd.grad(sol.event_t.sum(), (y0, k))
    # t* = log(y0 / 0.5) / k
    assert torch.allclose(gy[:, 0], 1 / (0.5 * y0.detach()[:, 0]), rtol=1e-5)
    assert abs(float(gk) - float(-exact.sum() / 0.5)) < 1e-4


def test_nonterminal_records_every_crossing_and_directions():
    def osc(t, y):
        return torch.stack([y[1], -y[0]])

    y0 = torch.tensor([0.0, 1.0], dtype=F64)
    sol = nde.solve(osc, nde.solvers.Tsit5(), 0.0, 10.0, y0, controller=tight(), event=Event(lambda t, y: y[0], terminal=False))
    assert torch.allclose(sol.event_t, torch.tensor([math.pi, 2 * math.pi, 3 * math.pi], dtype=F64), atol=1e-6)
    assert int(sol.result) == 0 and abs(float(sol.ys[-1, 0]) - math.sin(10.0)) < 1e-7
    up = nde.solve(osc, nde.solvers.Tsit5(), 0.0, 10.0, y0, controller=tight(),
                   event=Event(lambda t, y: y[0], terminal=False, direction=1))
    assert torch.allclose(up.event_t, torch.tensor([2 * math.pi], dtype=F64), atol=1e-6)
    assert torch.allclose(up.event_y, torch.tensor([[0.0, 1.0]], dtype=F64), atol=1e-7)
    # several conditions: the first to cross wins
    both = nde.solve(osc, nde.solvers.Tsit5(), 0.0, 10.0, y0, controller=tight(),
                     event=Event(lambda t, y: torch.stack([y[0] - 0.5, y[1] + 0.5])))
    assert abs(float(both.event_t) - math.pi / 6) < 1e-6


def test_nonterminal_independent_is_padded():
    y0 = torch.tensor([[0.0, 1.0], [0.0, 2.0]], dtype=F64)
    w = torch.tensor([[1.0], [2.0]], dtype=F64)

    def osc(t, y, args):
        return torch.stack([y[:, 1], -(w[:, 0] ** 2) * y[:, 0]], 1)

    sol = nde.solve(osc, nde.solvers.Tsit5(), 0.0, 4.0, y0, controller=tight(), batch_mode="independent",
                    event=Event(lambda t, y, a: y[:, 0], terminal=False))
    assert sol.event_mask.tolist() == [[True, False], [True, True]]
    assert abs(float(sol.event_t[0, 0]) - math.pi) < 1e-6
    assert torch.allclose(sol.event_t[1], torch.tensor([math.pi / 2, math.pi], dtype=F64), atol=1e-6)
    assert math.isnan(float(sol.event_t[0, 1]))


def test_reversed_time_event():
    def osc(t, y):
        return torch.stack([y[1], -y[0]])

    sol = nde.solve(osc, nde.solvers.Tsit5(), 0.0, -10.0, torch.tensor([0.0, 1.0], dtype=F64), controller=tight(),
                    event=Event(lambda t, y: y[0] + 0.5))
    assert abs(float(sol.event_t) + math.asin(0.5)) < 1e-7
    assert abs(float(sol.ts[-1]) + math.asin(0.5)) < 1e-7


def test_time_dependent_condition_and_float32():
    y0 = torch.tensor([1.0], dtype=torch.float32)
    sol = nde.solve(lambda t, y: -y, nde.solvers.Tsit5(), 0.0, 5.0, y0, controller=nde.PIDController(1e-6, 1e-7),
                    event=Event(lambda t, y: y[0] - torch.exp(-2 * t) * 2))
    # exp(-t) = 2 exp(-2t)  <=>  t = log 2
    assert abs(float(sol.event_t) - math.log(2)) < 1e-5
    assert sol.ys.dtype == torch.float32


def test_no_event_reports_t1():
    sol = nde.solve(lambda t, y: -y, nde.solvers.Tsit5(), 0.0, 1.0, torch.ones(1, dtype=F64), event=Event(lambda t, y: y[0] + 1))
    assert not bool(sol.event_mask) and float(sol.event_t) == 1.0 and int(sol.result) == 0


def test_fixed_step_solver_event():
    sol = nde.solve(ball, nde.solvers.RK4(), 0.0, 2.0, torch.tensor([1.0, 0.0], dtype=F64), dt0=0.05,
                    event=Event(lambda t, y, a: y[0]))
    # RK4 is exact on a parabola, its cubic interpolant too
    assert abs(float(sol.event_t) - fall_time(1.0, 0.0)) < 1e-9


def test_event_errors():
    with pytest.raises(ValueError, match="direction"):
        Event(lambda t, y: y, direction=2)
    with pytest.raises(TypeError, match="callable"):
        Event(3.0)
    with pytest.raises(TypeError, match="terminal"):
        Event(lambda t, y: y, terminal="yes")
    with pytest.raises(ValueError, match="one value per sample"):
        nde.solve(lambda t, y: -y, nde.solvers.Tsit5(), 0.0, 1.0, torch.ones(3, 2, dtype=F64), batch_mode="independent",
                  event=Event(lambda t, y: y.sum()))


def test_event_time_gradient_through_a_learnable_threshold():
    level = torch.tensor(0.3, dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.0, 0.0], dtype=F64)  # y0 itself needs no gradient
    for mode, y in (("joint", y0), ("independent", y0.unsqueeze(0))):
        cond = (lambda t, y, a: y[0] - level) if mode == "joint" else (lambda t, y, a: y[:, 0] - level)
        sol = nde.solve(ball, nde.solvers.Tsit5(), 0.0, 5.0, y, controller=tight(), batch_mode=mode, event=Event(cond))
        (g,) = torch.autograd.grad(sol.event_t.sum(), (level,))
        # t* = sqrt(2 (1 - level) / G)
        assert abs(float(g) - (-1 / math.sqrt(2 * G * (1 - 0.3)))) < 1e-6
