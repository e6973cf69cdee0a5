"""Adjoints: how gradients flow back through a solve."""

from __future__ import annotations

import abc

import torch


class AbstractAdjoint(abc.ABC):
    """An adjoint owns how the forward solve is recorded and how gradients come back."""

    @abc.abstractmethod
    def run(self, problem):
        """Solve a prepared problem (see ``nde._solve.Problem``) and return a Solution."""

    def _inputs(self, problem, t_in):
        """The tensors besides ``y0`` and the times ``t_in`` that receive gradients: those the problem
        depends on, found by inspection, and the adjoint's ``params``."""
        from ._adjoint_common import collect_params

        return [x for x in collect_params(problem, getattr(self, "params", None)) if all(x is not t for t in t_in)]


class DirectAdjoint(AbstractAdjoint):
    """Backpropagate through every operation of the solve (discretise-then-optimise).

    Exact gradients of the computed solution with respect to ``y0``, ``args`` and parameters; memory
    grows linearly with the number of steps.

    The gradients with respect to ``t0`` and ``t1`` are, as for every adjoint, those of the exact flow
    evaluated at the computed solution: ``dy(t1)/dt1 = f(t1, y(t1))`` and
    ``dy(t)/dt0 = -Phi(t, t0) f(t0, y0)`` (``Phi`` the Jacobian of the flow), not the derivative of the
    discrete solution with respect to its end points, which differs from it by the solver's error (at
    fixed ``dt = 0.02`` with ``ReversibleHeun``, finite differences of the discrete solve differ from it
    by 4e-4 relative). The loop steps on detached float64 times, and an adaptive solve's step sequence
    is not a differentiable function of ``t0`` and ``t1`` (accepting or rejecting a step is a jump), so the
    flow's derivative is the one that is defined for every solver and agrees across adjoints.
    """

    def run(self, problem):
        from ._solve import integrate

        t0, t1 = (t if isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled() else None
                  for t in (problem.t0_in, problem.t1_in))
        if t0 is None and t1 is None:
            return integrate(problem)
        # The loop works on detached times; gradients with respect to t0 and t1 come from the flow:
        # dy(t)/dt0 = -Phi(t, t0) f(t0, y0) and dy(t1)/dt1 = f(t1, y(t1)).
        terms, args = problem.user_terms, problem.args
        if not terms.is_ode:
            raise ValueError(
                "Gradients with respect to t0/t1 need an ODE (or a CDE with a differentiable control); "
                "pass t0 and t1 as plain numbers or detach them."
            )
        nb = problem.batch_ndim if problem.batch_mode == "independent" else 0
        ctx = (terms, args, nb)
        if t0 is not None:
            problem = problem.replace(y0=_TimeGrad.apply(t0, problem.y0, ctx, -1.0))
        sol = integrate(problem)
        pieces = list(sol.ys.unbind(0))
        if t0 is not None and problem.saveat.t0:
            # the saved y(t0) is y0 itself whatever t0 is: cancel the flow term that reached it
            pieces[0] = _TimeGrad.apply(t0, pieces[0], ctx, 1.0)
        if t1 is not None and problem.saveat.t1:
            pieces[-1] = _TimeGrad.apply(t1, pieces[-1], ctx, 1.0)
        sol.ys = torch.stack(pieces)
        return sol

    def __repr__(self):
        return "DirectAdjoint()"


class _TimeGrad(torch.autograd.Function):
    """Identity on ``y``; the gradient with respect to the time ``t`` is ``sign * <g, f(t, y)>``."""

    @staticmethod
    def forward(ctx, t, y, info, sign):
        ctx.info, ctx.sign = info, sign
        ctx.save_for_backward(t, y)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        t, y = ctx.saved_tensors
        terms, args, nb = ctx.info
        with torch.no_grad():
            tt = t.detach().to(y.dtype)
            if t.numel() > 1:  # per-sample times in independent mode
                tt = tt.reshape(tt.shape + (1,) * (y.dim() - tt.dim()))
            else:
                tt = tt.reshape(())
            gf = g * terms.ode(tt, y.detach(), args)
            if t.numel() > 1:
                gt = gf.reshape(t.shape + (-1,)).sum(-1)
            else:
                gt = gf.sum().reshape(t.shape)
        return (ctx.sign * gt).to(t.dtype), g, None, None
