"""Solvers for stochastic differential equations ``dy = f(t, y) dt + g(t, y) dW``.

The equation is given as terms: ``MultiTerm(ODETerm(f), ControlTerm(g, brownian, noise=...))``.
Every solver declares its interpretation (``sde_type``: ``"ito"`` or ``"stratonovich"``) and its
strong order per noise structure (``strong_orders``); ``strong_order`` is the order for general
noise. Solvers built from term products (Euler--Maruyama, Heun, midpoint, Euler--Heun) work with any
terms, CDE controls included; Milstein needs diagonal, scalar or additive noise; SRA1 and ShARK need
additive noise and a Brownian motion with space-time Lévy area.
"""

from __future__ import annotations

import math

import torch

from nde._terms import ControlTerm, ODETerm, _ReversedTime

from . import rk as _rk
from .base import AbstractSolver

_ITO, _STRAT = "ito", "stratonovich"


# ---- term helpers -----------------------------------------------------------------------------
def _parts(terms):
    sub = getattr(terms, "terms", None)
    return tuple(sub) if sub is not None else (terms,)


def _base(term):
    return term.term if isinstance(term, _ReversedTime) else term


def _is_dt(term):
    return isinstance(_base(term), ODETerm)


def _noise(term):
    return getattr(_base(term), "noise", "general")


def _time(t, y):
    if isinstance(t, torch.Tensor):
        return t.to(y.dtype)
    return torch.tensor(t, dtype=y.dtype, device=y.device)


def _contr(term, t0, t1, y):
    c = term.contr(t0, t1)
    if isinstance(c, torch.Tensor) and c.dtype != y.dtype:
        c = c.to(y.dtype)
    return c


def _split(terms, solver):
    """The drift terms and the single diffusion term of an SDE (for solvers that need the structure)."""
    parts = _parts(terms)
    drift = [p for p in parts if _is_dt(p)]
    diff = [p for p in parts if not _is_dt(p)]
    if len(diff) != 1:
        raise ValueError(
            f"{type(solver).__name__} needs exactly one diffusion term: pass "
            "MultiTerm(ODETerm(f), ControlTerm(g, brownian, noise=...)); "
            f"got {len(diff)} non-ODE terms."
        )
    return drift, diff[0]


def _drift_vf(drift, t, y, args):
    out = None
    for term in drift:
        v = term.vf(t, y, args)
        if isinstance(term, _ReversedTime):
            v = -v
        out = v if out is None else out + v
    return torch.zeros_like(y) if out is None else out


def _levy(term, t0, t1):
    """``(W, H)``: increment and space-time Lévy area of the diffusion term's control."""
    base = _base(term)
    path = getattr(base, "control", None)
    if isinstance(term, _ReversedTime):
        t0, t1 = -t0, -t1
    try:
        return path.evaluate(t0, t1, use_levy=True)
    except TypeError:
        raise TypeError(
            "This solver needs space-time Lévy areas: drive the ControlTerm with "
            "nde.BrownianInterval(..., levy_area='space-time')."
        ) from None


def _area(term, t0, t1):
    """``(W, A)``: increment and space-space Lévy area of the diffusion term's control."""
    base = _base(term)
    path = getattr(base, "control", None)
    if isinstance(term, _ReversedTime):
        t0, t1 = -t0, -t1
    fn = getattr(path, "evaluate_area", None)
    if fn is None:
        raise ValueError(
            "This solver needs space-space Lévy areas for general noise: drive the ControlTerm with "
            "nde.BrownianInterval(..., levy_area='davie' or 'foster')."
        )
    return fn(t0, t1)


def _vjp_graph(fn, y):
    """``(out, u, w)`` with ``out = fn(y)`` and ``w = (dout/dy)^T u`` as a function of a dummy cotangent ``u``
    (None when ``out`` does not depend on ``y``).

    Jacobian-vector products are then derivatives of ``w`` with respect to ``u`` (double backward).
    Unlike forward-mode AD this also works inside a custom autograd Function's forward (where adjoints
    run their forward solve), and the products stay differentiable for backpropagation."""
    y_ = y if y.requires_grad else y.detach().requires_grad_(True)
    out = fn(y_)
    if not out.requires_grad:
        return out, None, None
    u = torch.zeros_like(out, requires_grad=True)
    (w,) = torch.autograd.grad(out, y_, u, create_graph=True, allow_unused=True)
    return out, u, w


