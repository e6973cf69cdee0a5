"""Explicit Runge--Kutta methods: one generic stepper over Butcher tableaux held as data."""

from __future__ import annotations

import numpy as np
import torch

from . import _tableaux as _T
from nde._terms import only_ode_terms

from .base import AbstractSolver


class ButcherTableau:
    """The coefficients of an explicit Runge--Kutta method.

    ``y1 = y0 + dt * sum_j b_sol[j] k_j`` with ``k_i = f(t0 + c[i] dt, y0 + dt * sum_{j<i} a[i][j] k_j)``;
    the error estimate is ``dt * sum_j b_err[j] k_j``; ``dense[j]`` holds the coefficients (ascending
    powers of ``theta``) of the polynomial ``b_j(theta)`` of the continuous extension
    ``y(t0 + theta dt) = y0 + dt * sum_j b_j(theta) k_j``, or is None (cubic Hermite is used).
    """

    def __init__(self, c, a, b_sol, b_err=None, order=None, embedded_order=None, dense=None):
        self.c = [float(x) for x in c]
        self.a = [[float(x) for x in row] for row in a]
        self.b_sol = [float(x) for x in b_sol]
        self.b_err = None if b_err is None else [float(x) for x in b_err]
        self.order = order
        self.embedded_order = embedded_order
        self.dense = None if dense is None else np.asarray(dense, dtype=np.float64)
        self.stages = len(self.c)
        if len(self.a) != self.stages - 1 or any(len(r) != i + 1 for i, r in enumerate(self.a)):
            raise ValueError("a must hold the rows 2..s of a strictly lower-triangular Butcher matrix.")
        # First Same As Last: the last stage is evaluated at (t1, y1), so it is the next step's first.
        self.fsal = (
            self.stages > 1
            and self.c[-1] == 1.0
            and self.b_sol[-1] == 0.0
            and np.allclose(self.a[-1], self.b_sol[:-1], rtol=0, atol=1e-15)
        )
        # Nonzero coefficients of every linear combination, as (indices, values) pairs.
        self._rows = [self._nonzero(r) for r in self.a]
        self.ends = any(ci in (0.0, 1.0) for ci in self.c)
        self._sol = self._nonzero(self.b_sol[:-1] if self.fsal else self.b_sol)
        self._err = None if self.b_err is None else self._nonzero(self.b_err)
        self._cache = {}

    @staticmethod
    def _nonzero(row):
        idx = [j for j, x in enumerate(row) if x != 0.0]
        return idx, [row[j] for j in idx]

    def tensors(self, dtype, device):
        """Coefficient tensors for ``(dtype, device)``, built once and cached."""
        key = (dtype, device)
        out = self._cache.get(key)
        if out is None:
            out = {
                "dense": None if self.dense is None else torch.tensor(self.dense, dtype=dtype, device=device),
                "denseT": None if self.dense is None else torch.tensor(self.dense.T.copy(), dtype=dtype, device=device),
                "exps": None if self.dense is None else torch.arange(self.dense.shape[1], dtype=dtype, device=device),
                "c": torch.tensor(self.c, dtype=torch.float64, device=device),
                "zero": torch.zeros((), dtype=dtype, device=device),
            }
            self._cache[key] = out
        return out


def _combine(y0, ks, nz, dt, zero=None):
    """``y0 + dt * sum_j v_j k_j`` over the nonzero coefficients ``nz = (indices, values)``.

    ``dt`` is a Python float (joint mode) or a tensor broadcastable against ``y0`` (independent);
    ``y0`` may be None, and then ``zero``, a 0-d zero of the state's dtype, starts the sum (an
    addition of a 0-d tensor costs less than a product with a Python number).
    """
    idx, vals = nz
    out = y0 if y0 is not None else zero
    if isinstance(dt, float):
        # a chain of fused adds: fewer passes over memory than stacking the stages for one matrix
        # product, and, under autograd, a cheaper backward; the same operations with and without a
        # graph, so that recomputed steps reproduce the forward's bit for bit
        for j, v in zip(idx, vals):
            out = torch.add(out, ks[j], alpha=v * dt)
        return out
    if not idx:
        return out
    # per-sample dt: y0 + v_p dt * (k_p + sum_j (v_j / v_p) k_j), p the largest coefficient (ratios at
    # most 1): the sum as fused adds, which cost less than multiply-adds with a broadcast dt, and
    # one multiply-add with dt
    jp, vp, rest = _pivoted(nz)
    acc = ks[jp]
    for j, r in rest:
        acc = torch.add(acc, ks[j], alpha=r)
    return torch.addcmul(out, dt, acc, value=vp)


