"""``nde.cdeint``: the call convention of torchcde on top of :func:`nde.solve`.

A torchcde script switches by changing its import: the coefficient functions, ``CubicSpline``,
``LinearInterpolation``, ``InterpolationBase``, ``TupleControl``, the log-signature windows and
``cdeint`` keep their names, arguments and output layouts.

``cdeint`` solves the CDE in its ODE form ``dz/dt = f(t, z) dX/dt``, as torchcde does, with the
options of the backend it names: ``backend="torchdiffeq"`` takes torchdiffeq's methods and options
(fixed-step grids, ``interp``, ``perturb``, ``grid_constructor``, ``jump_t``, ``scipy_solver``, the
adjoint's options), ``backend="torchsde"`` torchsde's (``dt``, ``adaptive``, ``dt_min``, the reversible
Heun method and its exact adjoint). The Brownian part of torchcde's torchsde backend is zero, so
every torchsde method reduces to the deterministic method it applies to the drift.
"""

from __future__ import annotations

import bisect
import functools
import math
import warnings

import numpy as np
import torch

from ._controllers import ConstantStepSize, PIDController, _snap_tol, _term_jumps
from ._interpolation import TupleControl
from ._odeint import _run as _run_joint
from ._odeint import (
    _METHODS, _adaptive_setup, _check_method, _check_state, _check_t, _fixed_setup, _make_solver, _Plan,
    _split_options, _tol, _unflat_out,
)
from ._odeint_steps import with_interpolation
from ._path import AbstractPath
from ._saveat import SaveAt
from ._terms import ControlTerm, ODEForm, ODETerm, control_derivative, matrix_vector, matrix_vector_vjp

_BACKENDS = ("torchdiffeq", "torchsde", "nde")


# ---------------------------------------------------------------------------------------------
# controls
def _jump_ts_of(X):
    if isinstance(X, (AbstractPath, TupleControl)):
        return X.jump_ts
    try:
        g = X.grid_points
    except Exception:  # a path without knots, or with knots that differ between its parts
        return None
    return None if g is None else torch.as_tensor(g).detach().reshape(-1)


class _ForeignControl(AbstractPath):
    """Any object with ``derivative(t)`` (e.g. a torchcde interpolation) seen as an nde path."""

    def __init__(self, X):
        self.X = X
        interval = getattr(X, "interval", None)
        if interval is not None:
            lo, hi = (float(v) for v in torch.as_tensor(interval).reshape(-1)[[0, -1]])
        else:
            lo, hi = -math.inf, math.inf
        self._t0, self._t1 = lo, hi
        self._jumps = _jump_ts_of(X)

    @property
    def t0(self):
        return self._t0

    @property
    def t1(self):
        return self._t1

    @property
    def jump_ts(self):
        return self._jumps

    def evaluate(self, t0, t1=None, left=True):
        if t1 is None:
            return self.X.evaluate(t0)
        return self.X.evaluate(t1) - self.X.evaluate(t0)

    def derivative(self, t, left=True):
        return self.X.derivative(t)


# ---------------------------------------------------------------------------------------------
# the up-front check (on the first evaluation of the vector field, at no extra cost)
def _shape(x):
    return tuple(x.shape)