def jvp(fn, y, v):
    """``(dfn/dy)(y) v`` (the output has ``fn(y)``'s shape); zeros when ``fn`` does not depend on ``y``."""
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        out, u, w = _vjp_graph(fn, y)
        if w is None:
            return torch.zeros_like(out)
        (jv,) = torch.autograd.grad(w, u, v, create_graph=create, allow_unused=True)
    return torch.zeros_like(out) if jv is None else jv


def jvp_columns(fn, y, vs):
    """``sum_l d(fn(y)[..., :, l])/dy . vs[..., :, l]``: the derivative of each column of the matrix
    ``fn(y)`` (``(..., d, m)``) along its own direction; shape of ``y``. One double-backward a column."""
    create = torch.is_grad_enabled()
    total = None
    with torch.enable_grad():
        out, u, w = _vjp_graph(fn, y)
        if w is not None:
            m = out.shape[-1]
            for l in range(m):
                (jv,) = torch.autograd.grad(w, u, vs[..., l], create_graph=create, retain_graph=create or l < m - 1,
                                            allow_unused=True)
                if jv is not None:
                    total = jv[..., l] if total is None else total + jv[..., l]
    return torch.zeros_like(y) if total is None else total


def _sum_prod(terms, t, y, args, controls):
    out = None
    for term, c in zip(terms, controls):
        p = term.vf_prod(t, y, args, c)
        out = p if out is None else out + p
    return out


def _interval(t0, t1, y):
    dt = t1 - t0
    if isinstance(dt, torch.Tensor):
        dt = dt.to(y.dtype)
    return dt


class AbstractSDESolver(AbstractSolver):
    """Base class of the SDE solvers.

    Attributes
    ----------
    sde_type:
        ``"ito"`` or ``"stratonovich"``: the interpretation of ``g dW`` the solver converges to.
    strong_orders:
        Strong order of convergence per noise structure (``general``, ``diagonal``, ``scalar``,
        ``additive``); None where the method does not apply.
    """

    term_structure = "control"
    sde_type = _ITO
    strong_orders: dict = {}
    order = 1

    @property
    def strong_order(self):
        return self.strong_orders.get("general")

    def strong_order_for(self, noise: str):
        """The strong order for the noise structure ``noise``."""
        return self.strong_orders.get(noise)

    def init(self, terms, t0, t1, y0, args):
        _check_interpretation(self, terms)
        return None, 0


def _check_interpretation(solver, terms):
    """Refuse a diffusion term declared with the other interpretation (additive noise has only one)."""
    for part in _parts(terms):
        base = _base(part)
        declared = getattr(base, "sde_type", None)
        if declared is None or _is_dt(part) or getattr(base, "noise", None) == "additive":
            continue
        if declared != solver.sde_type:
            raise ValueError(
                f"The diffusion term is declared {declared!r} but {type(solver).__name__} converges to the "
                f"{solver.sde_type!r} solution; use a {declared} solver "
                f"({'EulerMaruyama, Milstein, SRID2' if declared == 'ito' else 'Heun, Midpoint, EulerHeun, ReversibleHeun, Milstein(sde_type=stratonovich)'})."
            )


# ---- methods built from term products: work for any terms --------------------------------------
class EulerMaruyama(AbstractSDESolver):
    """The Euler--Maruyama method (Itô); fixed steps.

    ``y1 = y0 + f(t0, y0) dt + g(t0, y0) dW``. Strong order 0.5 (1.0 for additive noise), weak
    order 1. Maruyama (1955), "Continuous Markov processes and stochastic equations",
    *Rend. Circ. Mat. Palermo* 4.
    """

    sde_type = _ITO
    strong_orders = {"general": 0.5, "diagonal": 0.5, "scalar": 0.5, "additive": 1.0}

    def step(self, terms, t0, t1, y0, args, solver_state):
        parts = _parts(terms)
        tt = _time(t0, y0)
        if (len(parts) == 2 and type(parts[0]) is ODETerm and type(parts[1]) is ControlTerm
                and parts[1].noise == "diagonal" and parts[1]._vf_prod is None and isinstance(t0, float)):
            # the common case in two fused operations: y0 + f dt + g * dW
            drift, diff = parts
            dW = _contr(diff, t0, t1, y0)
            g = diff.vf(tt, y0, args)
            if not diff._prod_checked:
                diff._check_prod(g, dW)
            y1 = torch.add(y0, drift.vf(tt, y0, args), alpha=t1 - t0)
            y1 = torch.addcmul(y1, g, dW)
            return y1, None, {"y0": y0, "y1": y1}, None, 1
        y1 = y0
        for term in parts:
            y1 = y1 + term.vf_prod(tt, y0, args, _contr(term, t0, t1, y0))
        return y1, None, {"y0": y0, "y1": y1}, None, 1


