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

from ._controllers import ConstantStepSize, PIDController
from ._event import Event, ImplicitEventTime
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
_SCIPY_OPTIONS = ("solver", "min_step", "max_step", "norm", "dtype")
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


def _split_options(method, options):
    """Validate ``options`` for ``method``; returns (drop-in options, solver constructor kwargs)."""
    kind = _METHODS[method][0]
    options = {} if options is None else dict(options)
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict; got {type(options).__name__}.")
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
            raise ValueError(f"Unknown option {k!r} for method={method!r}{hint}. Accepted options: {accepted}.")
    if "interp" in ours and ours["interp"] not in ("linear", "cubic"):
        raise ValueError(f"options['interp'] must be 'linear' or 'cubic'; got {ours['interp']!r}.")
    if "step_size" in ours and "grid_constructor" in ours and ours["step_size"] is not None and ours["grid_constructor"] is not None:
        raise ValueError("options 'step_size' and 'grid_constructor' are mutually exclusive: pass one of them.")
    if ours.get("dtype") is not None and not (isinstance(ours["dtype"], torch.dtype) and ours["dtype"].is_floating_point):
        raise TypeError(f"options['dtype'] must be a floating-point torch.dtype; got {ours['dtype']!r}.")
    for name in ("first_step", "safety", "ifactor", "dfactor", "min_step", "max_step", "step_size"):
        v = ours.get(name)
        if v is not None:
            v = _number(v, f"options[{name!r}]")
            if not (v > 0 or (name == "min_step" and v == 0) or (name == "max_step" and v == math.inf)):
                raise ValueError(f"options[{name!r}] must be positive; got {v}.")
            ours[name] = v
    if ours.get("norm") is not None and not callable(ours["norm"]):
        raise TypeError(f"options['norm'] must be a callable norm(tensor) -> scalar; got {type(ours['norm']).__name__}.")
    mns = ours.get("max_num_steps")
    if mns is not None and (isinstance(mns, bool) or not isinstance(mns, int) or mns < 1):
        raise ValueError(f"options['max_num_steps'] must be a positive integer; got {mns!r}.")
    return ours, solver_kw


def _number(v, name):
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a number; got a tensor of shape {tuple(v.shape)}.")
        v = float(v.detach())
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number; got {type(v).__name__}.")
    return float(v)


def _make_solver(method, solver_kw):
    cls = _solver_class(method)
    entry = _METHODS[method]
    defaults = entry[2] if len(entry) > 2 else {}
    if solver_kw:
        return cls(**{**defaults, **solver_kw})
    s = _SOLVER_CACHE.get(method)
    if s is None or type(s) is not cls:
        s = _SOLVER_CACHE[method] = cls(**defaults)
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
    vals = t.detach().to(torch.float64).cpu()
    if not bool(torch.isfinite(vals).all()):
        raise ValueError("t contains NaN or inf.")
    if vals.numel() > 1:
        d = vals[1:] - vals[:-1]
        if not (bool((d > 0).all()) or bool((d < 0).all())):
            raise ValueError("t must be strictly increasing or strictly decreasing.")
    return t, vals.tolist()


class _StepCell:
    """The interval of the step being taken (internal time); shared by a controller and a field."""

    __slots__ = ("a", "b")

    def __init__(self):
        self.a = self.b = None


class _GridSteps(ConstantStepSize):
    """Steps that land on prescribed grid points (internal time): a list, or ``start + i * step``."""

    def __init__(self, grid=None, start=None, step=None, cell=None):
        self.grid, self.start, self.step, self.cell = grid, start, step, cell

    def _point(self, i):
        if self.grid is not None:
            return self.grid[min(i, len(self.grid) - 1)]
        return self.start + i * self.step

    def init_joint(self, terms, t0, t1, y0, dt0, args, solver, error_order=None):
        nxt = min(self._point(1), t1)
        if self.cell is not None:
            self.cell.a, self.cell.b = t0, nxt
        return nxt, 1, 0

    def adapt_joint(self, t0, t1, y0, y1, y_err, state):
        nxt = self._point(state + 1)
        if self.cell is not None:
            self.cell.a, self.cell.b = t1, nxt
        return True, t1, nxt, False, state + 1, 0.0

    def __repr__(self):
        return "GridSteps()"


