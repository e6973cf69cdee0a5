"""``nde.cdeint``: the call convention of torchcde on top of :func:`nde.solve`.

A torchcde script switches by changing its import: the coefficient functions, ``CubicSpline``,
``LinearInterpolation`` and ``cdeint`` keep their names, arguments and output layouts.
"""

from __future__ import annotations

import math
import warnings

import torch

from ._path import AbstractPath
from ._saveat import SaveAt
from ._terms import ControlTerm

# torchdiffeq / torchcde method names -> (kind, nde.solvers class name)
_METHODS = {
    "dopri5": ("adaptive", "Dopri5"),
    "dopri8": ("adaptive", "Dopri8"),
    "tsit5": ("adaptive", "Tsit5"),
    "bosh3": ("adaptive", "Bosh3"),
    "fehlberg2": ("adaptive", "Fehlberg2"),
    "adaptive_heun": ("adaptive", "Heun"),
    "euler": ("fixed", "Euler"),
    "midpoint": ("fixed", "Midpoint"),
    "heun2": ("fixed", "Heun"),
    "heun3": ("fixed", "Heun3"),
    # torchdiffeq's "rk4" is Kutta's 3/8 rule; "rk4_classic" is the classical tableau
    "rk4": ("fixed", "RK38"),
    "rk4_classic": ("fixed", "RK4"),
    "explicit_adams": ("fixed", "ExplicitAdams"),
    "implicit_adams": ("fixed", "ImplicitAdams"),
    "implicit_euler": ("fixed", "ImplicitEuler"),
    "implicit_midpoint": ("fixed", "ImplicitMidpoint"),
    "trapezoid": ("fixed", "Trapezoid"),
    # torchsde's names, for backend="torchsde" (the Brownian part of that backend is zero, so these are ODE steps)
    "srk": ("adaptive", "Dopri5"),
    "reversible_heun": ("fixed", "ReversibleHeun"),
    "heun": ("fixed", "Heun"),
}
_BACKENDS = ("torchdiffeq", "torchsde", "nde")
_ADAPTIVE_OPTIONS = ("first_step", "jump_t", "step_t", "grid_points", "max_num_steps", "safety", "dtype", "eps")
_FIXED_OPTIONS = ("step_size", "perturb", "interp", "dtype", "grid_points")


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

    @property
    def t0(self):
        return self._t0

    @property
    def t1(self):
        return self._t1

    def evaluate(self, t0, t1=None, left=True):
        if t1 is None:
            return self.X.evaluate(t0)
        return self.X.evaluate(t1) - self.X.evaluate(t0)

    def derivative(self, t, left=True):
        return self.X.derivative(t)

    def buffers(self):
        return self.X.buffers() if hasattr(self.X, "buffers") else iter(())


def _solver(method, backend):
    import nde.solvers as solvers
    import nde.solvers.rk  # noqa: F401

    key = method
    if method is None:
        key = "srk" if backend == "torchsde" else "dopri5"
    if key not in _METHODS:
        raise ValueError(f"method must be one of {sorted(_METHODS)}; got {method!r}.")
    kind, name = _METHODS[key]
    # the Runge--Kutta methods by their module: nde.solvers.Heun / Midpoint name the SDE solvers
    cls = getattr(solvers.rk, name, None) or getattr(solvers, name, None)
    if cls is None:
        raise ValueError(f"method={method!r} needs nde.solvers.{name}, which this installation does not provide.")
    return kind, cls()


