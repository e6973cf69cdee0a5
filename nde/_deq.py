"""Deep equilibrium machinery: fixed points with implicit, phantom or Jacobian-free gradients.

:func:`deq_fixed_point` solves ``z* = f(z*, *args)`` without recording the iterations and
attaches gradients to ``z*`` by one of

* ``"implicit"``: the implicit function theorem. With ``J = df/dz`` at ``z*``, a cotangent ``v``
  of ``z*`` becomes ``g`` solving ``g = J^T g + v`` (i.e. ``(I - J)^T g = v``), then flows through
  one evaluation of ``f`` into ``args`` and the parameters ``f`` closes over. Memory is one
  evaluation of ``f``, whatever the forward iteration count.
* ``"phantom"``: ``k`` damped unrolled steps ``z <- (1 - lam) z + lam f(z)`` from ``z*``
  (Geng et al. 2021); memory ``k`` evaluations.
* ``"jfb"``: Jacobian-free backpropagation, one step ``f(z*)`` with ``J`` treated as zero
  (Fung et al. 2022).
* ``"unrolled"``: backpropagation through every solver iteration (a reference; memory grows
  with the iteration count).

:func:`implicit_vjp` is the linear solve on its own, for other implicit layers (for instance
steady states of ODEs).
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from .solvers.fixed_point import (
    AbstractFixedPointSolver,
    FixedPointResult,
    get_fixed_point_solver,
)

__all__ = ["deq_fixed_point", "implicit_vjp", "implicit_backward", "jacobian_regularisation", "spectral_radius"]

_BACKWARDS = ("implicit", "phantom", "jfb", "unrolled")


def implicit_vjp(vjp: Callable, v: torch.Tensor, solver: AbstractFixedPointSolver | str = "anderson",
                 batch_dims: int | None = None) -> FixedPointResult:
    r"""Solve the adjoint system of a fixed point, ``g = J^T g + v``.

    .. math:: (I - \partial f/\partial z)^\top g = v

    Parameters
    ----------
    vjp:
        ``u -> u^T J`` (same shape as ``v``), e.g. from ``torch.autograd.grad(f(z*), z*, u)``.
    v:
        The incoming cotangent.
    solver:
        Any fixed-point solver (its tolerances apply); :class:`~nde.solvers.NewtonKrylov`
        solves the system by GMRES.
    batch_dims:
        Leading batch dimensions (``vjp`` must not mix samples when positive).

    Returns
    -------
    FixedPointResult
        ``result.value`` is ``g``.

    Bai, Kolter & Koltun, "Deep equilibrium models", NeurIPS 2019.
    """
    solver = get_fixed_point_solver(solver)
    with torch.no_grad():
        return solver.solve_linear(vjp, v, None, batch_dims)


def _as_args(args):
    if args is None:
        return ()
    return args if isinstance(args, tuple) else (args,)


def implicit_backward(out: torch.Tensor, z: torch.Tensor, v: torch.Tensor,
                      solver: AbstractFixedPointSolver | str = "anderson", batch_dims: int | None = None,
                      identity: bool = False) -> FixedPointResult:
    r"""Adjoint solve of a fixed point whose map has been evaluated once with a graph.

    ``out = phi(z)`` is one evaluation of the map at the fixed point, with ``z`` a leaf requiring
    grad; the cotangent ``v`` of the fixed point becomes ``g`` solving

    .. math:: g = (\partial \phi / \partial z)^\top g + v,

    with vector-Jacobian products through the graph of ``out`` (kept for the caller, who then pulls
    ``g`` through the same graph to the parameters). With ``identity=True`` the map is
    ``phi(z) = z + out`` (``out`` a residual such as an ODE vector field, whose zero is the fixed
    point): the products are ``u + u^T d(out)/dz``.

    Parameters
    ----------
    out:
        ``phi(z)`` (or the residual, with ``identity=True``), connected to ``z`` by a graph.
    z:
        The leaf the map was evaluated at.
    v:
        The incoming cotangent, shape of ``z``.
    solver:
        Solver of the linear system (its tolerances and ``throw`` apply).
    batch_dims:
        Leading batch dimensions (the map must not mix samples when positive).
    identity:
        Add the identity to the Jacobian (see above).

    Returns
    -------
    FixedPointResult
        ``result.value`` is ``g``.
    """

    def vjp(u):
        with torch.enable_grad():
            (g,) = torch.autograd.grad(out, z, u, retain_graph=True, allow_unused=True)
        if g is None:
            g = torch.zeros_like(u)
        return u + g if identity else g

    return implicit_vjp(vjp, v, solver, batch_dims)


class _ImplicitFunction(torch.autograd.Function):
    """Identity on ``out = f(z*, *args)`` whose backward replaces the cotangent ``v`` by ``(I - J^T)^{-1} v``.

    The graph of ``out`` is saved as an input of this node (no reference from ``out`` back to the
    node), so the whole graph is freed with the output. The forward result is held weakly: its
    residual history (one entry per forward iteration) is not kept alive by the graph.
    """

    @staticmethod
    def forward(ctx, out, z_leaf, solver, batch_dims, forward_result):
        ctx.solver, ctx.batch_dims, ctx.forward_result = solver, batch_dims, weakref.ref(forward_result)
        ctx.save_for_backward(out, z_leaf)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            # create_graph=True: the adjoint solve would drop how J depends on z*(theta)
            raise RuntimeError(
                "deq_fixed_point(backward='implicit') does not support higher-order gradients "
                "(backward with create_graph=True); use backward='unrolled' or 'phantom' for those."
            )
        out, z_leaf = ctx.saved_tensors
        result = implicit_backward(out, z_leaf, grad, ctx.solver, ctx.batch_dims)
        forward_result = ctx.forward_result()
        if forward_result is not None:
            forward_result.backward = result
        return result.value, None, None, None, None


def deq_fixed_point(
    f: Callable,
    z0: torch.Tensor,
    args=(),
    solver: AbstractFixedPointSolver | str = "anderson",
    backward: str = "implicit",
    backward_solver: AbstractFixedPointSolver | str | None = None,
    phantom_steps: int = 5,
    phantom_damping: float = 0.5,
    batch_dims: int | None = None,
    return_result: bool = False,
):
    r"""Differentiable fixed point ``z* = f(z*, *args)`` of a map over tensors of any shape.

    The forward solve runs without recording the graph; gradients with respect to ``args``
    and every parameter ``f`` closes over come from ``backward``:

    * ``"implicit"`` (default): implicit function theorem, ``dz*/dθ = (I - J)^{-1} ∂f/∂θ``;
      the adjoint system ``(I - J)^T g = v`` is solved by ``backward_solver``. First-order
      only: a backward pass with ``create_graph=True`` raises.
    * ``"phantom"``: ``phantom_steps`` unrolled steps ``z <- (1-λ) z + λ f(z)`` from ``z*``.
    * ``"jfb"``: one step ``f(z*)``, Jacobian-free.
    * ``"unrolled"``: differentiate through the solver's iterations.

    Parameters
    ----------
    f:
        The map, called ``f(z, *args)``; returns a tensor of the shape of ``z``.
    z0:
        Initial guess (no gradient flows to it: ``z*`` does not depend on it).
    args:
        Tensor arguments of ``f`` (tuple; a single tensor is accepted).
    solver:
        Forward solver: an :class:`~nde.solvers.AbstractFixedPointSolver` or a name
        (``"naive"``, ``"anderson"``, ``"broyden"``, ``"newton"``).
    backward:
        ``"implicit"``, ``"phantom"``, ``"jfb"`` or ``"unrolled"``.
    backward_solver:
        Solver of the implicit adjoint system (default: the forward solver); use
        ``"gmres"``/:class:`~nde.solvers.NewtonKrylov` for GMRES.
    phantom_steps, phantom_damping:
        ``k >= 1`` and ``λ`` in ``(0, 1]`` of the phantom gradient.
    batch_dims:
        Leading dimensions holding independent samples (default 1; 0 if ``f`` couples samples).
    return_result:
        Also return the forward :class:`~nde.solvers.FixedPointResult`.

    Returns
    -------
    z : Tensor
        The equilibrium (for ``"implicit"``/``"jfb"``, ``f(z*)``; for ``"phantom"`` the last
        unrolled step), carrying gradients.
    result : FixedPointResult
        Only if ``return_result``. With ``backward="implicit"``, ``result.backward`` holds the
        adjoint solve's result once the backward pass has run.

    Bai, Kolter & Koltun, "Deep equilibrium models", NeurIPS 2019; Geng et al., "On training
    implicit models", NeurIPS 2021; Fung et al., "JFB: Jacobian-free backpropagation for implicit
    networks", AAAI 2022.
    """
    if backward not in _BACKWARDS:
        raise ValueError(f"backward must be one of {_BACKWARDS}, got {backward!r}.")
    if not (isinstance(phantom_steps, int) and phantom_steps >= 1):
        raise ValueError(f"phantom_steps must be a positive int, got {phantom_steps!r}.")
    if not (0 < phantom_damping <= 1):
        raise ValueError(f"phantom_damping must be in (0, 1], got {phantom_damping!r}.")
    solver = get_fixed_point_solver(solver)
    bsolver = solver if backward_solver is None else get_fixed_point_solver(backward_solver)
    args = _as_args(args)

    if backward == "unrolled" and torch.is_grad_enabled():
        result = solver.solve(f, z0, args, batch_dims)
        return (result.value, result) if return_result else result.value

    with torch.no_grad():
        result = solver.solve(f, z0.detach(), tuple(a.detach() if isinstance(a, torch.Tensor) else a
                                                    for a in args), batch_dims)
    z_star = result.value
    if not torch.is_grad_enabled():
        out = z_star
    elif backward == "implicit":
        z_leaf = z_star.detach().requires_grad_(True)
        out = f(z_leaf, *args)
        if out.requires_grad:
            out = _ImplicitFunction.apply(out, z_leaf, bsolver, batch_dims, result)
    elif backward == "jfb":
        out = f(z_star.detach(), *args)
    else:
        out = z_star.detach()
        lam = phantom_damping
        for _ in range(phantom_steps):
            out = f(out, *args) if lam == 1.0 else (1 - lam) * out + lam * f(out, *args)
    return (out, result) if return_result else out


def _sample_norm_sq(x, batch_dims):
    return x.pow(2).flatten(batch_dims).sum(-1) if batch_dims > 0 else x.pow(2).sum()


def jacobian_regularisation(f: Callable, z: torch.Tensor, args=(), num_samples: int = 1,
                            create_graph: bool = True, batch_dims: int | None = None,
                            normalise: bool = True) -> torch.Tensor:
    r"""Hutchinson estimate of the squared Frobenius norm of ``J = df/dz`` at ``z``.

    .. math:: \|J\|_F^2 = \mathbb{E}_{\epsilon \sim N(0, I)} \|\epsilon^\top J\|_2^2

    Added to the loss (times a small weight) it keeps the equilibrium map well conditioned and
    the solver iteration counts low (Bai, Koltun & Kolter, "Stabilizing equilibrium models by
    Jacobian regularization", ICML 2021).

    Parameters
    ----------
    f:
        The map ``f(z, *args)``.
    z:
        Point of evaluation (typically ``z*`` detached).
    args:
        Extra arguments of ``f``.
    num_samples:
        Number of Gaussian probes averaged.
    create_graph:
        Keep the graph so the estimate can be backpropagated (True for a training loss).
    batch_dims:
        Leading batch dimensions (default 1, 0 for a scalar ``z``); the estimate is per sample.
    normalise:
        Divide by the per-sample dimension (the mean squared Jacobian entry), as in the paper.

    Returns
    -------
    Tensor
        Per-sample estimates, shape ``z.shape[:batch_dims]``; take ``.mean()`` for a loss.
    """
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}.")
    if batch_dims is None:
        batch_dims = 1 if z.ndim >= 1 else 0
    args = _as_args(args)
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        fz = f(zz, *args)
        total = 0.0
        for i in range(num_samples):
            eps = torch.randn_like(fz)
            (vjp,) = torch.autograd.grad(fz, zz, eps, create_graph=create_graph,
                                         retain_graph=create_graph or i < num_samples - 1)
            total = total + _sample_norm_sq(vjp, batch_dims)
    est = total / num_samples
    if normalise:
        est = est / max(1, zz[(0,) * batch_dims].numel())
    return est


def spectral_radius(f: Callable, z: torch.Tensor, args=(), iters: int = 30,
                    batch_dims: int | None = None) -> torch.Tensor:
    r"""Power-iteration estimate of the spectral radius of ``J = df/dz`` at ``z``, per sample.

    .. math:: \rho(J) \approx \big(\textstyle\prod_{k > K/2} \|J^\top v_k\|\big)^{2/K},
        \quad v_{k+1} = J^\top v_k / \|J^\top v_k\|

    A radius below 1 means the fixed point is locally attracting for naive iteration and
    ``I - J`` is invertible (the implicit gradient exists); a diagnostic, not a loss.

    Parameters
    ----------
    f, z, args:
        Map, point, extra arguments.
    iters:
        Power iterations.
    batch_dims:
        Leading batch dimensions (default 1, 0 for a scalar ``z``).

    Returns
    -------
    Tensor
        Estimates of shape ``z.shape[:batch_dims]`` (no gradient).
    """
    if not (isinstance(iters, int) and iters >= 1):
        raise ValueError(f"iters must be a positive int, got {iters!r}.")
    if batch_dims is None:
        batch_dims = 1 if z.ndim >= 1 else 0
    args = _as_args(args)
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        fz = f(zz, *args)
        v = torch.randn_like(fz)
        bshape = z.shape[:batch_dims] + (1,) * (z.ndim - batch_dims)
        v = v / _sample_norm_sq(v, batch_dims).sqrt().reshape(bshape)
        logs = []
        for _ in range(iters):
            (w,) = torch.autograd.grad(fz, zz, v, retain_graph=True)
            norm = _sample_norm_sq(w, batch_dims).sqrt()
            logs.append(norm.clamp_min(torch.finfo(w.dtype).tiny).log())
            v = w / norm.clamp_min(torch.finfo(w.dtype).tiny).reshape(bshape)
    # geometric mean over the second half: robust to complex dominant pairs (oscillating ratios)
    return torch.stack(logs[iters // 2:]).mean(0).exp().detach()


class LiveTensorBytes(TorchDispatchMode):
    """Exact accounting of the CPU tensor memory created under the mode.

    Every operator output (forward, saved tensors, the backward engine's temporaries, a solver's
    buffers) is recorded with a weak reference to its storage, so a storage counts for exactly as
    long as anything holds it; views share their storage's bytes. While ``measuring`` is True the
    peak of the live total is kept in ``peak``. Deterministic, unlike peak RSS; used by the tests
    and benchmarks of the backward passes' memory.

    Examples
    --------
    >>> mode = LiveTensorBytes()
    >>> with mode:
    ...     loss = model(x).sum()
    ...     mode.measuring = True
    ...     grads = torch.autograd.grad(loss, params)
    >>> mode.peak  # bytes
    """

    def __init__(self):
        super().__init__()
        self.live = {}
        self.measuring = False
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                known = self.live.get(st.data_ptr())
                if known is None or known[0].expired():
                    self.live[st.data_ptr()] = (StorageWeakRef(st), st.nbytes())
        if self.measuring:
            self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
            self.peak = max(self.peak, sum(b for _, b in self.live.values()))
        return out
