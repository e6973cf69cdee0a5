"""Gradients of steady states by the implicit function theorem."""

from __future__ import annotations

import math
import warnings

import torch

from ._adjoint import AbstractAdjoint
from ._adjoint_common import collect_params, function_inputs, run_with_function, time_inputs


class ImplicitAdjoint(AbstractAdjoint):
    """Differentiate a steady state ``f(y*, theta) = 0`` through the implicit function theorem.

    Solve to (close to) an equilibrium, e.g. to a large ``t1``, with ``SaveAt(t1=True)``. The backward
    pass never looks at the trajectory: with ``J = df/dy`` at ``y*`` and the cotangent ``g`` of
    ``y*``, it solves ``J^T w = -g`` by GMRES (matrix-free, through vector-Jacobian products) and
    returns ``w^T df/dtheta`` for the parameters and ``args``. The steady state does not depend on
    ``y0``, ``t0`` or ``t1`` (their gradients are zero). Memory and backward cost are independent of
    the number of steps.

    Bai, Kolter & Koltun (2019), "Deep equilibrium models", NeurIPS; Krantz & Parks (2002), *The
    implicit function theorem*.

    Parameters
    ----------
    rtol, atol:
        Tolerances of the linear solve (residual ``<= atol + rtol |g|``).
    per_sample:
        Solve one linear system per sample (the first ``batch_ndim`` dimensions) rather than one for the
        whole state; valid when the vector field does not mix samples. None: per sample in
        ``batch_mode="independent"``, one system in joint mode.
    residual_tol:
        Warn when the RMS of ``f(t1, y*)`` exceeds this: the solve has not reached a steady state.
    params:
        Optional extra tensors to differentiate.
    """

    def __init__(self, rtol: float = 1e-8, atol: float = 1e-10, per_sample: bool | None = None,
                 residual_tol: float = 1e-3, params=None):
        for name, v in (("rtol", rtol), ("atol", atol), ("residual_tol", residual_tol)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be a positive number; got {v!r}.")
        self.rtol, self.atol, self.per_sample, self.residual_tol = float(rtol), float(atol), per_sample, residual_tol
        self.params = None if params is None else list(params)
        self.backward_stats = None

    def run(self, problem):
        sa = problem.saveat
        if sa.t0 or sa.ts is not None or sa.steps or sa.dense or not sa.t1:
            raise ValueError("ImplicitAdjoint differentiates the steady state only: use saveat=SaveAt(t1=True).")
        if not problem.terms.is_ode:
            raise ValueError("ImplicitAdjoint needs an ODE: the steady state solves f(t1, y*) = 0.")
        t_in = time_inputs(problem)
        params = [x for x in collect_params(problem, self.params) if all(x is not t for t in t_in)]
        runner = _ImplicitRunner(self, problem, params, t_in)
        return run_with_function(runner, problem, function_inputs(t_in, params))

    def __repr__(self):
        return f"ImplicitAdjoint(rtol={self.rtol}, atol={self.atol})"


class _ImplicitRunner:
    def __init__(self, adjoint, problem, params, t_in):
        self.adj, self.p, self.params, self.t_in = adjoint, problem, params, t_in
        self.solution = None

    def forward(self):
        from ._solve import integrate

        with torch.no_grad():
            sol = integrate(self.p)
        self.solution = sol
        self.y_star = sol.ys[-1]
        return sol.ys

    def _field(self, y):
        p = self.p
        t = p.t1
        if isinstance(t, torch.Tensor):
            tt = t.to(y.dtype).reshape(t.shape + (1,) * (y.dim() - t.dim()))
        else:
            tt = torch.tensor(t, dtype=y.dtype, device=y.device)
        return p.terms.ode(tt, y, p.args)

    def backward(self, ct):
        from nde.solvers.fixed_point import gmres

        p, adj = self.p, self.adj
        g = ct[-1]
        y = self.y_star.detach()
        with torch.enable_grad():
            y_ = y.requires_grad_(True)
            fy = self._field(y_)
        res = float(torch.linalg.vector_norm(fy.detach()) / math.sqrt(max(fy.numel(), 1)))
        if res > adj.residual_tol:
            warnings.warn(
                f"ImplicitAdjoint: |f(t1, y(t1))| = {res:.3g} (RMS): the solve has not reached a steady state, "
                "so the implicit gradient is inaccurate; integrate to a larger t1.", RuntimeWarning, stacklevel=2,
            )
        per_sample = adj.per_sample if adj.per_sample is not None else p.batch_mode == "independent"
        nb = p.batch_ndim if per_sample else 0
        rows = math.prod(y.shape[:nb]) if nb else 1
        shape = y.shape

        def matvec(u):
            (v,) = torch.autograd.grad(fy, y_, u.reshape(shape), retain_graph=True)
            return v.reshape(rows, -1)

        w, resid, ok, nmv = gmres(matvec, -g.reshape(rows, -1), rtol=adj.rtol, atol=adj.atol, restart=30,
                                  max_restarts=20)
        if not bool(ok.all()):
            warnings.warn(f"ImplicitAdjoint: the linear solve did not converge (residual {float(resid.max()):.3g}).",
                          RuntimeWarning, stacklevel=2)
        adj.backward_stats = {"matvecs": nmv, "residual": float(resid.max()), "steady_state_residual": res}
        grads = [None] * len(self.params)
        if self.params:
            out = torch.autograd.grad(fy, self.params, w.reshape(shape), allow_unused=True)
            grads = list(out)
        a_y = torch.zeros_like(y)
        out = [a_y]
        for t in self.t_in:
            if t is not None:
                out.append(torch.zeros_like(t))
        return out + grads