def cdeint(X, func, z0, t, adjoint=True, backend="torchdiffeq", **kwargs):
    r"""Solve the controlled differential equation ``z_t = z_{t_0} + \int_{t_0}^t f(s, z_s) dX_s``.

    torchcde's interface on top of :func:`nde.solve`: the CDE is solved in its ODE form
    ``dz/dt = f(t, z) dX/dt``. Paths built by nde (:class:`~nde.CubicSpline`,
    :class:`~nde.LinearInterpolation`) report their knots, so adaptive steps land on them; any
    other object with a ``derivative(t)`` method works too.

    Parameters
    ----------
    X:
        The control: an nde path, or any object with ``derivative(t)`` returning ``(..., channels)``.
    func:
        ``f(t, z)`` returning ``(..., hidden, channels)``; if it has a method ``prod(t, z, dXdt)``, that is
        called instead to compute ``f(t, z) dX/dt`` directly.
    z0:
        Initial state ``(..., hidden)``.
    t:
        1-D tensor of increasing times: integrate from ``t[0]`` to ``t[-1]`` and return the state at each.
    adjoint:
        Backpropagate with the continuous adjoint (:class:`~nde.BacksolveAdjoint`, seminorm) instead of
        through the solver's operations.
    backend:
        ``"torchdiffeq"`` (default), ``"torchsde"`` or ``"nde"``: which library's method names ``method``
        uses. Every backend solves with nde.
    **kwargs:
        ``method`` (default ``"dopri5"``), ``rtol`` (1e-4), ``atol`` (1e-6), ``options`` (``step_size``,
        ``first_step``, ``jump_t``, ``step_t``, ``grid_points``, ``max_num_steps``), ``adjoint_rtol``,
        ``adjoint_atol``, ``adjoint_method``, ``adjoint_params`` and nde's own ``batch_mode``.

    Returns
    -------
    torch.Tensor
        ``(..., len(t), hidden)``: time second-to-last, as torchcde returns it.

    References
    ----------
    Kidger, Morrill, Foster & Lyons (2020), "Neural controlled differential equations for irregular time series", NeurIPS.
    """
    import nde

    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}; got {backend!r}.")
    method = kwargs.pop("method", None)
    rtol = kwargs.pop("rtol", 1e-4)
    atol = kwargs.pop("atol", 1e-6)
    options = dict(kwargs.pop("options", None) or {})
    adjoint_rtol = kwargs.pop("adjoint_rtol", None)
    adjoint_atol = kwargs.pop("adjoint_atol", None)
    adjoint_method = kwargs.pop("adjoint_method", None)
    adjoint_params = kwargs.pop("adjoint_params", None)
    kwargs.pop("adjoint_options", None)
    batch_mode = kwargs.pop("batch_mode", "joint")
    for ignored in ("dt", "dt_min", "names", "logqp", "bm", "adaptive"):
        if ignored == "dt" and ignored in kwargs:
            options.setdefault("step_size", kwargs.pop("dt"))
        kwargs.pop(ignored, None)
    if kwargs:
        raise TypeError(f"cdeint got unexpected keyword arguments {sorted(kwargs)}.")

    if isinstance(z0, (tuple, list)):
        raise TypeError("z0 must be a tensor; tuples of states are not supported by nde.cdeint (concatenate them).")
    if not isinstance(z0, torch.Tensor) or not z0.is_floating_point():
        raise TypeError(f"z0 must be a floating-point tensor of shape (..., hidden); got {type(z0).__name__}.")
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, dtype=z0.dtype)
    if t.dim() != 1 or t.numel() < 2:
        raise ValueError(f"t must be a 1-D tensor of at least two increasing times; got shape {tuple(t.shape)}.")
    if bool((t[1:] <= t[:-1]).any()):
        raise ValueError("t must be strictly increasing.")
    if isinstance(X, AbstractPath):
        path = X
    elif hasattr(X, "derivative"):
        path = _ForeignControl(X)
    else:
        raise TypeError(f"X must be a path with a 'derivative' method (e.g. nde.CubicSpline); got {type(X).__name__}.")
    if not callable(func):
        raise TypeError(f"func must be callable as func(t, z); got {type(func).__name__}.")

    def direct_prod(s, z, args, dxdt):
        return func.prod(s, z, dxdt)

    vf_prod = direct_prod if hasattr(func, "prod") else None

    def vector_field(s, z, args):
        return func(s, z)
    term = ControlTerm(vector_field, path, vf_prod=vf_prod)
    kind, solver = _solver(method, backend)

    dt0 = None
    max_steps = "auto"
    if kind == "fixed":
        unknown = set(options) - set(_FIXED_OPTIONS)
        if unknown:
            raise ValueError(f"options {sorted(unknown)} do not apply to the fixed-step method {method!r}; use {_FIXED_OPTIONS}.")
        step = options.get("step_size")
        if step is None:
            diffs = (t[1:] - t[:-1]).detach()
            if not torch.allclose(diffs, diffs[0].expand_as(diffs), rtol=1e-9, atol=0):
                raise ValueError(
                    f"method={method!r} takes fixed steps: pass options=dict(step_size=...) (e.g. the smallest knot "
                    "spacing of X), since t is not evenly spaced."
                )
            step = float(diffs[0])
        controller = nde.ConstantStepSize()
        dt0 = float(step)
    else:
        unknown = set(options) - set(_ADAPTIVE_OPTIONS)
        if unknown:
            raise ValueError(f"options {sorted(unknown)} do not apply to the adaptive method {method!r}; use {_ADAPTIVE_OPTIONS}.")
        jump = options.get("jump_t")
        step_ts = options.get("step_t", options.get("grid_points"))
        controller = nde.PIDController(
            rtol=float(rtol), atol=float(atol), safety=float(options.get("safety", 0.9)),
            jump_ts=None if jump is None else torch.as_tensor(jump).detach(),
            step_ts=None if step_ts is None else torch.as_tensor(step_ts).detach(),
        )
        if options.get("first_step") is not None:
            dt0 = float(options["first_step"])
        if options.get("max_num_steps") is not None:
            max_steps = int(options["max_num_steps"])
    if adjoint:
        try:
            from ._backsolve import BacksolveAdjoint
        except ImportError:  # pragma: no cover - only before the continuous adjoint is installed
            BacksolveAdjoint = None
        if BacksolveAdjoint is None:
            warnings.warn("The continuous adjoint is not available; backpropagating through the solver instead.",
                          stacklevel=2)
            adj = nde.DirectAdjoint()
        else:
            adj_solver = None if adjoint_method is None else _solver(adjoint_method, backend)[1]
            adj = BacksolveAdjoint(
                rtol=None if adjoint_rtol is None else float(adjoint_rtol),
                atol=None if adjoint_atol is None else float(adjoint_atol),
                solver=adj_solver, params=adjoint_params,
            )
    else:
        adj = nde.DirectAdjoint()
    sol = nde.solve(term, solver, t[0], t[-1], z0, dt0=dt0, saveat=SaveAt(ts=t), controller=controller,
                    adjoint=adj, max_steps=max_steps, batch_mode=batch_mode, batch_ndim=max(z0.dim() - 1, 0))
    return sol.ys.movedim(0, -2)
