"""Step-size controllers: how big the next step is.

Two code paths share each controller: joint mode works on Python floats (one host sync a step,
for the error norm), independent mode on float64 NumPy arrays holding one time per sample (on the
host, where an operation on a few hundred numbers costs a fraction of a small tensor operation; the
error norms are the only per-sample numbers that come from the state's device, once a step).
"""

from __future__ import annotations

import bisect
import math

import numpy as np
import torch


class AbstractController:
    """Decides the first step and, after each step, whether to accept it and the next step."""

    adaptive = False

    def init_joint(self, terms, t0, t1, y0, dt0, args, solver):
        raise NotImplementedError

    def adapt_joint(self, t0, t1, y0, y1, y_err, state):
        raise NotImplementedError


def _check_dt0(dt0, t0, t1):
    if isinstance(dt0, torch.Tensor):
        if dt0.numel() != 1:
            raise ValueError(f"dt0 must be a scalar; got a tensor of shape {tuple(dt0.shape)}.")
        dt0 = float(dt0.detach())
    dt0 = float(dt0)
    if not math.isfinite(dt0) or dt0 == 0.0:
        raise ValueError(f"dt0 must be finite and nonzero; got {dt0}.")
    if (t1 - t0) * dt0 < 0:
        raise ValueError(f"dt0={dt0} points away from t1: its sign must be that of t1 - t0 = {t1 - t0}.")
    return abs(dt0)


class _Jumps:
    """The term's jump times in float64, as a sorted list (joint mode) and a tensor (independent mode)."""

    def __init__(self, jump_ts, device=None, dtype=torch.float64):
        self.tensor = torch.unique(torch.as_tensor(jump_ts, dtype=torch.float64).detach().reshape(-1).to(device))
        self.array = self.tensor.cpu().numpy()
        self.list = self.array.tolist()
        self.clip = True
        # times closer than the rounding of the state's dtype are one time to the solver's stages
        self.eps = max(torch.finfo(dtype).eps, torch.finfo(torch.float64).eps)


def _term_jumps(terms, device=None, dtype=torch.float64):
    j = getattr(terms, "jump_ts", None)
    if j is None:
        return None
    jumps = _Jumps(j, device, dtype)
    return jumps if jumps.list else None


def _snap_tol(dt0, start, t, eps):
    """How close a step end must be to a jump time to be moved onto it: rounding, not a real gap."""
    return min(1e-9 * dt0 + 16 * eps * max(abs(start), abs(t)), 0.25 * dt0)


def _next_end(jumps, t, target, tol):
    """The end of the step from ``t`` towards the grid point ``target`` (joint mode, floats).

    ``target`` is moved onto a jump time within ``tol`` of it; a jump time inside the step ends the
    step there instead. Returns ``(end, clipped)``.
    """
    ts = jumps.list
    i = bisect.bisect_left(ts, target)
    for j in (i, i - 1):
        if 0 <= j < len(ts) and abs(ts[j] - target) <= tol:
            target = ts[j]
            break
    if not jumps.clip:
        return target, False
    j = bisect.bisect_right(ts, t + tol)
    if j < len(ts) and ts[j] < target - tol:
        return ts[j], True
    return target, False


def _next_end_batch(jumps, t, target, dt0, start):
    """:func:`_next_end` with one time a sample (float64 NumPy arrays)."""
    ts = jumps.array
    last = ts.size - 1
    scale = np.maximum(np.maximum(np.abs(start), np.abs(target)), np.abs(t))
    tol = np.minimum(1e-9 * dt0 + 16 * jumps.eps * scale, 0.25 * dt0)
    i = np.searchsorted(ts, target)
    hi, lo = ts[np.minimum(i, last)], ts[np.maximum(i - 1, 0)]
    near = np.where(np.abs(hi - target) <= np.abs(target - lo), hi, lo)
    target = np.where(np.abs(near - target) <= tol, near, target)
    if not jumps.clip:
        return target, np.zeros(target.shape, dtype=bool)
    j = np.searchsorted(ts, t + tol, side="right")
    cand = ts[np.minimum(j, last)]
    clipped = (j <= last) & (cand < target - tol)
    return np.where(clipped, cand, target), clipped


