"""Neural ODEs: ``dy/dt = f_theta(t, y)`` with a neural network ``f_theta``."""

from __future__ import annotations

import torch
from torch import nn

import nde


class NeuralODE(nn.Module):
    """A neural ODE ``dy/dt = f(t, y)``; ``forward(y0, t)`` returns the trajectory at the times ``t``.

    Chen, Rubanova, Bettencourt & Duvenaud (2018), "Neural ordinary differential equations", NeurIPS.

    Parameters
    ----------
    func:
        The vector field: an ``nn.Module`` (or callable) ``f(t, y)`` or ``f(t, y, args)``.
    solver:
        An nde solver; default ``nde.solvers.Tsit5()``.
    rtol, atol:
        Tolerances of the default ``PIDController`` (ignored when ``controller`` or ``dt0`` is given).
    controller:
        Step-size controller; default ``PIDController(rtol, atol)`` for adaptive solvers, or
        ``ConstantStepSize()`` when ``dt0`` is given.
    dt0:
        Initial step (or constant step with ``ConstantStepSize``).
    adjoint:
        How gradients are computed; default ``nde.DirectAdjoint()``.
    saveat:
        What ``forward`` returns. Default ``None``: the states at every time of ``t``
        (``SaveAt(ts=t)``). Given an :class:`nde.SaveAt`, ``forward(y0, t)`` integrates from ``t[0]``
        to ``t[-1]`` and returns ``Solution.ys`` of that ``SaveAt`` (e.g. ``SaveAt(t1=True)`` for the
        final state only, or ``SaveAt(t1=True, dense=True)`` with ``self.solution.evaluate``).
    batch_mode, batch_ndim, max_steps, throw:
        Passed to :func:`nde.solve`.

    Attributes
    ----------
    stats:
        The statistics of the last forward solve (steps, NFE).
    solution:
        The :class:`nde.Solution` of the last forward solve (for ``evaluate``, ``result``, ``ts``).
    """

    def __init__(self, func, solver=None, rtol=1e-3, atol=1e-6, controller=None, dt0=None, adjoint=None,
                 batch_mode="joint", max_steps="auto", saveat=None, batch_ndim=1, throw=True):
        super().__init__()
        if saveat is not None and not isinstance(saveat, nde.SaveAt):
            raise TypeError(f"saveat must be an nde.SaveAt or None; got {type(saveat).__name__}.")
        self.func = func
        self.solver = solver if solver is not None else nde.solvers.Tsit5()
        self.rtol, self.atol = rtol, atol
        self.controller = controller
        self.dt0 = dt0
        self.adjoint = adjoint
        self.batch_mode = batch_mode
        self.max_steps = max_steps
        self.saveat = saveat
        self.batch_ndim = batch_ndim
        self.throw = throw
        self.term = nde.ODETerm(func)
        self.stats = None
        self.solution = None

    @property
    def vector_field(self):
        """The vector field ``f``."""
        return self.func

    def forward(self, y0: torch.Tensor, t, args=None) -> torch.Tensor:
        """Solve from ``t[0]`` to ``t[-1]``.

        Returns the states at every time of ``t``, of shape ``(len(t), *y0.shape)``, or, when the
        module was built with ``saveat=...``, the outputs that ``SaveAt`` asks for.
        """
        t = torch.as_tensor(t)
        if t.dim() != 1 or t.numel() < 2:
            raise ValueError(f"t must be a 1-D tensor of at least two times; got shape {tuple(t.shape)}.")
        controller = self.controller
        if controller is None:
            controller = nde.ConstantStepSize() if self.dt0 is not None else nde.PIDController(self.rtol, self.atol)
        sol = nde.solve(
            self.term, self.solver, t[0], t[-1], y0, dt0=self.dt0, args=args,
            saveat=nde.SaveAt(ts=t) if self.saveat is None else self.saveat, controller=controller,
            adjoint=self.adjoint, batch_mode=self.batch_mode, batch_ndim=self.batch_ndim, max_steps=self.max_steps,
            throw=self.throw,
        )
        self.stats = sol.stats
        self.solution = sol
        return sol.ys