_PIVOTS = {}


def _pivoted(nz):
    """``(j_p, v_p, [(j, v_j / v_p), ...])`` for the coefficients ``nz`` (a tableau's row, which
    lives as long as the tableau), ``p`` the largest in magnitude; computed once a row."""
    hit = _PIVOTS.get(id(nz))
    if hit is not None and hit[0] is nz:
        return hit[1]
    idx, vals = nz
    p = max(range(len(vals)), key=lambda i: abs(vals[i]))
    out = (idx[p], vals[p], [(j, v / vals[p]) for i, (j, v) in enumerate(zip(idx, vals)) if i != p])
    _PIVOTS[id(nz)] = (nz, out)
    return out


def _solution(y0, ks, nz, dt, zero):
    """``y0 + dt * sum_j b_j k_j`` with the increment summed first and added to ``y0`` once: one
    rounding at the size of ``y`` a step instead of one a stage, which is what accumulates over the
    steps of a low-precision (float32) solve (with a per-sample ``dt``, :func:`_combine` sums first)."""
    if isinstance(dt, float):
        return y0 + _combine(None, ks, nz, dt, zero)
    return _combine(y0, ks, nz, dt)


class ExplicitRK(AbstractSolver):
    """Generic explicit Runge--Kutta stepper; subclasses set ``tableau``.

    Uses FSAL when the tableau allows, an embedded error estimate when it has one, and its
    continuous extension for dense output (cubic Hermite on ``y0, y1, f0, f1`` otherwise).
    """

    tableau: ButcherTableau
    #: carry the last stage over as the next step's first even when the tableau is not FSAL (then it
    #: is not f(t1, y1)): torchdiffeq's convention for ``adaptive_heun`` and ``fehlberg2``, which the
    #: drop-in reproduces; a different (still second-order) method with one evaluation a step fewer
    reuse_last_stage = False

    @property
    def order(self):
        return self.tableau.order

    @property
    def error_order(self):
        t = self.tableau
        return None if t.b_err is None else t.embedded_order + 1

    def init(self, terms, t0, t1, y0, args):
        if (self.tableau.fsal or self.reuse_last_stage) and only_ode_terms(terms):
            # evaluate the first stage up front: the state then always holds a valid first stage for
            # every sample (the next step's, whether this one is accepted or not), and the automatic
            # first step size reuses it
            tt = t0.to(y0.dtype) if isinstance(t0, torch.Tensor) else torch.tensor(t0, dtype=y0.dtype, device=y0.device)
            return [terms.ode(tt, y0, args)], 1
        return [None], 0

    def first_stage(self, solver_state):
        """``f(t0, y0)`` if the state already holds it (else None)."""
        if isinstance(solver_state, list) and len(solver_state) == 1 and isinstance(solver_state[0], torch.Tensor):
            return solver_state[0]
        return None

    def step(self, terms, t0, t1, y0, args, solver_state):
        tab = self.tableau
        f = terms.ode
        co = tab.tensors(y0.dtype, y0.device)
        dt = t1 - t0
        joint = isinstance(dt, float)
        if not joint:
            dt64 = dt
            dt = dt.to(y0.dtype)
        nfe = 0
        ode_only = only_ode_terms(terms)
        # the last stage is reused as the next first stage (FSAL) only for ODE terms: a control path may
        # have a kink at the step's end, where the next step needs the derivative from the other side
        k1 = solver_state[0] if solver_state is not None and ode_only else None
        # Stages at the ends of the step see the vector field from inside the step: a control path
        # with a kink at a step boundary contributes its one-sided derivative (1 ulp inside).
        inside = tab.ends and not ode_only
        if joint:
            # every stage time in one host-to-tensor copy, in the dtype of the state
            vals = [t0 + ci * dt for ci in tab.c]
            if inside:
                lo, hi = _inside_ends(t0, t1, y0.dtype)
                vals = [lo if ci == 0.0 else hi if ci == 1.0 else v for ci, v in zip(tab.c, vals)]
            ts = _times_tensor(vals, y0).unbind()
        else:
            c = co["c"].reshape((-1,) + (1,) * t0.dim())
            ts = torch.addcmul(t0, c, dt64).to(y0.dtype).unbind(0)  # every stage time in one operation
            if inside:
                a, b = ts[0], (t0 + dt).to(y0.dtype)
                lo, hi = torch.nextafter(a, b), torch.nextafter(b, a)
                ts = [lo if ci == 0.0 else hi if ci == 1.0 else x for ci, x in zip(tab.c, ts)]
        if k1 is None:
            k1 = f(ts[0], y0, args)
            nfe += 1
        ks = [k1]
        y1 = None
        last = tab.stages - 1
        for i in range(1, tab.stages):
            if tab.fsal and i == last:
                y1 = _solution(y0, ks, tab._sol, dt, co["zero"])
                yi = y1
            else:
                yi = _combine(y0, ks, tab._rows[i - 1], dt)
            ks.append(f(ts[i], yi, args))
            nfe += 1
        if y1 is None:
            y1 = _solution(y0, ks, tab._sol, dt, co["zero"])
        if tab._err is None:
            y_err = None
        elif torch.is_grad_enabled():  # the error estimate is not differentiated
            with torch.no_grad():
                y_err = _combine(None, ks, tab._err, dt, co["zero"])
        else:
            y_err = _combine(None, ks, tab._err, dt, co["zero"])
        new_state = [ks[-1] if (tab.fsal or self.reuse_last_stage) and ode_only else None]
        dense_info = {"y0": y0, "y1": y1, "k": ks, "state": new_state}
        return y1, y_err, dense_info, new_state, nfe

    # ---- dense output -------------------------------------------------------------------
    def _f1(self, terms, args, t1, dense_info):
        """``f(t1, y1)``: the FSAL stage, or evaluated once and cached as the next step's first stage."""
        if self.tableau.fsal:
            return dense_info["k"][-1], 0
        state = dense_info["state"]
        if state[0] is None:
            y1 = dense_info["y1"]
            tt = torch.as_tensor(t1, dtype=y1.dtype, device=y1.device)
            state[0] = terms.ode(tt, y1, args)
            return state[0], 1
        return state[0], 0

    def dense_eval(self, terms, args, t0, t1, dense_info, theta):
        tab = self.tableau
        y0 = dense_info["y0"]
        dt = t1 - t0
        if tab.dense is not None:
            co = tab.tensors(y0.dtype, y0.device)
            if isinstance(dt, float) and theta.dim() == y0.dim() + 1:
                # joint mode, m times at once: y0 + dt * (theta^p @ P^T) @ K in three fused operations
                m = theta.shape[0]
                powers = theta.reshape(m, 1) ** co["exps"]  # (m, deg + 1)
                K = torch.stack(dense_info["k"]).reshape(len(dense_info["k"]), -1)
                out = torch.addmm(y0.reshape(1, -1), torch.mm(powers, co["denseT"]), K, alpha=dt)
                return out.reshape((m,) + y0.shape), 0
            b = _poly_basis(co["dense"], theta)  # (s, *theta.shape)
            return y0 + _weighted_sum(b, dense_info["k"], y0) * _bcast(dt, y0), 0
        f1, nfe = self._f1(terms, args, t1, dense_info)
        y1, f0 = dense_info["y1"], dense_info["k"][0]
        th = theta
        h00 = (1 + 2 * th) * (1 - th) ** 2
        h10 = th * (1 - th) ** 2
        h01 = th**2 * (3 - 2 * th)
        h11 = th**2 * (th - 1)
        dtb = _bcast(dt, y0)
        return h00 * y0 + h01 * y1 + dtb * (h10 * f0 + h11 * f1), nfe

    def dense_derivative(self, terms, args, t0, t1, dense_info, theta):
        tab = self.tableau
        y0 = dense_info["y0"]
        dt = t1 - t0
        if tab.dense is not None:
            P = tab.tensors(y0.dtype, y0.device)["dense"]
            dP = P[:, 1:] * torch.arange(1, P.shape[1], dtype=P.dtype, device=P.device)
            b = _poly_basis(dP, theta)
            return _weighted_sum(b, dense_info["k"], y0) + 0 * theta, 0
        f1, nfe = self._f1(terms, args, t1, dense_info)
        y1, f0 = dense_info["y1"], dense_info["k"][0]
        th = theta
        dtb = _bcast(dt, y0)
        d00 = 6 * th * (th - 1)
        d10 = (1 - th) * (1 - 3 * th)
        d11 = th * (3 * th - 2)
        return d00 * (y0 - y1) / dtb + d10 * f0 + d11 * f1, nfe


