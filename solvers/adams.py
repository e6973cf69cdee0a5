"""Adams--Bashforth--Moulton multistep methods (predictor--corrector, growing order).

The history of vector-field values lives in the solver state, so the loop needs no special support:
a rejected step leaves the state untouched, and a change of step size is detected from the stored
times (the coefficients are then recomputed for the actual, non-uniform nodes).
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import torch

from .base import AbstractSolver
from .implicit import _hermite, _hermite_derivative

_MAX_ORDER = 12


def _uniform_coefficients(k, implicit):
    """Adams coefficients on a uniform grid, exact rationals, as floats.

    Bashforth (``implicit=False``): ``y1 = y0 + dt sum_{j<k} beta_j f_{n-j}``; Moulton
    (``implicit=True``): ``y1 = y0 + dt sum_{j<k} beta_j f_{n+1-j}`` (``beta_0`` multiplies ``f(t1, y1)``).
    ``beta_j = int_0^1 prod_{m != j} (u - u_m) / (u_j - u_m) du`` with nodes ``u_j = -j`` (Bashforth) or
    ``1 - j`` (Moulton).
    """
    nodes = [Fraction(1 - j) if implicit else Fraction(-j) for j in range(k)]
    return [float(x) for x in _integrated_lagrange(nodes)]


def _integrated_lagrange(nodes):
    """``int_0^1 L_j(u) du`` for the Lagrange basis on ``nodes`` (exact for Fractions, float otherwise)."""
    out = []
    for j, uj in enumerate(nodes):
        # polynomial prod_{m != j} (u - u_m) in ascending powers
        poly = [nodes[0] * 0 + 1]
        denom = nodes[0] * 0 + 1
        for m, um in enumerate(nodes):
            if m == j:
                continue
            new = [poly[0] * 0] * (len(poly) + 1)
            for p, a in enumerate(poly):
                new[p] -= a * um
                new[p + 1] += a
            poly = new
            denom *= uj - um
        out.append(sum(a / (p + 1) for p, a in enumerate(poly)) / denom)
    return out


_BASHFORTH = [None] + [_uniform_coefficients(k, False) for k in range(1, _MAX_ORDER + 1)]
_MOULTON = [None] + [_uniform_coefficients(k, True) for k in range(1, _MAX_ORDER + 1)]


def _coefficients(times, t0, t1, k, implicit):
    """Coefficients for history ``times`` (most recent first, ``times[0] == t0``); uniform tables when the
    spacing is the step size, otherwise the integrated Lagrange basis on the actual nodes."""
    dt = t1 - t0
    nodes = [(t - t0) / dt for t in times[: (k - 1 if implicit else k)]]
    if implicit:
        nodes = [1.0] + nodes
    expect = [(1.0 if implicit else 0.0) - j for j in range(k)]
    if all(abs(a - b) <= 1e-9 for a, b in zip(nodes, expect)):
        return (_MOULTON if implicit else _BASHFORTH)[k]
    return [float(x) for x in _integrated_lagrange([float(u) for u in nodes])]


def _combine(fs, coeffs, scale):
    out = fs[0] * (coeffs[0] * scale)
    for fj, cj in zip(fs[1:], coeffs[1:]):
        out = out + fj * (cj * scale)
    return out


class AdamsBashforthMoulton(AbstractSolver):
    """Adams--Bashforth predictor with an optional Adams--Moulton corrector; order grows with the history.

    The first two steps are Kutta's 3/8 rule; from then on the predictor uses every stored value of
    ``f`` (``k`` of them, up to ``max_order - 1``): ``y1 = y0 + dt sum_{j<k} beta_j f_{n-j}``. With
    ``implicit=True`` the corrector ``y1 = y0 + dt (beta*_0 f(t1, y1) + sum_{j<k} beta*_{j+1} f_{n-j})``
    (order ``k + 1``) is iterated to convergence (functional iteration, at most ``max_iters`` times).
    The global order is set by the start-up steps: 4 for the predictor alone, 5 with a converged
    corrector (the default corrector tolerances stop earlier, which gives about 4). A long history
    makes the explicit variant's stability region tiny: with ``implicit=False`` prefer ``max_order=5``
    unless the steps are very small. Fixed steps; the history is kept in
    the solver state (per sample in independent batch mode) and non-uniform nodes (a shortened last
    step) get recomputed coefficients.
    Dense output: cubic Hermite.

    Hairer, Nørsett & Wanner, *Solving Ordinary Differential Equations I* (1993), III.1; Bashforth &
    Adams (1883), *An Attempt to Test the Theories of Capillary Action*; Moulton (1926), *New Methods
    in Exterior Ballistics*.

    Parameters
    ----------
    implicit:
        Use the Adams--Moulton corrector (PECE iterated) or only the Adams--Bashforth predictor.
    max_order:
        Largest history used is ``max_order - 1`` values (between 4 and 12).
    max_iters:
        Most corrector iterations a step.
    rtol, atol:
        The corrector stops when ``max |dy_new - dy_old| / (atol + rtol max(|dy_old|, |dy_new|)) < 1``.
    """

    error_order = None

    def __init__(self, implicit=True, max_order=_MAX_ORDER, max_iters=4, rtol=1e-7, atol=1e-9):
        if not isinstance(max_order, int) or not 4 <= max_order <= _MAX_ORDER:
            raise ValueError(f"max_order must be an integer between 4 and {_MAX_ORDER}; got {max_order!r}.")
        if not isinstance(max_iters, int) or max_iters < 1:
            raise ValueError(f"max_iters must be a positive integer; got {max_iters!r}.")
        for name, v in (("rtol", rtol), ("atol", atol)):
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite nonnegative number; got {v!r}.")
        self.implicit = bool(implicit)
        self.max_order = max_order
        self.max_iters = max_iters
        self.rtol = float(rtol)
        self.atol = float(atol)
        self._warned = False

    @property
    def order(self):
        return 5 if self.implicit else 4

    def __repr__(self):
        return f"{type(self).__name__}(implicit={self.implicit}, max_order={self.max_order})"

    def init(self, terms, t0, t1, y0, args):
        if isinstance(t0, float):
            return {"ts": [], "fs": [], "next": None}, 0
        return _batch_history(terms, t0, y0, args, self.max_order - 1)

    def step(self, terms, t0, t1, y0, args, solver_state):
        if not isinstance(t0, float):
            return self._step_batch(terms, t0, t1, y0, args, solver_state)
        f = terms.ode
        dt = t1 - t0
        st = solver_state if solver_state is not None else {"ts": [], "fs": [], "next": None}
        ts, fs = list(st["ts"]), list(st["fs"])
        nfe = 0
        pending = st.get("next")
        if pending is not None and pending[0] == t0:
            f0 = pending[1]
        else:
            f0 = f(torch.tensor(t0, dtype=y0.dtype, device=y0.device), y0, args)
            nfe += 1
        ts.insert(0, t0)
        fs.insert(0, f0)
        del ts[self.max_order - 1:], fs[self.max_order - 1:]
        k = min(len(fs), self.max_order - 1)
        tt1 = torch.tensor(t1, dtype=y0.dtype, device=y0.device)
        if k < 3:
            dy, n = self._kutta38(f, t0, dt, tt1, y0, f0, args)
            nfe += n
        else:
            dy = _combine(fs, _coefficients(ts, t0, t1, k, False), dt)
            if self.implicit:
                m = _coefficients(ts, t0, t1, k + 1, True)
                delta = _combine(fs[:k], m[1:], dt)
                converged = False
                for _ in range(self.max_iters):
                    dy_old = dy
                    f1 = f(tt1, y0 + dy, args)
                    nfe += 1
                    dy = f1 * (m[0] * dt) + delta
                    with torch.no_grad():
                        tol = self.atol + self.rtol * torch.maximum(dy_old.abs(), dy.abs())
                        converged = bool(((dy - dy_old).abs() / tol).max() < 1)
                    if converged:
                        break
                if not converged:
                    if not self._warned:
                        warnings.warn(
                            f"{type(self).__name__}: the corrector iteration did not converge at t={t0:.6g}; "
                            "the solution may be inaccurate (use smaller steps or more max_iters). "
                            "The oldest stored value is dropped.",
                            RuntimeWarning,
                            stacklevel=3,
                        )
                        self._warned = True
                    ts.pop()
                    fs.pop()
        y1 = y0 + dy
        new_state = {"ts": ts, "fs": fs, "next": None}
        dense_info = {"y0": y0, "y1": y1, "f0": f0, "state": new_state}
        return y1, None, dense_info, new_state, nfe

    def _step_batch(self, terms, t0, t1, y0, args, st):
        """Independent mode: per-sample histories in fixed-size buffers; coefficients from batched solves."""
        f = terms.ode
        B, H = y0.shape[0], self.max_order - 1
        pad = (1,) * (y0.dim() - 1)
        t0f, t1f = t0.reshape(B).to(torch.float64), t1.reshape(B).to(torch.float64)
        dt = t1f - t0f
        dtb = dt.to(y0.dtype).reshape((B,) + pad)
        f0 = st["next_f"]
        ts, fs, count, nodes = _push_history(st, t0f, f0, dt, H)
        nfe = 0
        start = count < 3
        y_rk = None
        if bool(start.any()):
            # Kutta's 3/8 rule while fewer than three values are stored
            tt0 = t0.to(y0.dtype)
            dt_y = dtb
            k2 = f(tt0 + dt_y / 3, y0 + f0 * (dt_y / 3), args)
            k3 = f(tt0 + 2 * dt_y / 3, y0 + (k2 - f0 / 3) * dt_y, args)
            k4 = f(t1.to(y0.dtype), y0 + (f0 - k2 + k3) * dt_y, args)
            y_rk = y0 + (f0 + 3 * (k2 + k3) + k4) * (dt_y * 0.125)
            nfe += 3
        beta = _batched_adams(nodes, count, table=_BASHFORTH)
        dy = dtb * _weighted(beta, fs, y0)
        if self.implicit:
            m = _batched_adams(torch.cat([torch.ones_like(nodes[:, :1]), nodes], 1), count + 1, table=_MOULTON)
            delta = dtb * _weighted(m[:, 1:], fs, y0)
            m0 = m[:, 0].to(y0.dtype).reshape((B,) + pad)
            tt1 = t1.to(y0.dtype)
            done = start.clone()
            for _ in range(self.max_iters):
                f1 = f(tt1, y0 + dy, args)
                nfe += 1
                dy_new = dtb * m0 * f1 + delta
                with torch.no_grad():
                    tol = self.atol + self.rtol * torch.maximum(dy.abs(), dy_new.abs())
                    conv = ((dy_new - dy).abs() / tol).reshape(B, -1).amax(1) < 1
                dy = torch.where(done.reshape((B,) + pad), dy, dy_new)  # converged samples keep their value
                done = done | conv
                if bool(done.all()):
                    break
            # samples whose corrector did not converge drop their oldest value, as in joint mode
            count = torch.where(done, count, (count - 1).clamp(min=1))
        y1 = y0 + dy
        if y_rk is not None:
            y1 = torch.where(start.reshape((B,) + pad), y_rk, y1)
        f1 = f(t1.to(y0.dtype), y1, args)
        nfe += 1
        new_state = {"ts": ts, "fs": fs, "count": count, "next_f": f1}
        return y1, None, {"y0": y0, "y1": y1, "f0": f0, "f1": f1}, new_state, nfe

    @staticmethod
    def _kutta38(f, t0, dt, tt1, y0, f0, args):
        """Kutta's 3/8 rule; returns the increment and the number of new evaluations."""
        dtype, dev = y0.dtype, y0.device
        k1 = f0
        k2 = f(torch.tensor(t0 + dt / 3, dtype=dtype, device=dev), y0 + k1 * (dt / 3), args)
        k3 = f(torch.tensor(t0 + 2 * dt / 3, dtype=dtype, device=dev), y0 + (k2 - k1 / 3) * dt, args)
        k4 = f(tt1, y0 + (k1 - k2 + k3) * dt, args)
        return (k1 + 3 * (k2 + k3) + k4) * (dt * 0.125), 3

    def _f1(self, terms, args, t1, info):
        """``f(t1, y1)``, evaluated once and handed to the next step through the state."""
        state = info["state"]
        if state["next"] is not None:
            return state["next"][1], 0
        y1 = info["y1"]
        f1 = terms.ode(torch.tensor(t1, dtype=y1.dtype, device=y1.device), y1, args)
        state["next"] = (t1, f1)
        return f1, 1

    def dense_eval(self, terms, args, t0, t1, dense_info, theta):
        d = dense_info
        f1, n = (d["f1"], 0) if "f1" in d else self._f1(terms, args, t1, d)
        return _hermite(d["y0"], d["y1"], d["f0"], f1, _dt(t0, t1, d["y0"]), theta), n

    def dense_derivative(self, terms, args, t0, t1, dense_info, theta):
        d = dense_info
        f1, n = (d["f1"], 0) if "f1" in d else self._f1(terms, args, t1, d)
        return _hermite_derivative(d["y0"], d["y1"], d["f0"], f1, _dt(t0, t1, d["y0"]), theta) + 0 * theta, n