def _check_one(dxdt, out, z, is_prod, where=""):
    if not isinstance(dxdt, torch.Tensor):
        raise ValueError(f"z0{where} is a tensor, so X.derivative{where} must return a tensor too; got {type(dxdt).__name__}.")
    if not isinstance(out, torch.Tensor):
        name = "func.prod" if is_prod else "func"
        raise ValueError(f"z0{where} is a tensor, so {name}{where} must return a tensor too; got {type(out).__name__}.")
    if dxdt.shape[:-1] != z.shape[:-1]:
        raise ValueError(
            f"X.derivative{where} returned shape {_shape(dxdt)} (batch shape {_shape(dxdt)[:-1]}), but z0{where} has "
            f"shape {_shape(z)} (batch shape {_shape(z)[:-1]}): the path and the initial state need the same batch "
            "dimensions."
        )
    if is_prod:
        if out.shape != z.shape:
            raise ValueError(
                f"func.prod{where} returned shape {_shape(out)}, but z0{where} has shape {_shape(z)}; they must be equal "
                "(func.prod(t, z, dXdt) computes f(t, z) dX/dt)."
            )
        return
    want = _shape(z) + (dxdt.shape[-1],)
    if out.dim() < 2 or out.shape[:-2] != z.shape[:-1] or out.shape[-2] != z.shape[-1] or out.shape[-1] != dxdt.shape[-1]:
        parts = []
        if out.dim() >= 2:
            if out.shape[:-2] != z.shape[:-1]:
                parts.append(f"batch shape {_shape(out)[:-2]} instead of z0's {_shape(z)[:-1]}")
            if out.shape[-2] != z.shape[-1]:
                parts.append(f"{out.shape[-2]} hidden channels instead of z0's {z.shape[-1]}")
            if out.shape[-1] != dxdt.shape[-1]:
                parts.append(f"{out.shape[-1]} input channels instead of X.derivative's {dxdt.shape[-1]}")
        why = "; ".join(parts) if parts else "it needs at least two dimensions (hidden, input channels)"
        raise ValueError(
            f"func{where} returned shape {_shape(out)} ({why}). It must return (..., hidden channels, input channels) "
            f"= {want}: z0{where} has shape {_shape(z)} and X.derivative{where} returned shape {_shape(dxdt)}."
        )


def _check_compatibility(dxdt, out, z, is_prod):
    if isinstance(z, torch.Tensor):
        _check_one(dxdt, out, z, is_prod)
        return
    name = "func.prod" if is_prod else "func"
    if not isinstance(dxdt, (tuple, list)):
        raise ValueError(f"z0 is a tuple, so X.derivative must return a tuple too (e.g. nde.TupleControl); got {type(dxdt).__name__}.")
    if not isinstance(out, (tuple, list)):
        raise ValueError(f"z0 is a tuple, so {name} must return a tuple too; got {type(out).__name__}.")
    if not len(z) == len(dxdt) == len(out):
        raise ValueError(
            f"z0, X.derivative(t) and {name} must be tuples of the same length; got {len(z)}, {len(dxdt)} and {len(out)}."
        )
    for i, (d, o, zi) in enumerate(zip(dxdt, out, z)):
        _check_one(d, o, zi, is_prod, where=f"[{i}]")


# ---------------------------------------------------------------------------------------------
# the term: f(t, z) dX/dt
def _derivative(X, t):
    return control_derivative(X, t, type(X.X).__name__ if isinstance(X, _ForeignControl) else None)


class _CDETerm(ControlTerm):
    """``f(t, z) dX/dt`` for a tensor state; checks the shapes on its first evaluation."""

    def __init__(self, func, path):
        self.func = func
        self._has_prod = hasattr(func, "prod")
        super().__init__(self._matrix, path, vf_prod=self._prod if self._has_prod else None)
        self._checked = False

    def _matrix(self, t, z, args):
        return self.func(t, z)

    def _prod(self, t, z, args, dxdt):
        return self.func.prod(t, z, dxdt)

    def ode(self, t, y, args):
        dxdt = _derivative(self.control, t)
        if self._has_prod:
            out = self.func.prod(t, y, dxdt)
            if not self._checked:
                _check_compatibility(dxdt, out, y, True)
                self._checked = True
            return out
        vf = self.func(t, y)
        if not self._checked:
            _check_compatibility(dxdt, vf, y, False)
            self._checked = True
        return matrix_vector(vf, dxdt)

    def _ode_vjp(self, t, y, args, a, inputs):
        if self._has_prod or not self._checked:
            return None
        return matrix_vector_vjp(lambda: self.func(t, y), _derivative(self.control, t), a, inputs)

    def __call__(self, t, y):
        return self.ode(t, y, None)


