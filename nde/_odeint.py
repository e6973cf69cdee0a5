"""The torchdiffeq call conventions (``odeint``, ``odeint_adjoint``, ``odeint_event``) on top of :func:`nde.solve`.

A script switches by changing its import line only: same signatures, defaults, options and
return conventions. The layer is thin: it translates method names and options into an nde
solver, controller and :class:`~nde.SaveAt`, flattens tuple states, and hands over to the loop.
"""

from __future__ import annotations

import inspect
import math
import warnings

import torch

from ._backsolve import BacksolveAdjoint
from ._event import Event, ImplicitEventTime
from ._odeint_steps import (
    CALLBACKS, Callbacks, DropinPID, GridSteps, IntervalGrid, OneSided, StepCell, find_callbacks,
    with_interpolation,
)
from ._saveat import SaveAt
from ._solve import solve

# method name -> (kind, nde.solvers class names to try, in order)
_METHODS = {
    "dopri8": ("adaptive", ("Dopri8",)),
    # torchdiffeq's dopri5 measures its error with Shampine's embedded solution
    "dopri5": ("adaptive", ("Dopri5",), {"error_estimate": "shampine"}),
    "tsit5": ("adaptive", ("Tsit5",)),
    "bosh3": ("adaptive", ("Bosh3",)),
    "fehlberg2": ("adaptive", ("Fehlberg2",)),
    "adaptive_heun": ("adaptive", ("Heun",)),
    "euler": ("fixed", ("Euler",)),
    "midpoint": ("fixed", ("Midpoint",)),
    "heun2": ("fixed", ("Heun",)),
    "heun3": ("fixed", ("Heun3",)),
    # the "rk4" of torchdiffeq is Kutta's 3/8 rule
    "rk4": ("fixed", ("RK38",)),
    "explicit_adams": ("fixed", ("ExplicitAdams",)),
    "implicit_adams": ("fixed", ("ImplicitAdams",)),
    "fixed_adams": ("fixed", ("FixedAdams", "ImplicitAdams")),
    "implicit_euler": ("fixed", ("ImplicitEuler",)),
    "implicit_midpoint": ("fixed", ("ImplicitMidpoint",)),
    "trapezoid": ("fixed", ("Trapezoid",)),
    "radauIIA3": ("fixed", ("RadauIIA3",)),
    "radauIIA5": ("fixed", ("RadauIIA5",)),
    "gl4": ("fixed", ("GaussLegendre4", "GL4")),
    "gl6": ("fixed", ("GaussLegendre6", "GL6")),
    "sdirk2": ("fixed", ("SDIRK2",)),
    "trbdf2": ("fixed", ("TRBDF2",)),
    "scipy_solver": ("scipy", ()),
}
METHODS = tuple(_METHODS)

_ADAPTIVE_OPTIONS = ("first_step", "safety", "ifactor", "dfactor", "max_num_steps", "dtype", "step_t", "jump_t",
                     "norm", "min_step", "max_step")
_FIXED_OPTIONS = ("step_size", "grid_constructor", "perturb", "interp", "norm", "dtype")
# (torchdiffeq's scipy wrapper ignores grid_points and eps without a warning)
_SCIPY_OPTIONS = ("solver", "min_step", "max_step", "norm", "dtype", "grid_points", "eps")
_OPTION_ALIASES = {"max_iters": "max_newton_iters"}
_EVENT_HORIZON = 1e18  # the far end of an event search ("until the event happens")
_SOLVER_CACHE = {}


# ---- method table -------------------------------------------------------------------------
def _solver_class(method):
    import nde.solvers as S

    names = _METHODS[method][1]
    for name in names:
        cls = getattr(S, name, None)
        if cls is not None:
            return cls
    raise ValueError(
        f"method={method!r} needs the nde solver {names[0]}, which this installation of nde.solvers does not provide."
    )


def _check_method(method):
    if method is None:
        return "dopri5"
    if not isinstance(method, str) or method not in _METHODS:
        raise ValueError(f"Invalid method {method!r}. Must be one of {{{', '.join(repr(m) for m in METHODS)}}}.")
    return method


def _constructor_args(cls):
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return ()
    return tuple(k for k, p in params.items() if k != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _split_options(method, options, name="options"):
    """Validate ``options`` for ``method``; returns (drop-in options, solver constructor kwargs).

    As torchdiffeq, an option the method does not know is ignored with a warning (naming it and
    listing the accepted ones); an option whose value is invalid raises.
    """
    kind = _METHODS[method][0]
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"{name} must be a dict; got {type(options).__name__}.")
    options = {} if options is None else dict(options)
    allowed = {"adaptive": _ADAPTIVE_OPTIONS, "fixed": _FIXED_OPTIONS, "scipy": _SCIPY_OPTIONS}[kind]
    extra = None
    ours, solver_kw = {}, {}
    for k, v in options.items():
        key = _OPTION_ALIASES.get(k, k)
        if k in allowed:
            ours[k] = v
            continue
        if extra is None:
            extra = _constructor_args(_solver_class(method)) if kind != "scipy" else ()
        if k in extra:
            solver_kw[k] = v
        elif key in extra:
            solver_kw[key] = v
        else:
            accepted = sorted(set(allowed) | set(extra) | {a for a, b in _OPTION_ALIASES.items() if b in extra})
            hint = ""
            if kind == "adaptive" and k in _FIXED_OPTIONS:
                hint = f" ({k!r} is an option of fixed-step methods such as 'rk4'; {method!r} chooses its own steps: use 'first_step' or 'max_step')"
            elif kind == "fixed" and k in _ADAPTIVE_OPTIONS:
                hint = f" ({k!r} is an option of adaptive methods such as 'dopri5'; {method!r} takes fixed steps: use 'step_size')"
            warnings.warn(
                f"Unknown option {k!r} in {name} for method={method!r}, ignored{hint}. Accepted options: {accepted}.",
                UserWarning, stacklevel=4,
            )
    if "interp" in ours and ours["interp"] not in ("linear", "cubic"):
        raise ValueError(f"{name}['interp'] must be 'linear' or 'cubic'; got {ours['interp']!r}.")
    if ours.get("step_size") is not None and ours.get("grid_constructor") is not None:
        raise ValueError(f"{name} 'step_size' and 'grid_constructor' are mutually exclusive: pass one of them.")
    if ours.get("grid_constructor") is not None and not callable(ours["grid_constructor"]):
        raise TypeError(f"{name}['grid_constructor'] must be callable as grid_constructor(func, y0, t); "
                        f"got {type(ours['grid_constructor']).__name__}.")
    if ours.get("dtype") is not None and not (isinstance(ours["dtype"], torch.dtype) and ours["dtype"].is_floating_point):
        raise TypeError(f"{name}['dtype'] must be a floating-point torch.dtype; got {ours['dtype']!r}.")
    for opt in ("first_step", "safety", "ifactor", "dfactor", "min_step", "max_step", "step_size"):
        v = ours.get(opt)
        if v is not None:
            v = _number(v, f"{name}[{opt!r}]")
            if not (v > 0 or (opt == "min_step" and v == 0) or (opt == "max_step" and v == math.inf)):
                raise ValueError(f"{name}[{opt!r}] must be positive; got {v}.")
            ours[opt] = v
    if ours.get("norm") is not None and not callable(ours["norm"]):
        raise TypeError(f"{name}['norm'] must be a callable norm(tensor) -> scalar; got {type(ours['norm']).__name__}.")
    mns = ours.get("max_num_steps")
    if mns is not None and (isinstance(mns, bool) or not isinstance(mns, int) or mns < 1):
        raise ValueError(f"{name}['max_num_steps'] must be a positive integer; got {mns!r}.")
    return ours, solver_kw


