"""Step controllers of the torchdiffeq drop-in: torchdiffeq's step conventions on top of nde's controllers.

Besides choosing the steps, the drop-in's controllers do what torchdiffeq does around each step:

* one-sided evaluation: stages that land on the end of a step are evaluated one ulp inside it
  (torchdiffeq's ``Perturb``), at every step end with ``perturb=True`` for fixed grids and at the
  step ends where a discontinuity may sit (``step_t``, ``jump_t``, the final time) for adaptive
  methods;
* the callbacks ``func.callback_step``, ``callback_accept_step`` and ``callback_reject_step``;
* ``max_num_steps``, a cap on the steps taken between two consecutive output times.

A controller only sees the times of the solve it drives (nde's internal time, running forwards);
``to_user`` (``+1`` or ``-1``) turns them into the times the user's function receives.
"""

from __future__ import annotations

import bisect
import copy
import inspect
import math

import torch

from ._controllers import ConstantStepSize, PIDController
from ._errors import SolveError
from ._solution import RESULTS

CALLBACKS = ("callback_step", "callback_accept_step", "callback_reject_step")


class MaxNumStepsExceeded(SolveError, AssertionError):
    """``max_num_steps`` steps were taken between two output times without reaching the next one.

    A :class:`~nde.SolveError` (so a ``RuntimeError``) and, as torchdiffeq raises an
    ``AssertionError`` here, an ``AssertionError`` too: code written for either keeps working.
    """


class StepCell:
    """The step being taken, in user time, and which of its ends the vector field sees from inside."""

    __slots__ = ("on", "a", "b", "na", "nb", "_near")

    def __init__(self):
        self.on = False
        self.a = self.b = 0.0
        self.na = self.nb = False
        self._near = None

    def set(self, a, b, na, nb):
        self.a, self.b, self.na, self.nb = a, b, na, nb
        self.on = na or nb
        self._near = None

    def inside(self, t):
        """``t`` moved one ulp into the step when it sits on a flagged end (else ``t`` unchanged)."""
        near = self._near
        if near is None or near[0] != t.dtype:
            # once a step: the ends in t's dtype, each one ulp towards the other
            ta = torch.tensor(self.a, dtype=t.dtype, device=t.device)
            tb = torch.tensor(self.b, dtype=t.dtype, device=t.device)
            tol = 2 * torch.finfo(t.dtype).eps * max(abs(self.a), abs(self.b))
            near = self._near = (t.dtype, tol, torch.nextafter(ta, tb), torch.nextafter(tb, ta))
        v = float(t)
        if self.nb and abs(v - self.b) <= near[1]:
            return near[3]
        if self.na and abs(v - self.a) <= near[1]:
            return near[2]
        return t


class OneSided:
    """``func(t, y)`` evaluated one ulp inside the current step at the ends its :class:`StepCell` flags."""

    # (declared as nde's f(t, y, args), so that a term calls it directly, with no adapter between)
    __signature__ = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                       for n in ("t", "y", "args")])

    def __init__(self, func, cell):
        self.func, self.cell = func, cell

    def __call__(self, t, y, args=None):
        if self.cell.on and isinstance(t, torch.Tensor) and t.dim() == 0:
            t = self.cell.inside(t)
        return self.func(t, y)


class Callbacks:
    """The user's step callbacks in torchdiffeq's convention ``callback(t0, y0, dt)``.

    ``t0`` is the user's time of the start of the step (a tensor of ``tdtype``), ``y0`` the state
    there in the user's structure (``wrap`` maps the flat state onto it), ``dt`` the positive size
    of the step.
    """

    def __init__(self, step=None, accept=None, reject=None, wrap=None, tdtype=torch.float64):
        self.step, self.accept, self.reject = step, accept, reject
        self.wrap, self.tdtype = wrap, tdtype

    def __call__(self, fn, t0, y0, dt):
        if fn is not None:
            fn(torch.tensor(t0, dtype=self.tdtype), y0 if self.wrap is None else self.wrap(y0),
               torch.tensor(dt, dtype=self.tdtype))


def find_callbacks(func, suffix=""):
    """The callbacks ``func`` defines (``suffix="_adjoint"``: those of the adjoint pass), as a dict."""
    out = {}
    for name in CALLBACKS:
        fn = getattr(func, name + suffix, None)
        if fn is not None and callable(fn):
            out[name] = fn
    return out