class _StratonovichHeunMixin:
    """Stochastic Heun (trapezoidal predictor--corrector) for non-ODE terms; ODE terms go to the RK method."""

    sde_type = _STRAT
    strong_orders = {"general": 0.5, "diagonal": 1.0, "scalar": 1.0, "additive": 1.0}
    strong_order = 0.5

    def strong_order_for(self, noise: str):
        """The strong order for the noise structure ``noise``."""
        return self.strong_orders.get(noise)

    def init(self, terms, t0, t1, y0, args):
        if terms.is_ode:
            return super().init(terms, t0, t1, y0, args)
        _check_interpretation(self, terms)
        return None, 0

    def step(self, terms, t0, t1, y0, args, solver_state):
        if terms.is_ode:
            return super().step(terms, t0, t1, y0, args, solver_state)
        parts = _parts(terms)
        cs = [_contr(p, t0, t1, y0) for p in parts]
        k0 = _sum_prod(parts, _time(t0, y0), y0, args, cs)
        k1 = _sum_prod(parts, _time(t1, y0), y0 + k0, args, cs)
        y1 = y0 + 0.5 * (k0 + k1)
        with torch.no_grad():
            err = 0.5 * (k1 - k0)
        return y1, err, {"y0": y0, "y1": y1}, None, 2

    def dense_eval(self, terms, args, t0, t1, dense_info, theta):
        if terms.is_ode:
            return super().dense_eval(terms, args, t0, t1, dense_info, theta)
        return AbstractSolver.dense_eval(self, terms, args, t0, t1, dense_info, theta)

    def dense_derivative(self, terms, args, t0, t1, dense_info, theta):
        if terms.is_ode:
            return super().dense_derivative(terms, args, t0, t1, dense_info, theta)
        return AbstractSolver.dense_derivative(self, terms, args, t0, t1, dense_info, theta)


class Heun(_StratonovichHeunMixin, _rk.Heun):
    """Heun's method for ODEs (order 2) and SDEs (Stratonovich).

    SDE step: ``k0 = f(t0, y0) dt + g(t0, y0) dW``, ``k1 = f(t1, y0 + k0) dt + g(t1, y0 + k0) dW``,
    ``y1 = y0 + (k0 + k1)/2``; strong order 0.5 for general noise and 1.0 for commutative (diagonal,
    scalar, additive) noise. Adaptive through the difference with Euler(--Maruyama).
    Rümelin (1982), "Numerical treatment of stochastic differential equations", *SIAM J. Numer. Anal.* 19.
    """


class _StratonovichMidpointMixin(_StratonovichHeunMixin):
    def step(self, terms, t0, t1, y0, args, solver_state):
        if terms.is_ode:
            return _rk.Midpoint.step(self, terms, t0, t1, y0, args, solver_state)
        parts = _parts(terms)
        cs = [_contr(p, t0, t1, y0) for p in parts]
        k0 = _sum_prod(parts, _time(t0, y0), y0, args, cs)
        tm = t0 + 0.5 * (t1 - t0)
        k1 = _sum_prod(parts, _time(tm, y0), y0 + 0.5 * k0, args, cs)
        y1 = y0 + k1
        with torch.no_grad():
            err = k1 - k0
        return y1, err, {"y0": y0, "y1": y1}, None, 2


class Midpoint(_StratonovichMidpointMixin, _rk.Midpoint):
    """The explicit midpoint rule for ODEs (order 2) and SDEs (Stratonovich).

    SDE step: ``y_half = y0 + (f(t0, y0) dt + g(t0, y0) dW)/2``,
    ``y1 = y0 + f(t_half, y_half) dt + g(t_half, y_half) dW``; strong order 0.5 for general noise
    and 1.0 for commutative noise. Burrage, Burrage & Tian (2004), "Numerical methods for strong
    solutions of stochastic differential equations: an overview", *Proc. R. Soc. A* 460.
    """


