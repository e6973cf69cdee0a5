"""Gradients of steady states by the implicit function theorem."""

from __future__ import annotations

import warnings

import torch

from ._adjoint import AbstractAdjoint
from ._adjoint_common import function_inputs, run_with_function, time_inputs
from ._adjoint_independent import _time_inputs_independent
from ._deq import implicit_backward
from .solvers.fixed_point import (
    AbstractFixedPointSolver,
    FixedPointError,
    FixedPointWarning,
    NewtonKrylov,
    get_fixed_point_solver,
)


class ImplicitAdjoint(AbstractAdjoint):
    r"""Differentiate a steady state ``f(t1, y*, args) = 0`` through the implicit function theorem.

    Solve to (close to) an equilibrium, e.g. to a large ``t1``, with ``SaveAt(t1=True)``. The backward
    pass never looks at the trajectory: with ``J = df/dy`` at ``y* = y(t1)`` and the cotangent ``g``
    of ``y*``, it solves

    .. math:: J^\top w = -g

    matrix-free (vector-Jacobian products of one evaluation of ``f``) with the machinery of
    :func:`nde.deq_fixed_point`: ``y*`` is the fixed point of ``y -> y + f(t1, y)``, whose adjoint
    system ``w = (I + J)^T w + g`` is solved by ``solver``. The gradient of the parameters and
    ``args`` is ``w^T df/dtheta``. Memory and backward cost are independent of the number of steps.

    What the other inputs receive:

    * ``y0`` and ``t0``: zero. An isolated, attracting equilibrium does not depend on where or when
      the solve started (the exact derivative of the computed ``y(t1)``, ``Phi(t1, t0)``, decays
      like the transient and vanishes in the limit). A manifold of equilibria (a conserved
      quantity) makes ``J`` singular: the linear solve then fails and is reported.
    * ``t1`` (a number, or per sample in ``batch_mode="independent"``): ``<g, f(t1, y(t1))>``, the
      exact derivative of the returned state, ``dy(t1)/dt1 = f(t1, y(t1))``. It is zero at an exact
      equilibrium and otherwise measures how far from one the solve stopped (equal to
      :class:`~nde.DirectAdjoint`'s ``t1`` gradient).

    Bai, Kolter & Koltun (2019), "Deep equilibrium models", NeurIPS; Krantz & Parks (2002), *The
    implicit function theorem*.

    Parameters
    ----------
    solver:
        Solver of the linear system: ``"gmres"`` (default; any nonsingular ``J``), ``"anderson"``,
        ``"broyden"``, ``"naive"``, or an :class:`~nde.solvers.AbstractFixedPointSolver` instance
        (whose own tolerances and ``throw`` then apply). The fixed-point solvers iterate
        ``w <- w + J^T w + g``; plain iteration needs the spectrum of ``I + J`` inside the unit disc
        (``FixedPointIteration(damping=h)`` iterates with step ``h``).
    rtol, atol:
        Tolerances of the linear solve built from a name (residual ``<= atol + rtol |g|``).
    max_steps:
        Iteration (or, for GMRES, operator-application) budget of a solver built from a name.
    per_sample:
        Solve one linear system per sample (the first ``batch_ndim`` dimensions) rather than one for the
        whole state; valid when the vector field does not mix samples. None: per sample in
        ``batch_mode="independent"``, one system in joint mode.
    residual_tol:
        Warn when the RMS of ``f(t1, y(t1))`` exceeds this: the solve has not reached a steady state.
    throw:
        A linear solve that does not converge raises :class:`~nde.solvers.FixedPointError` (True) or
        warns with :class:`~nde.solvers.FixedPointWarning` (False); None follows the ``throw``
        argument of :func:`nde.solve`. Ignored for a solver instance (its own ``throw`` applies).
    params:
        Optional extra tensors to differentiate.
    """

    def __init__(self, solver: AbstractFixedPointSolver | str = "gmres", rtol: float = 1e-8, atol: float = 1e-10,
                 max_steps: int = 600, per_sample: bool | None = None, residual_tol: float = 1e-3,
                 throw: bool | None = None, params=None):
        for name, v in (("rtol", rtol), ("atol", atol), ("residual_tol", residual_tol)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be a positive number; got {v!r}.")
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be a positive int; got {max_steps!r}.")
        if throw is not None and not isinstance(throw, bool):
            raise TypeError(f"throw must be True, False or None (follow nde.solve's throw); got {throw!r}.")
        if isinstance(solver, str):
            get_fixed_point_solver(solver)  # an unknown name fails here, not in the backward pass
        elif not isinstance(solver, AbstractFixedPointSolver):
            raise TypeError(
                f"solver must be a name ('gmres', 'anderson', 'broyden', 'naive') or an "
                f"AbstractFixedPointSolver instance; got {type(solver).__name__}."
            )
        self.solver = solver
        self.rtol, self.atol, self.max_steps = float(rtol), float(atol), max_steps
        self.per_sample, self.residual_tol, self.throw = per_sample, residual_tol, throw
        self.params = None if params is None else list(params)
        self.backward_stats = None

    def linear_solver(self, throw: bool) -> AbstractFixedPointSolver:
        """The solver of the backward linear system (``throw`` is used for a solver given by name)."""
        if isinstance(self.solver, AbstractFixedPointSolver):
            return self.solver
        tol = dict(rtol=self.rtol, atol=self.atol, max_steps=self.max_steps, throw=throw)
        if self.solver.lower() in ("gmres", "newton", "newton_krylov"):
            return NewtonKrylov(restart=30, **tol)
        return get_fixed_point_solver(self.solver, **tol)

    def run(self, problem):
        sa = problem.saveat
        if sa.t0 or sa.ts is not None or sa.steps or sa.dense or not sa.t1:
            raise ValueError("ImplicitAdjoint differentiates the steady state only: use saveat=SaveAt(t1=True).")
        if not problem.terms.is_ode:
            raise ValueError("ImplicitAdjoint needs an ODE: the steady state solves f(t1, y*) = 0.")
        independent = problem.batch_mode == "independent"
        t_in = _time_inputs_independent(problem) if independent else time_inputs(problem)
        params = self._inputs(problem, t_in)
        runner = _ImplicitRunner(self, problem, params, t_in)
        return run_with_function(runner, problem, function_inputs(t_in, params))

    def __repr__(self):
        return f"ImplicitAdjoint(solver={self.solver!r}, rtol={self.rtol}, atol={self.atol})"


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
        """The user's vector field at the user's ``t1`` (per-sample times broadcast over the state)."""
        p = self.p
        t = p.t1_in
        if isinstance(t, torch.Tensor):
            tt = t.detach().to(y.dtype)
            tt = tt.reshape(tt.shape + (1,) * (y.dim() - tt.dim())) if tt.numel() > 1 else tt.reshape(())
        else:
            tt = torch.tensor(float(t), dtype=y.dtype, device=y.device)
        return p.user_terms.ode(tt, y, p.args)

    def backward(self, ct):
        p, adj = self.p, self.adj
        g = ct[-1]
        y = self.y_star.detach()
        with torch.enable_grad():
            y_ = y.requires_grad_(True)
            fy = self._field(y_)
        per_sample = adj.per_sample if adj.per_sample is not None else p.batch_mode == "independent"
        nb = p.batch_ndim if per_sample else 0
        rms = fy.detach().pow(2).reshape(y.shape[:nb] + (-1,)).mean(-1).sqrt()
        res = float(rms.max()) if rms.numel() else 0.0
        if res > adj.residual_tol:
            where = f" (sample {tuple(torch.nonzero(rms == rms.max())[0].tolist())})" if nb else ""
            warnings.warn(
                f"ImplicitAdjoint: |f(t1, y(t1))| = {res:.3g} (RMS){where}: the solve has not reached a steady "
                "state, so the implicit gradient is inaccurate; integrate to a larger t1.", RuntimeWarning,
                stacklevel=2,
            )
        throw = p.throw if adj.throw is None else adj.throw
        named = not isinstance(adj.solver, AbstractFixedPointSolver)
        try:
            with warnings.catch_warnings():
                if named:  # reported below, with what it means here
                    warnings.simplefilter("ignore", FixedPointWarning)
                result = implicit_backward(fy, y_, g, adj.linear_solver(throw=False), batch_dims=nb, identity=True)
        except FixedPointError as err:
            raise FixedPointError(
                f"ImplicitAdjoint: the linear solve (df/dy)^T w = -g at y(t1) failed: {err} A singular df/dy "
                "means the steady state is not isolated (e.g. a conserved quantity).", err.result, err.samples,
            ) from err
        if named and not result.all_converged:
            failed = torch.nonzero(~result.converged.reshape(-1)).flatten().tolist()
            msg = (
                f"ImplicitAdjoint: the linear solve (df/dy)^T w = -g at y(t1) did not converge "
                f"(residual {float(result.residual.max()):.3g}, rtol={adj.rtol:g}, atol={adj.atol:g}, "
                f"max_steps={adj.max_steps}; samples {failed[:10]}): df/dy is singular or ill-conditioned (the steady "
                "state is not isolated), or raise max_steps / loosen rtol and atol."
            )
            if throw:
                raise FixedPointError(msg, result, failed)
            warnings.warn(msg, FixedPointWarning, stacklevel=2)
        w = result.value
        adj.backward_stats = {"matvecs": result.nfe, "residual": float(result.residual.max()),
                              "steady_state_residual": res, "result": result}
        grads = [None] * len(self.params)
        if self.params:
            grads = list(torch.autograd.grad(fy, self.params, w, allow_unused=True))
        out = [torch.zeros_like(y)]
        t0_in, t1_in = self.t_in
        if t0_in is not None:
            out.append(torch.zeros_like(t0_in))
        if t1_in is not None:
            # dy(t1)/dt1 = f(t1, y(t1)): per sample when t1 is
            gf = (g * fy.detach()).reshape(t1_in.shape + (-1,)) if t1_in.numel() > 1 else (g * fy.detach())
            out.append((gf.sum(-1) if t1_in.numel() > 1 else gf.sum().reshape(t1_in.shape)).to(t1_in.dtype))
        return out + grads
