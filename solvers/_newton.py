"""Building blocks of the Newton iterations of the implicit solvers.

Jacobians come from :mod:`torch.func` (reverse mode, one vector--Jacobian product per output
component, vectorised with ``vmap``) and are always detached: they only precondition the
iteration, whose fixed point does not depend on them.

Two layouts are supported:

* ``"full"``: the whole state is one system; ``J`` has shape ``(n, n)`` with ``n = y.numel()``;
* ``"batch"``: the leading dimension of the state holds independent samples; ``J`` is
  block diagonal and stored as ``(B, d, d)`` with ``d = y[0].numel()``. It costs ``d``
  vector--Jacobian products whatever the batch size.
"""

from __future__ import annotations

import math

import torch

JACOBIAN_MODES = ("auto", "full", "batch")


def check_jacobian_mode(jacobian):
    if jacobian not in JACOBIAN_MODES:
        raise ValueError(
            f"jacobian must be one of {JACOBIAN_MODES} ('full': the whole state is one system; 'batch': the "
            f"leading dimension holds independent samples, block-diagonal Jacobian); got {jacobian!r}."
        )
    return jacobian


#: largest dense Newton system ``"auto"`` builds over the whole state (a 4096 x 4096 float64 matrix is 134 MB)
MAX_AUTO_FULL = 4096


def resolve_layout(jacobian, y, joint, stages=1):
    """``"full"`` or ``"batch"`` for a state ``y``; ``"auto"`` is full in joint mode, batch in independent mode.

    In joint mode ``"auto"`` refuses to build a dense system of more than :data:`MAX_AUTO_FULL`
    unknowns (``stages * y.numel()``) and asks for an explicit choice instead.
    """
    if jacobian == "auto":
        jacobian = "full" if joint else "batch"
        if joint and stages * y.numel() > MAX_AUTO_FULL:
            hint = (
                f"Pass jacobian='batch' to the solver if the samples along the first dimension of y (shape "
                f"{tuple(y.shape)}) do not interact (block-diagonal Jacobian, one small system per sample), or "
                if y.dim() >= 2 else "Pass "
            )
            raise ValueError(
                f"The Newton system over the whole state has {stages * y.numel()} unknowns ({stages} stage(s) x "
                f"{y.numel()} state entries), too many for a dense Jacobian. {hint}jacobian='full' to build the "
                "dense system anyway, or use an explicit solver if the problem is not stiff."
            )
    if jacobian == "batch" and y.dim() == 0:
        return "full"
    return jacobian


def jacobian(fn, y, layout):
    """Detached Jacobian of ``fn`` (a map from ``y``'s shape to itself) at ``y``, and ``fn(y)``.

    Parameters
    ----------
    fn:
        ``fn(y) -> tensor of y.shape``.
    y:
        Point of evaluation.
    layout:
        ``"full"`` -> ``(n, n)``; ``"batch"`` -> ``(B, d, d)`` (samples along ``y``'s first dimension
        must not interact).

    Returns
    -------
    (J, fy)
        The Jacobian and the value ``fn(y)`` (both detached).
    """
    y = y.detach()
    shape = y.shape
    if layout == "full":
        n = y.numel()

        def g(x):
            return fn(x.reshape(shape)).reshape(n)

        x = y.reshape(n)
        eye = torch.eye(n, dtype=y.dtype, device=y.device)
    else:
        B = shape[0]
        d = y[0].numel()

        def g(x):
            return fn(x.reshape(shape)).reshape(B, d)

        x = y.reshape(B, d)
        eye = torch.eye(d, dtype=y.dtype, device=y.device).unsqueeze(1).expand(d, B, d)
    with torch.enable_grad():
        try:
            out, vjp_fn = torch.func.vjp(g, x)
            rows = torch.func.vmap(vjp_fn)(eye)[0]
        except (RuntimeError, NotImplementedError, ValueError):
            # vector fields that torch.func cannot transform (in-place updates of captured state, ...)
            xg = x.clone().requires_grad_(True)
            out = g(xg)
            if not out.requires_grad:
                raise RuntimeError(
                    "An implicit solver needs the Jacobian df/dy of the vector field, but its output does not depend "
                    "differentiably on y (it is computed without autograd or detached). Make the vector field "
                    "differentiable in y, or use an explicit solver such as Tsit5()."
                ) from None
            rows = torch.stack(
                [torch.autograd.grad(out, xg, e, retain_graph=True, allow_unused=True)[0] for e in eye.unbind(0)]
            )
    J = rows.detach() if layout == "full" else rows.detach().transpose(0, 1)
    return J, out.detach().reshape(shape)