class EulerHeun(AbstractSDESolver):
    """The Euler--Heun method (Stratonovich); fixed steps.

    Euler in the drift, Heun in the diffusion: ``y' = y0 + g(t0, y0) dW``,
    ``y1 = y0 + f(t0, y0) dt + (g(t0, y0) + g(t1, y')) dW / 2``. Strong order 0.5 for general noise,
    1.0 for commutative noise. Kloeden & Platen (1992), *Numerical Solution of Stochastic
    Differential Equations*, Springer.
    """

    sde_type = _STRAT
    strong_orders = {"general": 0.5, "diagonal": 1.0, "scalar": 1.0, "additive": 1.0}

    def step(self, terms, t0, t1, y0, args, solver_state):
        parts = _parts(terms)
        tt0, tt1 = _time(t0, y0), _time(t1, y0)
        drift = [p for p in parts if _is_dt(p)]
        noise = [p for p in parts if not _is_dt(p)]
        dcs = [_contr(p, t0, t1, y0) for p in drift]
        ncs = [_contr(p, t0, t1, y0) for p in noise]
        g0 = _sum_prod(noise, tt0, y0, args, ncs)
        g1 = _sum_prod(noise, tt1, y0 + g0, args, ncs)
        y1 = y0 + 0.5 * (g0 + g1)
        if drift:
            y1 = y1 + _sum_prod(drift, tt0, y0, args, dcs)
        return y1, None, {"y0": y0, "y1": y1}, None, 2


class LogODEMidpoint(AbstractSDESolver):
    """The log-ODE midpoint method (Stratonovich); fixed steps.

    Lie--Trotter splitting of the step's log-ODE with the explicit midpoint rule:
    ``y' = y0 + (f(t0, y0) dt + g(t0, y0) W) / 2``,
    ``y1 = y0 + f(t', y') dt + g(t', y') W + sum_l (dg_l/dy)(y') (g(t', y') A)_l`` with ``t'`` the
    midpoint, ``W`` the increment and ``A`` the space-space Lévy area of the step (Davie's or Foster's
    approximation from ``nde.BrownianInterval(levy_area="davie" | "foster")``); ``g_l`` is the
    ``l``-th column of ``g``. The Lévy-area term vanishes for commutative (diagonal, scalar,
    additive) noise, where the method is the midpoint method and no Lévy area is queried.
    Strong order 0.5 for general noise (the area is approximated), 1.0 for commutative noise.

    Foster (2020), "Numerical approximations for stochastic differential equations", thesis;
    Davie (2014), "KMT theory applied to approximations of SDE", Springer Proc. Math. Stat. 100.
    """

    sde_type = _STRAT
    strong_orders = {"general": 0.5, "diagonal": 1.0, "scalar": 1.0, "additive": 1.0}
    supports_independent = False

    def step(self, terms, t0, t1, y0, args, solver_state):
        drift, diff = _split(terms, self)
        general = _noise(diff) == "general"
        if general:
            W, A = _area(diff, t0, t1)
            W, A = W.to(y0.dtype), A.to(y0.dtype)
        else:
            W = _contr(diff, t0, t1, y0)
        dt = _interval(t0, t1, y0)
        tt0 = _time(t0, y0)
        k0 = diff.vf_prod(tt0, y0, args, W)
        if drift:
            k0 = k0 + dt * _drift_vf(drift, tt0, y0, args)
        tm = _time(t0 + 0.5 * (t1 - t0), y0)
        ym = y0 + 0.5 * k0
        nfe = 2
        if general:
            g = diff.vf(tm, ym, args)
            y1 = y0 + diff.prod(g, W) + jvp_columns(lambda z: diff.vf(tm, z, args), ym, g @ A)
            nfe += g.shape[-1]
        else:
            y1 = y0 + diff.vf_prod(tm, ym, args, W)
        if drift:
            y1 = y1 + dt * _drift_vf(drift, tm, ym, args)
        return y1, None, {"y0": y0, "y1": y1}, None, nfe


