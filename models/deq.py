"""Deep equilibrium layers: ``z* = f(z*, x)`` as an ``nn.Module``."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from nde._deq import deq_fixed_point, jacobian_regularisation
from nde.solvers.fixed_point import AbstractFixedPointSolver, FixedPointResult, get_fixed_point_solver

__all__ = ["DEQ", "DEQInfo", "MonotoneDEQ", "MonotoneLinear"]


@dataclasses.dataclass
class DEQInfo:
    """Diagnostics of one :class:`DEQ` forward pass.

    Attributes
    ----------
    result:
        The forward :class:`~nde.solvers.FixedPointResult` (``iterations``, ``residual``,
        ``residual_history``, ``converged`` per sample).
    jacobian_loss:
        Hutchinson estimate of ``||df/dz||_F^2 / dim`` at the equilibrium (batch mean), when
        ``jacobian_samples > 0`` and the module is training; otherwise None.
    """

    result: FixedPointResult
    jacobian_loss: torch.Tensor | None = None


def _apply_norm(module: nn.Module, norm: str | None):
    if norm is None:
        return
    if norm not in ("weight", "spectral"):
        raise ValueError(f"norm must be None, 'weight' or 'spectral', got {norm!r}.")
    layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    for sub in list(module.modules()):
        if isinstance(sub, layers) and not parametrize.is_parametrized(sub, "weight"):
            if norm == "weight":
                nn.utils.parametrizations.weight_norm(sub)
            else:
                nn.utils.parametrizations.spectral_norm(sub)


class DEQ(nn.Module):
    r"""Deep equilibrium layer: returns ``z*`` with ``z* = cell(z*, x)``.

    The forward pass finds the equilibrium with a fixed-point solver without recording the
    iterations; gradients come from implicit differentiation (default), phantom gradients,
    Jacobian-free backpropagation or unrolling (see :func:`nde.deq_fixed_point`).

    Bai, Kolter & Koltun, "Deep equilibrium models", NeurIPS 2019.

    Parameters
    ----------
    cell:
        ``nn.Module`` (or callable) ``cell(z, x) -> z`` of the shape of ``z``.
    solver:
        Forward solver (instance or name: ``"naive"``, ``"anderson"``, ``"broyden"``, ``"newton"``);
        a name is built with ``rtol``, ``atol``, ``max_steps`` and ``throw=False``.
    backward:
        ``"implicit"``, ``"phantom"``, ``"jfb"`` or ``"unrolled"``.
    backward_solver:
        Solver of the implicit adjoint system (default: same kind as the forward solver);
        ``"gmres"`` for GMRES.
    state_shape:
        Shape of ``z`` without the batch dimension; default: the shape of ``x`` (then
        ``z0 = 0``). Overridden by ``init`` or by passing ``z0`` to ``forward``.
    init:
        Optional callable ``init(x) -> z0``.
    norm:
        ``None``, ``"weight"`` or ``"spectral"``: reparametrise every Linear/Conv layer of the
        cell with weight normalisation or spectral normalisation (the latter bounds each
        layer's Lipschitz constant by about 1, which with 1-Lipschitz activations and a damped
        cell keeps the map close to contractive).
    jacobian_samples:
        Hutchinson probes for the Jacobian regulariser returned in :class:`DEQInfo`
        (0 disables; only computed in training mode).
    phantom_steps, phantom_damping:
        Parameters of ``backward="phantom"``.
    rtol, atol, max_steps:
        Tolerances of solvers given by name.
    batch_dims:
        Leading batch dimensions of ``z`` (each sample converges on its own).
    """

    def __init__(self, cell: Callable, solver: AbstractFixedPointSolver | str = "anderson",
                 backward: str = "implicit", backward_solver: AbstractFixedPointSolver | str | None = None,
                 state_shape: tuple | None = None, init: Callable | None = None, norm: str | None = None,
                 jacobian_samples: int = 0, phantom_steps: int = 5, phantom_damping: float = 0.5,
                 rtol: float = 1e-4, atol: float = 1e-6, max_steps: int = 50, batch_dims: int = 1):
        super().__init__()
        if not callable(cell):
            raise TypeError(f"cell must be callable as cell(z, x), got {type(cell).__name__}.")
        if backward not in ("implicit", "phantom", "jfb", "unrolled"):
            raise ValueError(f"backward must be 'implicit', 'phantom', 'jfb' or 'unrolled', got {backward!r}.")
        if not (isinstance(jacobian_samples, int) and jacobian_samples >= 0):
            raise ValueError(f"jacobian_samples must be a non-negative int, got {jacobian_samples!r}.")
        self.cell = cell
        if isinstance(cell, nn.Module):
            _apply_norm(cell, norm)
        elif norm is not None:
            raise ValueError("norm needs cell to be an nn.Module.")
        tol = dict(rtol=rtol, atol=atol, max_steps=max_steps, throw=False)
        self.solver = solver if isinstance(solver, AbstractFixedPointSolver) else get_fixed_point_solver(solver, **tol)
        if backward_solver is None:
            self.backward_solver = self.solver
        elif isinstance(backward_solver, AbstractFixedPointSolver):
            self.backward_solver = backward_solver
        else:
            self.backward_solver = get_fixed_point_solver(backward_solver, **tol)
        self.backward = backward
        self.state_shape = None if state_shape is None else tuple(state_shape)
        self.init = init
        self.jacobian_samples = jacobian_samples
        self.phantom_steps = phantom_steps
        self.phantom_damping = phantom_damping
        self.batch_dims = batch_dims
        self.last_info: DEQInfo | None = None

    def equilibrium_map(self, x):
        """Return ``(f, args)`` with the equilibrium ``z = f(z, *args)``; subclasses precompute here."""
        return self.cell, (x,)

    def equilibrium_output(self, z):
        """Map the solver's fixed point to the layer output (identity; splitting methods override)."""
        return z

    def initial_state(self, x):
        """Initial guess ``z0`` for input ``x``."""
        if self.init is not None:
            return self.init(x)
        if self.state_shape is not None:
            return x.new_zeros(x.shape[: self.batch_dims] + self.state_shape)
        return torch.zeros_like(x)

    def forward(self, x: torch.Tensor, z0: torch.Tensor | None = None, return_info: bool = False):
        """Equilibrium for input ``x``.

        Returns ``z*``, or ``(z*, DEQInfo)`` if ``return_info``; the info of the last call is
        also kept in ``self.last_info``.
        """
        with parametrize.cached():
            # fill the cache with graph-connected weights before the solver evaluates the cell
            # under no_grad (a weight first computed there would be cached without its graph)
            for mod in self.modules():
                if parametrize.is_parametrized(mod):
                    for name in mod.parametrizations:
                        getattr(mod, name)
            f, args = self.equilibrium_map(x)
            if z0 is None:
                z0 = self.initial_state(x)
            z, result = deq_fixed_point(
                f, z0, args, solver=self.solver, backward=self.backward, backward_solver=self.backward_solver,
                phantom_steps=self.phantom_steps, phantom_damping=self.phantom_damping,
                batch_dims=self.batch_dims, return_result=True,
            )
            jac = None
            if self.training and self.jacobian_samples > 0 and torch.is_grad_enabled():
                jac = jacobian_regularisation(f, result.value, args, num_samples=self.jacobian_samples,
                                              batch_dims=self.batch_dims).mean()
        z = self.equilibrium_output(z)
        info = DEQInfo(result=result, jacobian_loss=jac)
        self.last_info = info
        return (z, info) if return_info else z

    def extra_repr(self):
        return f"solver={self.solver!r}, backward={self.backward!r}"