def _number(v, name):
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a number; got a tensor of shape {tuple(v.shape)}.")
        v = float(v.detach())
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number; got {type(v).__name__}.")
    return float(v)


# torchdiffeq's adaptive RK steps take their last stage as the next step's first; for these two
# tableaux that stage is not f(t1, y1) (it is f at the Euler predictor, resp. at the first-order
# solution), so torchdiffeq runs variants of the methods with one evaluation a step fewer: the drop-in
# runs the same ones (nde.solve's Heun and Fehlberg2 evaluate f(t1, y1))
_LAST_STAGE_REUSED = ("adaptive_heun", "fehlberg2")


def _make_solver(method, solver_kw):
    cls = _solver_class(method)
    entry = _METHODS[method]
    defaults = entry[2] if len(entry) > 2 else {}
    if not solver_kw:
        s = _SOLVER_CACHE.get(method)
        if s is not None and type(s) is cls:
            return s
    s = cls(**{**defaults, **solver_kw})
    if method in _LAST_STAGE_REUSED:
        s.reuse_last_stage = True
    if not solver_kw:
        _SOLVER_CACHE[method] = s
    return s


# ---- states: a tensor or a tuple of tensors ------------------------------------------------
class _Flat:
    """Flattens a tuple state into one vector (and back)."""

    def __init__(self, y0):
        self.shapes = [y.shape for y in y0]
        self.sizes = [y.numel() for y in y0]

    def flatten(self, ys):
        return torch.cat([y.reshape(-1) for y in ys])

    def unflatten(self, y, lead=()):
        out, i = [], 0
        for shape, n in zip(self.shapes, self.sizes):
            out.append(y[..., i:i + n].reshape(tuple(lead) + tuple(shape)))
            i += n
        return tuple(out)


def _check_state(y0):
    if isinstance(y0, torch.Tensor):
        if not y0.dtype.is_floating_point:
            raise TypeError(f"y0 must be a floating-point tensor; got dtype {y0.dtype}.")
        return None, y0
    if isinstance(y0, (tuple, list)) and y0 and all(isinstance(y, torch.Tensor) for y in y0):
        dtypes = {y.dtype for y in y0}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise TypeError(f"The tensors of a tuple y0 must share one floating-point dtype; got {sorted(map(str, dtypes))}.")
        flat = _Flat(y0)
        return flat, flat.flatten(y0)
    raise TypeError(f"y0 must be a tensor or a tuple of tensors; got {type(y0).__name__}.")


def _tol(tol, name, flat, y):
    if isinstance(tol, (tuple, list)) and flat is not None:
        if len(tol) != len(flat.shapes):
            raise ValueError(f"A tuple {name} needs one entry per tensor of y0 ({len(flat.shapes)}); got {len(tol)}.")
        parts = [torch.as_tensor(v, dtype=y.dtype, device=y.device).expand(s) for v, s in zip(tol, flat.shapes)]
        return flat.flatten(parts)
    if isinstance(tol, torch.Tensor):
        if tol.requires_grad:
            raise ValueError(f"{name} cannot require gradient.")
        if tol.numel() == 1:
            return float(tol)
        t = tol.to(dtype=y.dtype, device=y.device)
        if flat is not None:
            if t.numel() != y.numel():
                raise ValueError(f"A tensor {name} with a tuple y0 must have one entry per element ({y.numel()}); got {t.numel()}.")
            return t.reshape(-1)
        try:
            torch.broadcast_shapes(t.shape, y.shape)
        except RuntimeError:
            raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast against y0 of shape {tuple(y.shape)}.") from None
        return t
    v = _number(tol, name)
    if not (v >= 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a finite nonnegative number; got {v}.")
    return v


class _TupleField:
    def __init__(self, func, flat):
        self.func, self.flat = func, flat

    def __call__(self, t, y):
        return self.flat.flatten(self.func(t, self.flat.unflatten(y)))


class _TupleCond:
    def __init__(self, fn, flat):
        self.fn, self.flat = fn, flat

    def __call__(self, t, y):
        return self.fn(t, self.flat.unflatten(y))


def _mixed_norm(flat, norm=None):
    if norm is not None:
        return lambda x: norm(flat.unflatten(x))

    def mixed(x):
        return torch.stack([p.pow(2).mean().sqrt() for p in flat.unflatten(x)]).max()

    return mixed


# ---- time ------------------------------------------------------------------------------------
def _check_t(t):
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"t must be a 1-D tensor of times; got {type(t).__name__}.") from None
    if not t.dtype.is_floating_point:
        raise TypeError(f"t must be a floating-point tensor; got dtype {t.dtype}.")
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"t must be a non-empty 1-D tensor of times; got shape {tuple(t.shape)}.")
    vals = t.detach().to(torch.float64).cpu().tolist()
    # (on the host: a few comparisons of Python floats cost less than tensor operations)
    if not all(math.isfinite(v) for v in vals):
        raise ValueError("t contains NaN or inf.")
    if len(vals) > 1:
        pairs = list(zip(vals[:-1], vals[1:]))
        if not (all(a < b for a, b in pairs) or all(a > b for a, b in pairs)):
            raise ValueError("t must be strictly increasing or strictly decreasing.")
    return t, vals