# ---- Milstein ---------------------------------------------------------------------------------
class Milstein(AbstractSDESolver):
    """The Milstein method for diagonal, scalar and additive noise; fixed steps.

    ``y1 = y0 + f dt + g dW + 1/2 (g' g) v`` with ``v = dW^2 - dt`` (Itô) or ``v = dW^2``
    (Stratonovich), ``g' g = (dg/dy) g`` the derivative of ``g`` along ``g`` (a Jacobian-vector product by
    double backward; for scalar noise that of the one column along itself), or, with
    ``derivative_free=True``, the finite difference ``(g(y0 + g sqrt(dt)) - g(y0)) / sqrt(dt)``
    with the Itô predictor ``y0 + f dt + g sqrt(dt)``. Strong order 1.0.
    Milstein (1974), "Approximate integration of stochastic differential equations",
    *Theory Probab. Appl.* 19; Rößler (2010), "Runge--Kutta methods for the strong approximation of
    solutions of stochastic differential equations", *SIAM J. Numer. Anal.* 48.

    Parameters
    ----------
    sde_type:
        ``"ito"`` or ``"stratonovich"``.
    derivative_free:
        Replace the derivative of ``g`` by a finite difference (one more evaluation of ``g``).
    """

    strong_orders = {"general": None, "diagonal": 1.0, "scalar": 1.0, "additive": 1.0}

    def __init__(self, sde_type: str = "ito", derivative_free: bool = False):
        if sde_type not in (_ITO, _STRAT):
            raise ValueError(f"sde_type must be 'ito' or 'stratonovich'; got {sde_type!r}.")
        self.sde_type = sde_type
        self.derivative_free = bool(derivative_free)

    def __repr__(self):
        return f"Milstein(sde_type={self.sde_type!r}, derivative_free={self.derivative_free})"

    def step(self, terms, t0, t1, y0, args, solver_state):
        drift, diff = _split(terms, self)
        noise = _noise(diff)
        if noise == "general":
            raise ValueError(
                "Milstein needs diagonal, scalar or additive noise (it has no Lévy-area terms); "
                "use noise='diagonal'/'scalar'/'additive', or EulerMaruyama/Heun for general noise."
            )
        tt = _time(t0, y0)
        dt = _interval(t0, t1, y0)
        dW = _contr(diff, t0, t1, y0)
        g = diff.vf(tt, y0, args)
        f = _drift_vf(drift, tt, y0, args) if drift else None
        if isinstance(dt, float):
            dt_abs = abs(dt)
        else:
            dt_abs = dt.abs()
        y1 = y0 + diff.prod(g, dW)
        if f is not None:
            y1 = y1 + f * dt
        nfe = 1
        if noise != "additive":
            v = dW * dW
            if self.sde_type == _ITO:
                v = v - dt_abs
            gvec = g[..., 0] if noise == "scalar" else g
            if self.derivative_free:
                sq = math.sqrt(dt_abs) if isinstance(dt_abs, float) else dt_abs.sqrt()
                yp = y0 + gvec * sq
                if self.sde_type == _ITO and f is not None:
                    yp = yp + f * dt
                gp = diff.vf(tt, yp, args)
                gdg = (gp - g) / sq
                nfe = 2
            else:
                # (dg/dy) g, the derivative of g along g (for scalar noise, of the one column along itself)
                gdg = jvp(lambda z: diff.vf(tt, z, args), y0, gvec)
            y1 = y1 + 0.5 * diff.prod(gdg, v)
        return y1, None, {"y0": y0, "y1": y1}, None, nfe


# ---- additive noise, strong order 1.5 ---------------------------------------------------------
def _additive(solver, terms):
    drift, diff = _split(terms, solver)
    if _noise(diff) != "additive":
        raise ValueError(
            f"{type(solver).__name__} is for additive noise: declare ControlTerm(..., noise='additive') "
            "(g must not depend on y)."
        )
    return drift, diff


class SRA1(AbstractSDESolver):
    """Rößler's SRA1 stochastic Runge--Kutta method for additive noise; fixed steps.

    Two drift stages, ``z = y0 + 3/4 f(t0, y0) dt + 3/2 g(t1) I10/dt``,
    ``y1 = y0 + (f(t0, y0)/3 + 2 f(t0 + 3/4 dt, z)/3) dt + g(t1) dW + (g(t0) - g(t1)) I10/dt``, with
    ``I10 = int (W(r) - W(t0)) dr = dt (H + dW/2)`` from the space-time Lévy area ``H``. Strong order
    1.5 (additive noise), deterministic order 2. Rößler (2010), "Runge--Kutta methods for the strong
    approximation of solutions of stochastic differential equations", *SIAM J. Numer. Anal.* 48.
    """

    sde_type = _ITO
    strong_orders = {"general": None, "diagonal": None, "scalar": None, "additive": 1.5}
    order = 2

    def step(self, terms, t0, t1, y0, args, solver_state):
        drift, diff = _additive(self, terms)
        dt = _interval(t0, t1, y0)
        W, H = _levy(diff, t0, t1)
        W, H = W.to(y0.dtype), H.to(y0.dtype)
        i10_dt = H + 0.5 * W  # I10 / dt
        tt0 = _time(t0, y0)
        g0 = diff.vf(tt0, y0, args)
        g1 = diff.vf(_time(t1, y0), y0, args)
        f0 = _drift_vf(drift, tt0, y0, args)
        h2 = y0 + 0.75 * dt * f0 + diff.prod(g1, 1.5 * i10_dt)
        f1 = _drift_vf(drift, _time(t0 + 0.75 * (t1 - t0), y0), h2, args)
        y1 = y0 + dt * (f0 / 3 + 2 * f1 / 3) + diff.prod(g1, W - i10_dt) + diff.prod(g0, i10_dt)
        return y1, None, {"y0": y0, "y1": y1}, None, 2