_NUMPY_DTYPES = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}


def _inside_ends(t0, t1, dtype):
    """``t0`` and ``t1`` rounded to ``dtype`` and moved one ulp (of ``dtype``) towards each other."""
    nd = _NUMPY_DTYPES.get(dtype)
    if nd is None:
        ends = torch.tensor([t0, t1], dtype=dtype)
        lo, hi = torch.nextafter(ends, ends.flip(0)).tolist()
        return lo, hi
    a, b = nd(t0), nd(t1)
    return float(np.nextafter(a, b)), float(np.nextafter(b, a))


def _times_tensor(vals, y):
    """A 1-D tensor of the Python floats ``vals`` in the dtype and on the device of ``y``."""
    nd = _NUMPY_DTYPES.get(y.dtype)
    if nd is not None and y.device.type == "cpu":
        return torch.from_numpy(np.array(vals, dtype=nd))
    return torch.tensor(vals, dtype=y.dtype, device=y.device)


def _bcast(dt, y):
    return dt if isinstance(dt, float) else dt.to(y.dtype)


def _poly_basis(P, theta):
    """``(s, *theta.shape)``: every row of ``P`` (ascending powers) evaluated at ``theta``."""
    powers = torch.stack([theta**p for p in range(P.shape[1])])  # (deg+1, *theta.shape)
    return torch.tensordot(P, powers, dims=1)