# ---- the common set-up -----------------------------------------------------------------------
class _Plan:
    pass


def _plan(func, y0, t, rtol, atol, method, options, event_fn, back_cell=False):
    """Everything a solve needs, from torchdiffeq's arguments.

    ``back_cell``: the adjoint pass evaluates the vector field one-sidedly at some step ends (its
    controller then drives the same :class:`StepCell` as the forward one).
    """
    if not callable(func):
        raise TypeError(f"func must be callable as func(t, y); got {type(func).__name__}.")
    method = _check_method(method)
    ours, solver_kw = _split_options(method, options)
    flat, y = _check_state(y0)
    t, tl = _check_t(t)
    P = _Plan()
    P.method, P.kind, P.flat, P.y, P.t, P.tl, P.user_func, P.y0_user = method, _METHODS[method][0], flat, y, t, tl, func, y0
    P.sign = -1.0 if len(tl) > 1 and tl[1] < tl[0] else 1.0
    P.rtol = _tol(rtol, "rtol", flat, y)
    P.atol = _tol(atol, "atol", flat, y)
    P.options, P.solver_kw = ours, solver_kw
    field = func if flat is None else _TupleField(func, flat)
    P.event = None
    if event_fn is not None:
        if not callable(event_fn):
            raise TypeError(f"event_fn must be callable as event_fn(t, y); got {type(event_fn).__name__}.")
        if len(tl) != 2:
            raise ValueError(f"With event_fn, t must hold exactly two times (the start and a direction); got len(t)={len(tl)}.")
        cond = event_fn if flat is None else _TupleCond(event_fn, flat)
        P.event_cond = cond
        P.event = Event(cond, direction=None, terminal=True)
    P.cell = None
    P.callbacks = _callbacks(P, find_callbacks(func), "func")
    if P.kind == "scipy":
        P.field = field
        return P
    P.solver = _build_solver(method, solver_kw, P.kind, rtol, atol, P.rtol, P.atol)
    if P.kind == "fixed":
        # outputs between grid points are torchdiffeq's interpolants of the step's ends
        P.solver = with_interpolation(P.solver, ours.get("interp", "linear"))
    # stages at a step's end see the vector field from inside the step: at every step end with
    # perturb=True (fixed grids), at the ends where a discontinuity may sit for adaptive methods
    if P.kind == "adaptive" or bool(ours.get("perturb", False)) or back_cell:
        P.cell = StepCell()
        field = OneSided(field, P.cell)
    P.field = field
    if len(tl) == 1 and P.event is None:
        return P  # nothing to integrate
    t0, t1 = tl[0], tl[-1]
    if P.event is not None:
        t1 = t0 + P.sign * _EVENT_HORIZON
    P.t0, P.t1 = t0, t1
    if P.kind == "adaptive":
        _adaptive_setup(P, ours)
    else:
        _fixed_setup(P, ours)
    return P


def _build_solver(method, solver_kw, kind, rtol, atol, rt, at):
    """The nde solver; an implicit fixed-step one also gets the tolerances of its stage iterations."""
    if kind == "fixed" and isinstance(rt, float) and isinstance(at, float) and ((rtol, atol) != (1e-7, 1e-9) or solver_kw):
        ctor = _constructor_args(_solver_class(method))
        if "rtol" in ctor and "atol" in ctor:
            solver_kw = {"rtol": rt, "atol": at, **solver_kw}
    return _make_solver(method, solver_kw)


def _callbacks(P, found, owner):
    """The callbacks of the method's kind, in torchdiffeq's convention; warns about unsupported ones."""
    if not found:
        return None
    supported = {"adaptive": CALLBACKS, "fixed": ("callback_step",), "scipy": ()}[P.kind]
    unsupported = sorted(k for k in found if k not in supported)
    if unsupported:
        warnings.warn(
            f"method={P.method!r} does not call the callbacks {unsupported} of {owner} "
            f"(it supports {list(supported) if supported else 'none'}).", UserWarning, stacklevel=4,
        )
    cb = {k: v for k, v in found.items() if k in supported}
    if not cb:
        return None
    tdtype = torch.float64 if P.kind == "adaptive" else P.t.dtype
    wrap = None if P.flat is None else P.flat.unflatten
    return Callbacks(cb.get("callback_step"), cb.get("callback_accept_step"), cb.get("callback_reject_step"),
                     wrap=wrap, tdtype=tdtype)


def _adaptive_setup(P, ours):
    step_t, jump_t = ours.get("step_t"), ours.get("jump_t")
    if step_t is not None and jump_t is not None:
        s = set(torch.as_tensor(step_t, dtype=torch.float64).reshape(-1).tolist())
        if s & set(torch.as_tensor(jump_t, dtype=torch.float64).reshape(-1).tolist()):
            raise ValueError("options 'step_t' and 'jump_t' must not have any repeated elements between them.")
    norm = ours.get("norm")
    if P.flat is not None:
        norm = _mixed_norm(P.flat, norm)
    hooks = dict(cell=P.cell, to_user=P.sign, callbacks=P.callbacks, max_num_steps=ours.get("max_num_steps"),
                 outs=() if P.event is not None else P.tl[1:])
    P.controller = DropinPID(P.rtol, hooks=hooks, **_pid_kwargs(ours, P.atol, norm, _times(step_t), _times(jump_t)))
    first = ours.get("first_step")
    P.dt0 = None if first is None else first * P.sign
    # torchdiffeq caps the steps between two output times (max_num_steps), not those of the solve; an
    # event search gets nde's default cap
    P.max_steps = None if P.event is None or ours.get("max_num_steps") is not None else "auto"
    P.saveat = SaveAt(ts=P.t.detach()) if P.event is None else SaveAt(t1=True)