class ShARK(AbstractSDESolver):
    """Foster's shifted additive-noise Runge--Kutta method (ShARK); adaptive.

    ``z1 = y0 + g H``, ``z2 = y0 + 5/6 f(t0, z1) dt + g (5/6 dW + H)``,
    ``y1 = y0 + (2/5 f(t0, z1) + 3/5 f(t0 + 5/6 dt, z2)) dt + g dW``, with ``H`` the space-time Lévy
    area; the embedded estimate ``3/5 (f(z2) - f(z1)) dt`` drives adaptive steps. Strong order 1.5 for
    additive noise (``g`` evaluated at ``t0``). Foster, dos Reis & Strange (2023), "High order splitting
    methods for SDEs satisfying a commutativity condition", *SIAM J. Numer. Anal.*
    """

    sde_type = _STRAT
    strong_orders = {"general": None, "diagonal": None, "scalar": None, "additive": 1.5}
    order = 2
    error_order = 2

    def step(self, terms, t0, t1, y0, args, solver_state):
        drift, diff = _additive(self, terms)
        dt = _interval(t0, t1, y0)
        W, H = _levy(diff, t0, t1)
        W, H = W.to(y0.dtype), H.to(y0.dtype)
        tt0 = _time(t0, y0)
        g = diff.vf(tt0, y0, args)
        gH = diff.prod(g, H)
        gW = diff.prod(g, W)
        z1 = y0 + gH
        f1 = _drift_vf(drift, tt0, z1, args)
        z2 = y0 + (5 / 6) * dt * f1 + (5 / 6) * gW + gH
        f2 = _drift_vf(drift, _time(t0 + (5 / 6) * (t1 - t0), y0), z2, args)
        y1 = y0 + dt * (0.4 * f1 + 0.6 * f2) + gW
        with torch.no_grad():
            err = 0.6 * dt * (f2 - f1)
        return y1, err, {"y0": y0, "y1": y1}, None, 3


