"""Implicit Runge--Kutta methods for stiff equations: fully implicit (Radau IIA, Gauss--Legendre) and
diagonally implicit (SDIRK, ESDIRK) tableaux over two generic steppers.

Every step solves the stage equations by a simplified Newton iteration whose matrix is built from the
Jacobian ``df/dy`` at the start of the step (:mod:`torch.func`, detached). In joint batch mode the
whole state is one system (``jacobian="full"``); in independent mode every sample has its own block
(``jacobian="batch"``: a block-diagonal Jacobian, one Newton iteration per sample run side by side).

Gradients: the iteration runs without autograd; when gradients are being recorded, one last Newton
step is taken from the converged stages with the exact Jacobian at the stages. Its derivative is that
of the implicit function theorem, ``dZ = (I - dt A x J)^{-1} dt (A x I) dF``, so backpropagating
through the step gives the exact gradient of the computed solution.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from . import _newton as N
from .base import AbstractSolver
from .rk import _poly_basis


class ImplicitTableau:
    """The coefficients of an implicit Runge--Kutta method.

    ``k_i = f(t0 + c_i dt, y0 + dt sum_j a_ij k_j)`` for all ``i`` (a full ``s x s`` matrix ``a``),
    ``y1 = y0 + dt sum_j b_j k_j``, and the error estimate ``dt sum_j b_err_j k_j`` when ``b_err`` is
    given. A lower-triangular ``a`` is solved stage by stage (DIRK), any other one all at once.
    A fully implicit method may instead carry an embedded formula of the form
    ``err = (I - dt g J)^{-1} (g dt f(t0, y0) + sum_i e_i Z_i)`` (``err_gamma = g``, ``err_z = e``).
    """

    def __init__(self, c, a, b, b_err=None, order=None, embedded_order=None, err_gamma=None, err_z=None):
        self.err_gamma = err_gamma
        self.err_z = None if err_z is None else np.asarray(err_z, dtype=np.float64)
        self.c = np.asarray(c, dtype=np.float64)
        self.a = np.asarray(a, dtype=np.float64)
        self.b = np.asarray(b, dtype=np.float64)
        self.b_err = None if b_err is None else np.asarray(b_err, dtype=np.float64)
        self.order = order
        self.embedded_order = embedded_order
        s = self.stages = len(self.c)
        if self.a.shape != (s, s) or self.b.shape != (s,):
            raise ValueError("a must be s x s and b of length s, with s = len(c).")
        self.diagonal = bool(np.all(np.triu(self.a, 1) == 0))
        self.stiffly_accurate = bool(np.allclose(self.a[-1], self.b, rtol=0, atol=1e-15))
        self.explicit_first = self.diagonal and self.a[0, 0] == 0.0 and self.c[0] == 0.0
        # f(t1, y1) is the last stage (up to the Newton tolerance): it is the next step's first stage
        self.last_is_f1 = self.stiffly_accurate and self.c[-1] == 1.0 and self.a[-1, -1] != 0.0
        self.fsal = self.explicit_first and self.last_is_f1
        if not self.diagonal:
            # y1 = y0 + sum_j d_j Z_j with Z_i = dt sum_j a_ij k_j (no further evaluation of f)
            self.d = np.linalg.solve(self.a.T, self.b)
            # collocation polynomial through (0, y0), (c_i, y0 + Z_i): u(theta) = y0 + sum_i L_i(theta) Z_i
            nodes = np.concatenate([[0.0], self.c])
            V = np.vander(nodes, increasing=True)
            self.collocation = np.linalg.inv(V)[:, 1:].T.copy()  # (s, s+1), ascending powers
            # A^{-1} = T diag(lam) T^{-1}: the Newton system decouples into one n x n system per
            # eigenvalue (a complex one per conjugate pair); ``pairs`` lists (i, conjugate partner or None)
            self.a_inv = np.linalg.inv(self.a)
            lam, T = np.linalg.eig(self.a_inv)
            self.eig, self.eig_T, self.eig_Tinv = lam, T, np.linalg.inv(T)
            self.pairs, used = [], set()
            for i in range(s):
                if i in used:
                    continue
                if abs(lam[i].imag) <= 1e-12 * abs(lam[i]):
                    self.pairs.append((i, None))
                    continue
                j = min((k for k in range(s) if k != i and k not in used), key=lambda k: abs(lam[k] - np.conj(lam[i])))
                used.update((i, j))
                self.pairs.append((i, j))
        self._cache = {}

    def tensors(self, dtype, device):
        key = (dtype, device)
        out = self._cache.get(key)
        if out is None:
            def t(x):
                return torch.as_tensor(x, dtype=dtype, device=device)

            out = {"a": t(self.a)}
            if self.err_z is not None:
                out["err_z"] = t(self.err_z)
            if not self.diagonal:
                out["d"] = t(self.d)
                out["collocation"] = t(self.collocation)
                out["a_inv"] = t(self.a_inv)
                cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
                out["eig"] = torch.as_tensor(self.eig, dtype=cdtype, device=device)
                out["eig_T"] = torch.as_tensor(self.eig_T, dtype=cdtype, device=device)
                out["eig_Tinv"] = torch.as_tensor(self.eig_Tinv, dtype=cdtype, device=device)
            self._cache[key] = out
        return out


def _stage_times(t0, dt, c, dtype, device):
    if isinstance(dt, float):
        return torch.tensor([t0 + ci * dt for ci in c], dtype=dtype, device=device).unbind()
    return [(t0 + float(ci) * dt).to(dtype) for ci in c]


def _per_sample_view(x, stacked):
    """``(B, -1)`` view of a state-shaped tensor (or of a stack of stages, stage-leading)."""
    if stacked:
        return x.transpose(0, 1).reshape(x.shape[1], -1)
    return x.reshape(x.shape[0], -1)


class _Newton:
    """Convergence bookkeeping of one Newton solve (scalar in the full layout, per sample otherwise)."""

    def __init__(self, scale, layout, stacked):
        self.scale = scale
        self.per_sample = layout == "batch"
        self.stacked = stacked
        self.prev = None
        self.rate = 0.0

    def norm(self, dx):
        r = dx / self.scale
        if self.per_sample:
            r = _per_sample_view(r, self.stacked)
            return torch.linalg.vector_norm(r, dim=1) / math.sqrt(max(r.shape[1], 1))
        return torch.linalg.vector_norm(r) / math.sqrt(max(r.numel(), 1))

    def update(self, dx):
        """After an increment ``dx``: ``(converged, stuck)`` -- every sample converged, or every sample
        either converged or diverged (so that iterating further is pointless); one host sync."""
        nrm = self.norm(dx)
        ok = nrm <= 1.0
        bad = ~torch.isfinite(nrm)
        rate = torch.zeros((), dtype=nrm.dtype, device=nrm.device)
        if self.prev is not None:
            # linear convergence at rate theta leaves an error of about theta / (1 - theta) * |dx|
            theta = nrm / self.prev.clamp(min=1e-300)
            rate = torch.where(self.last_ok, torch.zeros_like(theta), theta).max()
            ok = ok | ((theta < 0.9) & (theta * nrm <= (1 - theta)))
            bad = bad | ((theta > 2.0) & ~ok & (nrm > 1e3))
            ok = ok | self.last_ok
            bad = bad | self.last_bad
        self.prev = nrm
        self.last_ok, self.last_bad = ok, bad & ~ok
        flags = torch.stack([ok.all().to(nrm.dtype), (ok | bad).all().to(nrm.dtype), rate]).tolist()
        self.rate = max(self.rate, flags[2]) if math.isfinite(flags[2]) else math.inf
        return flags[0] > 0, flags[1] > 0


class AbstractImplicitRK(AbstractSolver):
    """Generic implicit Runge--Kutta stepper over an :class:`ImplicitTableau`.

    Parameters
    ----------
    jacobian:
        ``"auto"`` (default): one Jacobian of the whole state in joint batch mode, a block-diagonal
        one (one block a sample, the leading dimension) in independent mode. ``"full"`` or
        ``"batch"`` force either; ``"batch"`` in joint mode is right only when samples do not interact.
        ``"auto"`` raises rather than build a dense Newton system of more than 4096 unknowns.
    newton_rtol, newton_atol:
        The Newton iteration stops when the RMS of ``increment / (atol + rtol |y0|)`` is at most 1.
        Default ``eps^(3/4)`` of the dtype (about 2e-12 in float64, 6e-6 in float32). The
        iteration also stops once the estimated remaining error ``theta / (1 - theta) |increment|``
        (``theta`` the observed contraction rate) is within the tolerance.
    jacobian_reuse_rate:
        The Jacobian is kept for the next step while the Newton iterations of this one contracted
        faster than this rate (and converged); ``0`` computes it afresh every step. The default 0.01
        keeps it only when the iteration is nearly exact, which pays when the Jacobian is expensive
        (neural vector fields) and costs almost no extra iterations otherwise.
    max_newton_iters:
        Iterations allowed per solve. When they do not suffice, an adaptive method rejects the step
        (its error estimate becomes infinite) and a fixed-step method retries with a Jacobian refreshed
        at the current iterate, then warns.

    Notes
    -----
    ``nfe`` counts calls of the vector field; a Jacobian (one vectorised call) counts as one.
    """

    tableau: ImplicitTableau
    implicit = True

    def __init__(self, jacobian="auto", newton_rtol=None, newton_atol=None, max_newton_iters=10,
                 jacobian_reuse_rate=0.01):
        self.jacobian = N.check_jacobian_mode(jacobian)
        if not isinstance(jacobian_reuse_rate, (int, float)) or not 0 <= jacobian_reuse_rate < 1:
            raise ValueError(f"jacobian_reuse_rate must be a number in [0, 1); got {jacobian_reuse_rate!r}.")
        self.jacobian_reuse_rate = float(jacobian_reuse_rate)
        for name, v in (("newton_rtol", newton_rtol), ("newton_atol", newton_atol)):
            if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
                raise ValueError(f"{name} must be a positive number or None (dtype default); got {v!r}.")
        if not isinstance(max_newton_iters, int) or max_newton_iters < 1:
            raise ValueError(f"max_newton_iters must be a positive integer; got {max_newton_iters!r}.")
        self.newton_rtol = newton_rtol
        self.newton_atol = newton_atol
        self.max_newton_iters = max_newton_iters

    def __repr__(self):
        return f"{type(self).__name__}(jacobian={self.jacobian!r})"

    @property
    def order(self):
        return self.tableau.order

    @property
    def error_order(self):
        t = self.tableau
        if t.b_err is None and t.err_z is None:
            return None
        return min(t.order, t.embedded_order) + 1

    def init(self, terms, t0, t1, y0, args):
        """The Jacobian at ``(t0, y0)`` (and ``f(t0, y0)`` for FSAL methods); ``(state, nfe)``."""
        _, _, _, layout, _ = self._setup(t0, t1, y0)
        f = terms.ode
        tt0 = torch.as_tensor(t0, dtype=y0.dtype, device=y0.device) if isinstance(t0, float) else t0.to(y0.dtype)
        J, fy0 = N.jacobian(lambda y: f(tt0, y, args), y0, layout)
        nfe = 1
        f1 = None
        if self.tableau.fsal:
            f1 = fy0
            if torch.is_grad_enabled():
                f1 = f(tt0, y0, args)
                nfe += 1
        return {"f1": f1, "J": J, "fresh": True}, nfe

    def _start(self, f, t_start, y0, args, layout, state):
        """The Jacobian for this step (kept from the last one when it converged fast) and, when it was
        computed here, ``f(t0, y0)`` (detached)."""
        if isinstance(state, dict) and state.get("fresh") and state.get("J") is not None:
            return state["J"], None, 0
        J, fy0 = N.jacobian(lambda y: f(t_start, y, args), y0, layout)
        return J, fy0, 1

    def _new_state(self, state, f1, J, failed, rate):
        fresh = (not failed) and rate < self.jacobian_reuse_rate
        if failed and isinstance(state, dict):
            # a rejected step restarts from this state: make it recompute the Jacobian
            state["fresh"] = False
        return {"f1": f1, "J": J, "fresh": fresh}

    # ---- shared pieces -------------------------------------------------------------------
    def _setup(self, t0, t1, y0):
        dt = t1 - t0
        joint = isinstance(dt, float)
        if not joint:
            dt = dt.to(y0.dtype)
        tab = self.tableau
        layout = N.resolve_layout(self.jacobian if joint else "batch", y0, joint, 1 if tab.diagonal else tab.stages)
        if not joint and y0.dim() == 0:
            raise ValueError(f"{type(self).__name__} in independent mode needs a state with a batch dimension.")
        # per-sample step sizes for the Newton matrices: (B,) in independent mode
        dts = dt if joint else dt.reshape(-1)
        rtol = self.newton_rtol or N.default_tol(y0.dtype)
        atol = self.newton_atol or N.default_tol(y0.dtype)
        scale = (atol + rtol * y0.detach().abs())
        return dt, dts, joint, layout, scale

    def _failed(self, failed, y_err, y1):
        if failed is None:
            return y_err
        if y_err is None:
            return None
        inf = torch.full_like(y1, math.inf)
        if isinstance(failed, torch.Tensor):
            return torch.where(failed.reshape((-1,) + (1,) * (y1.dim() - 1)), inf, y_err)
        return inf if failed else y_err

    def _warn(self, t0):
        warnings.warn(
            f"{type(self).__name__}: the Newton iteration did not converge in the step from t={_first(t0):.6g}; "
            "the step may be inaccurate. Use smaller steps, more max_newton_iters or an adaptive solver "
            "such as Kvaerno5().",
            RuntimeWarning,
            stacklevel=4,
        )


def _first(t):
    return float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)


def _hermite(y0, y1, f0, f1, dt, theta):
    """Cubic Hermite interpolant on ``[t0, t0 + dt]`` (quadratic when ``f1`` is None)."""
    if f1 is None:
        return y0 + theta * dt * f0 + theta**2 * (y1 - y0 - dt * f0)
    h00 = (1 + 2 * theta) * (1 - theta) ** 2
    h10 = theta * (1 - theta) ** 2
    h01 = theta**2 * (3 - 2 * theta)
    h11 = theta**2 * (theta - 1)
    return h00 * y0 + h01 * y1 + dt * (h10 * f0 + h11 * f1)


def _hermite_derivative(y0, y1, f0, f1, dt, theta):
    if f1 is None:
        return f0 + 2 * theta * ((y1 - y0) / dt - f0)
    d00 = 6 * theta * (theta - 1)
    d10 = (1 - theta) * (1 - 3 * theta)
    d11 = theta * (3 * theta - 2)
    return d00 * (y0 - y1) / dt + d10 * f0 + d11 * f1


class AbstractDIRK(AbstractImplicitRK):
    """Diagonally implicit Runge--Kutta stepper: one Newton solve a stage, ``(I - dt a_ii J) dY = -G``.

    An explicit first stage (ESDIRK) reuses ``f(t0, y0)``; a stiffly accurate method whose last stage
    is ``f(t1, y1)`` passes it to the next step (FSAL). Dense output is cubic Hermite on
    ``y0, y1, f(t0, y0), f(t1, y1)`` (quadratic when ``f(t1, y1)`` is not a stage).
    """

    def step(self, terms, t0, t1, y0, args, solver_state):
        tab = self.tableau
        f = terms.ode
        dt, dts, joint, layout, scale = self._setup(t0, t1, y0)
        ts = _stage_times(t0, dt, tab.c, y0.dtype, y0.device)
        t_start = ts[0] if tab.c[0] == 0.0 else _stage_times(t0, dt, [0.0], y0.dtype, y0.device)[0]
        dt_safe = dt if joint else torch.where(dt == 0, torch.ones_like(dt), dt)
        nfe = 0
        J, fy0, nfe = self._start(f, t_start, y0, args, layout, solver_state)
        f0 = solver_state.get("f1") if (isinstance(solver_state, dict) and tab.fsal) else None
        if f0 is None:
            if torch.is_grad_enabled() or fy0 is None:
                f0 = f(t_start, y0, args)
                nfe += 1
            else:
                f0 = fy0
        # whether anything in this step carries gradients (parameters of f, y0 or args)
        track = torch.is_grad_enabled() and (f0.requires_grad or y0.requires_grad)
        ks = []
        lus = {}
        failed = None
        any_fail = False
        rate = 0.0
        for i in range(tab.stages):
            row = tab.a[i]
            base = y0
            for j in range(i):
                if row[j] != 0.0:
                    base = base + (float(row[j]) * dt) * ks[j]
            g = float(row[i])
            if g == 0.0:
                ks.append(f0 if (i == 0 and tab.c[0] == 0.0) else f(ts[i], base, args))
                nfe += 0 if (i == 0 and tab.c[0] == 0.0) else 1
                continue
            lu = lus.get(g)
            if lu is None:
                lu = lus[g] = N.Factorised(N.identity_minus(dts * g, J, layout))
            # starting value: the slope of the stage computed so far whose abscissa is nearest to c_i
            guess = ks[min(range(i), key=lambda j: abs(tab.c[j] - tab.c[i]))] if ks else f0
            Y, n, fail, r = self._solve_stage(f, ts[i], base, g, dt, dts, guess, lu, layout, scale, args)
            nfe += n
            rate = max(rate, r)
            if fail is not None:
                failed = fail if failed is None else failed | fail
                any_fail = True
                if tab.b_err is not None and not isinstance(fail, torch.Tensor):
                    # the step will be rejected: skip the remaining stages
                    inf = torch.full_like(y0, math.inf)
                    state = self._new_state(solver_state, None, J, True, rate)
                    return y0, inf, {"y0": y0, "y1": y0, "f0": f0, "f1": None}, state, nfe
            if track:
                Y, n = self._grad_step(f, ts[i], base, g, dt, dts, Y, layout, args)
                nfe += n
            ks.append((Y - base) / (g * dt_safe))
        co_b = tab.b
        y1 = y0
        for j in range(tab.stages):
            if co_b[j] != 0.0:
                y1 = y1 + (float(co_b[j]) * dt) * ks[j]
        y_err = None
        if tab.b_err is not None:
            with torch.no_grad():
                y_err = sum((float(e) * dt) * k for e, k in zip(tab.b_err, ks) if e != 0.0)
            if any_fail:
                y_err = self._failed(failed, y_err, y1)
        elif any_fail:
            self._warn(t0)
        f1 = ks[-1] if tab.last_is_f1 else None
        new_state = self._new_state(solver_state, f1 if tab.fsal else None, J, any_fail, rate)
        dense_info = {"y0": y0, "y1": y1, "f0": f0, "f1": f1}
        return y1, y_err, dense_info, new_state, nfe

    def _solve_stage(self, f, ti, base, g, dt, dts, guess, lu, layout, scale, args):
        """Solve ``Y = base + dt g f(ti, Y)`` without autograd. Returns ``(Y, nfe, failed, rate)``."""
        nfe = 0
        adaptive = self.tableau.b_err is not None
        with torch.no_grad():
            base_d = base.detach()
            Y = base_d + (g * dt) * guess.detach()
            for attempt in range(1 if adaptive else 2):
                conv = _Newton(scale, layout, stacked=False)
                ok = bad = False
                for _ in range(self.max_newton_iters):
                    F = f(ti, Y, args)
                    nfe += 1
                    G = Y - base_d - (g * dt) * F
                    dY = -N.from_system(lu.solve(N.to_system(G, layout)), Y.shape, layout)
                    Y = Y + dY
                    ok, bad = conv.update(dY)
                    if ok or bad:
                        break
                if ok:
                    return Y, nfe, None, conv.rate
                if attempt == 0 and not adaptive:
                    # refresh the Jacobian at the current iterate and try once more
                    if bad:
                        Y = base_d + (g * dt) * guess.detach()
                    J, _ = N.jacobian(lambda y: f(ti, y, args), Y, layout)
                    nfe += 1
                    lu = N.Factorised(N.identity_minus(dts * g, J, layout))
            failed = ~conv.last_ok if layout == "batch" else True
            return Y, nfe, failed, conv.rate

    def _grad_step(self, f, ti, base, g, dt, dts, Y, layout, args):
        """One Newton step with autograd and the exact Jacobian at ``Y`` (implicit-function derivative)."""
        F = f(ti, Y, args)
        if not (F.requires_grad or base.requires_grad):
            return Y, 1
        Js, _ = N.jacobian(lambda y: f(ti, y, args), Y, layout)
        lu = N.Factorised(N.identity_minus(dts * g, Js, layout))
        G = Y - base - (g * dt) * F
        return Y - N.from_system(lu.solve(N.to_system(G, layout)), Y.shape, layout), 2

    def dense_eval(self, terms, args, t0, t1, dense_info, theta):
        d = dense_info
        dt = _dt_like(t0, t1, d["y0"])
        return _hermite(d["y0"], d["y1"], d["f0"], d["f1"], dt, theta), 0

    def dense_derivative(self, terms, args, t0, t1, dense_info, theta):
        d = dense_info
        dt = _dt_like(t0, t1, d["y0"])
        return _hermite_derivative(d["y0"], d["y1"], d["f0"], d["f1"], dt, theta) + 0 * theta, 0


def _dt_like(t0, t1, y):
    dt = t1 - t0
    return dt if isinstance(dt, float) else dt.to(y.dtype)


class _Decoupled:
    """Simplified Newton solves ``(A^{-1}/dt x I - I x J) dZ = r`` through the eigen-decomposition of
    ``A^{-1}``: one LU of ``lam/dt I - J`` a real eigenvalue and one complex LU a conjugate pair,
    instead of one LU of the ``s n x s n`` system. Hairer & Wanner, *Solving ODEs II*, IV.8."""

    def __init__(self, tab, co, dts, J, layout):
        self.tab, self.co, self.layout = tab, co, layout
        eye = torch.eye(J.shape[-1], dtype=J.dtype, device=J.device)
        inv_h = 1.0 / dts if not isinstance(dts, torch.Tensor) else 1.0 / torch.where(dts == 0, torch.ones_like(dts), dts)
        self.lus = []
        for i, j in tab.pairs:
            lam = complex(tab.eig[i]) if j is not None else float(tab.eig[i].real)
            Jc = J.to(co["eig"].dtype) if j is not None else J
            ec = eye.to(Jc.dtype)
            if isinstance(inv_h, torch.Tensor):
                M = (lam * inv_h).to(Jc.dtype).reshape(-1, 1, 1) * ec - Jc
            else:
                M = (lam * inv_h) * ec - Jc
            self.lus.append(N.Factorised(M))

    def solve(self, r, shape):
        """``dZ`` (real, stage-leading) for a right-hand side ``r`` of shape ``(s,) + shape``."""
        co, layout = self.co, self.layout
        R = torch.tensordot(co["eig_Tinv"], r.to(co["eig"].dtype), dims=1)
        W = [None] * self.tab.stages
        for (i, j), lu in zip(self.tab.pairs, self.lus):
            if j is None:
                W[i] = N.from_system(lu.solve(N.to_system(R[i].real, layout)), shape, layout).to(R.dtype)
            else:
                W[i] = N.from_system(lu.solve(N.to_system(R[i], layout)), shape, layout)
                W[j] = W[i].conj()
        return torch.tensordot(co["eig_T"], torch.stack(W), dims=1).real


class AbstractFIRK(AbstractImplicitRK):
    """Fully implicit Runge--Kutta stepper: all stages in one Newton solve.

    Unknowns ``Z_i = dt sum_j a_ij k_j``; the simplified Newton matrix is ``I - dt (A x J)`` with
    ``J = df/dy(t0, y0)``. From 8 unknowns a system on, it is not factorised as one ``s n x s n``
    matrix: the eigen-decomposition of ``A^{-1}`` splits it into one ``n x n`` system a real
    eigenvalue and one complex one a conjugate pair (Hairer & Wanner, *Solving ODEs II*, IV.8). ``y1 = y0 + sum_j d_j Z_j`` with ``d = b A^{-1}``. Dense output is the
    collocation polynomial through ``y0`` and the stage values (these methods are collocation methods).
    """

    #: unknowns a stage from which the Newton systems are decoupled through the eigenvalues of A^{-1}
    _decouple_from = 8

    def step(self, terms, t0, t1, y0, args, solver_state):
        tab = self.tableau
        s = tab.stages
        f = terms.ode
        dt, dts, joint, layout, scale = self._setup(t0, t1, y0)
        co = tab.tensors(y0.dtype, y0.device)
        A = co["a"]
        ts = _stage_times(t0, dt, tab.c, y0.dtype, y0.device)
        t_start = _stage_times(t0, dt, [0.0], y0.dtype, y0.device)[0]
        J, f0, nfe = self._start(f, t_start, y0, args, layout, solver_state)
        if f0 is None:
            with torch.no_grad():
                f0 = f(t_start, y0, args)
            nfe += 1

        def residual(Z, y0_):
            Fs = torch.stack([f(ts[i], y0_ + Z[i], args) for i in range(s)])
            AF = torch.tensordot(A, Fs, dims=1)
            return Z - dt * AF

        adaptive = tab.err_z is not None
        with torch.no_grad():
            y0d = y0.detach()
            Z = torch.stack([(float(ci) * dt) * f0 for ci in tab.c])
            # decoupling pays from about 8 unknowns a stage; below, one LU of the small coupled system is cheaper
            if J.shape[-1] >= self._decouple_from:
                lu = _Decoupled(tab, co, dts, J, layout)
            else:
                lu = N.Factorised(N.kron_system(dts, A, J, layout))
            # (A^{-1} x I) Z / dt - F(Z) = 0 is the stage equation the decoupled solves work on
            inv_dt = 1.0 / dt if joint else 1.0 / torch.where(dt == 0, torch.ones_like(dt), dt)
            active = None if joint else (dt != 0).to(y0.dtype)
            ok = False
            for attempt in range(1 if adaptive else 2):
                conv = _Newton(scale, layout, stacked=True)
                for _ in range(self.max_newton_iters):
                    if isinstance(lu, _Decoupled):
                        Fs = torch.stack([f(ts[i], y0d + Z[i], args) for i in range(s)])
                        dZ = lu.solve(Fs - torch.tensordot(co["a_inv"], Z, dims=1) * inv_dt, y0.shape)
                        if active is not None:
                            dZ = dZ * active
                    else:
                        G = residual(Z, y0d)
                        dZ = -N.from_system(lu.solve(N.to_system(G, layout, s)), y0.shape, layout, s)
                    nfe += s
                    Z = Z + dZ
                    ok, bad = conv.update(dZ)
                    if ok or bad:
                        break
                if ok or adaptive:
                    break
                # full Newton matrix at the current stages, and once more
                if bad:
                    Z = torch.stack([(float(ci) * dt) * f0 for ci in tab.c])
                Js = [N.jacobian(lambda y, i=i: f(ts[i], y, args), y0d + Z[i], layout)[0] for i in range(s)]
                nfe += s
                lu = N.Factorised(N.kron_system(dts, A, Js, layout))
            y_err = None
            if adaptive:
                g = tab.err_gamma
                raw = (g * dt) * f0 + torch.tensordot(co["err_z"], Z, dims=1)
                lu_e = N.Factorised(N.identity_minus(dts * g, J, layout))
                y_err = N.from_system(lu_e.solve(N.to_system(raw, layout)), y0.shape, layout)
        if not ok:
            if adaptive:
                y_err = self._failed(~conv.last_ok if layout == "batch" else True, y_err, y0)
            else:
                self._warn(t0)
        track = torch.is_grad_enabled() and y0.requires_grad
        if torch.is_grad_enabled() and not track:
            # parameters of f (or tensors in args) that require gradients show in its output
            track = f(t_start, y0, args).requires_grad
            nfe += 1
        if track:
            nfe += s
            G = residual(Z, y0)
            if G.requires_grad:
                Js = [N.jacobian(lambda y, i=i: f(ts[i], y, args), y0.detach() + Z[i], layout)[0] for i in range(s)]
                nfe += s
                lu = N.Factorised(N.kron_system(dts, A, Js, layout))
                Z = Z - N.from_system(lu.solve(N.to_system(G, layout, s)), y0.shape, layout, s)
        y1 = y0 + torch.tensordot(co["d"], Z, dims=1)
        dense_info = {"y0": y0, "y1": y1, "Z": list(Z.unbind(0))}
        return y1, y_err, dense_info, self._new_state(solver_state, None, J, not ok, conv.rate), nfe

    def dense_eval(self, terms, args, t0, t1, dense_info, theta):
        y0 = dense_info["y0"]
        P = self.tableau.tensors(y0.dtype, y0.device)["collocation"]
        basis = _poly_basis(P, theta)
        out = y0
        for i, Zi in enumerate(dense_info["Z"]):
            out = out + basis[i] * Zi
        return out, 0

    def dense_derivative(self, terms, args, t0, t1, dense_info, theta):
        y0 = dense_info["y0"]
        P = self.tableau.tensors(y0.dtype, y0.device)["collocation"]
        dP = P[:, 1:] * torch.arange(1, P.shape[1], dtype=P.dtype, device=P.device)
        basis = _poly_basis(dP, theta)
        dt = _dt_like(t0, t1, y0)
        out = 0 * theta
        for i, Zi in enumerate(dense_info["Z"]):
            out = out + basis[i] * Zi
        return out / dt, 0


# ---- tableaux --------------------------------------------------------------------------------
_S2, _S3, _S6, _S15 = math.sqrt(2.0), math.sqrt(3.0), math.sqrt(6.0), math.sqrt(15.0)

_IMPLICIT_EULER = ImplicitTableau(c=[1.0], a=[[1.0]], b=[1.0], order=1)
_IMPLICIT_MIDPOINT = ImplicitTableau(c=[0.5], a=[[0.5]], b=[1.0], order=2)
_TRAPEZOID = ImplicitTableau(c=[0.0, 1.0], a=[[0.0, 0.0], [0.5, 0.5]], b=[0.5, 0.5], order=2)

_RADAU3 = ImplicitTableau(c=[1 / 3, 1.0], a=[[5 / 12, -1 / 12], [3 / 4, 1 / 4]], b=[3 / 4, 1 / 4], order=3)
_RADAU5 = ImplicitTableau(
    c=[(4 - _S6) / 10, (4 + _S6) / 10, 1.0],
    a=[
        [(88 - 7 * _S6) / 360, (296 - 169 * _S6) / 1800, (-2 + 3 * _S6) / 225],
        [(296 + 169 * _S6) / 1800, (88 + 7 * _S6) / 360, (-2 - 3 * _S6) / 225],
        [(16 - _S6) / 36, (16 + _S6) / 36, 1 / 9],
    ],
    b=[(16 - _S6) / 36, (16 + _S6) / 36, 1 / 9],
    order=5,
    embedded_order=3,
    err_gamma=(6 + 81 ** (1 / 3) - 9 ** (1 / 3)) / 30,
    err_z=[x * (6 + 81 ** (1 / 3) - 9 ** (1 / 3)) / 90 for x in (-(13 + 7 * _S6), -13 + 7 * _S6, -1.0)],
)
_GL4 = ImplicitTableau(
    c=[0.5 - _S3 / 6, 0.5 + _S3 / 6],
    a=[[0.25, 0.25 - _S3 / 6], [0.25 + _S3 / 6, 0.25]],
    b=[0.5, 0.5],
    order=4,
)
_GL6 = ImplicitTableau(
    c=[0.5 - _S15 / 10, 0.5, 0.5 + _S15 / 10],
    a=[
        [5 / 36, 2 / 9 - _S15 / 15, 5 / 36 - _S15 / 30],
        [5 / 36 + _S15 / 24, 2 / 9, 5 / 36 - _S15 / 24],
        [5 / 36 + _S15 / 30, 2 / 9 + _S15 / 15, 5 / 36],
    ],
    b=[5 / 18, 4 / 9, 5 / 18],
    order=6,
)

_G2 = 1 - _S2 / 2
_SDIRK2 = ImplicitTableau(c=[_G2, 1.0], a=[[_G2, 0.0], [1 - _G2, _G2]], b=[1 - _G2, _G2], order=2)

_GT = 2 - _S2
_DT, _WT = _GT / 2, _S2 / 4
_TRBDF2 = ImplicitTableau(
    c=[0.0, _GT, 1.0],
    a=[[0.0, 0.0, 0.0], [_DT, _DT, 0.0], [_WT, _WT, _DT]],
    b=[_WT, _WT, _DT],
    b_err=[_WT - (1 - _WT) / 3, _WT - (3 * _WT + 1) / 3, _DT - _DT / 3],
    order=2,
    embedded_order=3,
)

_GK3 = 0.43586652150
_K3 = [
    [0.0, 0.0, 0.0, 0.0],
    [_GK3, _GK3, 0.0, 0.0],
    [(-4 * _GK3**2 + 6 * _GK3 - 1) / (4 * _GK3), (-2 * _GK3 + 1) / (4 * _GK3), _GK3, 0.0],
    [(6 * _GK3 - 1) / (12 * _GK3), -1 / ((24 * _GK3 - 12) * _GK3), (-6 * _GK3**2 + 6 * _GK3 - 1) / (6 * _GK3 - 3), _GK3],
]
_KVAERNO3 = ImplicitTableau(
    c=[0.0, 2 * _GK3, 1.0, 1.0],
    a=_K3,
    b=_K3[3],
    b_err=[x - y for x, y in zip(_K3[3], _K3[2])],
    order=3,
    embedded_order=2,
)

_GK5 = 0.26
_K5 = [
    [0.0] * 7,
    [_GK5, _GK5, 0, 0, 0, 0, 0],
    [0.13, 0.84033320996790809, _GK5, 0, 0, 0, 0],
    [0.22371961478320505, 0.47675532319799699, -0.06470895363112615, _GK5, 0, 0, 0],
    [0.16648564323248321, 0.10450018841591720, 0.03631482272098715, -0.13090704451073998, _GK5, 0, 0],
    [0.13855640231268224, 0.0, -0.04245337201752043, 0.02446657898003141, 0.61943039072480676, _GK5, 0],
    [0.13659751177640291, 0.0, -0.05496908796538376, -0.04118626728321046, 0.62993304899016403,
     0.06962479448202728, _GK5],
]
_KVAERNO5 = ImplicitTableau(
    c=[sum(r) for r in _K5],
    a=_K5,
    b=_K5[6],
    b_err=[x - y for x, y in zip(_K5[6], _K5[5])],
    order=5,
    embedded_order=4,
)


# ---- solvers ---------------------------------------------------------------------------------
class ImplicitEuler(AbstractDIRK):
    """Implicit (backward) Euler: order 1, L-stable, fixed steps.

    ``y1 = y0 + dt f(t1, y1)``. Hairer & Wanner, *Solving Ordinary Differential Equations II* (1996), IV.3.
    Parameters as in :class:`AbstractImplicitRK`.
    """

    tableau = _IMPLICIT_EULER


class ImplicitMidpoint(AbstractDIRK):
    """Implicit midpoint rule (one-stage Gauss method): order 2, A-stable, symplectic, fixed steps.

    ``y1 = y0 + dt f(t0 + dt/2, (y0 + y1) / 2)``. Hairer & Wanner, *Solving ODEs II* (1996), IV.3;
    Butcher (1964), "Implicit Runge--Kutta processes", *Math. Comp.* 18.
    """

    tableau = _IMPLICIT_MIDPOINT


class Trapezoid(AbstractDIRK):
    """Trapezoidal rule (Crank--Nicolson; two-stage Lobatto IIIA): order 2, A-stable, fixed steps.

    ``y1 = y0 + dt/2 (f(t0, y0) + f(t1, y1))``. Crank & Nicolson (1947), *Proc. Camb. Phil. Soc.* 43;
    Hairer & Wanner, *Solving ODEs II* (1996), IV.3.
    """

    tableau = _TRAPEZOID


class SDIRK2(AbstractDIRK):
    """Two-stage singly diagonally implicit RK method, ``gamma = 1 - sqrt(2)/2``: order 2, L-stable, stiffly accurate.

    ``k_i = f(t0 + c_i dt, y0 + dt sum_{j<=i} a_ij k_j)`` with ``a = [[g, 0], [1-g, g]]``.
    Alexander (1977), "Diagonally implicit Runge--Kutta methods for stiff O.D.E.'s", *SIAM J. Numer. Anal.* 14(6).
    """

    tableau = _SDIRK2


class TRBDF2(AbstractDIRK):
    """TR-BDF2: a trapezoidal stage to ``t0 + gamma dt`` then BDF2, ``gamma = 2 - sqrt(2)``; order 2, L-stable.

    Written as a three-stage ESDIRK (first stage explicit, FSAL) with Hosea and Shampine's embedded
    third-order formula, so it is adaptive (``error_order = 3``) and also runs with fixed steps.
    Bank et al. (1985), "Transient simulation of silicon devices and circuits", *IEEE Trans. CAD* 4(4);
    Hosea & Shampine (1996), "Analysis and implementation of TR-BDF2", *Appl. Numer. Math.* 20.
    """

    tableau = _TRBDF2


class Kvaerno3(AbstractDIRK):
    """Kværnø's ESDIRK 3(2): four stages, order 3 with embedded order 2, L-stable, stiffly accurate, FSAL.

    Adaptive (use with :class:`~nde.PIDController`); ``gamma = 0.4358665215``. Dense output: cubic Hermite.
    Kværnø (2004), "Singly diagonally implicit Runge--Kutta methods with an explicit first stage",
    *BIT Numer. Math.* 44(3).
    """

    tableau = _KVAERNO3


class Kvaerno5(AbstractDIRK):
    """Kværnø's ESDIRK 5(4): seven stages, order 5 with embedded order 4, L-stable, stiffly accurate, FSAL.

    Adaptive (use with :class:`~nde.PIDController`); ``gamma = 0.26``. Some stages are evaluated past
    ``t1`` (``c_3 = 1.23``). Dense output: cubic Hermite.
    Kværnø (2004), "Singly diagonally implicit Runge--Kutta methods with an explicit first stage",
    *BIT Numer. Math.* 44(3).
    """

    tableau = _KVAERNO5


class RadauIIA3(AbstractFIRK):
    """Two-stage Radau IIA: order 3, L-stable, stiffly accurate, fixed steps.

    ``c = (1/3, 1)``. Collocation dense output of order 2.
    Hairer & Wanner, *Solving Ordinary Differential Equations II* (1996), IV.5, Table 5.5.
    """

    tableau = _RADAU3


class RadauIIA5(AbstractFIRK):
    """Three-stage Radau IIA: order 5, L-stable, stiffly accurate; adaptive or fixed steps.

    ``c = ((4 - sqrt 6)/10, (4 + sqrt 6)/10, 1)``. Collocation dense output of order 3. The error
    estimate is the embedded third-order formula filtered through ``(I - dt g0 J)^{-1}``
    (``g0 = 0.2749``, the real eigenvalue of ``A``), so it stays bounded on stiff components.
    Hairer & Wanner, *Solving Ordinary Differential Equations II* (1996), IV.5, Table 5.6, and IV.8
    (embedded formula, eq. 8.17--8.20).
    """

    tableau = _RADAU5


class GaussLegendre4(AbstractFIRK):
    """Two-stage Gauss--Legendre: order 4, A-stable, symplectic, fixed steps.

    ``c = 1/2 -+ sqrt(3)/6``. Butcher (1964), "Implicit Runge--Kutta processes", *Math. Comp.* 18.
    """

    tableau = _GL4


class GaussLegendre6(AbstractFIRK):
    """Three-stage Gauss--Legendre: order 6, A-stable, symplectic, fixed steps.

    ``c = (1/2 - sqrt(15)/10, 1/2, 1/2 + sqrt(15)/10)``. Butcher (1964), "Implicit Runge--Kutta
    processes", *Math. Comp.* 18.
    """

    tableau = _GL6


__all__ = [
    "ImplicitTableau", "AbstractImplicitRK", "AbstractDIRK", "AbstractFIRK", "ImplicitEuler", "ImplicitMidpoint",
    "Trapezoid", "SDIRK2", "TRBDF2", "Kvaerno3", "Kvaerno5", "RadauIIA3", "RadauIIA5", "GaussLegendre4",
    "GaussLegendre6",
]