class ExplicitAdams(AdamsBashforthMoulton):
    """Adams--Bashforth alone (no corrector): :class:`AdamsBashforthMoulton` with ``implicit=False``."""

    def __init__(self, max_order=_MAX_ORDER, rtol=1e-7, atol=1e-9):
        super().__init__(implicit=False, max_order=max_order, rtol=rtol, atol=atol)


class ImplicitAdams(AdamsBashforthMoulton):
    """Adams--Bashforth predictor with iterated Adams--Moulton corrector: :class:`AdamsBashforthMoulton`."""

    def __init__(self, max_order=_MAX_ORDER, max_iters=4, rtol=1e-7, atol=1e-9):
        super().__init__(implicit=True, max_order=max_order, max_iters=max_iters, rtol=rtol, atol=atol)


#: Fixed-step Adams--Bashforth--Moulton; the same method as :class:`ImplicitAdams`.
FixedAdams = ImplicitAdams


class AdaptiveAdams(AbstractSolver):
    """Variable-step Adams--Bashforth--Moulton in PECE form, with an error estimate for adaptive steps.

    Predict with Adams--Bashforth on the last ``k`` values of ``f`` (order ``k``), evaluate, correct
    with Adams--Moulton through ``f(t1, y_pred)`` and the same history (order ``k + 1``), evaluate
    again: two evaluations a step. Coefficients are integrals of the Lagrange basis on the actual,
    non-uniform nodes, so the step size may change every step. ``k`` grows from 1 (the first step
    is Euler/trapezoid) to ``order - 1``; the error estimate is ``y_corr - y_pred`` (the local error
    of the predictor, ``O(dt^order)``), which keeps the corrected solution well inside the tolerance.
    In independent batch mode every sample keeps its own history and nodes (fixed-size buffers; the
    coefficients of all samples come from one batched solve of the moment equations). On smooth non-stiff problems at tight tolerances it needs a third of the
    evaluations of ``Dopri5``; a controller that limits step growth (``PIDController(factormax=2)``)
    keeps the variable-step formulas well conditioned.

    Hairer, Nørsett & Wanner, *Solving Ordinary Differential Equations I* (1993), III.5 (variable step
    size multistep methods); Shampine & Gordon (1975), *Computer Solution of Ordinary Differential
    Equations: the Initial Value Problem*.

    Parameters
    ----------
    order:
        Order of the predictor once the history is full (2 to 12, default 8; the corrector has one more).
    """

    def __init__(self, order=8):
        if not isinstance(order, int) or not 2 <= order <= _MAX_ORDER:
            raise ValueError(f"order must be an integer between 2 and {_MAX_ORDER}; got {order!r}.")
        self._order = order

    @property
    def order(self):
        return self._order

    @property
    def error_order(self):
        return self._order

    def __repr__(self):
        return f"AdaptiveAdams(order={self._order})"

    def init(self, terms, t0, t1, y0, args):
        if isinstance(t0, float):
            return {"ts": [], "fs": [], "next": None}, 0
        return _batch_history(terms, t0, y0, args, self._order - 1)

    def step(self, terms, t0, t1, y0, args, solver_state):
        if not isinstance(t0, float):
            return self._step_batch(terms, t0, t1, y0, args, solver_state)
        f = terms.ode
        dt = t1 - t0
        st = solver_state if solver_state is not None else {"ts": [], "fs": [], "next": None}
        nfe = 0
        pending = st["next"]
        if pending is not None and pending[0] == t0:
            f0 = pending[1]
        else:
            f0 = f(torch.tensor(t0, dtype=y0.dtype, device=y0.device), y0, args)
            nfe += 1
        ts = ([t0] + list(st["ts"]))[: self._order - 1]
        fs = ([f0] + list(st["fs"]))[: self._order - 1]
        nodes = [(t - t0) / dt for t in ts]
        beta = [float(x) for x in _integrated_lagrange(nodes)]
        y_pred = y0 + _combine(fs, beta, dt)
        tt1 = torch.tensor(t1, dtype=y0.dtype, device=y0.device)
        f_pred = f(tt1, y_pred, args)
        m = [float(x) for x in _integrated_lagrange([1.0] + nodes)]
        y1 = y0 + _combine([f_pred] + fs, m, dt)
        f1 = f(tt1, y1, args)
        nfe += 2
        with torch.no_grad():
            y_err = y1 - y_pred
        new_state = {"ts": ts, "fs": fs, "next": (t1, f1)}
        dense_info = {"y0": y0, "y1": y1, "f0": f0, "f1": f1}
        return y1, y_err, dense_info, new_state, nfe

    def _step_batch(self, terms, t0, t1, y0, args, st):
        """Independent mode: every sample its own nodes; coefficients from one batched linear solve."""
        f = terms.ode
        B, H = y0.shape[0], self._order - 1
        pad = (1,) * (y0.dim() - 1)
        t0f, t1f = t0.reshape(B).to(torch.float64), t1.reshape(B).to(torch.float64)
        dt = t1f - t0f
        f0 = st["next_f"]  # f(t0, y0): carried from the last accepted step (or init)
        ts, fs, count, nodes = _push_history(st, t0f, f0, dt, H)
        beta = _batched_adams(nodes, count)  # (B, H)
        moulton = _batched_adams(torch.cat([torch.ones_like(nodes[:, :1]), nodes], 1), count + 1)  # (B, H+1)
        dtb = dt.to(y0.dtype).reshape((B,) + pad)

        y_pred = y0 + dtb * _weighted(beta, fs, y0)
        tt1 = t1.to(y0.dtype)
        f_pred = f(tt1, y_pred, args)
        y1 = y0 + dtb * _weighted(moulton, torch.cat([f_pred.unsqueeze(1), fs], 1), y0)
        f1 = f(tt1, y1, args)
        with torch.no_grad():
            y_err = y1 - y_pred
        new_state = {"ts": ts, "fs": fs, "count": count, "next_f": f1}
        dense_info = {"y0": y0, "y1": y1, "f0": f0, "f1": f1}
        return y1, y_err, dense_info, new_state, 2

    def dense_eval(self, terms, args, t0, t1, dense_info, theta):
        d = dense_info
        return _hermite(d["y0"], d["y1"], d["f0"], d["f1"], _dt(t0, t1, d["y0"]), theta), 0

    def dense_derivative(self, terms, args, t0, t1, dense_info, theta):
        d = dense_info
        return _hermite_derivative(d["y0"], d["y1"], d["f0"], d["f1"], _dt(t0, t1, d["y0"]), theta) + 0 * theta, 0


