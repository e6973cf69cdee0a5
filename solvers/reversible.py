"""Algebraically reversible solvers: every step can be undone exactly, so the backward pass can
reconstruct the forward states instead of storing them (see :class:`nde.ReversibleAdjoint`).

Every solver here has ``reversible = True`` and a method
``reverse_step(terms, t0, t1, y1, args, solver_state1) -> (y0, solver_state0, nfe)`` inverting
``step`` in closed form.
"""

from __future__ import annotations

import torch

from .base import AbstractSolver


def _time(t, y):
    """A time as a tensor of ``y``'s dtype (0-d in joint mode, per sample in independent mode)."""
    if isinstance(t, torch.Tensor):
        return t.to(dtype=y.dtype, device=y.device)
    return torch.tensor(t, dtype=y.dtype, device=y.device)


def _cast(c, y):
    """Control increments in ``y``'s dtype (time increments are float64 tensors in independent mode)."""
    if isinstance(c, torch.Tensor):
        return c.to(y.dtype) if c.dtype.is_floating_point and c.dtype != y.dtype else c
    if isinstance(c, (tuple, list)):
        return type(c)(_cast(x, y) for x in c)
    return c


def _sum_vf(a, b):
    if isinstance(a, (tuple, list)):
        return type(a)(x + z for x, z in zip(a, b))
    return a + b


class AbstractReversibleSolver(AbstractSolver):
    """A solver whose step is invertible in closed form."""

    reversible = True

    def reverse_step(self, terms, t0, t1, y1, args, solver_state):
        """Invert :meth:`step`: from ``(t1, y1, state1)`` recover ``(y0, state0, nfe)``."""
        raise NotImplementedError


class ReversibleHeun(AbstractReversibleSolver):
    """The reversible Heun method: second order, one vector-field evaluation a step, exactly invertible.

    Keeps a second state ``z`` next to the solution ``y``:
    ``z1 = 2 y0 - z0 + f(t0, z0) dX``, ``y1 = y0 + (f(t0, z0) + f(t1, z1)) dX / 2``; the inverse is
    ``z0 = 2 y1 - z1 - f(t1, z1) dX``, ``y0 = y1 - (f(t0, z0) + f(t1, z1)) dX / 2``. Written with terms'
    ``vf``/``contr``/``prod``, so the same class steps ODEs (``dX = dt``), and controlled terms.
    The error estimate ``(f(t1, z1) - f(t0, z0)) dX / 2`` (the difference to an Euler step) makes it adaptive.

    On SDEs it converges to the Stratonovich solution (``sde_type``); a diffusion term declared Itô is
    refused. Strong order 0.5 for general noise, 1.0 for diagonal, scalar and additive noise
    (``strong_orders``; measured by the test suite).

    Kidger, Foster, Li & Lyons (2021), "Efficient and accurate gradients for neural SDEs", NeurIPS.
    """

    order = 2
    sde_type = "stratonovich"
    strong_orders = {"general": 0.5, "diagonal": 1.0, "scalar": 1.0, "additive": 1.0}
    strong_order = 0.5
    error_order = 2
    term_structure = "control"

    def strong_order_for(self, noise: str):
        """The strong order for the noise structure ``noise``."""
        return self.strong_orders.get(noise)

    def init(self, terms, t0, t1, y0, args):
        from .sde import _check_interpretation

        _check_interpretation(self, terms)
        return (y0, terms.vf(_time(t0, y0), y0, args)), 1

    def step(self, terms, t0, t1, y0, args, solver_state):
        z0, vf0 = solver_state
        c = _cast(terms.contr(t0, t1), y0)
        d0 = terms.prod(vf0, c)
        z1 = torch.add(d0 - z0, y0, alpha=2)  # 2 y0 - z0 + d0
        vf1 = terms.vf(_time(t1, y0), z1, args)
        d1 = terms.prod(vf1, c)
        y1 = torch.add(y0, d0 + d1, alpha=0.5)
        with torch.no_grad():
            y_err = torch.sub(d1, d0).mul_(0.5)
        return y1, y_err, {"y0": y0, "y1": y1}, (z1, vf1), 1

    def reverse_step(self, terms, t0, t1, y1, args, solver_state):
        z1, vf1 = solver_state
        c = _cast(terms.contr(t0, t1), y1)
        d1 = terms.prod(vf1, c)
        z0 = 2 * y1 - z1 - d1
        vf0 = terms.vf(_time(t0, y1), z0, args)
        y0 = y1 - 0.5 * (terms.prod(vf0, c) + d1)
        return y0, (z0, vf0), 1