class _TrackedPID(PIDController):
    """PIDController that accepts a per-element ``rtol``, records the current step interval, and
    accepts a step of size ``dtmin`` whatever its error (``min_step`` semantics)."""

    def __init__(self, rtol, cell=None, **kw):
        super().__init__(rtol=rtol if isinstance(rtol, float) else 1.0, **kw)
        if not isinstance(rtol, float):
            self.rtol = rtol
        self._cell = cell

    def _next_t1(self, t0, t1, t_end):
        out = super()._next_t1(t0, t1, t_end)
        if self._cell is not None:
            self._cell.a, self._cell.b = t0, out
        return out

    def adapt_joint(self, t0, t1, y0, y1, y_err, state):
        out = super().adapt_joint(t0, t1, y0, y1, y_err, state)
        if out[0] or self.dtmin is None or not self.force_dtmin or t1 - t0 > self.dtmin * (1 + 1e-9):
            return out
        err = out[5]
        prev1, _, q = state
        jump = bool(self.jump_ts) and t1 in self.jump_ts
        first = max(err, 1e-10) if math.isfinite(err) else 1.0
        return True, t1, t1 + self._clip_dt(t1 - t0), jump, (first, prev1, q), err


class _OneSided:
    """Evaluates ``func`` at a step's ends from inside the step (its one-sided limits).

    At the left end of the current step time is nudged one ulp towards the right end and vice versa,
    so that a vector field with a jump at a grid point or at ``jump_t`` is sampled on the correct side.
    """

    def __init__(self, func, cell, sign):
        self.func, self.cell, self.sign = func, cell, sign

    def __call__(self, t, y):
        a, b = self.cell.a, self.cell.b
        if a is not None and isinstance(t, torch.Tensor) and t.dim() == 0:
            ta = torch.tensor(a * self.sign, dtype=t.dtype, device=t.device)
            tb = torch.tensor(b * self.sign, dtype=t.dtype, device=t.device)
            if bool(t == ta):
                t = torch.nextafter(t, tb)
            elif bool(t == tb):
                t = torch.nextafter(t, ta)
        return self.func(t, y)


# ---- the common set-up -----------------------------------------------------------------------
class _Plan:
    pass


def _plan(func, y0, t, rtol, atol, method, options, event_fn):
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
    if P.kind == "scipy":
        P.field = field
        return P
    if P.kind == "fixed" and isinstance(P.rtol, float) and isinstance(P.atol, float) and (
        (rtol, atol) != (1e-7, 1e-9) or solver_kw
    ):
        ctor = _constructor_args(_solver_class(method))
        if "rtol" in ctor and "atol" in ctor:
            solver_kw = {"rtol": P.rtol, "atol": P.atol, **solver_kw}
    P.solver = _make_solver(method, solver_kw)
    one_sided = (P.kind == "fixed" and bool(ours.get("perturb", False))) or (P.kind == "adaptive" and ours.get("jump_t") is not None)
    if one_sided:
        P.cell = _StepCell()
        field = _OneSided(field, P.cell, P.sign)
    P.field = field
    t0, t1 = tl[0], tl[-1]
    if P.event is not None:
        t1 = t0 + P.sign * _EVENT_HORIZON
    P.t0, P.t1 = t0, t1
    if P.kind == "adaptive":
        _adaptive_setup(P, ours)
    else:
        _fixed_setup(P, ours)
    return P


def _adaptive_setup(P, ours):
    step_t, jump_t = ours.get("step_t"), ours.get("jump_t")
    if step_t is not None and jump_t is not None:
        s = set(torch.as_tensor(step_t, dtype=torch.float64).reshape(-1).tolist())
        if s & set(torch.as_tensor(jump_t, dtype=torch.float64).reshape(-1).tolist()):
            raise ValueError("options 'step_t' and 'jump_t' must not have any repeated elements between them.")
    norm = ours.get("norm")
    if P.flat is not None:
        norm = _mixed_norm(P.flat, norm)
    min_step = ours.get("min_step") or None
    max_step = ours.get("max_step")
    kw = dict(
        atol=P.atol, norm=norm, dtmin=min_step, force_dtmin=min_step is not None,
        dtmax=None if max_step in (None, math.inf) else max_step,
        factormin=ours.get("dfactor", 0.2), factormax=ours.get("ifactor", 10.0), safety=ours.get("safety", 0.9),
        step_ts=_times(step_t), jump_ts=_times(jump_t),
    )
    if P.cell is not None or not isinstance(P.rtol, float) or min_step is not None:
        P.controller = _TrackedPID(P.rtol, cell=P.cell, **kw)
    else:
        P.controller = PIDController(rtol=P.rtol, **kw)
    first = ours.get("first_step")
    P.dt0 = None if first is None else first * P.sign
    P.max_steps = ours.get("max_num_steps", None if P.event is None else "auto")
    P.saveat = SaveAt(ts=P.t.detach()) if P.event is None else SaveAt(t1=True)
    P.linear = False


