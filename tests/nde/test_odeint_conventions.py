"""torchdiffeq's conventions that nde.odeint / nde.odeint_adjoint follow, call for call.

The backward pass's options and grids, adjoint norms, max_num_steps, unknown options, an event
at t0, the step callbacks and one-sided stages at step ends, each against torchdiffeq itself.
"""

import math
import warnings

import pytest
import torch

import nde
from nde._odeint_steps import MaxNumStepsExceeded

torchdiffeq = pytest.importorskip("torchdiffeq")

F64, F32 = torch.float64, torch.float32


class Linear(torch.nn.Module):
    """``dy/dt = A y + 0.1 sin t``, counting its evaluations."""

    def __init__(self):
        super().__init__()
        self.A = torch.nn.Parameter(torch.tensor([[-0.5, 1.0], [-1.0, -0.3]], dtype=F64))
        self.nfe = 0

    def forward(self, t, y):
        self.nfe += 1
        return y @ self.A.T + 0.1 * torch.sin(t)


def forward_backward(lib, t, **kw):
    """(forward NFE, backward NFE, gradient of y0 and A) of ``lib.odeint_adjoint``."""
    f = Linear()
    y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = lib.odeint_adjoint(f, y0, t, **kw)
        n_fwd = f.nfe
        grads = torch.autograd.grad((out * torch.arange(1.0, out.numel() + 1, dtype=F64).reshape(out.shape)).sum(),
                                    (y0, f.A))
    return n_fwd, f.nfe - n_fwd, torch.cat([g.reshape(-1) for g in grads])


T3 = torch.linspace(0.0, 1.0, 3, dtype=F64)
UNEVEN = torch.tensor([0.0, 0.001, 1.0], dtype=F64)


def five_points(func, y0, t):
    return torch.linspace(float(t[0]), float(t[-1]), 5, dtype=F64)


@pytest.mark.parametrize("t, kw", [
    (T3, dict(method="rk4", options=dict(step_size=0.1), adjoint_options=dict(step_size=0.5))),
    (T3, dict(method="rk4", options=dict(step_size=0.1))),  # adjoint_options inherited from options
    (UNEVEN, dict(method="euler")),
    (UNEVEN, dict(method="midpoint", options=dict(grid_constructor=five_points))),
    (UNEVEN.flip(0), dict(method="heun3", options=dict(step_size=0.3))),
    (T3, dict(method="dopri5", adjoint_method="rk4", adjoint_options=dict(step_size=0.5))),
    (T3, dict(method="rk4", options=dict(step_size=0.25), adjoint_method="euler", adjoint_options=dict(step_size=0.05))),
], ids=["rk4-steps", "inherited", "uneven-t", "grid-constructor", "reversed", "adaptive-then-fixed", "fixed-then-fixed"])
def test_backward_pass_steps_on_torchdiffeqs_grid(t, kw):
    ours = forward_backward(nde, t, **kw)
    theirs = forward_backward(torchdiffeq, t, **kw)
    assert ours[:2] == theirs[:2]
    # (the backward pass restarts from the forward states, which an adaptive method finds to its tolerance)
    assert float((ours[2] - theirs[2]).abs().max()) < (1e-6 if kw["method"] == "dopri5" else 1e-12)


def test_adaptive_adjoint_options_reach_the_backward_pass():
    steps = []

    class Recorded(Linear):
        def callback_step_adjoint(self, t0, y0, dt):
            steps.append(float(dt))

    kw = dict(rtol=1e-8, atol=1e-8)
    y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    t = torch.linspace(0.0, 2.0, 3, dtype=F64)
    for opts in (dict(max_step=0.05), dict(first_step=1e-4)):
        steps.clear()
        f = Recorded()
        out = nde.odeint_adjoint(f, y0, t, adjoint_options=opts, **kw)
        (g,) = torch.autograd.grad(out.sum(), (f.A,))
        f2 = Linear()
        (g_tdq,) = torch.autograd.grad(torchdiffeq.odeint_adjoint(f2, y0, t, adjoint_options=opts, **kw).sum(), (f2.A,))
        assert float((g - g_tdq).abs().max()) < 1e-6
        if "max_step" in opts:
            assert max(steps) <= 0.05 + 1e-15 and len(steps) >= 40
        else:
            assert abs(steps[0] - 1e-4) < 1e-15
    # a step_t of the backward pass (in the user's time): steps land on it
    seen = []

    class Starts(Linear):
        def callback_accept_step_adjoint(self, t0, y0, dt):
            seen.append(float(t0))

    f = Starts()
    out = nde.odeint_adjoint(f, y0, t, adjoint_options=dict(step_t=torch.tensor([0.3, 1.7], dtype=F64)), **kw)
    out.sum().backward()
    assert any(abs(s - 1.7) < 1e-12 for s in seen) and any(abs(s - 0.3) < 1e-12 for s in seen)