class _TupleCDETerm(ODEForm):
    """``f(t, z) dX/dt`` for a tuple state (flattened into one vector) driven by a :class:`TupleControl`."""

    def __init__(self, func, X, flat):
        self.func, self.X, self.flat = func, X, flat
        self._has_prod = hasattr(func, "prod")
        self._checked = False

    def ode(self, t, y, args):
        zs = self.flat.unflatten(y)
        dxdt = _derivative(self.X, t)
        if not self._checked and not isinstance(dxdt, (tuple, list)):
            raise ValueError(
                "z0 is a tuple, so X.derivative must return a tuple too (drive the CDE with nde.TupleControl); got "
                f"{type(dxdt).__name__}."
            )
        out = self.func.prod(t, zs, dxdt) if self._has_prod else self.func(t, zs)
        if not self._checked:
            _check_compatibility(dxdt, out, zs, self._has_prod)
            self._checked = True
        if not self._has_prod:
            out = tuple(matrix_vector(v, d) for v, d in zip(out, dxdt))
        return self.flat.flatten(out)

    def __call__(self, t, y):
        return self.ode(t, y, None)

    @property
    def jump_ts(self):
        return _jump_ts_of(self.X)


# ---------------------------------------------------------------------------------------------
# steps
class _Grid(ConstantStepSize):
    """Steps on a prescribed grid of internal times (torchdiffeq's fixed-grid solvers).

    Grid points within rounding of a knot of the path are moved exactly onto it, so that the stages
    at the step ends see the path from inside the step in either time direction.
    """

    def __init__(self, grid):
        super().__init__(land_on_jumps=False)
        self.grid = [float(g) for g in grid]

    def _points(self, terms, y0):
        pts = list(self.grid)
        jumps = _term_jumps(terms, dtype=y0.dtype)
        if jumps is not None:
            spacing = min(b - a for a, b in zip(pts[:-1], pts[1:]))
            for i, p in enumerate(pts):
                j = bisect.bisect_left(jumps.list, p)
                tol = _snap_tol(spacing, pts[0], p, jumps.eps)
                for k in (j, j - 1):
                    if 0 <= k < len(jumps.list) and abs(jumps.list[k] - p) <= tol:
                        pts[i] = jumps.list[k]
                        break
        return pts

    def init_joint(self, terms, t0, t1, y0, dt0, args, solver, error_order=None):
        pts = self._points(terms, y0)
        i = min(bisect.bisect_right(pts, t0), len(pts) - 1)
        return min(pts[i], t1), (pts, i), 0

    def adapt_joint(self, t0, t1, y0, y1, y_err, state):
        pts, i = state
        i = min(i + 1, len(pts) - 1)
        return True, t1, pts[i], False, (pts, i), 0.0

    def init_batch(self, terms, t0, t1, y0, dt0, args, solver, norm_fn, error_order=None):
        pts = _GridPoints(np.array(self._points(terms, y0), dtype=np.float64))
        i = np.minimum(np.searchsorted(pts.array, t0, side="right"), pts.last)
        return np.minimum(pts.array[i], t1), (pts, i), 0

    def adapt_batch(self, t0, t1, y0, y1, y_err, state, norm_fn):
        pts, i = state
        i = np.minimum(i + 1, pts.last)
        return np.ones(t0.shape, dtype=bool), t1, pts.array[i], (pts, i), None

    def __repr__(self):
        return f"GridSteps({len(self.grid) - 1} steps)"


class _GridPoints:
    """A grid held outside the per-sample controller state (which the loop indexes by sample)."""

    def __init__(self, array):
        self.array, self.last = array, array.size - 1


# torchsde's methods, applied to an equation whose Brownian part is zero: the deterministic method
# each applies to the drift, and the interpretation (Ito / Stratonovich) it is defined for
_SDE_METHODS = {
    "euler": ("Euler", "ito"),
    "milstein": ("Euler", "both"),
    "srk": ("_SRA1Drift", "ito"),
    "midpoint": ("Midpoint", "stratonovich"),
    "heun": ("Heun", "stratonovich"),
    "euler_heun": ("Euler", "stratonovich"),
    "log_ode": ("Midpoint", "stratonovich"),
    "reversible_heun": ("ReversibleHeun", "stratonovich"),
}