def _pid_kwargs(ours, atol, norm, step_ts, jump_ts):
    """PIDController arguments from torchdiffeq's adaptive options."""
    min_step = ours.get("min_step") or None
    max_step = ours.get("max_step")
    return dict(
        atol=atol, norm=norm, dtmin=min_step, force_dtmin=min_step is not None,
        dtmax=None if max_step in (None, math.inf) else max_step,
        factormin=ours.get("dfactor", 0.2), factormax=ours.get("ifactor", 10.0), safety=ours.get("safety", 0.9),
        step_ts=step_ts, jump_ts=jump_ts,
    )


def _times(x):
    if x is None:
        return None
    return torch.as_tensor(x, dtype=torch.float64).detach().reshape(-1).cpu()


def _step_grid(a, b, step, dtype):
    """torchdiffeq's grid from ``a`` to ``b > a`` for ``step_size=step``: ``a + i * step``, then ``b``.

    Computed as torchdiffeq computes it, in the dtype of ``t`` (so a float32 ``t`` gives the same
    rounded grid points).
    """
    a_, b_ = torch.tensor(a, dtype=dtype), torch.tensor(b, dtype=dtype)
    n = max(int(torch.ceil((b_ - a_) / step + 1).item()), 2)
    grid = (torch.arange(0, n, dtype=dtype) * step + a_).tolist()
    grid[-1] = b
    return grid


def _constructed_grid(gc, func, y0, t):
    """``grid_constructor(func, y0, t)`` as a list of floats, checked to run from ``t[0]`` to ``t[-1]``."""
    g = gc(func, y0, t)
    g, gl = _check_t(g)
    lo, hi = float(t[0]), float(t[-1])
    if gl[0] != lo or gl[-1] != hi:
        raise ValueError(
            f"options['grid_constructor'] must return a grid starting at t[0]={lo} and ending at t[-1]={hi}; "
            f"got one from {gl[0]} to {gl[-1]}."
        )
    return gl


def _fixed_setup(P, ours):
    step = ours.get("step_size")
    gc = ours.get("grid_constructor")
    sign = P.sign
    P.max_steps = None
    perturb = bool(ours.get("perturb", False))
    hooks = dict(cell=P.cell if perturb else None, perturb=perturb, to_user=sign)
    if P.event is not None:
        if step is None:
            raise ValueError(
                f"Event handling with the fixed-step method {P.method!r} needs options=dict(step_size=...)."
            )
        # (as torchdiffeq's, the event search calls no callbacks, and stops after 20000 steps)
        P.controller = GridSteps(start=sign * P.t0, step=step, dtype=P.y.dtype, **hooks)
        P.dt0 = sign * step
        P.max_steps = 20000
        P.saveat = SaveAt(t1=True)
        return
    tl = P.tl
    if step is not None:
        grid = _step_grid(sign * tl[0], sign * tl[-1], step, P.t.dtype)
    elif gc is not None:
        grid = [sign * x for x in _constructed_grid(gc, P.user_func, P.y0_user, P.t)]
    else:
        grid = [sign * x for x in tl]
    P.controller = GridSteps(grid=grid, callbacks=P.callbacks, **hooks)
    P.dt0 = sign * (grid[1] - grid[0])
    P.saveat = SaveAt(ts=P.t.detach())


def _with_time_grad_start(P):
    """y0 seen as depending on t[0]: ``y(t; t0 + d, y0) = y(t; t0, y0 - d f(t0, y0)) + O(d^2)``."""
    t0 = P.t[0]
    with torch.no_grad():
        f0 = P.field(t0.detach().to(P.y.dtype), P.y)
    return P.y - f0 * (t0 - t0.detach()).to(P.y.dtype)


def _with_time_grad_outputs(P, ys):
    """``dy(t_i)/dt_i = f(t_i, y(t_i))`` attached to the outputs."""
    t = P.t
    with torch.no_grad():
        fs = torch.stack([P.field(ti.detach().to(ys.dtype), yi) for ti, yi in zip(t, ys.detach())])
    d = (t - t.detach()).to(ys.dtype).reshape((-1,) + (1,) * (ys.dim() - 1))
    return ys + fs * d


def _run(P, adjoint):
    """Solve the plan; returns the flat solution at ``t`` (or ``(event_t, solution)``)."""
    t_grad = P.t.requires_grad
    y0 = _with_time_grad_start(P) if t_grad else P.y
    if P.kind == "scipy":
        return _run_scipy(P, y0)
    if P.event is not None:
        return _run_event(P, y0, adjoint)
    if len(P.tl) == 1:
        return y0.unsqueeze(0)
    _fresh(P)
    sol = solve(P.field, P.solver, P.t0, P.t1, y0, dt0=P.dt0, saveat=P.saveat, controller=P.controller,
                adjoint=adjoint, max_steps=P.max_steps)
    ys = sol.ys
    if t_grad:
        ys = _with_time_grad_outputs(P, ys)
    return ys


def _fresh(P):
    """No step is under way: the vector field is evaluated where it is asked."""
    if P.cell is not None:
        P.cell.on = False