class MonotoneLinear(nn.Module):
    r"""Monotone operator parameterisation of a single-layer equilibrium (Winston & Kolter 2020).

    The equilibrium ``z = relu(W z + U x + b)`` with

    .. math:: W = (1 - m) I - A^\top A + B - B^\top

    has ``I - W`` strongly monotone (``I - W \succeq m I``), so the equilibrium exists and is
    unique for every ``x`` and every parameter value. It is computed by Peaceman--Rachford
    splitting: with ``F(z) = (I - W) z - (U x + b)``, the resolvent
    ``R(v) = (I + \alpha (I - W))^{-1} (v + \alpha (U x + b))`` and ``z = relu(u)``,

    .. math:: T(u) = 2 R(2\,\mathrm{relu}(u) - u) - (2\,\mathrm{relu}(u) - u),

    a contraction for every ``alpha > 0`` (reflected resolvent of a strongly monotone operator
    composed with the nonexpansive reflection of ``relu``); ``z* = relu(u*)``.

    Winston & Kolter, "Monotone operator equilibrium networks", NeurIPS 2020.

    Parameters
    ----------
    in_features, hidden_features:
        Sizes of ``x`` and ``z``.
    m:
        Monotonicity margin, ``0 < m <= 1``.
    alpha:
        Step size of the splitting (> 0).
    """

    def __init__(self, in_features: int, hidden_features: int, m: float = 0.5, alpha: float = 1.0):
        super().__init__()
        if not (0 < m <= 1):
            raise ValueError(f"m (monotonicity margin) must be in (0, 1], got {m!r}.")
        if not alpha > 0:
            raise ValueError(f"alpha (splitting step size) must be positive, got {alpha!r}.")
        self.m = float(m)
        self.alpha = float(alpha)
        self.U = nn.Linear(in_features, hidden_features)
        scale = 1.0 / hidden_features ** 0.5
        self.A = nn.Parameter(scale * torch.randn(hidden_features, hidden_features))
        self.B = nn.Parameter(scale * torch.randn(hidden_features, hidden_features))

    def weight(self):
        """The matrix ``W``."""
        h = self.A.shape[0]
        eye = torch.eye(h, dtype=self.A.dtype, device=self.A.device)
        return (1 - self.m) * eye - self.A.T @ self.A + self.B - self.B.T

    def splitting_map(self, x):
        """Return ``(T, (c,))``: the splitting map ``T(u, c)`` with ``c = alpha (U x + b)`` precomputed."""
        W = self.weight()
        eye = torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
        resolvent = torch.linalg.inv(eye + self.alpha * (eye - W)).T
        c = self.alpha * self.U(x)

        def T(u, c):
            v = 2 * torch.relu(u) - u
            return 2 * ((v + c) @ resolvent) - v

        return T, (c,)

    def forward(self, z, x):
        """The equilibrium equation's right-hand side ``relu(W z + U x + b)``."""
        return torch.relu(z @ self.weight().T + self.U(x))


class MonotoneDEQ(DEQ):
    """Equilibrium layer with a guaranteed unique fixed point: :class:`DEQ` over :class:`MonotoneLinear`.

    Input ``x`` of shape ``(batch, in_features)``; output ``z*`` of shape
    ``(batch, hidden_features)`` solving ``z* = relu(W z* + U x + b)``. The solver iterates the
    Peaceman--Rachford map on the splitting variable ``u`` and returns ``relu(u*)``.

    Parameters
    ----------
    in_features, hidden_features, m, alpha:
        See :class:`MonotoneLinear`.
    **kwargs:
        Passed to :class:`DEQ` (solver, backward, tolerances, ...).
    """

    def __init__(self, in_features: int, hidden_features: int, m: float = 0.5, alpha: float = 1.0, **kwargs):
        kwargs.setdefault("state_shape", (hidden_features,))
        super().__init__(MonotoneLinear(in_features, hidden_features, m, alpha), **kwargs)

    def equilibrium_map(self, x):
        return self.cell.splitting_map(x)

    def equilibrium_output(self, u):
        return torch.relu(u)