def _weighted_sum(b, ks, y0):
    """``sum_j b_j * k_j`` with ``b`` of shape ``(s, *theta.shape)``."""
    K = torch.stack(ks)  # (s, *y.shape)
    if b.dim() - 1 > y0.dim():  # joint: theta is (m, 1, ..., 1)
        m = b.shape[1]
        return torch.mm(b.reshape(b.shape[0], m).t(), K.reshape(K.shape[0], -1)).reshape((m,) + y0.shape)
    return (b * K).sum(0)


def _make(name, data, doc):
    tableau = ButcherTableau(**data)
    cls = type(name, (ExplicitRK,), {"tableau": tableau, "__doc__": doc})
    return cls


Euler = _make("Euler", _T.EULER, """Euler's method: order 1, one stage, fixed steps.

``y1 = y0 + dt f(t0, y0)``. Euler (1768), *Institutionum calculi integralis*.
""")
Heun = _make("Heun", _T.HEUN, """Heun's method (explicit trapezoidal rule): order 2 with an embedded Euler step.

``y1 = y0 + dt/2 (k1 + k2)``; adaptive through the Euler error estimate. Heun (1900),
*Z. Math. Phys.* 45.
""")
Midpoint = _make("Midpoint", _T.MIDPOINT, """Explicit midpoint rule: order 2 with an embedded Euler step.

``y1 = y0 + dt f(t0 + dt/2, y0 + dt/2 f(t0, y0))``. Runge (1895), *Math. Ann.* 46.
""")
Ralston = _make("Ralston", _T.RALSTON, """Ralston's second-order method (minimal truncation error), Euler embedded.

Ralston (1962), "Runge--Kutta methods with minimum error bounds", *Math. Comp.* 16.
""")
Heun3 = _make("Heun3", _T.HEUN3, """Heun's third-order method; fixed steps.

Heun (1900), *Z. Math. Phys.* 45.
""")
RK4 = _make("RK4", _T.RK4, """The classical fourth-order Runge--Kutta method; fixed steps.

Kutta (1901), "Beitrag zur naeherungsweisen Integration totaler Differentialgleichungen",
*Z. Math. Phys.* 46.
""")
RK38 = _make("RK38", _T.RK38, """Kutta's 3/8 rule: fourth order, fixed steps.

Kutta (1901), *Z. Math. Phys.* 46.
""")
Fehlberg2 = _make("Fehlberg2", _T.FEHLBERG2, """Fehlberg's RK1(2): second-order solution with a first-order embedded estimate.

Fehlberg (1969), "Low-order classical Runge--Kutta formulas with stepsize control and their
application to some heat transfer problems", NASA TR R-315.
""")
Bosh3 = _make("Bosh3", _T.BOSH3, """Bogacki--Shampine 3(2): third order, embedded second order, FSAL.

Bogacki & Shampine (1989), "A 3(2) pair of Runge--Kutta formulas", *Appl. Math. Lett.* 2(4).
""")
_Dopri5 = _make("Dopri5", _T.DOPRI5, "")
_DOPRI5_SHAMPINE = ButcherTableau(**_T.DOPRI5_SHAMPINE)


