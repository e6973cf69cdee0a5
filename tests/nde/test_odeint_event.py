"""nde.odeint_event / odeint(event_fn=...) against torchdiffeq, analytic event times and finite differences."""

import math

import pytest
import torch

import nde

torchdiffeq = pytest.importorskip("torchdiffeq")

F64 = torch.float64


class Ball(torch.nn.Module):
    """Height and velocity of a falling ball with linear drag-free gravity ``g``."""

    def __init__(self, g=9.81, dtype=F64):
        super().__init__()
        self.g = torch.nn.Parameter(torch.tensor(g, dtype=dtype))

    def forward(self, t, y):
        return torch.stack([y[1], -self.g * torch.ones_like(y[1])])


def ground(t, y):
    return y[0]


def fall_time(h, v, g=9.81):
    return (v + math.sqrt(v * v + 2 * g * h)) / g


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "dopri8"])
def test_bouncing_ball_event_time(method):
    f = Ball()
    y0 = torch.tensor([2.0, 1.0], dtype=F64)
    t_ev, sol = nde.odeint_event(f, y0, torch.tensor(0.0, dtype=F64), event_fn=ground, method=method,
                                 rtol=1e-9, atol=1e-10)
    assert abs(float(t_ev) - fall_time(2.0, 1.0)) < 1e-6
    assert sol.shape == (2, 2) and torch.equal(sol[0], y0)
    assert abs(float(sol[1, 0])) < 1e-8
    if method in ("dopri5", "dopri8"):  # (torchdiffeq's bosh3 interpolant misplaces this event)
        t_tdq, sol_tdq = torchdiffeq.odeint_event(f, y0, torch.tensor(0.0, dtype=F64), event_fn=ground,
                                                  method=method, rtol=1e-9, atol=1e-10)
        assert abs(float(t_ev) - float(t_tdq)) < 1e-6
        assert torch.allclose(sol, sol_tdq, atol=1e-6)


def test_float32_event():
    f = Ball(dtype=torch.float32)
    y0 = torch.tensor([2.0, 0.0])
    t_ev, sol = nde.odeint_event(f, y0, torch.tensor(0.0), event_fn=ground, rtol=1e-6, atol=1e-7)
    assert t_ev.dtype == torch.float32 and sol.dtype == torch.float32
    assert abs(float(t_ev) - fall_time(2.0, 0.0)) < 1e-5


@pytest.mark.parametrize("interface", ["odeint", "odeint_adjoint", "torchdiffeq"])
def test_event_time_gradient(interface):
    """d t_event / d (y0, g) against the analytic derivative and finite differences."""
    fn = {"odeint": nde.odeint, "odeint_adjoint": nde.odeint_adjoint, "torchdiffeq": torchdiffeq.odeint}[interface]
    f = Ball()
    y0 = torch.tensor([2.0, 1.0], dtype=F64, requires_grad=True)

    def event_time(y0):
        tol = 1e-8 if interface == "odeint_adjoint" else 1e-10
        t_ev, sol = nde.odeint_event(f, y0, torch.tensor(0.0, dtype=F64), event_fn=ground, odeint_interface=fn,
                                     rtol=tol, atol=tol)
        return t_ev, sol

    t_ev, sol = event_time(y0)
    gy, gg = torch.autograd.grad(t_ev, (y0, f.g), retain_graph=True)
    h, v, g = 2.0, 1.0, 9.81
    disc = math.sqrt(v * v + 2 * g * h)
    # t* = (v + disc) / g
    analytic = torch.tensor([1 / disc, (1 + v / disc) / g], dtype=F64)
    assert torch.allclose(gy, analytic, rtol=1e-6)
    d_g = -(v + disc) / g**2 + (h / disc) / g
    assert abs(float(gg) - d_g) < 1e-6
    eps = 1e-6
    fd = []
    for i in range(2):
        d = torch.zeros(2, dtype=F64)
        d[i] = eps
        with torch.no_grad():
            fd.append((float(event_time(y0.detach() + d)[0]) - float(event_time(y0.detach() - d)[0])) / (2 * eps))
    # (torchdiffeq bisects the event time only to atol, which limits its finite differences)
    assert torch.allclose(gy, torch.tensor(fd, dtype=F64), rtol=1e-3 if interface == "torchdiffeq" else 1e-5)
    # the state at the event carries the total derivative: the impact velocity -sqrt(v^2 + 2 g h)
    (gv,) = torch.autograd.grad(sol[1, 1], (y0,))
    assert torch.allclose(gv, torch.tensor([-g / disc, -v / disc], dtype=F64), rtol=1e-6)