def _run_event(P, y0, adjoint):
    kw = dict(dt0=P.dt0, saveat=P.saveat, controller=P.controller, max_steps=P.max_steps)
    _fresh(P)
    with torch.no_grad():
        c0 = P.event_cond(torch.tensor(P.t0, dtype=y0.dtype, device=y0.device), y0.detach())
    if bool((torch.as_tensor(c0) == 0).any()):
        # as torchdiffeq: a condition that is exactly zero at t0 is an event at t0
        te, y_fixed = P.t0, y0
    elif adjoint is None or not torch.is_grad_enabled():
        sol = solve(P.field, P.solver, P.t0, P.t1, y0, event=P.event, **kw)
        _check_event(sol, P)
        return sol.event_t.to(P.t.dtype), torch.stack([P.y, sol.ys[-1]])
    else:
        # the event time first (no graph), then the state at that time through the adjoint, and the
        # event time's gradient rerouted onto that state by the implicit function theorem
        with torch.no_grad():
            sol = solve(P.field, P.solver, P.t0, P.t1, y0.detach(), event=P.event, **kw)
        _check_event(sol, P)
        te = float(sol.event_t)
        _fresh(P)
        fixed = solve(P.field, P.solver, P.t0, te, y0, dt0=P.dt0, saveat=SaveAt(t1=True), controller=P.controller,
                      adjoint=adjoint, max_steps=P.max_steps)
        y_fixed = fixed.ys[-1]
    cond = _active_condition(P.event_cond, te, y_fixed)
    t_ev, y_ev = ImplicitEventTime.apply(P.field, cond, torch.tensor(te, dtype=torch.float64), y_fixed)
    return t_ev.to(P.t.dtype), torch.stack([P.y, y_ev])


def _active_condition(cond, te, y):
    """The component of a (possibly vector-valued) condition that vanishes at the event."""
    with torch.no_grad():
        c = cond(torch.tensor(te, dtype=y.dtype, device=y.device), y.detach())
    if c.numel() == 1:
        return lambda t, y: cond(t, y).reshape(())
    k = int(c.reshape(-1).abs().argmin())
    return lambda t, y: cond(t, y).reshape(-1)[k]


def _check_event(sol, P):
    if not bool(sol.event_mask):
        raise RuntimeError(
            f"No event occurred: event_fn never changed sign up to t={float(sol.ts[-1]) if sol.ts is not None else P.t1}."
        )


def _run_scipy(P, y0):
    import numpy as np
    from scipy.integrate import solve_ivp

    if P.event is not None:
        raise ValueError("event_fn is not supported with method='scipy_solver'; use an nde method such as 'dopri5'.")
    needs_grad = torch.is_grad_enabled() and (
        y0.requires_grad or (isinstance(P.user_func, torch.nn.Module) and any(p.requires_grad for p in P.user_func.parameters()))
    )
    if needs_grad:
        warnings.warn("method='scipy_solver' is not differentiable: its output carries no gradient.", stacklevel=3)
    o = P.options
    y_np = y0.detach().cpu().to(torch.float64).numpy().reshape(-1)
    dtype, device, shape = y0.dtype, y0.device, y0.shape
    if len(P.tl) == 1:
        return y0.detach().unsqueeze(0)
    field = P.field

    def rhs(t, y):
        with torch.no_grad():
            tt = torch.tensor(t, dtype=dtype, device=device)
            yy = torch.as_tensor(y, dtype=dtype, device=device).reshape(shape)
            return field(tt, yy).detach().cpu().to(torch.float64).numpy().reshape(-1)

    def tol(v):
        return v.detach().cpu().to(torch.float64).numpy().reshape(-1) if isinstance(v, torch.Tensor) else v

    res = solve_ivp(rhs, (P.tl[0], P.tl[-1]), y_np, method=o.get("solver", "LSODA"), t_eval=np.asarray(P.tl),
                    rtol=tol(P.rtol), atol=tol(P.atol), min_step=o.get("min_step", 0.0) or 0.0,
                    max_step=o.get("max_step", math.inf) or math.inf)
    if not res.success:
        raise RuntimeError(f"scipy.integrate.solve_ivp failed: {res.message}")
    return torch.as_tensor(res.y.T, dtype=dtype, device=device).reshape((len(P.tl),) + tuple(shape))


def _unflat_out(P, out):
    if P.flat is None:
        return out
    if isinstance(out, tuple):
        t_ev, sol = out
        return t_ev, P.flat.unflatten(sol, lead=(sol.shape[0],))
    return P.flat.unflatten(out, lead=(out.shape[0],))