def _times(x):
    if x is None:
        return None
    return torch.as_tensor(x, dtype=torch.float64).detach().reshape(-1).cpu()


def _fixed_setup(P, ours):
    step = ours.get("step_size")
    gc = ours.get("grid_constructor")
    sign = P.sign
    P.dt0 = None
    P.max_steps = None
    P.linear = False
    if P.event is not None:
        if step is None:
            raise ValueError(
                f"Event handling with the fixed-step method {P.method!r} needs options=dict(step_size=...)."
            )
        P.controller = _GridSteps(start=sign * P.t0, step=step, cell=P.cell)
        P.dt0 = sign * step
        P.max_steps = ours.get("max_num_steps", 20000)
        P.saveat = SaveAt(t1=True)
        return
    tl = P.tl
    if step is not None:
        T = (tl[-1] - tl[0]) * sign
        n = max(int(math.ceil(T / step + 1)), 2)
        grid = [sign * tl[0] + i * step for i in range(n - 1)] + [sign * tl[-1]]
    elif gc is not None:
        g = gc(P.user_func, P.y0_user, P.t)
        g, gl = _check_t(g)
        if gl[0] != tl[0] or gl[-1] != tl[-1]:
            raise ValueError(
                f"options['grid_constructor'] must return a grid starting at t[0]={tl[0]} and ending at t[-1]={tl[-1]}; "
                f"got one from {gl[0]} to {gl[-1]}."
            )
        grid = [sign * x for x in gl]
    else:
        grid = [sign * x for x in tl]
    P.controller = _GridSteps(grid=grid, cell=P.cell)
    # a step size for adjoints whose backward pass takes constant steps
    P.dt0 = sign * (step if step is not None else min(b - a for a, b in zip(grid[:-1], grid[1:])))
    on_grid = set(grid)
    if all(sign * x in on_grid for x in tl) or ours.get("interp", "linear") == "cubic":
        P.saveat = SaveAt(ts=P.t.detach())
    else:
        # the grid values, interpolated linearly onto t afterwards
        P.grid = torch.tensor(grid, dtype=torch.float64)
        P.saveat = SaveAt(ts=P.grid * sign)
        P.linear = True


def _interp_linear(ts, ys, t):
    """Piecewise-linear interpolation of ``ys`` (at increasing ``ts``) at times ``t``."""
    t = t.to(torch.float64)
    i = torch.searchsorted(ts, t, right=True).clamp(1, ts.numel() - 1)
    a, b = ts[i - 1], ts[i]
    w = ((t - a) / (b - a)).to(ys.dtype).reshape((-1,) + (1,) * (ys.dim() - 1))
    return ys[i - 1] + w * (ys[i] - ys[i - 1])


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
    if len(P.tl) == 1:
        return y0.unsqueeze(0)
    if P.event is not None:
        return _run_event(P, y0, adjoint)
    sol = solve(P.field, P.solver, P.t0, P.t1, y0, dt0=P.dt0, saveat=P.saveat, controller=P.controller,
                adjoint=adjoint, max_steps=P.max_steps)
    ys = sol.ys
    if P.linear:
        ys = _interp_linear(P.grid, ys, P.t.detach() * P.sign)
    if t_grad:
        ys = _with_time_grad_outputs(P, ys)
    return ys


