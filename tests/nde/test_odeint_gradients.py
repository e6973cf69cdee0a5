"""Gradients of nde.odeint / nde.odeint_adjoint: gradcheck for every method, adjoint against direct."""

import math

import pytest
import torch

import nde
from nde._odeint import METHODS

torchdiffeq = pytest.importorskip("torchdiffeq")

F64 = torch.float64
A0 = torch.tensor([[-0.3, 1.0], [-1.0, -0.2]], dtype=F64)
T = torch.tensor([0.0, 0.3, 0.6], dtype=F64)
# tolerances at which an adaptive solve is smooth enough in its inputs for finite differences
ADAPTIVE_RTOL = {"dopri8": 1e-8, "dopri5": 1e-10, "tsit5": 1e-10, "bosh3": 1e-6, "fehlberg2": 1e-7,
                 "adaptive_heun": 1e-5}
ORDER = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4, "explicit_adams": 4, "implicit_adams": 4,
         "fixed_adams": 4, "implicit_euler": 1, "implicit_midpoint": 2, "trapezoid": 2, "radauIIA3": 3,
         "radauIIA5": 5, "gl4": 4, "gl6": 6, "sdirk2": 2, "trbdf2": 2}
DIFFERENTIABLE = [m for m in METHODS if m != "scipy_solver"]


def available(method):
    try:
        nde._odeint._solver_class(method)
    except ValueError as e:
        pytest.skip(str(e))


class Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.A = torch.nn.Parameter(A0.clone())
        self.unused = torch.nn.Parameter(torch.ones(3, dtype=F64))

    def forward(self, t, y):
        return y @ self.A.T + 0.1 * torch.sin(t)


def kwargs(method, step=0.1):
    if method in ADAPTIVE_RTOL:
        r = ADAPTIVE_RTOL[method]
        return dict(method=method, rtol=r, atol=r)
    return dict(method=method, options=dict(step_size=step))


@pytest.mark.parametrize("method", DIFFERENTIABLE)
def test_gradcheck_odeint(method):
    available(method)

    def fn(y0, A):
        return nde.odeint(lambda t, y: A @ y + 0.1 * torch.sin(t), y0, T, **kwargs(method))

    y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    A = A0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (y0, A))


FIXED = [m for m in DIFFERENTIABLE if m not in ADAPTIVE_RTOL]
SHARED_FIXED = ["euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams"]
WEIGHTS = torch.tensor([[0.3, -0.7], [1.1, 0.4], [-0.5, 0.9]], dtype=F64)


def _gradients(lib_fn, method, **kw):
    """d(sum of WEIGHTS * y(T)) / d(y0, A) for ``dy/dt = A y + 0.1 sin t``, through ``lib_fn``."""
    A = A0.clone().requires_grad_(True)
    y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    if "adjoint" in lib_fn.__name__:
        kw["adjoint_params"] = (A,)
    out = lib_fn(lambda t, y: A @ y + 0.1 * torch.sin(t), y0, T, method=method, **kw)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad((out * WEIGHTS).sum(), (y0, A))])


def _reference():
    # the exact gradient to about 1e-12: direct backpropagation through a tight dopri8 solve
    return _gradients(nde.odeint, "dopri8", rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("method", list(ADAPTIVE_RTOL))
def test_gradcheck_odeint_adjoint(method):
    """The continuous adjoint is exact up to the tolerance of the backward solve."""
    available(method)
    A = A0.clone().requires_grad_(True)

    def fn(y0, A):
        return nde.odeint_adjoint(lambda t, y: A @ y + 0.1 * torch.sin(t), y0, T, adjoint_params=(A,),
                                  **kwargs(method))

    y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    # (finite differences of an adaptive solve are noisy: gradcheck can only hold it to 1e-5) ...
    assert torch.autograd.gradcheck(fn, (y0, A), atol=1e-5, rtol=1e-3)
    # ... the exact gradient holds it to the tolerance
    r = ADAPTIVE_RTOL[method]
    err = float((_gradients(nde.odeint_adjoint, method, rtol=r, atol=r) - _reference()).abs().max())
    assert err <= 100 * r, err


# steps at which the error of the gradient is well above the floor set by the stage iterations
STEPS = {"radauIIA5": 0.3, "gl6": 0.3}


@pytest.mark.parametrize("method", FIXED)
def test_adjoint_gradient_converges_at_the_methods_order(method):
    """With fixed steps the adjoint gradient converges to the exact one at the order of the method."""
    available(method)
    h = STEPS.get(method, 0.1)
    # (tight tolerances for the stage iterations of the implicit Runge--Kutta methods)
    tol = dict(rtol=1e-12, atol=1e-12) if method not in SHARED_FIXED else {}
    ref = _reference()
    errs = [float((_gradients(nde.odeint_adjoint, method, options=dict(step_size=s), **tol) - ref).abs().max())
            for s in (h, h / 2)]
    order = math.log2(errs[0] / errs[1])
    assert order >= ORDER[method] - 0.4, (errs, order)


@pytest.mark.parametrize("method", SHARED_FIXED)
def test_adjoint_gradient_is_torchdiffeqs(method):
    """Same backward grid, same adjoint: the gradients of both libraries agree to rounding."""
    ours = _gradients(nde.odeint_adjoint, method, options=dict(step_size=0.1))
    theirs = _gradients(torchdiffeq.odeint_adjoint, method, options=dict(step_size=0.1))
    assert float((ours - theirs).abs().max()) < 1e-12


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "rk4", "heun3"])
@pytest.mark.parametrize("norm", ["rms", "seminorm"])
def test_adjoint_matches_direct_and_torchdiffeq(method, norm):
    available(method)
    f = Field()
    y0 = torch.tensor([[1.0, 0.5], [0.2, -0.3]], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 2, 5, dtype=F64)
    tol = 1e-7 if method == "bosh3" else 1e-9
    kw = dict(method=method, rtol=tol, atol=tol / 10)
    if method in ("rk4", "heun3"):
        kw["options"] = dict(step_size=0.01)
    grads = {}
    for name, fn in (("direct", nde.odeint), ("adjoint", nde.odeint_adjoint)):
        # (passing adjoint_options replaces the forward options in the backward pass, as in torchdiffeq)
        extra = dict(adjoint_options=dict(norm=norm, **kw.get("options", {}))) if name == "adjoint" else {}
        out = fn(f, y0, t, **kw, **extra)
        gy, gA = torch.autograd.grad(out.pow(2).sum(), (y0, f.A))
        grads[name] = (gy, gA)
    for a, b in zip(grads["direct"], grads["adjoint"]):
        assert torch.allclose(a, b, rtol=max(1e-5, 1000 * tol), atol=1e-7)
    if method != "tsit5" and norm == "rms":
        out = torchdiffeq.odeint_adjoint(f, y0, t, **kw)
        gy, gA = torch.autograd.grad(out.pow(2).sum(), (y0, f.A))
        assert torch.allclose(gA, grads["adjoint"][1], rtol=max(1e-5, 1000 * tol), atol=1e-7)