def identity_minus(scale, J, layout):
    """``I - scale * J`` with ``scale`` a float or a tensor of shape ``(B,)`` (batch layout)."""
    m = J.shape[-1]
    eye = torch.eye(m, dtype=J.dtype, device=J.device)
    if layout == "batch" and isinstance(scale, torch.Tensor):
        return eye - scale.reshape(-1, 1, 1) * J
    return eye - scale * J


def kron_system(scale, A, Js, layout):
    """``I - scale * [a_ij J_j]`` for an s-stage method: the Newton matrix of the stage equations.

    ``A`` is ``(s, s)``; ``Js`` is one Jacobian (shared by all stages) or a list of s of them.
    Unknowns are ordered stage-major (``index = i * m + k``).
    """
    s = A.shape[0]
    if isinstance(Js, torch.Tensor):
        Js = [Js] * s
    Jst = torch.stack(Js)  # (s, m, m) or (s, B, m, m)
    if layout == "full":
        m = Jst.shape[-1]
        K = torch.einsum("ij,jkl->ikjl", A, Jst).reshape(s * m, s * m)
        sc = scale
    else:
        B, m = Jst.shape[1], Jst.shape[-1]
        K = torch.einsum("ij,jbkl->bikjl", A, Jst).reshape(B, s * m, s * m)
        sc = scale.reshape(-1, 1, 1) if isinstance(scale, torch.Tensor) else scale
    eye = torch.eye(s * m, dtype=K.dtype, device=K.device)
    return eye - sc * K


class Factorised:
    """An LU factorisation of a (batch of) Newton matrices, for repeated solves."""

    def __init__(self, M):
        self.lu, self.piv = torch.linalg.lu_factor(M)

    def solve(self, rhs):
        """``M^{-1} rhs`` with ``rhs`` of shape ``(m,)`` or ``(B, m)``."""
        return torch.linalg.lu_solve(self.lu, self.piv, rhs.unsqueeze(-1)).squeeze(-1)


def to_system(x, layout, stages=None):
    """Flatten a state-shaped tensor (or a stack of ``stages`` of them) to the layout's right-hand side."""
    if stages is None:
        return x.reshape(-1) if layout == "full" else x.reshape(x.shape[0], -1)
    if layout == "full":
        return x.reshape(-1)
    B = x.shape[1]
    return x.reshape(stages, B, -1).transpose(0, 1).reshape(B, -1)


def from_system(v, shape, layout, stages=None):
    """Inverse of :func:`to_system`."""
    if stages is None:
        return v.reshape(shape)
    if layout == "full":
        return v.reshape((stages,) + tuple(shape))
    B = shape[0]
    return v.reshape(B, stages, -1).transpose(0, 1).reshape((stages,) + tuple(shape))


def scaled_rms(dx, y, rtol, atol, per_sample):
    """RMS of ``dx / (atol + rtol |y|)``: one number, or one per sample (leading dimension)."""
    r = dx / (atol + rtol * y.abs())
    if per_sample and r.dim() > 0:
        r = r.reshape(r.shape[0], -1)
        return torch.linalg.vector_norm(r, dim=1) / math.sqrt(max(r.shape[1], 1))
    return torch.linalg.vector_norm(r) / math.sqrt(max(r.numel(), 1))


def default_tol(dtype):
    """Default Newton tolerance for a dtype: ``eps^(3/4)`` (about 2e-12 in float64, 6e-6 in float32)."""
    return float(torch.finfo(dtype).eps) ** 0.75