class AsynchronousLeapfrog(AbstractReversibleSolver):
    """The asynchronous leapfrog method (ALF): second order, one evaluation a step, exactly invertible.

    Carries ``v``, an approximation of ``f(t, y)``: with ``h = t1 - t0``,
    ``k = y0 + v0 h/2``, ``u = f(t0 + h/2, k)``, ``v1 = 2u - v0``, ``y1 = k + v1 h/2``; the inverse
    recomputes ``k = y1 - v1 h/2`` and ``u``, then ``v0 = 2u - v1``, ``y0 = k - v0 h/2``.
    Error estimate ``y1 - (y0 + h v0) = h (u - v0)``. ODEs only.

    Zhuang, Dvornek, Tatikonda & Duncan (2021), "MALI: a memory efficient and reverse accurate
    integrator for neural ODEs", ICLR.
    """

    order = 2
    error_order = 2

    def init(self, terms, t0, t1, y0, args):
        return terms.ode(_time(t0, y0), y0, args), 1

    def _half(self, t0, t1, y):
        h = t1 - t0
        hb = h.to(y.dtype) if isinstance(h, torch.Tensor) else h
        return hb, _time(t0 + 0.5 * h, y)

    def step(self, terms, t0, t1, y0, args, solver_state):
        v0 = solver_state
        h, s = self._half(t0, t1, y0)
        k = y0 + (0.5 * h) * v0
        u = terms.ode(s, k, args)
        v1 = 2 * u - v0
        y1 = k + (0.5 * h) * v1
        with torch.no_grad():
            y_err = h * (u - v0)
        return y1, y_err, {"y0": y0, "y1": y1}, v1, 1

    def reverse_step(self, terms, t0, t1, y1, args, solver_state):
        v1 = solver_state
        h, s = self._half(t0, t1, y1)
        k = y1 - (0.5 * h) * v1
        u = terms.ode(s, k, args)
        v0 = 2 * u - v1
        return k - (0.5 * h) * v0, v0, 1