def test_reverse_time_and_t0_gradient():
    f = Ball()
    y0 = torch.tensor([2.0, 1.0], dtype=F64)
    t0 = torch.tensor(1.0, dtype=F64, requires_grad=True)
    # backwards from t0: when was the ball last at height 0? (y(t) = 2 + (t - t0) - g/2 (t - t0)^2)
    t_ev, sol = nde.odeint_event(f, y0, t0, event_fn=ground, reverse_time=True, rtol=1e-10, atol=1e-10)
    g = 9.81
    back = (1.0 - math.sqrt(1.0 + 4 * g)) / g  # the negative root of 2 + s - g/2 s^2
    assert abs(float(t_ev) - (1.0 + back)) < 1e-7
    (gt0,) = torch.autograd.grad(t_ev, (t0,))
    assert abs(float(gt0) - 1.0) < 1e-6  # shifting the start shifts the event
    t_tdq, _ = torchdiffeq.odeint_event(f, y0, t0.detach(), event_fn=ground, reverse_time=True, rtol=1e-10, atol=1e-10)
    assert abs(float(t_ev) - float(t_tdq)) < 1e-7


def test_odeint_with_event_fn_and_tuple_state():
    def f(t, y):
        pos, vel = y
        return vel, -9.81 * torch.ones_like(vel)

    y0 = (torch.tensor([2.0], dtype=F64), torch.tensor([0.0], dtype=F64))
    t = torch.tensor([0.0, 1.0], dtype=F64)
    t_ev, (pos, vel) = nde.odeint(f, y0, t, event_fn=lambda t, y: y[0][0], rtol=1e-9, atol=1e-10)
    assert abs(float(t_ev) - fall_time(2.0, 0.0)) < 1e-7
    assert pos.shape == (2, 1) and abs(float(pos[1, 0])) < 1e-8
    t_tdq, (pos_tdq, vel_tdq) = torchdiffeq.odeint(f, y0, t, event_fn=lambda t, y: y[0][0], rtol=1e-9, atol=1e-10)
    assert abs(float(t_ev) - float(t_tdq)) < 1e-7
    assert torch.allclose(vel, vel_tdq, atol=1e-6)


def test_vector_event_fn_first_crossing_wins():
    f = Ball()
    y0 = torch.tensor([2.0, 3.0], dtype=F64)
    # height reaches 2.2 (rising) before it falls back through 0
    t_ev, _ = nde.odeint_event(f, y0, torch.tensor(0.0, dtype=F64),
                               event_fn=lambda t, y: torch.stack([y[0], y[0] - 2.2]), rtol=1e-10, atol=1e-10)
    s = (3.0 - math.sqrt(9.0 - 2 * 9.81 * 0.2)) / 9.81
    assert abs(float(t_ev) - s) < 1e-7


def test_fixed_step_event():
    f = Ball()
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    for interp in ("cubic", "linear"):
        t_ev, sol = nde.odeint_event(f, y0, torch.tensor(0.0, dtype=F64), event_fn=ground, method="rk4",
                                     options=dict(step_size=0.05, interp=interp))
        t_tdq, _ = torchdiffeq.odeint_event(f, y0, torch.tensor(0.0, dtype=F64), event_fn=ground, method="rk4",
                                            options=dict(step_size=0.05, interp=interp))
        # the event is located on torchdiffeq's interpolant between the grid points
        assert abs(float(t_ev) - float(t_tdq)) < 1e-8, interp
        if interp == "cubic":  # Kutta's rule and its cubic interpolant are exact on a parabola
            assert abs(float(t_ev) - fall_time(2.0, 0.0)) < 1e-9
        else:
            assert 1e-5 < abs(float(t_ev) - fall_time(2.0, 0.0)) < 1e-3


def test_no_event_raises():
    with pytest.raises(RuntimeError, match="No event"):
        nde.odeint_event(lambda t, y: torch.zeros_like(y), torch.ones(1, dtype=F64), torch.tensor(0.0, dtype=F64),
                         event_fn=lambda t, y: y[0] + 1.0)
    with pytest.raises(AssertionError, match=r"max_num_steps exceeded \(50>=50\)"):
        nde.odeint_event(lambda t, y: -y, torch.ones(1, dtype=F64), torch.tensor(0.0, dtype=F64),
                         event_fn=lambda t, y: y[0] + 1.0, options=dict(max_num_steps=50))