# ---- public API --------------------------------------------------------------------------------
def odeint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None):
    """Solve ``dy/dt = func(t, y)``, ``y(t[0]) = y0`` and return ``y`` at every time of ``t``.

    The call conventions of ``torchdiffeq.odeint``: a script switches by changing its import line.
    Gradients come from backpropagating through the solver's operations (exact gradients of the
    computed solution); see :func:`odeint_adjoint` for the memory-saving alternative.

    Parameters
    ----------
    func:
        ``func(t, y)`` returning ``dy/dt`` (the structure of ``y``); a function or an ``nn.Module``.
        As in torchdiffeq, the methods ``func.callback_step(t0, y0, dt)`` (before each step),
        ``func.callback_accept_step`` and ``func.callback_reject_step`` (after each step of an
        adaptive method) are called when ``func`` defines them; fixed-step methods call
        ``callback_step`` only (not during an event search). ``t0`` is the user's time of the step's
        start, ``dt > 0`` the size of the step actually taken.
    y0:
        Initial state: a tensor of any shape or a tuple of tensors.
    t:
        1-D tensor of times, strictly increasing or decreasing; ``t[0]`` is the initial time.
        Gradients with respect to ``t`` are supported.
    rtol, atol:
        Relative and absolute tolerances (numbers, tensors broadcastable against ``y0``, or tuples
        matching a tuple ``y0``).
    method:
        One of :data:`METHODS` (default ``"dopri5"``). Adaptive: ``dopri8, dopri5, tsit5, bosh3,
        fehlberg2, adaptive_heun``. Fixed step: ``euler, midpoint, heun2, heun3, rk4`` (Kutta's 3/8
        rule), the Adams methods and the implicit ``implicit_euler, implicit_midpoint, trapezoid,
        radauIIA3, radauIIA5, gl4, gl6, sdirk2, trbdf2``. ``scipy_solver`` wraps
        ``scipy.integrate.solve_ivp`` and is **not differentiable**.
    options:
        Adaptive methods: ``first_step, safety, ifactor, dfactor, max_num_steps, dtype, step_t,
        jump_t, norm, min_step, max_step``. Fixed-step methods: ``step_size, grid_constructor,
        perturb, interp`` (``"linear"`` or ``"cubic"``: torchdiffeq's interpolants between grid
        points). ``scipy_solver``: ``solver, min_step, max_step``. Constructor arguments of the nde
        solver (e.g. ``max_newton_iters``, alias ``max_iters``) are accepted too. As in torchdiffeq,
        any other option is ignored with a warning that names it and lists the accepted ones; an
        invalid value raises ``ValueError`` or ``TypeError``. ``max_num_steps`` caps the steps
        (accepted and rejected) between two consecutive output times; exceeding it raises an error
        that is both an ``AssertionError`` (as torchdiffeq's) and a :class:`~nde.SolveError`. Adaptive stages that land on the end of a step at
        ``t[-1]``, ``step_t`` or ``jump_t`` are evaluated one ulp inside the step, so a vector field
        that jumps there is sampled on the step's side.
    event_fn:
        ``event_fn(t, y)``: when given, ``t`` must hold two times (start and direction) and the
        solve runs until any element of ``event_fn`` changes sign. An element that is exactly zero
        at ``t[0]`` is an event at ``t[0]`` (as torchdiffeq's adaptive methods).

    Returns
    -------
    Tensor of shape ``(len(t), *y0.shape)`` (a tuple of such when ``y0`` is a tuple); with
    ``event_fn``, ``(event_t, solution)`` where ``solution`` holds the states at ``t[0]`` and at
    the event. The event time is differentiable (implicit function theorem).
    """
    P = _plan(func, y0, t, rtol, atol, method, options, event_fn)
    return _unflat_out(P, _run(P, None))


def odeint_adjoint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None,
                   adjoint_rtol=None, adjoint_atol=None, adjoint_method=None, adjoint_options=None,
                   adjoint_params=None):
    """:func:`odeint` with gradients from the continuous adjoint (memory constant in the number of steps).

    The backward pass solves the adjoint equations backwards in time
    (``da/dt = -a^T df/dy``, ``dL/dtheta = -int a^T df/dtheta dt``); Chen et al. (2018), "Neural
    ordinary differential equations", NeurIPS. Call conventions of ``torchdiffeq.odeint_adjoint``.

    Parameters
    ----------
    func, y0, t, rtol, atol, method, options, event_fn:
        As :func:`odeint`.
    adjoint_rtol, adjoint_atol, adjoint_method:
        Tolerances and method of the backward solve; default those of the forward solve. The
        backward solve may be adaptive for a fixed-step forward one and the reverse.
    adjoint_options:
        The options of the backward solve, as ``options`` for ``adjoint_method``; default the
        forward ``options`` without ``norm`` (when ``adjoint_method`` is that of the forward
        solve). As in torchdiffeq it solves from each output time to the previous one: a fixed-step
        method on the grid built for that interval (``step_size`` from its start,
        ``grid_constructor(func, y0, t)`` called with the interval's two times, or the interval in
        one step), an adaptive one with its error measured by ``norm``: by default the largest RMS
        of the state, the adjoint state and each parameter's adjoint; ``"seminorm"`` leaves the
        parameters' adjoints out (Kidger et al. 2021, "Hey, that's not an ODE", ICML), usually with
        fewer steps; or a callable receiving torchdiffeq's tuple ``(t, y, adj_y, *adj_params)`` (the
        tensors of a tuple state unpacked; ``t`` is 0, nde does not integrate ``dL/dt``).
        ``func.callback_step_adjoint``, ``callback_accept_step_adjoint`` and
        ``callback_reject_step_adjoint`` are called during the backward solve with that tuple.
    adjoint_params:
        The tensors to differentiate with respect to (besides ``y0`` and ``t``); default
        ``func.parameters()`` (``func`` must then be an ``nn.Module``). As in torchdiffeq, tensors that
        ``func`` uses but that are not listed receive no gradient (``adjoint_params=()`` differentiates
        ``y0`` and ``t`` only); listed ones that ``func`` does not use get a zero gradient.

    Returns
    -------
    As :func:`odeint`.
    """
    if adjoint_params is None and not isinstance(func, torch.nn.Module):
        raise ValueError(
            "func must be an nn.Module so that its parameters can be found; otherwise pass them explicitly with "
            "adjoint_params=(...) (adjoint_params=() when there are none)."
        )
    if adjoint_rtol is None:
        adjoint_rtol = rtol
    if adjoint_atol is None:
        adjoint_atol = atol
    if adjoint_method is None:
        adjoint_method = method
    if adjoint_method != method and options is not None and adjoint_options is None:
        raise ValueError(
            "adjoint_method differs from method, so adjoint_options cannot be inferred from options: pass adjoint_options too."
        )
    if adjoint_options is None:
        # as torchdiffeq: the backward pass takes the forward options, except the norm
        adjoint_options = {} if options is None else {k: v for k, v in dict(options).items() if k != "norm"}
    elif not isinstance(adjoint_options, dict):
        raise TypeError(f"adjoint_options must be a dict; got {type(adjoint_options).__name__}.")
    back = _backward_plan(adjoint_method, adjoint_options)
    P = _plan(func, y0, t, rtol, atol, method, options, event_fn, back_cell=back.needs_cell)
    if P.kind == "scipy":
        raise ValueError("method='scipy_solver' is not differentiable and cannot be used with odeint_adjoint.")
    params = tuple(func.parameters()) if adjoint_params is None else tuple(adjoint_params)
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"adjoint_params must hold tensors; got {type(p).__name__}.")
    used = tuple(p for p in params if p.requires_grad)
    if len(used) != len(params) and callable(back.norm):
        warnings.warn("Some adjoint_params do not require gradient: they are left out of the adjoint pass, and out of "
                      "the tuple its adjoint_options['norm'] receives.", UserWarning, stacklevel=2)
    back.finish(P, adjoint_rtol, adjoint_atol, used, func)
    adjoint = _DropinBacksolve(back, solver=back.solver, norm="rms", params=used)
    out = _run(P, adjoint)
    if used:
        # every parameter gets a gradient (zero when func does not use it), never None
        zero = sum((p.reshape(-1)[:1] * 0).sum().to(P.y.dtype) for p in used)
        out = (out[0], out[1] + zero) if isinstance(out, tuple) else out + zero
    return _unflat_out(P, out)