def _run_event(P, y0, adjoint):
    kw = dict(dt0=P.dt0, saveat=P.saveat, controller=P.controller, max_steps=P.max_steps)
    if adjoint is None or not torch.is_grad_enabled():
        sol = solve(P.field, P.solver, P.t0, P.t1, y0, event=P.event, **kw)
        _check_event(sol, P)
        t_ev, y_ev = sol.event_t, sol.ys[-1]
    else:
        # the event time first (no graph), then the state at that time through the adjoint, and the
        # event time's gradient rerouted onto that state by the implicit function theorem
        with torch.no_grad():
            sol = solve(P.field, P.solver, P.t0, P.t1, y0.detach(), event=P.event, **kw)
        _check_event(sol, P)
        te = float(sol.event_t)
        fixed = solve(P.field, P.solver, P.t0, te, y0, dt0=P.dt0, saveat=SaveAt(t1=True), controller=P.controller,
                      adjoint=adjoint, max_steps=P.max_steps)
        y_fixed = fixed.ys[-1]
        cond = _active_condition(P.event_cond, te, y_fixed)
        t_ev, y_ev = ImplicitEventTime.apply(P.field, cond, torch.tensor(te, dtype=torch.float64), y_fixed)
    solution = torch.stack([P.y, y_ev])
    return t_ev.to(P.t.dtype), solution


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
        perturb, interp`` (``"linear"`` or ``"cubic"``). ``scipy_solver``: ``solver, min_step,
        max_step``. Constructor arguments of the nde solver (e.g. ``max_newton_iters``, alias
        ``max_iters``) are accepted too; anything else raises ``ValueError``.
        ``max_num_steps`` caps the total number of steps of the solve.
    event_fn:
        ``event_fn(t, y)``: when given, ``t`` must hold two times (start and direction) and the
        solve runs until any element of ``event_fn`` changes sign.

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
        Tolerances and method of the backward solve; default those of the forward solve.
    adjoint_options:
        ``dict(norm="seminorm")`` measures the error of the backward solve on the state and adjoint
        only, not on the parameter gradients (Kidger et al. 2021, "Hey, that's not an ODE",
        ICML), usually with fewer steps; ``norm="rms"`` (default) on everything.
    adjoint_params:
        The tensors to differentiate with respect to; default ``func.parameters()`` (``func`` must
        then be an ``nn.Module``). Parameters that ``func`` does not use get a zero gradient.

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
    elif adjoint_method != method and options is not None and adjoint_options is None:
        raise ValueError(
            "adjoint_method differs from method, so adjoint_options cannot be inferred from options: pass adjoint_options too."
        )
    P = _plan(func, y0, t, rtol, atol, method, options, event_fn)
    if P.kind == "scipy":
        raise ValueError("method='scipy_solver' is not differentiable and cannot be used with odeint_adjoint.")
    params = tuple(func.parameters()) if adjoint_params is None else tuple(adjoint_params)
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"adjoint_params must hold tensors; got {type(p).__name__}.")
    params = tuple(p for p in params if p.requires_grad)
    adjoint = _make_adjoint(P, adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options, params)
    out = _run(P, adjoint)
    if params:
        # every parameter gets a gradient (zero when func does not use it), never None
        zero = sum((p.reshape(-1)[:1] * 0).sum().to(P.y.dtype) for p in params)
        out = (out[0], out[1] + zero) if isinstance(out, tuple) else out + zero
    return _unflat_out(P, out)


def _make_adjoint(P, rtol, atol, method, adjoint_options, params):
    import nde

    cls = getattr(nde, "BacksolveAdjoint", None)
    if cls is None:
        raise RuntimeError("odeint_adjoint needs nde.BacksolveAdjoint, which this installation does not provide.")
    aopts = {} if adjoint_options is None else dict(adjoint_options)
    norm = aopts.pop("norm", None)
    if norm is None:
        norm = "rms"
    if norm not in ("seminorm", "rms"):
        raise ValueError(f"adjoint_options['norm'] must be 'seminorm' or 'rms'; got {norm!r}.")
    method = _check_method(method)
    if _METHODS[method][0] == "scipy":
        raise ValueError("adjoint_method='scipy_solver' is not differentiable; pick an nde method such as 'dopri5'.")
    if aopts:
        ours, solver_kw = _split_options(method, aopts)
    else:
        ours, solver_kw = {}, {}
    solver = _make_solver(method, solver_kw)
    rt = _tol(rtol, "adjoint_rtol", P.flat, P.y)
    at = _tol(atol, "adjoint_atol", P.flat, P.y)
    if not isinstance(rt, float) or not isinstance(at, float):
        raise ValueError("adjoint_rtol and adjoint_atol must be numbers for odeint_adjoint.")
    return cls(rtol=rt, atol=at, solver=solver, norm=norm, params=params)


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