def test_grid_constructor_is_called_on_each_backward_interval():
    calls = []

    def grid(func, y0, t):
        calls.append(tuple(t.tolist()))
        return torch.linspace(float(t[0]), float(t[1]), 11, dtype=t.dtype)

    x0 = torch.tensor(1.0, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    xs = nde.odeint_adjoint(lambda t, x: x, x0, t, method="euler", options=dict(grid_constructor=grid),
                            adjoint_params=())
    xs[1].backward()
    assert calls == [(0.0, 1.0), (1.0, 0.0)]  # forward, then the backward interval from t[1] to t[0]
    assert abs(float(xs[1]) - 1.1 ** 10) < 1e-12
    assert abs(float(x0.grad) - 1.1 ** 10) < 1e-12  # Euler backwards on the same grid


def test_perturb_reaches_the_backward_pass():
    for perturb in (True, False):
        ts = []

        def f(t, x):
            ts.append(float(t))
            return -x

        x0 = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
        xs = nde.odeint_adjoint(f, x0, torch.tensor([0.0, 1.0], dtype=F64), method="rk4",
                                options=dict(step_size=0.5, perturb=perturb), adjoint_params=())
        assert (0.0 in ts) != perturb and (0.5 in ts) != perturb
        ts.clear()
        xs.sum().backward()
        assert (1.0 in ts) != perturb and (0.5 in ts) != perturb and (0.0 in ts) != perturb


# ---- adjoint norms ----------------------------------------------------------------------------
def tdq_default_norm(seminorm):
    """torchdiffeq's adjoint norms, written out: max of the RMS of t, y, adj_y (and each adj_param)."""

    def norm(state):
        t, y, adj_y, *adj_params = state
        parts = [t.abs(), y.pow(2).mean().sqrt(), adj_y.pow(2).mean().sqrt()]
        if not seminorm:
            parts += [p.pow(2).mean().sqrt() for p in adj_params]
        return torch.stack(parts).max()

    return norm


@pytest.mark.parametrize("seminorm", [False, True], ids=["default", "seminorm"])
def test_adjoint_norms_are_torchdiffeqs(seminorm):
    t = torch.linspace(0.0, 2.0, 4, dtype=F64)
    named = dict(norm="seminorm") if seminorm else {}
    a = forward_backward(nde, t, rtol=1e-7, atol=1e-8, adjoint_options=named)
    b = forward_backward(nde, t, rtol=1e-7, atol=1e-8, adjoint_options=dict(norm=tdq_default_norm(seminorm)))
    assert a[1] == b[1]  # the same steps
    assert float((a[2] - b[2]).abs().max()) < 1e-12


def test_callable_adjoint_norm_receives_torchdiffeqs_tuple():
    seen = []
    p1, p2 = torch.rand(7, dtype=F64, requires_grad=True), torch.rand((), dtype=F64, requires_grad=True)

    def norm(state):
        seen.append(tuple(tuple(s.shape) for s in state))
        return torch.stack([s.abs().max() for s in state]).max()

    f = lambda t, x: x * (p1.sum() + p2)  # noqa: E731
    t = torch.tensor([0.0, 1.0], dtype=F64)
    x0 = torch.ones(2, 2, dtype=F64, requires_grad=True)
    nde.odeint_adjoint(f, x0, t, adjoint_params=(p1, p2), adjoint_options=dict(norm=norm)).sum().backward()
    assert seen and set(seen) == {((), (2, 2), (2, 2), (7,), ())}
    seen.clear()
    x0 = (torch.tensor(1.0, dtype=F64), torch.ones(2, 2, dtype=F64))
    g = lambda t, x: (x[0] * p2, x[1] * p1.sum())  # noqa: E731
    nde.odeint_adjoint(g, x0, t, adjoint_params=(p1, p2), adjoint_options=dict(norm=norm))[1].sum().backward()
    assert seen and set(seen) == {((), (), (2, 2), (), (2, 2), (7,), ())}
    with pytest.raises(ValueError, match="adjoint_options\\['norm'\\] must be 'seminorm', or a callable"):
        nde.odeint_adjoint(f, x0[1], t, adjoint_params=(p1, p2), adjoint_options=dict(norm="l2"))


# ---- max_num_steps -----------------------------------------------------------------------------
def test_max_num_steps_caps_the_steps_between_output_times():
    f = lambda t, y: torch.stack([y[1], -y[0]])  # noqa: E731
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    t = torch.linspace(0.0, 20.0, 41, dtype=F64)
    kw = dict(rtol=1e-10, atol=1e-10, options=dict(max_num_steps=15))
    # hundreds of steps in all, at most 15 between two outputs: both libraries run
    ours, theirs = nde.odeint(f, y0, t, **kw), torchdiffeq.odeint(f, y0, t, **kw)
    assert float((ours - theirs).abs().max()) < 1e-8
    with pytest.raises(AssertionError, match="max_num_steps exceeded"):
        torchdiffeq.odeint(f, y0, t[[0, -1]], **kw)
    with pytest.raises(MaxNumStepsExceeded, match=r"max_num_steps exceeded \(15>=15\).*between two consecutive output times") as e:
        nde.odeint(f, y0, t[[0, -1]], **kw)
    assert isinstance(e.value, AssertionError) and isinstance(e.value, nde.SolveError)
    assert e.value.result == nde.RESULTS.max_steps_reached and e.value.step == 15
    # the backward pass caps each of its intervals too (inheriting the option, as torchdiffeq's, whose
    # backward pass needs between 16 and 20 steps in some interval here)
    p = torch.tensor(1.0, dtype=F64, requires_grad=True)
    for lib, error in ((torchdiffeq, AssertionError), (nde, MaxNumStepsExceeded)):
        out = lib.odeint_adjoint(lambda t, y: p * f(t, y), y0, t, adjoint_params=(p,), **kw)
        with pytest.raises(error, match="max_num_steps exceeded"):
            out.sum().backward()
    out = nde.odeint_adjoint(lambda t, y: p * f(t, y), y0, t, adjoint_params=(p,), **kw,
                             adjoint_options=dict(max_num_steps=20))
    (g,) = torch.autograd.grad(out.sum(), (p,))
    assert bool(torch.isfinite(g))


# ---- unknown options ---------------------------------------------------------------------------
def test_unknown_options_warn_and_are_ignored_as_in_torchdiffeq():
    f = Linear()
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    with torch.no_grad():
        plain = nde.odeint(f, y0, T3)
        with pytest.warns(UserWarning, match="Unknown option 'step_size' in options for method='dopri5', ignored.*Accepted options: \\[.*'first_step'"):
            extra = nde.odeint(f, y0, T3, options=dict(step_size=0.1, first_step=None))
        assert torch.equal(plain, extra)
        with pytest.warns(UserWarning, match="Unknown option 'max_num_steps' in options for method='rk4'"):
            nde.odeint(f, y0, T3, method="rk4", options=dict(step_size=0.1, max_num_steps=5))
    y0.requires_grad_(True)
    with pytest.warns(UserWarning, match="Unknown option 'jump_t' in adjoint_options for method='euler'"):
        nde.odeint_adjoint(f, y0, T3, method="euler", options=dict(step_size=0.1), adjoint_options=dict(jump_t=[0.5]))
    # invalid values still raise
    with pytest.raises(ValueError, match="options\\['step_size'\\] must be positive"):
        nde.odeint(f, y0, T3, method="rk4", options=dict(step_size=-0.1))
    with pytest.raises(ValueError, match="adjoint_options\\['max_step'\\] must be positive"):
        nde.odeint_adjoint(f, y0, T3, adjoint_options=dict(max_step=0.0))


# ---- an event at t0 ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dopri5", "bosh3", "rk4"])
def test_event_function_zero_at_t0_is_an_event_at_t0(method):
    f = Linear()
    y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    t0 = torch.tensor(0.25, dtype=F64)
    opts = dict(step_size=0.01) if method == "rk4" else None
    events = [lambda t, y: y[0] - 1.0, lambda t, y: torch.stack([y[1] + 3.0, y[0] - 1.0])]
    for event_fn in events:
        for interface in (nde.odeint, nde.odeint_adjoint):
            t_ev, sol = nde.odeint_event(f, y0, t0, event_fn=event_fn, method=method, options=opts,
                                         odeint_interface=interface)
            assert float(t_ev) == 0.25
            assert torch.equal(sol.detach(), torch.stack([y0, y0]).detach())
            g = torch.autograd.grad(t_ev, y0, allow_unused=True)[0]
            assert g is not None and bool(torch.isfinite(g).all())
        if method != "rk4":  # (torchdiffeq's fixed-step event search never stops on a zero at t0)
            t_tdq, _ = torchdiffeq.odeint_event(f, y0, t0, event_fn=event_fn, method=method)
            assert float(t_tdq) == 0.25
        t_ev, _ = nde.odeint(f, y0, torch.stack([t0, t0 + 1]), event_fn=event_fn, method=method, options=opts)
        assert float(t_ev) == 0.25


# ---- callbacks ---------------------------------------------------------------------------------
class Recording(torch.nn.Module):
    """A damped oscillator that records torchdiffeq's step callbacks."""

    def __init__(self):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(4.0, dtype=F64))
        self.log = []

    def forward(self, t, y):
        return torch.stack([y[1], -self.k * y[0] - 0.1 * y[1]])

    def callback_step(self, t0, y0, dt):
        self.log.append(("step", float(t0), float(dt), y0.detach().clone()))

    def callback_accept_step(self, t0, y0, dt):
        self.log.append(("accept", float(t0), float(dt), y0.detach().clone()))

    def callback_reject_step(self, t0, y0, dt):
        self.log.append(("reject", float(t0), float(dt), y0.detach().clone()))

    def callback_step_adjoint(self, t0, y0, dt):
        self.log.append(("step_adjoint", float(t0), float(dt), y0))


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_adaptive_callbacks_fire_around_every_step(reverse):
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    t = torch.linspace(0.0, 3.0, 4, dtype=F64)
    t = t.flip(0) if reverse else t
    logs = {}
    for lib in (nde, torchdiffeq):
        f = Recording()
        with torch.no_grad():
            lib.odeint(f, y0, t, rtol=1e-6, atol=1e-8, options=dict(first_step=0.5))
        logs[lib] = f.log
    ours, theirs = logs[nde], logs[torchdiffeq]
    # every attempt is announced, then accepted or rejected, with the same (t0, y0, dt)
    assert [e[0] for e in ours[0::2]] == ["step"] * (len(ours) // 2)
    for announce, outcome in zip(ours[0::2], ours[1::2]):
        assert outcome[0] in ("accept", "reject") and announce[1:3] == outcome[1:3]
        assert torch.equal(announce[3], outcome[3])
    accepted = [e for e in ours if e[0] == "accept"]
    assert "reject" in [e[0] for e in ours]  # first_step=0.5 is too large
    assert abs(sum(e[2] for e in accepted) - 3.0) < 1e-12
    sign = -1 if reverse else 1
    assert abs(accepted[0][1] - float(t[0])) == 0 and all(sign * (b[1] - a[1]) > 0 for a, b in zip(accepted, accepted[1:]))
    # the same controller takes the same steps as torchdiffeq (which overshoots t[-1] at the end)
    tdq_accepted = [e for e in theirs if e[0] == "accept"]
    assert len(accepted) == len(tdq_accepted)
    for a, b in zip(accepted[:-1], tdq_accepted[:-1]):
        assert abs(a[1] - b[1]) < 1e-9 and abs(a[2] - b[2]) < 1e-9 and float((a[3] - b[3]).abs().max()) < 1e-7


def test_fixed_grid_callbacks_are_torchdiffeqs_and_tuple_states():
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    logs = {}
    for lib in (nde, torchdiffeq):
        f = Recording()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lib.odeint(f, y0, t, method="rk4", options=dict(step_size=0.25))
        logs[lib] = f.log
    ours, theirs = logs[nde], logs[torchdiffeq]
    assert [e[:3] for e in ours] == [e[:3] for e in theirs] and len(ours) == 4
    for a, b in zip(ours, theirs):
        assert float((a[3] - b[3]).abs().max()) < 1e-14
    with pytest.warns(UserWarning, match="does not call the callbacks \\['callback_accept_step', 'callback_reject_step'\\]"):
        nde.odeint(Recording(), y0, t, method="rk4", options=dict(step_size=0.25))

    # a tuple state reaches the callback as a tuple
    seen = []

    class TupleField:
        def __call__(self, t, y):
            return (-y[0], y[1] * 0.5)

        def callback_step(self, t0, y0, dt):
            seen.append(tuple(tuple(x.shape) for x in y0))

    nde.odeint(TupleField(), (torch.ones(3, dtype=F64), torch.ones(1, dtype=F64)), t)
    assert seen and set(seen) == {((3,), (1,))}


def test_adjoint_callbacks_see_torchdiffeqs_augmented_state():
    y0 = torch.tensor([1.0, 0.0], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    logs = {}
    for lib in (nde, torchdiffeq):
        f = Recording()
        out = lib.odeint_adjoint(f, y0, t, method="rk4", options=dict(step_size=0.125))
        f.log.clear()
        out.sum().backward()
        logs[lib] = f.log
    ours, theirs = logs[nde], logs[torchdiffeq]
    assert [e[:3] for e in ours] == [e[:3] for e in theirs] and len(ours) == 8
    assert ours[0][1] == 1.0 and ours[-1][1] == 0.125
    for a, b in zip(ours, theirs):  # (t, y, adj_y, adj_k); nde does not integrate dL/dt: its entry is 0
        assert len(a[3]) == len(b[3]) == 4
        for x, y in zip(a[3][1:], b[3][1:]):
            assert x.shape == y.shape and float((x - y).abs().max()) < 1e-12


def test_no_callbacks_no_hooks():
    """A func without callbacks gets no callback machinery (nothing is called per step)."""
    P = nde._odeint._plan(lambda t, y: -y, torch.ones(2), torch.linspace(0, 1, 3), 1e-7, 1e-9, None, None, None)
    assert P.callbacks is None and P.controller._cb is None


# ---- one-sided stages at step ends --------------------------------------------------------------
def step_up_at(t_jump):
    def f(t, y):
        return torch.where(t < t_jump, torch.ones_like(y), 100 * torch.ones_like(y))

    return f


def counting(f):
    def g(t, y):
        g.n += 1
        return f(t, y)

    g.n = 0
    return g


@pytest.mark.parametrize("method", ["adaptive_heun", "fehlberg2", "bosh3", "dopri5", "dopri8"])
def test_adaptive_stages_at_step_ends_see_the_field_from_inside(method):
    """A field that jumps exactly at t[-1] or at a step_t: the stages there see its left limit.

    torchdiffeq evaluates every stage that lands on a step's end one ulp before it; steps end on
    step_t and jump_t (in nde also on t[-1], where torchdiffeq steps past and interpolates).
    Evaluated on the far side, the jump inflates the error estimate and the solve crawls through
    hundreds of rejected steps.
    """
    y0 = torch.zeros(1, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    kw = dict(method=method, rtol=1e-8, atol=1e-8)
    f = counting(step_up_at(1.0))
    ours = nde.odeint(f, y0, t, **kw)
    assert abs(float(ours[-1]) - 1.0) < 1e-12 and f.n <= 80, f.n
    # at a step_t the next step starts from the left limit too (first same as last), as in torchdiffeq
    f, g = counting(step_up_at(0.5)), counting(step_up_at(0.5))
    ours = nde.odeint(f, y0, t, options=dict(step_t=[0.5]), **kw)
    theirs = torchdiffeq.odeint(g, y0, t, options=dict(step_t=[0.5]), **kw)
    assert abs(float(ours[-1]) - 50.5) < 1e-5 and abs(float(theirs[-1]) - 50.5) < 1e-5
    assert f.n <= 1.1 * g.n + 5, (f.n, g.n)


@pytest.mark.parametrize("method, bound", [("explicit_adams", 1e-4), ("implicit_adams", 1e-6)])
def test_adams_methods_are_accurate_on_non_uniform_grids(method, bound):
    """nde's Adams coefficients follow the actual nodes (torchdiffeq's assume uniform steps: 1e-3--3e-2 here)."""
    A = torch.tensor([[-0.5, 1.0], [-1.0, -0.3]], dtype=F64)
    f = lambda t, y: y @ A.T + 0.1 * torch.sin(t)  # noqa: E731
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    t = torch.tensor([0.0, 0.63], dtype=F64)
    exact = nde.odeint(f, y0, t, method="dopri8", rtol=1e-13, atol=1e-13)
    for grid in ([0, .1, .2, .3, .33, .43, .53, .63], [0, .05, .1, .2, .35, .5, .63]):
        opts = dict(grid_constructor=lambda func, y, tt, g=grid: torch.tensor(g, dtype=F64))
        assert float((nde.odeint(f, y0, t, method=method, options=opts) - exact).abs().max()) < bound


# ---- trivial solves -------------------------------------------------------------------------
@pytest.mark.parametrize("method", [m for m in nde._odeint.METHODS])
def test_a_single_time_returns_y0(method):
    y0 = torch.tensor([1.0, 2.0], dtype=F64)
    for t in (torch.tensor([0.3], dtype=F64), torch.tensor([-0.3], dtype=F64)):
        out = nde.odeint(lambda t, y: -y, y0, t, method=method)
        assert out.shape == (1, 2) and torch.equal(out[0], y0)