# ---- the adjoint pass ------------------------------------------------------------------------
class _Backward:
    """How the adjoint pass of :func:`odeint_adjoint` steps: method, options, norm, callbacks.

    The backward pass solves the augmented system ``z = [y, a, a_theta]`` from each output time to
    the previous one, as torchdiffeq's: with an adaptive method its error is measured by
    torchdiffeq's adjoint norms; with a fixed-step method it steps on the grid torchdiffeq builds for
    that interval (``step_size`` from the interval's start, ``grid_constructor`` called on the
    interval's two times, else the interval in one step).
    """

    def __init__(self, method, ours, solver_kw, norm):
        self.method, self.kind, self.ours, self.solver_kw, self.norm = method, _METHODS[method][0], ours, solver_kw, norm
        self.needs_cell = self.kind == "adaptive" or bool(ours.get("perturb", False))

    def finish(self, P, rtol, atol, params, func):
        self.P, self.params = P, params
        self.rtol = _number(rtol, "adjoint_rtol") if not isinstance(rtol, (tuple, list)) else rtol
        self.atol = _number(atol, "adjoint_atol") if not isinstance(atol, (tuple, list)) else atol
        if not isinstance(self.rtol, float) or not isinstance(self.atol, float):
            raise ValueError("adjoint_rtol and adjoint_atol must be numbers for odeint_adjoint.")
        for name, v in (("adjoint_rtol", self.rtol), ("adjoint_atol", self.atol)):
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite nonnegative number; got {v}.")
        self.solver = _build_solver(self.method, self.solver_kw, self.kind, rtol, atol, self.rtol, self.atol)
        found = find_callbacks(func, "_adjoint")
        supported = CALLBACKS if self.kind == "adaptive" else ("callback_step",)
        unsupported = sorted(k + "_adjoint" for k in found if k not in supported)
        if unsupported:
            warnings.warn(f"adjoint_method={self.method!r} does not call the callbacks {unsupported} of func "
                          f"(it supports {[k + '_adjoint' for k in supported]}).", UserWarning, stacklevel=3)
        self.found = {k: v for k, v in found.items() if k in supported}

    # the augmented state as torchdiffeq's adjoint shows it: (t, y, adj_y, *adj_params)
    def _layout(self, problem):
        from ._adjoint_common import time_inputs

        # (the parameters of the augmented state, in the order of the backward pass)
        t_in = time_inputs(problem)
        zp = _listed_inputs(problem, self.params, t_in)
        offs, o = {}, 0
        for x in zp:
            offs[id(x)] = (o, x.numel(), x.shape)
            o += x.numel()
        y0 = problem.y0
        n = y0.numel()
        blocks = [offs[id(x)] for x in self.params if id(x) in offs]
        return n, tuple(y0.shape), [(a, k) for a, k, _ in offs.values()], blocks

    def _tuple(self, n, shape, blocks, flat_state):
        def split(z, split_state=False):
            y, a = z[:n].reshape(shape), z[n:2 * n].reshape(shape)
            ps = [z[2 * n + o:2 * n + o + k].reshape(sh) for o, k, sh in blocks]
            zero = z.new_zeros(())
            if split_state and flat_state is not None:
                return (zero,) + flat_state.unflatten(y) + flat_state.unflatten(a) + tuple(ps)
            return (zero, y, a) + tuple(ps)

        return split

    def _error_norm(self, n, shape, segments, blocks):
        """The error norm of the backward solve on the flat augmented state."""
        P = self.P
        flat, state_norm = P.flat, P.options.get("norm")
        if callable(self.norm):
            split = self._tuple(n, shape, blocks, flat)
            user = self.norm
            return lambda x: torch.as_tensor(user(split(x, split_state=True)))
        semi = self.norm == "seminorm"
        if state_norm is not None:
            sn = state_norm if flat is None else _mixed_norm(flat, state_norm)

            def norm(x):
                vals = [sn(x[:n].reshape(shape) if flat is None else x[:n]),
                        sn(x[n:2 * n].reshape(shape) if flat is None else x[n:2 * n])]
                if not semi:
                    vals += [x[2 * n + o:2 * n + o + k].pow(2).mean().sqrt() for o, k in segments]
                return torch.stack([torch.as_tensor(v, dtype=x.dtype) for v in vals]).max()

            return norm
        # torchdiffeq's default: the largest RMS of the blocks (the tensors of y and of adj_y, and
        # each parameter's adjoint unless a seminorm), in one reduction
        sizes = list(flat.sizes) * 2 if flat is not None else [n, n]
        if not semi:
            sizes += [k for _, k in segments]
        sizes = [k for k in sizes if k > 0]
        total = sum(sizes)
        ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        counts = torch.tensor(sizes, dtype=torch.float64)
        cache = {}

        def norm(x):
            key = (x.dtype, x.device)
            c = cache.get(key)
            if c is None:
                c = cache[key] = (ids.to(x.device), counts.to(device=x.device, dtype=x.dtype))
            sq = x[:total].square()
            sums = torch.zeros(len(sizes), dtype=x.dtype, device=x.device).index_add_(0, c[0], sq)
            return (sums / c[1]).max().sqrt()

        return norm

    def controller(self, problem):
        """The backward pass's controller and first step size (None: nde's choice)."""
        P, ours = self.P, self.ours
        if P.cell is not None:
            P.cell.on = False
        n, shape, segments, blocks = self._layout(problem)
        to_user = -P.sign  # the backward solve runs forwards in -T, T the forward's internal time
        cb = None
        if self.found:
            split = self._tuple(n, shape, blocks, None)
            tdtype = torch.float64 if self.kind == "adaptive" else P.t.dtype
            f = self.found
            cb = Callbacks(f.get("callback_step"), f.get("callback_accept_step"), f.get("callback_reject_step"),
                           wrap=split, tdtype=tdtype)
        if self.kind == "adaptive":
            hooks = dict(cell=P.cell, to_user=to_user, callbacks=cb, max_num_steps=ours.get("max_num_steps"))
            # step_t/jump_t in the time of the backward solve (the forward's internal time)
            step_t, jump_t = _times(ours.get("step_t")), _times(ours.get("jump_t"))
            kw = _pid_kwargs(ours, self.atol, self._error_norm(n, shape, segments, blocks),
                             None if step_t is None else step_t * P.sign, None if jump_t is None else jump_t * P.sign)
            return DropinPID(self.rtol, hooks=hooks, **kw), ours.get("first_step")
        perturb = bool(ours.get("perturb", False))
        step, gc = ours.get("step_size"), ours.get("grid_constructor")

        def make(t0, t1):
            if step is not None:
                return _step_grid(t0, t1, step, P.t.dtype)
            if gc is not None:
                tt = torch.tensor([to_user * t0, to_user * t1], dtype=P.t.dtype, device=P.t.device)
                return [to_user * x for x in _constructed_grid(gc, P.user_func, P.y0_user, tt)]
            return [t0, t1]

        c = IntervalGrid(make, cell=P.cell if perturb else None, perturb=perturb, to_user=to_user, callbacks=cb)
        return c, None


