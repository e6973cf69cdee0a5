"""Continuous normalising flows."""

from __future__ import annotations

import math

import torch
from torch import nn

import nde

_TRACES = ("auto", "exact", "hutchinson")


class _TimeMLP(nn.Module):
    """``f(t, x)``: an MLP on ``[x, t]``."""

    def __init__(self, dim, width, depth):
        super().__init__()
        layers, d = [], dim + 1
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.Softplus()]
            d = width
        layers.append(nn.Linear(d, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, t, x):
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[:-1] + (1,))
        return self.net(torch.cat([x, tt], dim=-1))


class CNF(nn.Module):
    """A continuous normalising flow (FFJORD): ``x = z(t1)`` with ``dz/dt = f(t, z)``, ``z(0) ~ N(0, I)``.

    The change of variables in continuous time gives
    ``log p(x) = log N(z(0); 0, I) - int_0^t1 tr(df/dz)(t, z(t)) dt``, computed by solving
    ``[z, c]`` backwards from ``[x, 0]`` with ``dc/dt = -tr(df/dz)``. The trace is exact (one
    vector-Jacobian product per dimension) for small dimensions, or Hutchinson's unbiased estimate
    ``eps^T (df/dz) eps`` with one Rademacher ``eps`` per sample held fixed during a solve.

    Chen, Rubanova, Bettencourt & Duvenaud (2018), "Neural ordinary differential equations";
    Grathwohl, Chen, Bettencourt, Sutskever & Duvenaud (2019), "FFJORD: free-form continuous dynamics
    for scalable reversible generative models", ICLR.

    Parameters
    ----------
    dim:
        Dimension of the data.
    vector_field:
        An ``nn.Module`` ``f(t, z)`` returning ``z``'s shape; default an MLP on ``[z, t]`` with
        ``depth`` hidden layers of ``width`` softplus units.
    t1:
        Length of the flow.
    solver, rtol, atol, adjoint:
        How the flow is solved and differentiated (default ``Dopri5``, 1e-5, 1e-7, ``DirectAdjoint``).
    dt0:
        None (default): adaptive steps to ``rtol``/``atol``. A number: fixed steps of that size (then
        ``solver`` may be a fixed-step method such as ``nde.solvers.RK4()``), a cost known in advance.
    trace:
        ``"exact"``, ``"hutchinson"`` or ``"auto"`` (exact when ``dim <= exact_trace_max_dim``).
    """

    def __init__(self, dim: int, vector_field: nn.Module | None = None, width: int = 64, depth: int = 2,
                 t1: float = 1.0, solver=None, rtol: float = 1e-5, atol: float = 1e-7, adjoint=None,
                 trace: str = "auto", exact_trace_max_dim: int = 8, dt0: float | None = None):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer; got {dim!r}.")
        if trace not in _TRACES:
            raise ValueError(f"trace must be one of {_TRACES}; got {trace!r}.")
        if not t1 > 0:
            raise ValueError(f"t1 must be positive; got {t1!r}.")
        self.dim = dim
        self.vector_field = vector_field if vector_field is not None else _TimeMLP(dim, width, depth)
        self.t1 = float(t1)
        self.solver = solver if solver is not None else nde.solvers.Dopri5()
        self.rtol, self.atol = rtol, atol
        self.adjoint = adjoint
        self.trace = trace
        self.exact_trace_max_dim = exact_trace_max_dim
        if dt0 is not None and (isinstance(dt0, bool) or not isinstance(dt0, (int, float)) or not 0 < dt0 <= t1):
            raise ValueError(f"dt0 must be None or a step size in (0, t1={t1}]; got {dt0!r}.")
        self.dt0 = None if dt0 is None else float(dt0)

    def _exact(self) -> bool:
        return self.trace == "exact" or (self.trace == "auto" and self.dim <= self.exact_trace_max_dim)

    def _augmented(self, eps):
        f, d = self.vector_field, self.dim
        exact = self._exact()

        def field(t, s, args):
            create = torch.is_grad_enabled()
            with torch.enable_grad():
                z = s[..., :d]
                if not z.requires_grad:
                    z = z.detach().requires_grad_(True)
                dz = f(t, z)
                if exact:
                    tr = 0.0
                    for i in range(d):
                        (g,) = torch.autograd.grad(dz[..., i].sum(), z, create_graph=create, retain_graph=True)
                        tr = tr + g[..., i]
                else:
                    (g,) = torch.autograd.grad(dz, z, eps, create_graph=create)
                    tr = (g * eps).sum(-1)
            if not create:
                dz, tr = dz.detach(), tr.detach()
            return torch.cat([dz, -tr.unsqueeze(-1)], dim=-1)

        return field

    def _solve(self, term, y0, t0, t1):
        if self.dt0 is not None:
            dt0 = self.dt0 if t1 > t0 else -self.dt0
            return nde.solve(term, self.solver, t0, t1, y0, dt0=dt0, adjoint=self.adjoint).ys[-1]
        ctrl = nde.PIDController(rtol=self.rtol, atol=self.atol)
        return nde.solve(term, self.solver, t0, t1, y0, controller=ctrl, adjoint=self.adjoint).ys[-1]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` for ``x`` of shape ``(..., dim)``; returns shape ``x.shape[:-1]``."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dimension dim={self.dim}; got shape {tuple(x.shape)}.")
        eps = None if self._exact() else torch.randint(0, 2, x.shape, device=x.device).to(x.dtype) * 2 - 1
        s0 = torch.cat([x, torch.zeros_like(x[..., :1])], dim=-1)
        s = self._solve(self._augmented(eps), s0, self.t1, 0.0)
        z, c = s[..., : self.dim], s[..., self.dim]
        base = -0.5 * (z**2).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)
        return base - c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`log_prob`."""
        return self.log_prob(x)

    def sample(self, n: int, dtype=None, device=None) -> torch.Tensor:
        """``n`` samples: ``z ~ N(0, I)`` pushed through the flow; returns ``(n, dim)``."""
        p = next(self.parameters(), None)
        dtype = dtype or (p.dtype if p is not None else torch.get_default_dtype())
        device = device or (p.device if p is not None else None)
        z = torch.randn(n, self.dim, dtype=dtype, device=device)
        return self.transform(z)

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        """Push base points ``z`` (shape ``(..., dim)``) from time 0 to ``t1``."""
        f = self.vector_field
        return self._solve(lambda t, y, args: f(t, y), z, 0.0, self.t1)


__all__ = ["CNF"]
