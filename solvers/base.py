"""The interface every solver of nde implements; the solve loop knows solvers only through it."""

from __future__ import annotations

import abc


class AbstractSolver(abc.ABC):
    """One step of a numerical method.

    A solver owns one step and its interpolant; the loop owns time, saving and
    statistics; a controller owns the step size.

    Attributes
    ----------
    order:
        Order of convergence of the method on ODEs.
    strong_order:
        Strong order on SDEs (None when the method is not an SDE solver).
    error_order:
        Exponent ``q`` of the local error estimate, ``|y_error| = O(dt^q)``; None when the
        method has no error estimate (it then needs a constant step size).
    term_structure:
        ``"ode"`` for solvers that use ``term.ode`` (ODEs, and CDEs with a differentiable
        control), ``"control"`` for solvers that use control increments (SDEs).
    """

    order: int | None = None
    strong_order: float | None = None
    error_order: int | None = None
    term_structure: str = "ode"
    #: whether ``step`` accepts per-sample times (tensors) for independent batch mode
    supports_independent: bool = True
    #: whether the solver is algebraically reversible (usable with ReversibleAdjoint)
    reversible: bool = False
    #: whether the solver's error estimate needs a stochastic/implicit treatment (informational)
    implicit: bool = False

    @property
    def adaptive(self) -> bool:
        """Whether the solver produces an error estimate for adaptive step-size control."""
        return self.error_order is not None

    def init(self, terms, t0, t1, y0, args):
        """Return the initial solver state (e.g. a cached first stage); ``(state, nfe)``."""
        return None, 0

    @abc.abstractmethod
    def step(self, terms, t0, t1, y0, args, solver_state):
        """Advance from ``(t0, y0)`` to ``t1``.

        ``t0``/``t1`` are Python floats (joint mode) or tensors broadcastable against ``y0``
        holding one time per sample (independent mode).

        Returns
        -------
        (y1, y_error, dense_info, solver_state, nfe)
            ``y_error`` is None when the method has no error estimate; ``dense_info`` is what
            :meth:`dense_eval` needs; ``nfe`` the number of vector-field evaluations made.
        """

    def dense_eval(self, terms, args, t0, t1, dense_info, theta):
        """Evaluate the step's interpolant at fractions ``theta`` of the step ``[t0, t1]``.

        ``theta`` broadcasts against ``y``: in joint mode it has shape ``(m, 1, ..., 1)`` (one
        extra leading dimension; the result is ``(m, *y.shape)``), in independent mode it has
        ``y``'s rank with one fraction per sample (the result is ``y.shape``).
        Returns ``(values, nfe)``. The default interpolates linearly.
        """
        y0, y1 = dense_info["y0"], dense_info["y1"]
        return y0 + theta * (y1 - y0), 0

    def dense_derivative(self, terms, args, t0, t1, dense_info, theta):
        """Time derivative of the interpolant; same conventions as :meth:`dense_eval`."""
        y0, y1 = dense_info["y0"], dense_info["y1"]
        d = (y1 - y0) / (t1 - t0)
        return d + theta * 0, 0

    def __repr__(self):
        return f"{type(self).__name__}()"