class _Hooks:
    """Bookkeeping shared by the drop-in's controllers: the cell, the callbacks, the step cap."""

    def _hooks(self, cell=None, perturb=False, to_user=1.0, callbacks=None, max_num_steps=None, outs=()):
        self._cell, self._perturb, self._to_user = cell, perturb, to_user
        self._cb = callbacks
        self._mns = max_num_steps
        self._outs_user = tuple(outs)
        self._special = frozenset()

    def _start(self, t0, t_end, y0, special=()):
        self._y = y0
        self._t_end = t_end
        self._special = frozenset(special)
        if self._mns is not None:
            self._outs = sorted(self._to_user * u for u in self._outs_user) or [math.inf]
            self._pending = bisect.bisect_right(self._outs, t0)
            self._n = 0

    def _announce(self, t0, t1):
        """The step ``[t0, t1]`` is about to be taken (from the state ``self._y``)."""
        cell = self._cell
        if cell is not None:
            if self._perturb:
                na = nb = True
            else:
                na = t0 in self._special
                nb = t1 == self._t_end or t1 in self._special
            u = self._to_user
            cell.set(u * t0, u * t1, na, nb)
        cb = self._cb
        if cb is not None and cb.step is not None:
            cb(cb.step, self._to_user * t0, self._y, t1 - t0)

    def _report(self, t0, t1, y0, y1, accept):
        """The step ``[t0, t1]`` from ``y0`` was taken (and accepted or rejected)."""
        cb = self._cb
        if cb is not None:
            cb(cb.accept if accept else cb.reject, self._to_user * t0, y0, t1 - t0)
        self._y = y1 if accept else y0
        if accept and t1 >= self._t_end and self._cell is not None:
            self._cell.on = False  # the solve is over: the next one starts afresh
        if self._mns is None:
            return
        t = t1 if accept else t0
        outs = self._outs
        if self._pending < len(outs) and t >= outs[self._pending]:
            self._pending = bisect.bisect_right(outs, t)
            self._n = 0
            return
        self._n += 1
        if self._n >= self._mns:
            nxt = outs[self._pending] if self._pending < len(outs) else math.inf
            tu, nu = self._to_user * t, self._to_user * nxt
            raise MaxNumStepsExceeded(
                f"max_num_steps exceeded ({self._n}>={self._mns}): {self._n} steps from t={tu:.6g} did not reach "
                f"the next output time t={nu:.6g}. options['max_num_steps'] caps the steps between two consecutive "
                "output times: raise it, loosen rtol/atol, or check the vector field for stiffness or a singularity.",
                result=RESULTS.max_steps_reached, t=tu, step=self._n,
            )


class GridSteps(_Hooks, ConstantStepSize):
    """Steps that land on prescribed points (internal time): a list, or ``start, start + step, ...``.

    The open-ended grid accumulates ``t + step`` in ``dtype``, as torchdiffeq's fixed-step event search does.
    """

    def __init__(self, grid=None, start=None, step=None, dtype=torch.float64, **hooks):
        self.grid, self.start, self.step, self.dtype = grid, start, step, dtype
        self._pts = None
        self._hooks(**hooks)

    def _point(self, i):
        if self.grid is not None:
            return self.grid[min(i, len(self.grid) - 1)]
        pts = self._pts
        if pts is None or pts[0] != self.start:
            pts = self._pts = [self.start]
        while len(pts) <= i:
            pts.append(float(torch.tensor(pts[-1], dtype=self.dtype) + self.step))
        return pts[i]

    def init_joint(self, terms, t0, t1, y0, dt0, args, solver, error_order=None):
        self._start(t0, t1, y0)
        nxt = min(self._point(1), t1)
        self._announce(t0, nxt)
        return nxt, 1, 0

    def adapt_joint(self, t0, t1, y0, y1, y_err, state):
        nxt = self._point(state + 1)
        self._y = y1
        t_end = self._t_end
        if t1 < t_end:
            # the step the loop takes next (it lands on t_end when within rounding of it)
            self._announce(t1, nxt if t_end - nxt > 1e-9 * (nxt - t1) else t_end)
        elif self._cell is not None:
            self._cell.on = False  # the solve is over: the next one starts afresh
        return True, t1, nxt, False, state + 1, 0.0

    def __repr__(self):
        return "GridSteps()"


class IntervalGrid(GridSteps):
    """:class:`GridSteps` whose grid is built for each solve from its own ``[t0, t1]``.

    ``make(t0, t1)`` returns the grid (internal times from ``t0`` to ``t1``); the adjoint pass solves
    one interval between consecutive output times at a time, and builds its grid there as torchdiffeq does.
    """

    def __init__(self, make, **hooks):
        super().__init__(**hooks)
        self.make = make

    def init_joint(self, terms, t0, t1, y0, dt0, args, solver, error_order=None):
        self.grid = self.make(t0, t1)
        return super().init_joint(terms, t0, t1, y0, dt0, args, solver, error_order)


