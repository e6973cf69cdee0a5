"""The continuous adjoint: optimise-then-discretise, solving the augmented system backwards in time."""

from __future__ import annotations

import bisect
import copy
import math

import torch

from ._adjoint import AbstractAdjoint
from ._adjoint_common import (
    Recorder, assemble_grads, check_supported, function_inputs, output_map, run_with_function,
    time_grads, time_inputs,
)
from ._controllers import ConstantStepSize, PIDController
from ._terms import DerivedODETerm

_NORMS = ("seminorm", "rms", "mixed")


def _rms_head(n):
    """RMS norm of the first ``n`` entries of a flat vector (the seminorm of the augmented state)."""

    def norm(x):
        x = x.reshape(-1)[:n]
        return torch.linalg.vector_norm(x) / math.sqrt(max(n, 1))

    return norm


def _mixed(sizes):
    """The largest RMS norm of consecutive pieces of the given sizes of a flat vector."""

    def norm(x):
        return torch.stack([torch.linalg.vector_norm(p) / math.sqrt(p.numel())
                            for p in x.reshape(-1).split(sizes) if p.numel()]).max()

    return norm


class BacksolveAdjoint(AbstractAdjoint):
    """The continuous adjoint method (optimise-then-discretise) with O(1) memory in the number of steps.

    The forward solve records no graph. The backward pass solves the augmented system
    ``dy/dt = f(t, y)``, ``da/dt = -a^T df/dy``, ``da_theta/dt = -a^T df/dtheta`` from ``t1`` back to
    ``t0``, adding the cotangent of every saved output at its time (where ``y`` is also reset to the
    forward value). With ``norm="seminorm"`` the step-size controller measures the error of ``y`` and
    ``a`` only: the parameter channels ``a_theta`` are integrals that nothing else depends on, so their
    error need not limit the step; this takes far fewer backward steps.

    Chen, Rubanova, Bettencourt & Duvenaud (2018), "Neural ordinary differential equations", NeurIPS;
    Kidger, Chen & Lyons (2021), "'Hey, that's not an ODE': faster ODE adjoints via seminorms", ICML.

    Parameters
    ----------
    rtol, atol:
        Tolerances of the backward solve; None takes those of the forward solve's controller.
    solver:
        Solver of the backward solve; None takes the forward solver (``Tsit5`` when that is a reversible
        solver, whose stability region suits the dissipative adjoint system poorly; for SDEs ``Heun``
        unless the forward solver is ``Heun``, ``Midpoint`` or ``EulerHeun``).
    norm:
        The error norm of the backward solve, over the augmented state ``[y, a, a_theta]`` (the adjoint
        ``a`` of ``y`` and ``a_theta`` of the parameters): ``"seminorm"`` (default), the RMS norm of
        ``[y, a]`` alone; ``"rms"``, the RMS norm of every entry of ``[y, a, a_theta]`` alike;
        ``"mixed"``, the largest of the RMS norms of ``y``, of ``a`` and of each parameter's adjoint
        (torchdiffeq's default for ``odeint_adjoint``, which weighs a small parameter tensor as much as
        the whole state). With an implicit backward solver the RMS norm is used, since its stage
        iterations need it.
    params:
        Optional tensors to differentiate, for vector fields that are not ``nn.Module`` s and whose
        parameters cannot be found by inspection (closures, globals and ``args`` are inspected).

    Notes
    -----
    The gradient is that of the exact solution map, computed to the backward tolerance; it agrees with
    :class:`~nde.DirectAdjoint`'s to about the tolerances used. With respect to ``t0`` and ``t1`` it is
    the flow's derivative, ``<dL/dy(t1), f(t1, y(t1))>`` and ``-<a(t0), f(t0, y0)>``, like every adjoint's.
    After a fixed-step forward solve the backward solve takes the forward's step size, unless ``rtol``
    or ``atol`` is given and the backward ``solver`` has an error estimate: then it adapts to them (as
    torchdiffeq's adjoint does with an adaptive ``adjoint_method``). In ``batch_mode="independent"`` every sample's augmented system runs on its own
    ``[t0, t1]`` and stops at its own save times (one solve in a normalised time ``s`` in ``[0, 1]`` carries
    the batch, with its step size shared); the parameter adjoint is summed over the samples. ODE terms, CDEs whose control is
    differentiable, and Stratonovich SDEs ``MultiTerm(ODETerm(f), ControlTerm(g, brownian))`` solved by
    ``Heun``, ``Midpoint``, ``EulerHeun`` or ``ReversibleHeun`` (joint batch mode) are supported. For an SDE
    the adjoint SDE ``da = -a df/dy dt - a d(g o dW)/dy`` is solved backwards on the forward solve's
    Brownian path (the stochastic adjoint of Li, Wong, Chen & Duvenaud (2020), "Scalable gradients for
    stochastic differential equations", AISTATS) with ``Heun``, ``Midpoint`` or ``EulerHeun``; its gradient
    converges to the discrete one as the step shrinks. Itô SDEs are refused (except with additive noise).
    """

    def __init__(self, rtol=None, atol=None, solver=None, norm="seminorm", params=None):
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}; got {norm!r}.")
        for name, v in (("rtol", rtol), ("atol", atol)):
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0):
                raise ValueError(f"{name} must be a positive number or None; got {v!r}.")
        from nde.solvers.base import AbstractSolver

        if solver is not None and not isinstance(solver, AbstractSolver):
            raise TypeError(f"solver must be an nde solver instance or None; got {type(solver).__name__}.")
        self.rtol, self.atol, self.solver, self.norm = rtol, atol, solver, norm
        self.params = None if params is None else list(params)
        self.backward_stats = None

    def run(self, problem):
        check_supported(problem, "BacksolveAdjoint")
        sde = None
        if not problem.terms.is_ode:
            if problem.batch_mode == "independent":
                raise ValueError(
                    "BacksolveAdjoint solves SDEs in batch_mode='joint' only; use batch_mode='joint', or "
                    "adjoint=nde.CheckpointAdjoint() / nde.ReversibleAdjoint()."
                )
            sde = _sde_setup(problem, self.solver)
        t_in = time_inputs(problem)
        params = self._inputs(problem, t_in)
        if problem.batch_mode == "independent":
            from ._adjoint_independent import run_independent

            return run_independent(problem, self, "backsolve")
        runner = _BacksolveRunner(self, problem, params, t_in, sde)
        return run_with_function(runner, problem, function_inputs(t_in, params))

    def backward_controller(self, problem, n_head, solver=None, longest=None, param_sizes=()):
        """The controller of the backward solve and, for fixed steps, its step size.

        ``longest`` (the longest interval of a sample) is given when the backward solve runs in a
        normalised time ``s`` in ``[0, 1]`` (independent mode): step bounds are converted to it and the
        forward's ``step_ts``/``jump_ts``, which have no meaning there, are dropped.
        """
        c = problem.controller
        if isinstance(c, ConstantStepSize):
            fixed = getattr(solver, "error_order", None) is None
            if fixed or (self.rtol is None and self.atol is None):
                return ConstantStepSize(), abs(problem.dt0) if not isinstance(problem.dt0, torch.Tensor) else None
            c = PIDController(rtol=self.rtol if self.rtol is not None else 1e-3,
                              atol=self.atol if self.atol is not None else 1e-6)
        c = copy.copy(c)
        if not isinstance(c, PIDController):
            return c, None
        if self.rtol is not None:
            c.rtol = self.rtol
        if self.atol is not None:
            c.atol = self.atol
        if isinstance(c.atol, torch.Tensor):
            c.atol = float(c.atol.max())
        if longest is not None:
            longest = max(longest, 1e-300)
            c.step_ts, c.jump_ts = [], []
            c.dtmin = None if c.dtmin is None else c.dtmin / longest
            c.dtmax = None if c.dtmax is None else c.dtmax / longest
        # implicit solvers iterate their stages to a tolerance measured in the whole state: leaving the
        # parameter channels out of the error control leaves them unconverged, so they keep the RMS norm
        if getattr(solver, "implicit", False) or self.norm == "rms":
            c.norm = None
        elif self.norm == "seminorm":
            c.norm = _rms_head(n_head)
        else:
            c.norm = _mixed([n_head // 2, n_head // 2] + [int(k) for k in param_sizes])
        return c, None

    def __repr__(self):
        return f"BacksolveAdjoint(rtol={self.rtol}, atol={self.atol}, solver={self.solver!r}, norm={self.norm!r})"


def _transformed(z):
    """Whether ``z`` is a tensor wrapped by a ``torch.func`` transform (vjp, jacrev, vmap, ...)."""
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(z))
    except AttributeError:
        return False


def augmented_field(terms, params, args, shape, n, rescale=None):
    """``(t, z) -> dz/dt`` of the augmented state ``z = [y, a, a_theta]`` (flat).

    With ``rescale = (t_end, w)`` (per-sample tensors broadcastable against ``y``), the argument is a
    normalised time ``s`` and each sample runs on its own interval: ``t = t_end + s w`` and
    ``dz/ds = w dz/dt``; the parameter channel sums every sample's ``w a^T df/dtheta``.
    """

    vjp = getattr(terms, "_ode_vjp", None)

    def f(t, z):
        if _transformed(z):
            # torch.autograd.grad inside a torch.func transform returns wrong values (the adjoint and
            # parameter channels) without an error; refusing makes the Newton Jacobian fall back to autograd
            raise NotImplementedError("the augmented adjoint field cannot be traced by torch.func")
        # differentiable in z only when asked (an implicit solver's Newton Jacobian): then second
        # derivatives of the vector field are recorded
        diff = torch.is_grad_enabled() and z.requires_grad
        y = z[:n].reshape(shape)
        a = z[n:2 * n].reshape(shape)
        if rescale is not None:
            t_end, w = rescale
            t = t_end + t * w
            a = a * w
        with torch.enable_grad():
            y_ = y if diff else y.detach().requires_grad_(True)
            # a term that knows its structure (g(t, y) dX/dt) computes the product and the VJP together
            both = None if diff or vjp is None else vjp(t, y_, args, a, [y_] + params)
            if both is not None:
                fy, gr = both
            else:
                fy = terms.ode(t, y_, args)
                if fy.requires_grad:
                    gr = torch.autograd.grad(fy, [y_] + params, -a, allow_unused=True, create_graph=diff)
                else:
                    gr = [None] * (1 + len(params))
        if not diff:
            fy = fy.detach()
        if rescale is not None:
            fy = fy * w
        parts = [fy.reshape(-1), (gr[0] if gr[0] is not None else torch.zeros_like(y)).reshape(-1)]
        for prm, g in zip(params, gr[1:]):
            parts.append(torch.zeros(prm.numel(), dtype=z.dtype, device=z.device) if g is None else g.reshape(-1).to(z.dtype))
        return torch.cat(parts)

    return f


def split_params(a_th, params):
    """The flat parameter channel ``a_th`` cut into one gradient per parameter."""
    grads, off = [], 0
    for prm in params:
        grads.append(a_th[off:off + prm.numel()].reshape(prm.shape).to(prm.dtype))
        off += prm.numel()
    return grads


_STRATONOVICH_SOLVERS = ("Heun", "Midpoint", "EulerHeun")


def _sde_setup(problem, back_solver):
    """Drift, diffusion and backward solver of a Stratonovich SDE ``dy = f dt + g o dW``, checked.

    Returns ``(drift, diffusion, solver)``: ``drift`` an :class:`~nde.ODETerm` (or None), ``diffusion``
    the one :class:`~nde.ControlTerm` driven by a Brownian motion, in the user's time.
    """
    from nde import solvers as S

    from ._terms import ControlTerm, MultiTerm, ODETerm

    terms = problem.user_terms
    parts = terms.terms if isinstance(terms, MultiTerm) else (terms,)
    smooth = [x for x in parts if x.is_ode]
    rough = [x for x in parts if not x.is_ode]
    if len(rough) != 1 or not isinstance(rough[0], ControlTerm):
        raise ValueError(
            "BacksolveAdjoint solves SDEs with one diffusion term, MultiTerm(ODETerm(f), ControlTerm(g, brownian)); "
            "combine the diffusions into one ControlTerm, or use adjoint=nde.CheckpointAdjoint()."
        )
    diffusion = rough[0]
    if not smooth:
        drift = None
    elif len(smooth) == 1 and type(smooth[0]) is ODETerm:
        drift = smooth[0]
    else:
        drift = ODETerm(lambda t, y, args: sum(x.ode(t, y, args) for x in smooth))
    solver = problem.solver
    kind = "stratonovich" if isinstance(solver, S.ReversibleHeun) else getattr(solver, "sde_type", None)
    if diffusion.noise != "additive" and (kind != "stratonovich" or diffusion.sde_type == "ito"):
        raise ValueError(
            f"BacksolveAdjoint solves the adjoint of a Stratonovich SDE, but {solver!r} solves it in the Itô sense "
            "(or the diffusion is declared sde_type='ito'). Use a Stratonovich solver (nde.solvers.Heun, Midpoint, "
            "EulerHeun, ReversibleHeun), or adjoint=nde.CheckpointAdjoint() / nde.DirectAdjoint()."
        )
    strat = tuple(getattr(S, name) for name in _STRATONOVICH_SOLVERS)
    if back_solver is None:
        back_solver = solver if type(solver) in strat else S.Heun()
    elif type(back_solver) not in strat:
        raise ValueError(
            f"solver (of the backward solve) must be one of nde.solvers.{', '.join(_STRATONOVICH_SOLVERS)} for an "
            f"SDE (they step the adjoint through its diffusion's products); got {back_solver!r}."
        )
    return drift, diffusion, back_solver


def forward_step_at(T, t):
    """The forward solve's step size at time ``t`` (a first step for the backward solve from ``t``).

    The step ending at or spanning ``t``; the last step was shortened to land on ``t1``, so there the
    larger of it and the step before it.
    """
    n = len(T) - 1
    i = min(max(bisect.bisect_left(T, t) - 1, 0), n - 1)
    h = T[i + 1] - T[i]
    if i == n - 1 and n >= 2:
        h = max(h, T[i] - T[i - 1])
    return h


class _BacksolveRunner:
    def __init__(self, adjoint, problem, params, t_in, sde=None):
        self.adj, self.p, self.params, self.t_in = adjoint, problem, params, t_in
        self.sde = sde
        self.solution = None

    def forward(self):
        from ._solve import integrate

        p = self.p
        self.rec = Recorder(p.t0)
        with torch.no_grad():
            sol = integrate(p.replace(on_accept=self.rec))
        self.solution = sol
        self.ys = sol.ys
        return sol.ys

    def backward(self, ct):
        from ._solve import solve

        p, rec = self.p, self.rec
        T = rec.T
        at_start, per_step, at_t1, n_out = output_map(p, T)
        if n_out != ct.shape[0]:
            raise RuntimeError("BacksolveAdjoint cannot differentiate a solve that stopped early (result != successful).")
        # the internal time of every output
        when = {k: T[0] for k in at_start}
        for i, lst in enumerate(per_step):
            for k, th in lst:
                when[k] = T[i + 1] if th is None else T[i] + th * (T[i + 1] - T[i])
        groups = sorted(set(when.values()), reverse=True)
        y0 = p.y0.detach()
        shape, n = tuple(y0.shape), y0.numel()
        P = sum(x.numel() for x in self.params)
        solver = self.adj.solver or p.solver
        if self.adj.solver is None and getattr(solver, "reversible", False):
            from nde.solvers.rk import Tsit5

            solver = Tsit5()
        # the backward solve runs in internal time (running forwards in it), or for SDEs in the user's
        # time, in which the augmented diffusion reads the forward solve's Brownian motion
        sign = 1.0
        if self.sde is not None:
            from ._sde_adjoint import stratonovich_adjoint_terms

            drift, diffusion, solver = self.sde
            f = stratonovich_adjoint_terms(drift, diffusion, self.params, p.args, shape)
            sign = float(p.sign)
        else:
            # the augmented ODE keeps the forward terms' jump times (knots of a control path), and stages at
            # its step ends see the path from inside the step, as in the forward solve
            f = DerivedODETerm(augmented_field(p.terms, self.params, p.args, shape, n), p.terms)
        controller, dt0 = self.adj.backward_controller(p, 2 * n, solver, param_sizes=[x.numel() for x in self.params])
        y = rec.y if rec.y is not None else y0
        a = torch.zeros_like(y0)
        a_th = torch.zeros(P, dtype=y0.dtype, device=y0.device)
        t_cur = T[-1]
        nfe = steps = 0
        for tg in sorted(set(groups) | {T[0]}, reverse=True):
            if tg < t_cur:
                z = torch.cat([y.reshape(-1), a.reshape(-1), a_th])
                if dt0 is not None:
                    step0 = -dt0
                elif len(T) > 1:
                    # start from the forward solve's step size at t_cur instead of estimating one (2 evaluations)
                    step0 = -min(forward_step_at(T, t_cur), t_cur - tg)
                else:
                    step0 = None
                with torch.no_grad():
                    sol = solve(f, solver, sign * t_cur, sign * tg, z, dt0=None if step0 is None else sign * step0,
                                controller=controller, max_steps=p.max_steps)
                z = sol.ys[-1]
                nfe += sol.stats["nfe"]
                steps += sol.stats["num_steps"]
                y, a, a_th = z[:n].reshape(shape), z[n:2 * n].reshape(shape), z[2 * n:]
                t_cur = tg
            ks = [k for k, w in when.items() if w == tg]
            if ks:
                y = self.ys[ks[0]]
                for k in ks:
                    a = a + ct[k]
        self.adj.backward_stats = {"nfe": nfe, "num_steps": steps}
        grads = split_params(a_th, self.params)
        g0, g1 = time_grads(p, self.t_in, y0, rec.y if rec.y is not None else y0, a, ct, at_t1)
        return assemble_grads(self.t_in, self.params, a, g0, g1, grads)