class SRID2(AbstractSDESolver):
    """Rößler's SRI-type stochastic Runge--Kutta method for diagonal and scalar noise (Itô); fixed steps.

    Four stages with drift stages ``H0`` and diffusion stages ``H1``; the diffusion is weighted by the
    iterated integrals ``I1 = dW``, ``I11 = (dW^2 - dt)/2``, ``I111 = (dW^3 - 3 dt dW)/6`` and
    ``I10 = dt (H + dW/2)`` (``H`` the space-time Lévy area), which are exact for diagonal noise.
    Strong order 1.5. Rößler (2010), "Runge--Kutta methods for the strong approximation of solutions of
    stochastic differential equations", *SIAM J. Numer. Anal.* 48.
    """

    sde_type = _ITO
    strong_orders = {"general": None, "diagonal": 1.5, "scalar": 1.5, "additive": 1.5}
    order = 2
    _c0 = (0.0, 1.0, 0.5, 0.0)
    _c1 = (0.0, 0.25, 1.0, 0.25)
    _a0 = ((), (1.0,), (0.25, 0.25), (0.0, 0.0, 0.0))
    _a1 = ((), (0.25,), (1.0, 0.0), (0.0, 0.0, 0.25))
    _b0 = ((), (0.0,), (1.0, 0.5), (0.0, 0.0, 0.0))
    _b1 = ((), (-0.5,), (1.0, 0.0), (2.0, -1.0, 0.5))
    _alpha = (1 / 6, 1 / 6, 2 / 3, 0.0)
    _beta = ((-1.0, 4 / 3, 2 / 3, 0.0), (1.0, -4 / 3, 1 / 3, 0.0), (2.0, -4 / 3, -2 / 3, 0.0),
             (-2.0, 5 / 3, -2 / 3, 1.0))

    def step(self, terms, t0, t1, y0, args, solver_state):
        drift, diff = _split(terms, self)
        noise = _noise(diff)
        if noise == "general":
            raise ValueError("SRID2 needs diagonal, scalar or additive noise; use EulerMaruyama for general noise.")
        if noise == "additive":
            return SRA1.step(self, terms, t0, t1, y0, args, solver_state)
        dt = _interval(t0, t1, y0)
        W, H = _levy(diff, t0, t1)
        W, H = W.to(y0.dtype), H.to(y0.dtype)
        sq = math.sqrt(abs(dt)) if isinstance(dt, float) else dt.abs().sqrt()
        i11 = 0.5 * (W * W - abs(dt) if isinstance(dt, float) else W * W - dt.abs())
        i111 = (W**3 - 3 * (abs(dt) if isinstance(dt, float) else dt.abs()) * W) / 6
        i10_dt = H + 0.5 * W
        weights = [W, i11 / sq, i10_dt, i111 / dt]
        ts0 = [_time(t0 + c * (t1 - t0), y0) for c in self._c0]
        ts1 = [_time(t0 + c * (t1 - t0), y0) for c in self._c1]
        fs, gs, gvs = [], [], []
        y1 = y0
        for s in range(4):
            h0, h1 = y0, y0
            for j in range(s):
                if self._a0[s][j]:
                    h0 = h0 + (self._a0[s][j] * dt) * fs[j]
                if self._b0[s][j]:
                    h0 = h0 + self._b0[s][j] * gvs[j] * i10_dt
                if self._a1[s][j]:
                    h1 = h1 + (self._a1[s][j] * dt) * fs[j]
                if self._b1[s][j]:
                    h1 = h1 + (self._b1[s][j] * sq) * gvs[j]
            fs.append(_drift_vf(drift, ts0[s], h0, args))
            g = diff.vf(ts1[s], h1, args)
            gs.append(g)
            gvs.append(g[..., 0] if noise == "scalar" else g)
            wgt = None
            for b, w in zip((x[s] for x in self._beta), weights):
                if b:
                    wgt = b * w if wgt is None else wgt + b * w
            y1 = y1 + (self._alpha[s] * dt) * fs[s] + diff.prod(g, wgt)
        return y1, None, {"y0": y0, "y1": y1}, None, 8


# ---- adaptive stepping by step doubling -------------------------------------------------------
class StepDoubling(AbstractSolver):
    """Adaptive steps for any SDE solver: one step of ``dt`` against two of ``dt/2``.

    Returns the two-half-step solution with error estimate ``y_half - y_full``; the Brownian motion
    is queried at the midpoint, and (being a fixed function of its seed) gives the same values when a
    rejected interval is retried. Error order ``strong_order + 1/2``.

    Parameters
    ----------
    solver:
        An SDE solver instance, e.g. ``EulerMaruyama()``.
    """

    term_structure = "control"

    def __init__(self, solver: AbstractSolver):
        if not isinstance(solver, AbstractSolver):
            raise TypeError(f"solver must be an nde solver instance; got {type(solver).__name__}.")
        self.solver = solver
        so = solver.strong_order if solver.strong_order is not None else getattr(solver, "order", 1) or 1
        self.error_order = float(so) + 0.5
        self.sde_type = getattr(solver, "sde_type", None)
        self.strong_orders = getattr(solver, "strong_orders", {})
        self.strong_order = solver.strong_order
        self.order = solver.order

    def __repr__(self):
        return f"StepDoubling({self.solver!r})"

    def init(self, terms, t0, t1, y0, args):
        self.solver.init(terms, t0, t1, y0, args)
        return None, 0

    def step(self, terms, t0, t1, y0, args, solver_state):
        s = self.solver
        tm = t0 + 0.5 * (t1 - t0)
        yf, _, _, _, n1 = s.step(terms, t0, t1, y0, args, None)
        yh, _, _, _, n2 = s.step(terms, t0, tm, y0, args, None)
        y1, _, _, _, n3 = s.step(terms, tm, t1, yh, args, None)
        with torch.no_grad():
            err = y1 - yf
        return y1, err, {"y0": y0, "y1": y1}, None, n1 + n2 + n3