def _backward_plan(method, adjoint_options):
    method = _check_method(method)
    if _METHODS[method][0] == "scipy":
        raise ValueError("adjoint_method='scipy_solver' is not differentiable; pick an nde method such as 'dopri5'.")
    aopts = dict(adjoint_options)
    norm = aopts.pop("norm", None)
    if norm == "rms":
        norm = None  # the default
    if not (norm is None or norm == "seminorm" or callable(norm)):
        raise ValueError(
            "adjoint_options['norm'] must be 'seminorm', or a callable norm(tensor_tuple) -> scalar receiving "
            f"(t, y, adj_y, *adj_params) as torchdiffeq's; got {norm!r}."
        )
    ours, solver_kw = _split_options(method, aopts, name="adjoint_options")
    return _Backward(method, ours, solver_kw, norm)


def _listed_inputs(problem, params, t_in):
    """The tensors the adjoint pass differentiates besides ``y0`` and the times ``t_in``: as
    torchdiffeq's, exactly ``adjoint_params`` (each once); tensors that ``func`` uses but that are not
    listed get no gradient."""
    out, seen = [], {id(problem.y0)} | {id(t) for t in t_in if t is not None}
    for x in params:
        if id(x) not in seen:
            seen.add(id(x))
            out.append(x)
    return out


class _DropinBacksolve(BacksolveAdjoint):
    """:class:`~nde.BacksolveAdjoint` stepping its backward pass as torchdiffeq's adjoint does."""

    def __init__(self, back, **kw):
        super().__init__(**kw)
        self._back = back

    def _inputs(self, problem, t_in):
        return _listed_inputs(problem, self.params, t_in)

    def backward_controller(self, problem, n_head, solver=None, **kwargs):
        return self._back.controller(problem)


def odeint_event(func, y0, t0, *, event_fn, reverse_time=False, odeint_interface=odeint, **kwargs):
    """Solve from ``t0`` until ``event_fn(t, y)`` changes sign; return ``(event_t, solution)``.

    ``solution`` holds the states at ``t0`` and at the event. The event time is differentiable with
    respect to ``y0`` and the parameters of ``func`` by the implicit function theorem:
    ``dt*/dp = -(dc/dy dy/dp) / (dc/dt + dc/dy f)``; Chen, Amos & Nickel (2021), "Learning neural
    event functions for ordinary differential equations", ICLR.

    Parameters
    ----------
    func, y0:
        As :func:`odeint`.
    t0:
        The initial time (a scalar tensor).
    event_fn:
        ``event_fn(t, y)``; the solve stops where any element of it crosses zero.
    reverse_time:
        Integrate towards decreasing time.
    odeint_interface:
        :func:`odeint` (default) or :func:`odeint_adjoint` (or another function with their signature).
    **kwargs:
        Passed on to ``odeint_interface`` (``rtol``, ``atol``, ``method``, ``options``, ...).
    """
    t0 = torch.as_tensor(t0)
    if not t0.dtype.is_floating_point:
        t0 = t0.to(torch.float64)
    if t0.numel() != 1:
        raise ValueError(f"t0 must be a scalar; got shape {tuple(t0.shape)}.")
    t0f = t0.reshape(-1)
    t = torch.cat([t0f, t0f.detach() + (-1.0 if reverse_time else 1.0)])
    event_t, solution = odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)
    if odeint_interface in (odeint, odeint_adjoint):
        return event_t, solution
    # an interface that does not differentiate the event time: reroute its gradient
    flat, _ = _check_state(y0)
    last = solution[-1] if flat is None else flat.flatten([s[-1] for s in solution])
    field = func if flat is None else _TupleField(func, flat)
    cond = event_fn if flat is None else _TupleCond(event_fn, flat)
    cond = _active_condition(cond, float(event_t), last)
    te, last = ImplicitEventTime.apply(field, cond, event_t, last)
    if flat is None:
        return te, torch.cat([solution[:-1], last.unsqueeze(0)])
    parts = flat.unflatten(last)
    return te, tuple(torch.cat([s[:-1], p.unsqueeze(0)]) for s, p in zip(solution, parts))


__all__ = ["odeint", "odeint_adjoint", "odeint_event", "METHODS"]