@functools.lru_cache(maxsize=None)
def _sra1_class():
    """The drift stages of Rossler's SRA1 (torchsde's ``srk`` for additive noise): a second-order
    Runge--Kutta method with ``c = (0, 3/4)``, ``b = (1/3, 2/3)`` and an embedded Euler step."""
    from nde.solvers.rk import ButcherTableau, ExplicitRK

    tableau = ButcherTableau(c=[0.0, 0.75], a=[[0.75]], b_sol=[1 / 3, 2 / 3], b_err=[-2 / 3, 2 / 3], order=2,
                             embedded_order=1)
    return type("SRA1Drift", (ExplicitRK,), {"tableau": tableau, "__doc__": _sra1_class.__doc__})


def _sde_solver(method):
    import nde.solvers as S
    import nde.solvers.rk as R

    name = _SDE_METHODS[method][0]
    if name == "_SRA1Drift":
        return _sra1_class()()
    if name == "ReversibleHeun":
        return S.ReversibleHeun()
    return getattr(R, name)()


# ---------------------------------------------------------------------------------------------
def _pop(kwargs, name, default=None):
    return kwargs.pop(name) if name in kwargs else default


def _adjoint_kwargs(kwargs, rtol, atol):
    """``adjoint_rtol``, ``adjoint_atol`` (default: the forward tolerances), ``adjoint_method``,
    ``adjoint_options`` and ``adjoint_params``, taken out of ``kwargs``."""
    return (_pop(kwargs, "adjoint_rtol", rtol), _pop(kwargs, "adjoint_atol", atol), _pop(kwargs, "adjoint_method"),
            _pop(kwargs, "adjoint_options"), _pop(kwargs, "adjoint_params"))


def _as_control(X):
    if isinstance(X, AbstractPath):
        return X
    if not hasattr(X, "derivative"):
        raise ValueError(
            f"X must be a path with a 'derivative' method (e.g. nde.CubicSpline(coeffs, t)); got {type(X).__name__}."
        )
    return _ForeignControl(X)


def _make_term(X, func, flat):
    if flat is not None:
        return _TupleCDETerm(func, X, flat)
    return _CDETerm(func, _as_control(X))