class DropinPID(_Hooks, PIDController):
    """PIDController with torchdiffeq's conventions.

    Accepts a per-element ``rtol``, accepts a step of size ``dtmin`` whatever its error (``min_step``
    semantics), and runs the hooks of :class:`_Hooks` around every step.
    """

    def __init__(self, rtol, hooks=None, **kw):
        super().__init__(rtol=rtol if isinstance(rtol, float) else 1.0, **kw)
        if not isinstance(rtol, float):
            self.rtol = rtol
        self._hooks(**(hooks or {}))

    def init_joint(self, terms, t0, t1, y0, dt0, args, solver, error_order=None, f0=None):
        self._start(t0, t1, y0, set(self.step_ts) | set(self.jump_ts))
        return super().init_joint(terms, t0, t1, y0, dt0, args, solver, error_order, f0)

    def _next_t1(self, t0, t1, t_end):
        out = super()._next_t1(t0, t1, t_end)
        # the step the loop takes (it lands on t_end when within rounding of it)
        self._announce(t0, t_end if t_end - out <= 1e-10 * (out - t0) else out)
        return out

    def adapt_joint(self, t0, t1, y0, y1, y_err, state):
        out = super().adapt_joint(t0, t1, y0, y1, y_err, state)
        if not out[0] and self.dtmin is not None and self.force_dtmin and t1 - t0 <= self.dtmin * (1 + 1e-9):
            # at the smallest step allowed: take it, even with a non-finite error
            err = out[5]
            prev1, _, q = state[:3]
            jump = bool(self.jump_ts) and t1 in self.jump_ts
            first = max(err, 1e-10) if math.isfinite(err) else 1.0
            out = True, t1, t1 + self._clip_dt(t1 - t0), jump, (first, prev1, q), err
        self._report(t0, t1, y0, y1, out[0])
        return out

    def __repr__(self):
        return f"DropinPID(rtol={self.rtol}, atol={self.atol})"


# ---- torchdiffeq's interpolation between the points of a fixed grid ------------------------------
def _linear_eval(self, terms, args, t0, t1, dense_info, theta):
    y0, y1 = dense_info[0], dense_info[1]
    return y0 + theta * (y1 - y0), 0


def _linear_derivative(self, terms, args, t0, t1, dense_info, theta):
    y0, y1 = dense_info[0], dense_info[1]
    return (y1 - y0) / (t1 - t0) + 0 * theta, 0


def _slopes(terms, args, t0, t1, dense_info):
    """``f(t0, y0)`` and ``f(t1, y1)``, evaluated once a step (per grad mode: an event search
    evaluates without a graph, its result with one)."""
    y0, y1 = dense_info[0], dense_info[1]
    f = dense_info[2].setdefault(torch.is_grad_enabled(), [None, None])
    nfe = 0
    for i, (t, y) in enumerate(((t0, y0), (t1, y1))):
        if f[i] is None:
            f[i] = terms.ode(torch.as_tensor(t, dtype=y.dtype, device=y.device), y, args)
            nfe += 1
    return f[0], f[1], nfe


def _hermite_eval(self, terms, args, t0, t1, dense_info, theta):
    f0, f1, nfe = _slopes(terms, args, t0, t1, dense_info)
    y0, y1 = dense_info[0], dense_info[1]
    h00 = (1 + 2 * theta) * (1 - theta) ** 2
    h10 = theta * (1 - theta) ** 2
    h01 = theta ** 2 * (3 - 2 * theta)
    h11 = theta ** 2 * (theta - 1)
    return h00 * y0 + h01 * y1 + (t1 - t0) * (h10 * f0 + h11 * f1), nfe


def _hermite_derivative(self, terms, args, t0, t1, dense_info, theta):
    f0, f1, nfe = _slopes(terms, args, t0, t1, dense_info)
    y0, y1 = dense_info[0], dense_info[1]
    d00 = 6 * theta * (theta - 1)
    d10 = (1 - theta) * (1 - 3 * theta)
    d11 = theta * (3 * theta - 2)
    return d00 * (y0 - y1) / (t1 - t0) + d10 * f0 + d11 * f1, nfe


def _interpolating_class(cls, interp):
    """``cls`` with its dense output replaced by torchdiffeq's ``interp`` between a step's ends."""
    base_step = cls.step

    def step(self, terms, t0, t1, y0, args, solver_state):
        y1, y_err, info, state, nfe = base_step(self, terms, t0, t1, y0, args, solver_state)
        return y1, y_err, (y0, y1, {}, info), state, nfe

    linear = interp == "linear"
    body = {
        "__module__": cls.__module__, "__slots__": (), "__doc__": cls.__doc__, "step": step,
        "dense_eval": _linear_eval if linear else _hermite_eval,
        "dense_derivative": _linear_derivative if linear else _hermite_derivative,
    }
    return type(cls.__name__, (cls,), body)


_DENSE_CLASSES = {}


def with_interpolation(solver, interp):
    """``solver`` whose dense output is torchdiffeq's ``interp`` ("linear" or "cubic") between grid points.

    Explicit Runge--Kutta solvers without a continuous extension of their own already interpolate
    by cubic Hermite on ``f(t0, y0)`` (their first stage) and ``f(t1, y1)``, as torchdiffeq does.
    """
    from nde.solvers.rk import ExplicitRK

    if interp == "cubic" and isinstance(solver, ExplicitRK) and solver.tableau.dense is None:
        return solver
    cls = type(solver)
    sub = _DENSE_CLASSES.get((cls, interp))
    if sub is None:
        sub = _DENSE_CLASSES[(cls, interp)] = _interpolating_class(cls, interp)
    out = copy.copy(solver)
    out.__class__ = sub
    return out
