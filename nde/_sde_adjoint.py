"""The stochastic adjoint of a Stratonovich SDE: the augmented system a continuous adjoint solves backwards.

For ``dy = f(t, y) dt + g(t, y) o dW`` and a loss ``L(y(T))``, the adjoint ``a = dL/dy(t)`` and the
parameter adjoint ``a_theta`` satisfy (Li et al. 2020)

``da = -a df/dy dt - a d(g o dW)/dy``, ``da_theta = -a df/dtheta dt - a d(g o dW)/dtheta``,

Stratonovich equations driven by the *same* Brownian path. Solving ``[y, a, a_theta]`` from ``T`` back to
``t0`` with a Stratonovich solver (Heun, midpoint, Euler--Heun) gives ``a(t0) = dL/dy0`` and
``a_theta(t0) = dL/dtheta``. Itô SDEs must be converted to Stratonovich form first.

Li, Wong, Chen & Duvenaud (2020), "Scalable gradients for stochastic differential equations", AISTATS.
"""

from __future__ import annotations

import torch

from ._terms import ControlTerm, MultiTerm, ODETerm


def _zeros_like_params(params, like):
    return [torch.zeros(p.numel(), dtype=like.dtype, device=like.device) for p in params]


def _vjp_parts(out, y_, params, a, n_shape):
    if out.requires_grad:
        gr = torch.autograd.grad(out, [y_] + list(params), -a, allow_unused=True)
    else:
        gr = [None] * (1 + len(params))
    ga = gr[0] if gr[0] is not None else torch.zeros(n_shape, dtype=a.dtype, device=a.device)
    gp = [torch.zeros(p.numel(), dtype=a.dtype, device=a.device) if g is None else g.reshape(-1).to(a.dtype)
          for p, g in zip(params, gr[1:])]
    return ga, gp


def stratonovich_adjoint_terms(drift, diffusion, params, args, shape):
    """Terms of the augmented state ``z = [y, a, a_theta]`` (flat) of a Stratonovich SDE.

    Parameters
    ----------
    drift:
        The drift term (an :class:`~nde.ODETerm`), or None.
    diffusion:
        The diffusion :class:`~nde.ControlTerm` (any noise structure), driven by the Brownian motion
        of the forward solve.
    params:
        The tensors to differentiate (parameters of ``f`` and ``g``).
    args:
        Passed to the vector fields.
    shape:
        Shape of ``y``.

    Returns
    -------
    MultiTerm
        ``MultiTerm(ODETerm(f_aug), ControlTerm(..., vf_prod=g_aug_prod))``; solve it from ``T`` to
        ``t0`` with a Stratonovich solver that uses products only (``Heun``, ``Midpoint``, ``EulerHeun``,
        ``EulerMaruyama`` is not Stratonovich).
    """
    shape = tuple(shape)
    n = 1
    for s in shape:
        n *= s
    params = list(params)

    def split(z):
        return z[:n].reshape(shape), z[n:2 * n].reshape(shape)

    def f_aug(t, z, a_args):
        y, a = split(z)
        with torch.enable_grad():
            y_ = y.detach().requires_grad_(True)
            fy = drift.vf(t, y_, args)
            ga, gp = _vjp_parts(fy, y_, params, a, shape)
        return torch.cat([fy.detach().reshape(-1), ga.reshape(-1)] + gp)

    def g_aug_prod(t, z, a_args, dw):
        y, a = split(z)
        with torch.enable_grad():
            y_ = y.detach().requires_grad_(True)
            gdw = diffusion.vf_prod(t, y_, args, dw)
            ga, gp = _vjp_parts(gdw, y_, params, a, shape)
        return torch.cat([gdw.detach().reshape(-1), ga.reshape(-1)] + gp)

    def no_matrix(t, z, a_args):
        raise ValueError("The adjoint diffusion is available only as a product: use Heun, Midpoint or EulerHeun.")

    control = diffusion.control
    terms = [ControlTerm(no_matrix, control, noise="general", vf_prod=g_aug_prod, sde_type="stratonovich")]
    if drift is not None:
        terms.insert(0, ODETerm(f_aug))
    return MultiTerm(*terms)