def _dt(t0, t1, y):
    dt = t1 - t0
    return dt if isinstance(dt, float) else dt.to(y.dtype)


def _batch_history(terms, t0, y0, args, H):
    """Independent-mode state: fixed-size per-sample buffers (most recent first), a count of valid
    entries, and ``f(t0, y0)``; ``(state, nfe)``."""
    B = y0.shape[0]
    tb = t0.reshape(B).to(torch.float64)
    return {
        "ts": tb.new_zeros(B, H), "fs": y0.new_zeros((B, H) + tuple(y0.shape[1:])),
        "count": torch.zeros(B, dtype=torch.long, device=y0.device), "next_f": terms.ode(t0.to(y0.dtype), y0, args),
    }, 1


def _push_history(st, t0f, f0, dt, H):
    """The history with ``(t0, f0)`` in front, the new counts, and the nodes ``(t_j - t0) / dt``."""
    ts = torch.cat([t0f.unsqueeze(1), st["ts"][:, :-1]], 1)
    fs = torch.cat([f0.unsqueeze(1), st["fs"][:, :-1]], 1)
    count = (st["count"] + 1).clamp(max=H)
    dt_safe = torch.where(dt == 0, torch.ones_like(dt), dt)  # finished samples take zero steps
    return ts, fs, count, (ts - t0f.unsqueeze(1)) / dt_safe.unsqueeze(1)