def test_unused_parameters_get_zero_gradient():
    f = Field()
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    out = nde.odeint_adjoint(f, y0, T)
    out.sum().backward()
    assert f.unused.grad is not None and torch.equal(f.unused.grad, torch.zeros(3, dtype=F64))
    assert f.A.grad is not None and float(f.A.grad.abs().sum()) > 0
    # explicit adjoint_params, one of them unused
    extra = torch.ones(2, dtype=F64, requires_grad=True)
    out = nde.odeint_adjoint(f, y0, T, adjoint_params=tuple(f.parameters()) + (extra,))
    (g,) = torch.autograd.grad(out.sum(), (extra,))
    assert torch.equal(g, torch.zeros(2, dtype=F64))


@pytest.mark.parametrize("fn", [nde.odeint, nde.odeint_adjoint], ids=["direct", "adjoint"])
def test_gradient_with_respect_to_times(fn):
    f = Field()
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    t = torch.tensor([0.1, 0.4, 0.9], dtype=F64, requires_grad=True)

    def loss(tt):
        return fn(f, y0, tt, rtol=1e-10, atol=1e-10).pow(2).sum()

    (g,) = torch.autograd.grad(loss(t), (t,))
    eps = 1e-6
    fd = []
    for i in range(3):
        d = torch.zeros(3, dtype=F64)
        d[i] = eps
        with torch.no_grad():
            fd.append((float(loss(t + d)) - float(loss(t - d))) / (2 * eps))
    assert torch.allclose(g, torch.tensor(fd, dtype=F64), rtol=1e-5, atol=1e-7)
    theirs = torchdiffeq.odeint_adjoint(f, y0, t, rtol=1e-10, atol=1e-10).pow(2).sum()
    (gt,) = torch.autograd.grad(theirs, (t,))
    assert torch.allclose(g, gt, rtol=1e-5, atol=1e-7)


def test_tuple_state_gradients_adjoint_vs_direct():
    w = torch.tensor([0.7, -0.4], dtype=F64, requires_grad=True)

    def f(t, y):
        a, b = y
        return (w[0] * b.expand_as(a), w[1] * a.sum().reshape(1))

    y0 = (torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True), torch.tensor([0.5], dtype=F64))
    outs = []
    for fn, kw in ((nde.odeint, {}), (nde.odeint_adjoint, dict(adjoint_params=(w,)))):
        a, b = fn(f, y0, T, rtol=1e-10, atol=1e-10, **kw)
        outs.append(torch.autograd.grad(a.sum() + b.pow(2).sum(), (y0[0], w)))
    for x, y in zip(*outs):
        assert torch.allclose(x, y, rtol=1e-6)


def test_adjoint_params_are_exactly_the_tensors_differentiated():
    # torchdiffeq's semantics: besides y0 and t only adjoint_params get gradients; a tensor func uses
    # that is not listed gets none (adjoint_params=() skips the parameters' adjoint altogether)
    for lib in (torchdiffeq, nde):
        f = Field()
        w = torch.tensor(0.7, dtype=F64, requires_grad=True)
        y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)

        def g(t, y):
            return w * f(t, y)

        lib.odeint_adjoint(g, y0, T, rtol=1e-10, atol=1e-10, adjoint_params=()).pow(2).sum().backward()
        assert f.A.grad is None and w.grad is None, lib.__name__
        gy_none = y0.grad.clone()
        y0.grad = None
        lib.odeint_adjoint(g, y0, T, rtol=1e-10, atol=1e-10, adjoint_params=(w,)).pow(2).sum().backward()
        assert f.A.grad is None and w.grad is not None, lib.__name__
        direct = torch.autograd.grad(nde.odeint(g, y0, T, rtol=1e-10, atol=1e-10).pow(2).sum(), (y0, w))
        assert torch.allclose(y0.grad, direct[0], rtol=1e-7) and torch.allclose(gy_none, direct[0], rtol=1e-7)
        assert torch.allclose(w.grad, direct[1], rtol=1e-7), lib.__name__
    # a tensor listed twice is differentiated once (torchdiffeq would count its gradient twice)
    w.grad = None
    nde.odeint_adjoint(g, y0, T, rtol=1e-10, atol=1e-10, adjoint_params=(w, w)).pow(2).sum().backward()
    assert torch.allclose(w.grad, direct[1], rtol=1e-7)