def cdeint(X, func, z0, t, adjoint=True, backend="torchdiffeq", **kwargs):
    r"""Solve the controlled differential equation ``z_t = z_{t_0} + \int_{t_0}^t f(s, z_s) dX_s``.

    torchcde's interface on top of :func:`nde.solve`: the CDE is solved in its ODE form
    ``dz/dt = f(t, z) dX/dt``. Paths built by nde (:class:`~nde.CubicSpline`,
    :class:`~nde.LinearInterpolation`) and any other object with ``derivative(t)`` (and optionally
    ``grid_points``) work; their knots are where adaptive steps land, and the stages at a step's ends
    see the path from inside the step.

    Parameters
    ----------
    X:
        The control: an nde path, any object with ``derivative(t)`` returning ``(..., channels)``, or a
        :class:`TupleControl` for a tuple state.
    func:
        ``f(t, z)`` returning ``(..., hidden, channels)``; if it has a method ``prod(t, z, dXdt)``, that is
        called instead to compute ``f(t, z) dX/dt`` directly. Tuples in, tuples out for a tuple ``z0``.
    z0:
        Initial state ``(..., hidden)``, or a tuple of such tensors.
    t:
        1-D tensor of strictly monotone times: integrate from ``t[0]`` to ``t[-1]`` (backwards if decreasing)
        and return the state at each.
    adjoint:
        Backpropagate with the continuous adjoint (:class:`~nde.BacksolveAdjoint`; for torchsde's
        ``reversible_heun`` with ``adjoint_method="adjoint_reversible_heun"``, the exact
        :class:`~nde.ReversibleAdjoint`) instead of through the solver's operations. Tensors of the
        path that require grad (the data) receive their gradient either way, ``adjoint_params`` or not.
    backend:
        ``"torchdiffeq"`` (default) or ``"torchsde"``: whose methods and options ``**kwargs`` holds. Every
        backend solves with nde. ``"nde"`` takes torchdiffeq's methods, and fixed steps that also stop
        on the knots of the path (:class:`~nde.ConstantStepSize`).
    **kwargs:
        torchdiffeq: ``method`` (default ``"dopri5"``), ``rtol`` (1e-4), ``atol`` (1e-6), ``options`` (as
        :func:`nde.odeint`: ``step_size``, ``grid_constructor``, ``interp``, ``perturb``, ``first_step``,
        ``jump_t``, ``step_t``, ``max_num_steps``, ...), ``adjoint_rtol``, ``adjoint_atol``,
        ``adjoint_method``, ``adjoint_options``, ``adjoint_params``.
        torchsde: ``method`` (default ``"midpoint"``, or ``"srk"`` when ``func.sde_type == "ito"``),
        ``dt`` (1e-3), ``adaptive`` (False), ``rtol``, ``atol``, ``dt_min`` (1e-5), ``options``, ``names``,
        ``bm`` (accepted: the Brownian part is zero, so it does not change the solution),
        ``adjoint_method``, ``adjoint_adaptive``, ``adjoint_rtol``, ``adjoint_atol``, ``adjoint_options``,
        ``adjoint_params``.
        Both: nde's ``batch_mode`` (``"joint"`` or ``"independent"``).

    Returns
    -------
    torch.Tensor or tuple of torch.Tensor
        ``(..., len(t), hidden)``: time second-to-last, as torchcde returns it.

    Notes
    -----
    Differences to torchcde, all in favour of accuracy: fixed-step stages at a step's ends take the
    one-sided derivative of the path from inside the step (torchdiffeq's ``perturb=True``; pass
    ``options=dict(perturb=False)`` to evaluate exactly at the step ends), adaptive steps always land on
    the path's knots, and torchsde's adaptive steps are controlled by the method's embedded error
    estimate instead of step doubling.

    References
    ----------
    Kidger, Morrill, Foster & Lyons (2020), "Neural controlled differential equations for irregular time series", NeurIPS.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}; got {backend!r}.")
    if not callable(func) and not hasattr(func, "prod"):
        raise TypeError(f"func must be callable as func(t, z) or have a method prod(t, z, dXdt); got {type(func).__name__}.")
    batch_mode = _pop(kwargs, "batch_mode", "joint")
    flat, y = _check_state(z0)
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, dtype=y.dtype)
    t, tl = _check_t(t)
    if len(tl) < 2:
        raise ValueError(f"t must hold at least two times (the start and the end); got shape {tuple(t.shape)}.")
    if flat is not None and batch_mode != "joint":
        raise ValueError("batch_mode='independent' needs a tensor z0; a tuple z0 is solved jointly.")
    term = _make_term(X, func, flat)
    if backend == "torchsde":
        P, adj = _plan_torchsde(term, func, y, flat, t, tl, adjoint, kwargs)
    else:
        P, adj = _plan_torchdiffeq(term, func, y, flat, t, tl, adjoint, backend, kwargs)
    return _finish(P, _run(P, adj, batch_mode))


def _finish(P, ys):
    out = _unflat_out(P, ys)
    if isinstance(out, tuple):
        return tuple(o.movedim(0, -2) for o in out)
    return out.movedim(0, -2)


def _new_plan(term, func, y, flat, t, tl, method, rtol, atol, options):
    P = _Plan()
    P.method, P.flat, P.y, P.t, P.tl, P.user_func, P.y0_user = method, flat, y, t, tl, func, y
    P.sign = -1.0 if tl[1] < tl[0] else 1.0
    P.rtol = _tol(rtol, "rtol", flat, y)
    P.atol = _tol(atol, "atol", flat, y)
    P.options = options
    P.event = None
    P.cell = None
    P.callbacks = None
    P.field = term
    P.t0, P.t1 = tl[0], tl[-1]
    return P


def _fixed_steps(P, ours, land_on_jumps):
    """torchdiffeq's fixed-step grids (a step size, a grid constructor, or the output times) and its
    outputs between steps (``interp``), on steps that see the knots of the path exactly."""
    if land_on_jumps and ours.get("step_size") is not None:
        # nde's own convention: the steps also stop on the knots; outputs by dense interpolation
        P.controller, P.dt0, P.max_steps = ConstantStepSize(), P.sign * ours["step_size"], None
        P.saveat = SaveAt(ts=P.t.detach())
        return
    func, P.user_func = P.user_func, P.field  # a grid constructor is called with the vector field
    _fixed_setup(P, ours)
    P.user_func = func
    P.controller = _Grid(P.controller.grid)
    # outputs between grid points: torchdiffeq's interpolant of the step's ends
    P.solver = with_interpolation(P.solver, ours.get("interp", "linear"))


def _plan_torchdiffeq(term, func, y, flat, t, tl, adjoint, backend, kwargs):
    method = _check_method(_pop(kwargs, "method"))
    rtol = _pop(kwargs, "rtol", 1e-4)
    atol = _pop(kwargs, "atol", 1e-6)
    options = _pop(kwargs, "options")
    adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options, adjoint_params = _adjoint_kwargs(kwargs, rtol, atol)
    if kwargs:
        raise TypeError(
            f"cdeint (backend={backend!r}) got unexpected keyword arguments {sorted(kwargs)}; it takes method, rtol, "
            "atol, options, adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options, adjoint_params and batch_mode."
        )
    ours, solver_kw = _split_options(method, options)
    P = _new_plan(term, func, y, flat, t, tl, method, rtol, atol, ours)
    P.kind = _METHODS[method][0]
    if P.kind == "scipy":
        return P, None
    P.solver = _make_solver(method, solver_kw)
    if P.kind == "adaptive":
        _adaptive_setup(P, ours)
    else:
        if ours.get("perturb") is False:
            # evaluate exactly at the step ends, as torchdiffeq does without perturb
            P.field = ODETerm(term)
        _fixed_steps(P, ours, backend == "nde")
    adj = None
    if adjoint:
        if adjoint_method is None:
            adjoint_method = method
        elif adjoint_method != method and options is not None and adjoint_options is None:
            raise ValueError(
                "adjoint_method differs from method, so adjoint_options cannot be inferred from options: pass "
                "adjoint_options too."
            )
        params = () if adjoint_params is None else tuple(p for p in adjoint_params if p.requires_grad)
        adj = _backsolve(P, adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options, params)
    return P, adj


def _backsolve(P, rtol, atol, method, adjoint_options, params):
    """torchcde's adjoint (torchdiffeq's ``odeint_adjoint``): the continuous adjoint solved by ``method``."""
    from ._backsolve import BacksolveAdjoint

    aopts = {} if adjoint_options is None else dict(adjoint_options)
    norm = aopts.pop("norm", None)
    if norm is None:
        norm = "rms"
    if norm not in ("seminorm", "rms"):
        raise ValueError(f"adjoint_options['norm'] must be 'seminorm' or 'rms'; got {norm!r}.")
    method = _check_method(method)
    if _METHODS[method][0] == "scipy":
        raise ValueError("adjoint_method='scipy_solver' is not differentiable; pick an nde method such as 'dopri5'.")
    ours, solver_kw = _split_options(method, aopts, name="adjoint_options") if aopts else ({}, {})
    solver = _make_solver(method, solver_kw)
    rt = _tol(rtol, "adjoint_rtol", P.flat, P.y)
    at = _tol(atol, "adjoint_atol", P.flat, P.y)
    if not isinstance(rt, float) or not isinstance(at, float):
        raise ValueError("adjoint_rtol and adjoint_atol must be numbers.")
    return BacksolveAdjoint(rtol=rt, atol=at, solver=solver, norm=norm, params=params)


def _plan_torchsde(term, func, y, flat, t, tl, adjoint, kwargs):
    import nde

    sde_type = getattr(func, "sde_type", "stratonovich")
    if sde_type not in ("ito", "stratonovich"):
        raise ValueError(f"func.sde_type must be 'ito' or 'stratonovich'; got {sde_type!r}.")
    method = _pop(kwargs, "method")
    if method is None:
        method = "srk" if sde_type == "ito" else "midpoint"
    _check_sde_method(method, sde_type, "method")
    dt = float(_pop(kwargs, "dt", 1e-3))
    adaptive = bool(_pop(kwargs, "adaptive", False))
    rtol = _pop(kwargs, "rtol", 1e-4)
    atol = _pop(kwargs, "atol", 1e-6)
    dt_min = float(_pop(kwargs, "dt_min", 1e-5))
    options = _pop(kwargs, "options")
    names = _pop(kwargs, "names")
    _pop(kwargs, "bm")
    if _pop(kwargs, "logqp", False):
        raise ValueError("logqp=True needs a prior drift and a nonzero diffusion; a CDE has neither.")
    for name in ("extra", "extra_solver_state"):
        if _pop(kwargs, name) not in (None, False):
            raise ValueError(f"{name} is not supported by nde.cdeint: the solver state of a step is internal to nde.")
    adjoint_adaptive = bool(_pop(kwargs, "adjoint_adaptive", False))
    adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options, adjoint_params = _adjoint_kwargs(kwargs, rtol, atol)
    if kwargs:
        raise TypeError(
            f"cdeint (backend='torchsde') got unexpected keyword arguments {sorted(kwargs)}; it takes method, dt, "
            "adaptive, rtol, atol, dt_min, options, names, bm, adjoint_method, adjoint_adaptive, adjoint_rtol, "
            "adjoint_atol, adjoint_options, adjoint_params and batch_mode."
        )
    if not (dt > 0 and math.isfinite(dt)):
        raise ValueError(f"dt must be a positive number; got {dt}.")
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options must be a dict; got {type(options).__name__}.")
    if adjoint_options is not None and not isinstance(adjoint_options, dict):
        raise TypeError(f"adjoint_options must be a dict; got {type(adjoint_options).__name__}.")
    if names is not None:
        if not isinstance(names, dict):
            raise TypeError(f"names must be a dict; got {type(names).__name__}.")
        bad = {k: v for k, v in names.items() if v not in ("f", "g", "h", "f_and_g", "g_prod", "f_and_g_prod")}
        if bad:
            raise ValueError(
                f"names renames the methods of the SDE that torchcde builds from X and func (f, g); {bad} names methods "
                "it does not have."
            )
    if flat is not None:
        raise ValueError("backend='torchsde' needs a tensor z0 (torchsde has no tuple states).")
    if y.dim() != 2:
        raise ValueError(
            f"backend='torchsde' needs z0 of shape (batch, hidden), as torchsde does; got shape {tuple(y.shape)}."
        )
    if tl[1] < tl[0]:
        raise ValueError("backend='torchsde' needs strictly increasing t, as torchsde does (use the torchdiffeq backend).")
    P = _new_plan(term, func, y, flat, t, tl, method, rtol, atol, {})
    P.kind = "adaptive" if adaptive else "fixed"
    P.solver = _sde_solver(method)
    reversible = method == "reversible_heun"
    if reversible:
        # its vector-field value at a step's end is reused by the next step: the ODE form, as torchsde sees it
        P.field = ODETerm(term)
    if adaptive:
        if P.solver.error_order is None:
            raise ValueError(
                f"adaptive=True with method={method!r}: nde's {type(P.solver).__name__} has no error estimate; use "
                "method='midpoint' or 'heun' (Stratonovich) or 'srk' (Ito), or adaptive=False."
            )
        if not isinstance(P.rtol, float) or not isinstance(P.atol, float):
            raise ValueError("rtol and atol must be numbers with backend='torchsde'.")
        P.controller = PIDController(rtol=P.rtol, atol=P.atol, dtmin=dt_min, force_dtmin=True)
        P.dt0 = dt
        P.max_steps = 16384
        P.saveat = SaveAt(ts=t.detach())
    else:
        _fixed_steps(P, {"step_size": dt}, False)
    adj = None
    if adjoint:
        if adjoint_method is None:
            adjoint_method = "adjoint_reversible_heun" if reversible else ("midpoint" if sde_type == "stratonovich" else "euler")
        params = () if adjoint_params is None else tuple(p for p in adjoint_params if p.requires_grad)
        if adjoint_method == "adjoint_reversible_heun":
            if not reversible:
                raise ValueError(
                    f"adjoint_method='adjoint_reversible_heun' is the exact adjoint of method='reversible_heun'; got "
                    f"method={method!r}."
                )
            adj = nde.ReversibleAdjoint(params=params)
        else:
            if reversible:
                warnings.warn(
                    f"method='reversible_heun', but adjoint_method={adjoint_method!r} rather than "
                    "'adjoint_reversible_heun': the gradients are those of the continuous adjoint, not exact.",
                    stacklevel=3,
                )
            _check_sde_method(adjoint_method, sde_type, "adjoint_method")
            solver = _sde_solver(adjoint_method)
            if getattr(solver, "reversible", False):
                solver = nde.solvers.rk.Heun()
            ar = _tol(adjoint_rtol, "adjoint_rtol", None, y)
            at = _tol(adjoint_atol, "adjoint_atol", None, y)
            if not isinstance(ar, float) or not isinstance(at, float):
                raise ValueError("adjoint_rtol and adjoint_atol must be numbers.")
            kw = dict(rtol=ar, atol=at, solver=solver, norm="rms", params=params)
            adj = _fixed_step_backsolve(dt, **kw) if adaptive and not adjoint_adaptive else nde.BacksolveAdjoint(**kw)
    return P, adj


def _check_sde_method(method, sde_type, name):
    if method == "adjoint_reversible_heun" and name == "adjoint_method":
        return
    if method not in _SDE_METHODS:
        raise ValueError(f"{name} must be one of {sorted(_SDE_METHODS)} with backend='torchsde'; got {method!r}.")
    kind = _SDE_METHODS[method][1]
    if kind != "both" and kind != sde_type:
        raise ValueError(
            f"{name}={method!r} solves {kind} SDEs, but func.sde_type is {sde_type!r} (torchcde's default is "
            "'stratonovich'): pick a method of that kind, or set func.sde_type."
        )


def _fixed_step_backsolve(dt, **kwargs):
    """A BacksolveAdjoint whose backward solve takes fixed steps ``dt`` although the forward one adapts
    them (torchsde's ``adjoint_adaptive=False``)."""
    from ._backsolve import BacksolveAdjoint

    class FixedStepBacksolve(BacksolveAdjoint):
        def backward_controller(self, problem, n_head, solver=None, **kwargs):
            return ConstantStepSize(), dt

    return FixedStepBacksolve(**kwargs)


def _run(P, adjoint, batch_mode):
    if batch_mode == "joint":
        return _run_joint(P, adjoint)
    from ._solve import solve

    # every sample its own steps
    if P.kind == "scipy" or P.t.requires_grad:
        raise ValueError("batch_mode='independent' needs an nde method, and t not requiring grad.")
    sol = solve(P.field, P.solver, P.t0, P.t1, P.y, dt0=P.dt0, saveat=P.saveat, controller=P.controller,
                adjoint=adjoint, max_steps=P.max_steps, batch_mode=batch_mode, batch_ndim=max(P.y.dim() - 1, 0))
    return sol.ys


__all__ = ["cdeint", "InterpolationBase", "TupleControl"]