def host_times(x, shape):
    """Per-sample times or step sizes (a number, or a tensor or array of ``shape``) as a new float64
    NumPy array of ``shape``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.array(np.broadcast_to(np.asarray(x, dtype=np.float64), shape))


def device_times(x, like):
    """A NumPy array of per-sample times (or a mask) as a tensor on ``like``'s device (no copy on the CPU)."""
    t = torch.from_numpy(x)
    return t if like.device.type == "cpu" else t.to(like.device)


class ConstantStepSize(AbstractController):
    """Fixed steps of size ``dt0`` (the last step is shortened to land on ``t1``).

    Steps also end on the jump times of the terms (the knots of a control path, the window
    boundaries of a log-ODE): a step that would cross one ends on it, and the next one continues
    to the grid point ``t0 + n dt0`` it was heading for. Grid points within rounding of a jump time
    are moved exactly onto it. A solver's stages at a step's ends then see the path from inside
    the step, forwards and backwards in time; steps aligned with the knots are unchanged.

    Parameters
    ----------
    land_on_jumps:
        Whether steps end on the terms' jump times (default). ``False`` takes the grid
        ``t0 + n dt0`` whatever the path (steps then cross knots, and the solution is first-order
        accurate there), still moving grid points within rounding of a knot onto it.
    """

    def __init__(self, land_on_jumps: bool = True):
        self.land_on_jumps = bool(land_on_jumps)

    def _jumps(self, terms, y0, device=None):
        jumps = _term_jumps(terms, device, y0.dtype)
        if jumps is not None:
            jumps.clip = getattr(self, "land_on_jumps", True)  # subclasses need not call __init__
        return jumps

    def init_joint(self, terms, t0, t1, y0, dt0, args, solver, error_order=None):
        if dt0 is None:
            raise ValueError("ConstantStepSize needs a step size: pass dt0=... to nde.solve.")
        dt0 = _check_dt0(dt0, t0, t1)
        jumps = self._jumps(terms, y0)
        first, clipped = t0 + dt0, False
        if jumps is not None:
            first, clipped = _next_end(jumps, t0, first, _snap_tol(dt0, t0, first, jumps.eps))
        return min(first, t1), (dt0, t0, 1, jumps, clipped), 0

    def adapt_joint(self, t0, t1, y0, y1, y_err, state):
        dt0, start, m, jumps, clipped = state
        if not clipped:
            m = m + 1
        # count grid points from the start so that long solves do not accumulate rounding in t
        nxt = start + m * dt0
        if jumps is not None:
            nxt, clipped = _next_end(jumps, t1, nxt, _snap_tol(dt0, start, nxt, jumps.eps))
        return True, t1, nxt, False, (dt0, start, m, jumps, clipped), 0.0

    def init_batch(self, terms, t0, t1, y0, dt0, args, solver, norm_fn, error_order=None):
        if dt0 is None:
            raise ValueError("ConstantStepSize needs a step size: pass dt0=... to nde.solve.")
        dt0 = np.abs(host_times(dt0, t0.shape))
        if not (np.isfinite(dt0).all() and (dt0 > 0).all()):
            raise ValueError("dt0 must be finite and nonzero for every sample.")
        jumps = self._jumps(terms, y0, y0.device)
        first = t0 + dt0
        clipped = np.zeros(t0.shape, dtype=bool)
        if jumps is not None:
            first, clipped = _next_end_batch(jumps, t0, first, dt0, t0)
        return np.minimum(first, t1), (dt0, t0.copy(), np.ones(t0.shape), jumps, clipped), 0

    def adapt_batch(self, t0, t1, y0, y1, y_err, state, norm_fn):
        dt0, start, m, jumps, clipped = state
        m = np.where(clipped, m, m + 1)
        nxt = start + m * dt0
        if jumps is not None:
            nxt, clipped = _next_end_batch(jumps, t1, nxt, dt0, start)
        return np.ones(t0.shape, dtype=bool), t1, nxt, (dt0, start, m, jumps, clipped), None

    def __repr__(self):
        return "ConstantStepSize()" if self.land_on_jumps else "ConstantStepSize(land_on_jumps=False)"


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Root mean square of all elements."""
    return torch.linalg.vector_norm(x) / math.sqrt(max(x.numel(), 1))


class PIDController(AbstractController):
    """Adaptive step sizes from an embedded error estimate (PI/PID control).

    A step is accepted when ``norm(y_err / (atol + rtol * max(|y0|, |y1|))) <= 1``. The next step is
    ``dt * clip(safety * e_n^(-b1) * e_{n-1}^(-b2) * e_{n-2}^(-b3), factormin, factormax)`` with
    ``b1 = (pcoeff + icoeff + dcoeff) / q``, ``b2 = -(pcoeff + 2 dcoeff) / q``, ``b3 = dcoeff / q``,
    ``q`` the solver's error order; an accepted step never shrinks the next one. The defaults give an
    integral (I) controller. With ``dt0=None`` the first step follows Hairer, Norsett & Wanner,
    *Solving ODEs I*, II.4. Söderlind (2002), "Automatic control and adaptive time-stepping",
    *Numer. Algorithms* 31.

    Parameters
    ----------
    rtol, atol:
        Relative and absolute tolerances (``atol`` may be a tensor broadcastable against y).
    pcoeff, icoeff, dcoeff:
        PID coefficients.
    norm:
        Error norm ``norm(x) -> scalar``, default RMS. In independent mode it is applied per sample.
    dtmin, dtmax:
        Bounds on the step size; a rejected step that would go below ``dtmin`` ends the solve with
        ``dt_underflow`` (unless ``force_dtmin=True``, which accepts it).
    factormin, factormax, safety:
        Bounds on the change of step size, and the safety factor.
    step_ts:
        Times the steps must land on.
    jump_ts:
        Times of discontinuities of the vector field: steps land on them and restart (no FSAL).
    """

    adaptive = True

    def __init__(self, rtol=1e-3, atol=1e-6, pcoeff=0.0, icoeff=1.0, dcoeff=0.0, norm=None, dtmin=None,
                 dtmax=None, factormin=0.2, factormax=10.0, safety=0.9, step_ts=None, jump_ts=None,
                 force_dtmin=False):
        for name, v in (("rtol", rtol), ("factormin", factormin), ("factormax", factormax), ("safety", safety)):
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite nonnegative number; got {v!r}.")
        if isinstance(atol, torch.Tensor):
            if not bool(torch.isfinite(atol).all()) or bool((atol < 0).any()):
                raise ValueError("atol must be finite and nonnegative.")
        elif not isinstance(atol, (int, float)) or not math.isfinite(atol) or atol < 0:
            raise ValueError(f"atol must be a finite nonnegative number or tensor; got {atol!r}.")
        if not isinstance(atol, torch.Tensor) and rtol == 0 and atol == 0:
            raise ValueError("rtol and atol cannot both be zero: no step could ever be accepted.")
        if factormin > 1 or factormax < 1:
            raise ValueError(f"Need factormin <= 1 <= factormax; got factormin={factormin}, factormax={factormax}.")
        self.rtol = float(rtol)
        self.atol = atol if isinstance(atol, torch.Tensor) else float(atol)
        self.pcoeff, self.icoeff, self.dcoeff = float(pcoeff), float(icoeff), float(dcoeff)
        self.norm = norm
        self.dtmin = None if dtmin is None else abs(float(dtmin))
        self.dtmax = None if dtmax is None else abs(float(dtmax))
        self.factormin, self.factormax, self.safety = float(factormin), float(factormax), float(safety)
        self.step_ts = _sorted_times(step_ts, "step_ts")
        self.jump_ts = _sorted_times(jump_ts, "jump_ts")
        self.force_dtmin = bool(force_dtmin)

    def __repr__(self):
        return f"PIDController(rtol={self.rtol}, atol={self.atol})"

    # ---- shared pieces -------------------------------------------------------------------
    def _scaled(self, y0, y1, y_err):
        atol = self.atol
        if isinstance(atol, torch.Tensor):
            atol = atol.to(y0.dtype)
        scale = torch.maximum(y0.abs(), y1.abs()).mul_(self.rtol).add_(atol)
        return y_err / scale

    def _plain(self):
        """Scalar tolerances with rtol > 0 and the RMS norm: the joint fast paths apply."""
        return self.norm is None and isinstance(self.rtol, float) and self.rtol > 0 and not isinstance(
            self.atol, torch.Tensor)

    def _const(self, value, y):
        """``value`` as a 0-d tensor of ``y``'s dtype and device, built once: an operation with it costs
        less than with a Python number, which is converted to a tensor first (half the time of a
        small elementwise operation)."""
        key = (value, y.dtype, y.device)
        cache = self.__dict__.setdefault("_consts", {})
        c = cache.get(key)
        if c is None:
            c = cache[key] = torch.tensor(value, dtype=y.dtype, device=y.device)
        return c

    def _ratio(self, y):
        """``atol / rtol`` as a 0-d tensor of ``y``'s dtype and device."""
        return self._const(self.atol / self.rtol, y)

    def _error_norm(self, y0, y1, y_err, abs_y0=None):
        """The scaled error norm of one joint step, as a Python float (the one host sync of a step),
        and ``|y1|`` when it was computed (None otherwise); ``abs_y0`` is ``|y0|`` if already known."""
        if not self._plain():
            scaled = self._scaled(y0, y1, y_err)
            if self.norm is not None:
                return float(self.norm(scaled)), None
            return float(torch.linalg.vector_norm(scaled)) / math.sqrt(max(scaled.numel(), 1)), None
        # err / (atol + rtol m) = (err / (m + atol / rtol)) / rtol, with m = max(|y0|, |y1|): one pass
        # fewer, and |y1| is the next step's |y0|
        abs_y1 = y1.abs()
        m = torch.maximum(y0.abs() if abs_y0 is None else abs_y0, abs_y1).add_(self._ratio(y1))
        m = torch.div(y_err, m, out=m)
        n = math.sqrt(max(m.numel(), 1))
        return float(torch.linalg.vector_norm(m)) / (n * self.rtol), abs_y1

    def _betas(self, q):
        return ((self.pcoeff + self.icoeff + self.dcoeff) / q, -(self.pcoeff + 2 * self.dcoeff) / q, self.dcoeff / q)

    def _initial_dt(self, terms, t0, t1, y0, args, q, norm_per, f0=None):
        """Hairer--Norsett--Wanner's starting step; returns ``(dt, nfe)``.

        Joint mode (``t0`` a Python float): every norm is synced to the host once and the rest is
        arithmetic on Python floats, ``dt`` a float. Independent mode (``t0`` a NumPy array): one
        entry a sample, the norms brought to the host once each and ``dt`` a NumPy array.
        """
        if not terms.is_ode:
            raise ValueError("An adaptive solve of this equation needs a first step: pass dt0=... to nde.solve.")
        f = terms.ode
        atol = self.atol.to(y0.dtype) if isinstance(self.atol, torch.Tensor) else self.atol
        joint = isinstance(t0, float)
        pad = (1,) * (y0.dim() - 1)
        if joint:
            tt0 = torch.tensor(t0, dtype=y0.dtype, device=y0.device)

            def norm(x):
                return float(norm_per(x))
        else:  # per-sample times, broadcastable against y0 as everywhere else in independent mode
            tt0 = device_times(t0, y0).to(y0.dtype).reshape(t0.shape + pad)

            def norm(x):
                return norm_per(x).to("cpu", torch.float64).numpy()
        nfe = 2 if f0 is None else 1
        with torch.no_grad():
            f0 = f(tt0, y0, args) if f0 is None else f0.detach()
            scale = y0.abs() * self.rtol + atol
            d0 = norm(y0 / scale)
            d1 = norm(f0 / scale)
            if joint:
                h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
                y1 = torch.add(y0, f0, alpha=h0)
                tt1 = torch.tensor(t0 + h0, dtype=y0.dtype, device=y0.device)
            else:
                with np.errstate(all="ignore"):
                    h0 = np.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
                h0b = device_times(h0, y0).to(y0.dtype).reshape(h0.shape + pad)
                y1 = torch.addcmul(y0, h0b, f0)
                tt1 = tt0 + h0b
            f1 = f(tt1, y1, args)
            d2 = norm((f1 - f0) / scale) / h0
        if joint:
            dmax = max(d1, d2)
            return min(100 * h0, max(h0 * 1e-3, 1e-6) if dmax <= 1e-15 else (0.01 / dmax) ** (1.0 / q)), nfe
        dmax = np.maximum(d1, d2)
        with np.errstate(all="ignore"):
            h1 = np.where(dmax <= 1e-15, np.maximum(h0 * 1e-3, 1e-6), (0.01 / dmax) ** (1.0 / q))
        return np.minimum(100 * h0, h1), nfe

    # ---- joint mode (Python floats) ------------------------------------------------------
    def init_joint(self, terms, t0, t1, y0, dt0, args, solver, error_order=None, f0=None):
        """First step; ``f0``, when given, is ``f(t0, y0)`` already evaluated by the solver."""
        q = error_order
        if q is None:
            raise ValueError(
                f"{type(solver).__name__} has no error estimate, so it cannot be used with PIDController; "
                "use ConstantStepSize() with dt0=..., or an adaptive solver such as Tsit5()."
            )
        self._q = q
        nfe = 0
        if dt0 is None:
            dt, nfe = self._initial_dt(terms, t0, t1, y0, args, q, self.norm or rms_norm, f0)
        else:
            dt = _check_dt0(dt0, t0, t1)
        dt = self._clip_dt(dt)
        return self._next_t1(t0, t0 + dt, t1), (1.0, 1.0, q), nfe

    def _clip_dt(self, dt):
        if self.dtmax is not None:
            dt = min(dt, self.dtmax)
        if self.dtmin is not None and self.force_dtmin:
            dt = max(dt, self.dtmin)
        return dt

    def _next_t1(self, t0, t1, t_end):
        # land on step_ts / jump_ts that lie inside (t0, t1)
        for ts in (self.step_ts, self.jump_ts):
            if ts:
                i = bisect.bisect_right(ts, t0)
                if i < len(ts) and ts[i] < t1:
                    t1 = ts[i]
        return min(t1, t_end)

    def adapt_joint(self, t0, t1, y0, y1, y_err, state):
        """Returns ``(accept, next_t0, next_t1, made_jump, state, error_norm)``."""
        prev1, prev2, q = state[:3]
        # |y| of the state the last call ended on, which is this step's y0 when it is the same tensor
        abs_y0 = state[3][1] if len(state) > 3 and state[3] is not None and state[3][0] is y0 else None
        if torch.is_grad_enabled():
            with torch.no_grad():
                err, abs_y1 = self._error_norm(y0, y1, y_err, abs_y0)
        else:
            err, abs_y1 = self._error_norm(y0, y1, y_err, abs_y0)
        dt = t1 - t0
        if not math.isfinite(err):
            accept = False
            factor = self.factormin
        else:
            accept = err <= 1.0
            if not accept and self.force_dtmin and self.dtmin is not None and dt <= self.dtmin * (1 + 1e-9):
                accept = True  # already at the smallest step allowed: take it
            b1, b2, b3 = self._betas(q)
            if err == 0.0:
                factor = self.factormax
            else:
                factor = self.safety * err ** (-b1)
                if b2 != 0.0:
                    factor *= prev1 ** (-b2)
                if b3 != 0.0:
                    factor *= prev2 ** (-b3)
            factor = min(max(factor, 1.0 if accept else self.factormin), self.factormax)
        new_dt = self._clip_dt(dt * factor)
        if accept:
            made_jump = bool(self.jump_ts) and _hits(self.jump_ts, t1)
            state = (max(err, 1e-10), prev1, q, None if abs_y1 is None else (y1, abs_y1))
            return True, t1, t1 + new_dt, made_jump, state, err
        if abs_y0 is None and len(state) > 3:
            state = state[:3] + (None,)
        return False, t0, t0 + new_dt, False, state, err

    # ---- independent mode (NumPy arrays, one entry a sample) ------------------------------
    def init_batch(self, terms, t0, t1, y0, dt0, args, solver, norm_fn, error_order=None, f0=None):
        q = error_order
        if q is None:
            raise ValueError(
                f"{type(solver).__name__} has no error estimate, so it cannot be used with PIDController; "
                "use ConstantStepSize() with dt0=..., or an adaptive solver such as Tsit5()."
            )
        nfe = 0
        if dt0 is None:
            dt, nfe = self._initial_dt(terms, t0, t1, y0, args, q, norm_fn, f0)
        else:
            dt = np.abs(host_times(dt0, t0.shape))
        if self.dtmax is not None:
            dt = np.minimum(dt, self.dtmax)
        ones = np.ones(t0.shape)
        return self._next_t1_batch(t0, t0 + dt, t1), (ones, ones, q), nfe

    def _next_t1_batch(self, t0, t1, t_end):
        for ts in (self.step_ts, self.jump_ts):
            if ts:
                tst = np.array(ts + [math.inf])
                cand = tst[np.searchsorted(tst[:-1], t0, side="right")]
                t1 = np.where(cand < t1, cand, t1)
        return np.minimum(t1, t_end)

    def _error_batch(self, y0, y1, y_err, norm_fn):
        """The scaled error norm of every sample (leading dimension), as float64 NumPy."""
        if not self._plain():
            return norm_fn(self._scaled(y0, y1, y_err)).to("cpu", torch.float64).numpy()
        # as _error_norm: err / (atol + rtol m) = (err / (m + atol / rtol)) / rtol, one pass fewer
        m = torch.maximum(y0.abs(), y1.abs()).add_(self._ratio(y1))
        m = torch.div(y_err, m, out=m).reshape(m.shape[0], -1)
        err = torch.linalg.vector_norm(m, dim=1).to("cpu", torch.float64).numpy()
        return err * (1.0 / (math.sqrt(max(m.shape[1], 1)) * self.rtol))

    def _err_floor(self, b1):
        """The error below which integral control takes ``factormax`` anyway: the errors are raised to
        it, so that ``err ** -b1`` stays finite."""
        if b1 > 0 and self.safety > 0:
            return max(0.5 * (self.factormax / self.safety) ** (-1.0 / b1), 1e-300)
        return 1e-300

    def adapt_batch(self, t0, t1, y0, y1, y_err, state, norm_fn):
        prev1, prev2, q = state
        b1, b2, b3 = self._betas(q)
        if torch.is_grad_enabled():  # the error estimate is not differentiated
            with torch.no_grad():
                err = self._error_batch(y0, y1, y_err, norm_fn)
        else:
            err = self._error_batch(y0, y1, y_err, norm_fn)
        dt = t1 - t0
        # NaN and inf compare false: a non-finite error rejects the step
        accept = err <= 1.0
        if self.force_dtmin and self.dtmin is not None:
            accept = accept | (np.isfinite(err) & (dt <= self.dtmin * (1 + 1e-9)))
        lo = np.where(accept, 1.0, self.factormin)  # an accepted step never shrinks the next one
        if b2 == 0.0 and b3 == 0.0:
            # integral control: an error below the floor (0 included) gives factormax, inf gives 0 and
            # NaN (kept by maximum, dropped by fmax) gives lo (both then factormin: the step is rejected)
            factor = np.minimum(np.fmax(self.safety * np.maximum(err, self._err_floor(b1)) ** -b1, lo), self.factormax)
            new_state = state
        else:
            finite = np.isfinite(err)
            safe_err = np.maximum(np.where(finite, err, 1.0), 1e-10)
            factor = self.safety * safe_err ** -b1
            if b2 != 0.0:
                factor = factor * prev1 ** -b2
            if b3 != 0.0:
                factor = factor * prev2 ** -b3
            factor = np.where(err == 0, self.factormax, factor)
            factor = np.where(finite, np.minimum(np.maximum(factor, lo), self.factormax), self.factormin)
            new_state = (np.where(accept, safe_err, prev1), np.where(accept, prev1, prev2), q)
        new_dt = dt * factor
        if self.dtmax is not None:
            new_dt = np.minimum(new_dt, self.dtmax)
        if self.dtmin is not None and self.force_dtmin:
            new_dt = np.maximum(new_dt, self.dtmin)
        next_t0 = np.where(accept, t1, t0)
        return accept, next_t0, next_t0 + new_dt, new_state, err


def _hits(ts, t):
    i = bisect.bisect_left(ts, t)
    return i < len(ts) and ts[i] == t


def _sorted_times(ts, name):
    if ts is None:
        return []
    vals = torch.as_tensor(ts, dtype=torch.float64).reshape(-1)
    if not bool(torch.isfinite(vals).all()):
        raise ValueError(f"{name} must be finite.")
    return sorted(set(vals.tolist()))