def _weighted(coef, vals, y):
    """``sum_j coef[:, j] vals[:, j]`` for per-sample coefficients ``(B, m)`` and values ``(B, m, ...)``."""
    c = coef.to(y.dtype).reshape(coef.shape + (1,) * (y.dim() - 1))
    return (c * vals).sum(1)


def _batched_adams(nodes, count, table=None):
    """``int_0^1 L_j(u) du`` for every row of ``nodes`` (B, m), using its first ``count[b]`` nodes.

    Solves the moment equations ``sum_j beta_j u_j^p = 1 / (p + 1)``, ``p < count``; unused entries
    get the identity, so their coefficients are zero. With ``table`` (the uniform-grid coefficients by
    count), rows whose nodes are the uniform ones take the exact tabulated values instead.
    """
    B, m = nodes.shape
    solved = _moment_solve(nodes, count)
    if table is None:
        return solved
    # uniform nodes are u_j = u_0 - j (u_0 = 0 for Bashforth, 1 for Moulton)
    j = torch.arange(m, device=nodes.device, dtype=nodes.dtype)
    valid = j.unsqueeze(0) < count.unsqueeze(1)
    uniform = (((nodes - (nodes[:, :1] - j)).abs() <= 1e-9) | ~valid).all(1)
    if not bool(uniform.any()):
        return solved
    rows = torch.zeros(len(table), m, dtype=nodes.dtype, device=nodes.device)
    for k in range(1, min(len(table), m + 1)):
        rows[k, :k] = torch.as_tensor(table[k], dtype=nodes.dtype)
    return torch.where(uniform.unsqueeze(1), rows[count.clamp(max=len(table) - 1)], solved)


def _moment_solve(nodes, count):
    B, m = nodes.shape
    p = torch.arange(m, device=nodes.device)
    valid = p.unsqueeze(0) < count.unsqueeze(1)  # (B, m)
    V = nodes.unsqueeze(1) ** p.reshape(1, m, 1).to(nodes.dtype)  # V[b, p, j] = u_j^p
    mask = valid.unsqueeze(1) & valid.unsqueeze(2)
    eye = torch.eye(m, dtype=nodes.dtype, device=nodes.device).expand(B, m, m)
    V = torch.where(mask, V, eye)
    rhs = torch.where(valid, 1.0 / (p + 1).to(nodes.dtype), torch.zeros_like(nodes))
    return torch.linalg.solve(V, rhs)


__all__ = ["AdamsBashforthMoulton", "ExplicitAdams", "ImplicitAdams", "FixedAdams", "AdaptiveAdams"]