class Reversible(AbstractReversibleSolver):
    """Turn any explicit one-step solver into an algebraically reversible one of the same order.

    With ``d(ta -> tb, x)`` the increment of one step of ``solver`` from ``(ta, x)`` to ``tb``, and a
    second state ``z``, a step is
    ``y1 = c y0 + (1 - c) z0 + d(t0 -> t1, z0)``, ``z1 = z0 - d(t1 -> t0, y1)`` (a backward step of
    the base solver), inverted by ``z0 = z1 + d(t1 -> t0, y1)``,
    ``y0 = (y1 - (1 - c) z0 - d(t0 -> t1, z0)) / c``. The coupling ``c`` in (0, 1] keeps ``z`` close to
    ``y``; the base solver's order, error estimate and dense output carry over. A step costs two base steps.

    Stability: on ``dy/dt = lam y`` with real ``lam < 0`` the scheme has, next to the solution's mode
    ``e^(lam h)``, a parasitic mode growing by ``c e^(|lam| h)`` a step (for an exact base step), so it is
    stable only while ``|lam| h <= log(1/c)`` (0.001 for the default coupling). On dissipative dynamics
    the forward solution then drifts away by ``e^(|lam| T)`` times the local errors, which the base
    solver's error estimate does not see (``f = net(y) - y`` on ``[0, 10]`` at ``rtol=1e-6``: an error of
    1e-2), and the reconstruction of :class:`~nde.ReversibleAdjoint` amplifies errors by
    ``e^(|lam| h)`` a step whatever ``c`` is. Near the imaginary axis (oscillatory, weakly damped
    dynamics) the scheme is stable and exact to rounding. On ``y' = A y`` (a damped oscillator, float64)
    the measured orders are 1.05 (Euler), 3.98 (RK4), 5.20 (Tsit5) and 5.11 (Dopri5).

    McCallum & Foster (2024), "Efficient, accurate and stable gradients for neural ODEs", arXiv:2410.11648.

    Parameters
    ----------
    solver:
        An explicit solver instance, e.g. ``nde.solvers.Tsit5()``.
    coupling:
        The coupling ``c`` (default 0.999). Smaller values damp the drift between ``y`` and ``z``
        but amplify rounding errors of the reconstruction by ``1/c`` a step.
    """

    def __init__(self, solver: AbstractSolver, coupling: float = 0.999):
        if isinstance(solver, type):
            raise TypeError(f"solver must be an instance: pass {solver.__name__}() rather than {solver.__name__}.")
        if not isinstance(solver, AbstractSolver):
            raise TypeError(f"solver must be an nde solver such as nde.solvers.Tsit5(); got {type(solver).__name__}.")
        if getattr(solver, "implicit", False) or getattr(solver, "reversible", False):
            raise ValueError(f"solver must be an explicit, non-reversible solver; got {solver!r}.")
        if isinstance(coupling, bool) or not isinstance(coupling, (int, float)) or not 0 < coupling <= 1:
            raise ValueError(f"coupling must be a number in (0, 1]; got {coupling!r}.")
        self.solver = solver
        self.coupling = float(coupling)

    @property
    def order(self):
        return self.solver.order

    @property
    def error_order(self):
        return self.solver.error_order

    @property
    def term_structure(self):
        return self.solver.term_structure

    @property
    def supports_independent(self):
        return self.solver.supports_independent

    def _increment(self, terms, ta, tb, x, args):
        st, n0 = self.solver.init(terms, ta, tb, x, args)
        x1, err, info, _, n1 = self.solver.step(terms, ta, tb, x, args, st)
        return x1 - x, err, info, n0 + n1

    def init(self, terms, t0, t1, y0, args):
        return y0, 0

    def step(self, terms, t0, t1, y0, args, solver_state):
        z0 = solver_state
        c = self.coupling
        d, y_err, info, n1 = self._increment(terms, t0, t1, z0, args)
        y1 = c * y0 + (1 - c) * z0 + d if c != 1 else y0 + d
        db, _, _, n2 = self._increment(terms, t1, t0, y1, args)
        z1 = z0 - db
        dense = {"y0": y0, "y1": y1, "z0": z0, "base": info}
        return y1, y_err, dense, z1, n1 + n2

    def reverse_step(self, terms, t0, t1, y1, args, solver_state):
        z1 = solver_state
        c = self.coupling
        db, _, _, n1 = self._increment(terms, t1, t0, y1, args)
        z0 = z1 + db
        d, _, _, n2 = self._increment(terms, t0, t1, z0, args)
        y0 = (y1 - (1 - c) * z0 - d) / c if c != 1 else y1 - d
        return y0, z0, n1 + n2

    def dense_eval(self, terms, args, t0, t1, dense_info, theta):
        # base interpolant u(theta) from z0, shifted by (1 - theta (1 - c)) (y0 - z0): exact at both ends
        u, n = self.solver.dense_eval(terms, args, t0, t1, dense_info["base"], theta)
        gap = dense_info["y0"] - dense_info["z0"]
        return u + (1 - theta * (1 - self.coupling)) * gap, n

    def dense_derivative(self, terms, args, t0, t1, dense_info, theta):
        du, n = self.solver.dense_derivative(terms, args, t0, t1, dense_info["base"], theta)
        dt = t1 - t0
        dt = dt.to(du.dtype) if isinstance(dt, torch.Tensor) else dt
        return du - (1 - self.coupling) * (dense_info["y0"] - dense_info["z0"]) / dt, n

    def __repr__(self):
        return f"Reversible({self.solver!r}, coupling={self.coupling})"


__all__ = ["AbstractReversibleSolver", "ReversibleHeun", "AsynchronousLeapfrog", "Reversible"]