class Dopri5(_Dopri5):
    """Dormand--Prince 5(4): fifth order, embedded fourth order, FSAL, 4th-order dense output.

    Dormand & Prince (1980), "A family of embedded Runge--Kutta formulae", *J. Comput. Appl. Math.* 6(1);
    continuous extension from Hairer, Norsett & Wanner, *Solving ODEs I*, II.6.

    Parameters
    ----------
    error_estimate:
        ``"shampine"`` (default): the error is estimated against Shampine's alternative fourth-order
        solution (Shampine (1986), "Some practical Runge--Kutta formulas", *Math. Comp.* 46), as
        torchdiffeq's ``dopri5`` does, so that both take the same steps at the same tolerances.
        ``"dormand-prince"``: the embedded fourth-order solution of the original pair, whose larger
        estimate takes about 5--10% more steps for an error about 1.5 times smaller (the two lie on
        the same work--precision curve). The fifth-order solution is the same.
    """

    def __init__(self, error_estimate: str = "shampine"):
        if error_estimate not in ("dormand-prince", "shampine"):
            raise ValueError(
                f"error_estimate must be 'dormand-prince' or 'shampine'; got {error_estimate!r}."
            )
        self.error_estimate = error_estimate
        self.tableau = _DOPRI5_SHAMPINE if error_estimate == "shampine" else _Dopri5.tableau

    def __repr__(self):
        if self.error_estimate == "dormand-prince":
            return "Dopri5(error_estimate='dormand-prince')"
        return "Dopri5()"


Tsit5 = _make("Tsit5", _T.TSIT5, """Tsitouras 5(4): fifth order, embedded fourth order, FSAL, 4th-order dense output.

Tsitouras (2011), "Runge--Kutta pairs of order 5(4) satisfying only the first column
simplifying assumption", *Comput. Math. Appl.* 62(2).
""")
Dopri8 = _make("Dopri8", _T.DOPRI8, """Prince--Dormand 8(7): eighth order, embedded seventh order, FSAL, sixth-order dense output.

Prince & Dormand (1981), "High order embedded Runge--Kutta formulae", *J. Comput. Appl. Math.* 7(1);
sixth-order dense output from Bogacki & Shampine (1990), "Interpolating high-order Runge--Kutta formulas",
*Comput. Math. Appl.* 20(3).
""")

__all__ = [
    "ButcherTableau", "ExplicitRK", "Euler", "Heun", "Midpoint", "Ralston", "Heun3", "RK4", "RK38",
    "Fehlberg2", "Bosh3", "Dopri5", "Tsit5", "Dopri8",
]
