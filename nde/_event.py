"""Events: stop (or mark) a solve where a condition on the state changes sign.

After every accepted step the loop evaluates the condition at the end of the step. When it has
changed sign, the crossing is located on the step's dense output by the Illinois variant of
regula falsi, to a bracket of a few units in the last place of the time. The event time is made
differentiable by the implicit function theorem: if ``c(t*, y(t*; p)) = 0`` then
``dt*/dp = -(dc/dy . dy/dp) / (dc/dt + dc/dy . dy/dt)``.
"""

from __future__ import annotations

import math

import torch

from ._terms import as_vector_field

_MAX_ITERS = 100


class Event:
    """A condition whose sign change ends (or is recorded during) a solve.

    The event happens where ``cond_fn(t, y, args)`` crosses zero. Every element of the returned
    tensor is a separate condition (in independent batch mode, the trailing elements of each
    sample's row); the event happens at the first crossing of any of them.

    Parameters
    ----------
    cond_fn:
        ``cond_fn(t, y, args)`` or ``cond_fn(t, y)`` returning a tensor: a scalar or any shape in
        joint mode, ``batch_shape`` or ``batch_shape + (k,)`` in independent mode (it receives
        ``t`` and ``y`` as the vector field does).
    direction:
        ``None``: any crossing; ``1``: only from negative to nonnegative (rising); ``-1``: only
        from positive to nonpositive (falling).
    terminal:
        True: the solve stops at the event (each sample at its own in independent mode).
        False: every event time is recorded and the solve goes on.

    Notes
    -----
    The solve reports ``Solution.event_t`` (user time, float64) and ``Solution.event_mask``
    (which samples had an event) and ``Solution.event_y`` (the state at the event). For a
    terminal event both are of shape ``()`` in joint mode or ``batch_shape`` in independent
    mode, the solve's ``result`` is ``RESULTS.event_occurred`` where it happened, the final
    state is the state at the event, and ``SaveAt(ts=...)`` entries after the event hold that
    state too; samples without an event carry ``event_t = t1``. For a non-terminal event they
    have one more trailing dimension, one entry per event (padded with NaN and ``False``).
    A crossing at the very start of the solve (condition exactly zero at ``t0``) is not an
    event. With a direct adjoint the event time is differentiable with respect to ``y0``,
    ``args`` and the parameters, through the implicit function theorem.
    """

    def __init__(self, cond_fn, direction=None, terminal=True):
        if not callable(cond_fn):
            raise TypeError(f"cond_fn must be callable as cond_fn(t, y, args) or cond_fn(t, y); got {type(cond_fn).__name__}.")
        if direction not in (None, 1, -1) or isinstance(direction, bool):
            raise ValueError(f"direction must be None (any crossing), 1 (rising) or -1 (falling); got {direction!r}.")
        if not isinstance(terminal, bool):
            raise TypeError(f"terminal must be True or False; got {terminal!r}.")
        self.cond_fn = cond_fn
        self._fn = as_vector_field(cond_fn, name="event condition cond_fn")
        self.direction = direction
        self.terminal = terminal

    def __repr__(self):
        return f"Event({getattr(self.cond_fn, '__name__', type(self.cond_fn).__name__)}, direction={self.direction}, terminal={self.terminal})"

    # ---- used by the solve loop ------------------------------------------------------------
    def _joint(self, p, y0):
        return _JointTracker(self, p, y0)

    def _independent(self, p, yf, t0_full, tend_full, pad):
        return _IndependentTracker(self, p, yf, t0_full, tend_full, pad)


def _crossed(s_a, s_b, direction):
    if direction is None:
        return (s_a != 0) & (s_b != s_a)
    if direction > 0:
        return (s_a < 0) & (s_b >= 0)
    return (s_a > 0) & (s_b <= 0)


class _Tracker:
    def __init__(self, event, p):
        self.event = event
        self.sign = p.sign
        self.args = p.args
        self.solver = p.solver
        self.terms = p.terms
        self.direction = event.direction

    def cond(self, tau, y):
        t = tau * self.sign if self.sign < 0 else tau
        return self.event._fn(t, y, self.args)

    def dense(self, t_a, t_b, info, theta):
        return self.solver.dense_eval(self.terms, self.args, t_a, t_b, info, theta)

    def slope(self, t_a, t_b, info, theta):
        return self.solver.dense_derivative(self.terms, self.args, t_a, t_b, info, theta)


def _illinois(h, a, fa, b, fb, tol, converged):
    """Vectorised Illinois regula falsi on brackets ``[a, b]`` with ``fa > 0 >= fb``.

    ``h(x) -> values`` evaluates every bracket at once; ``converged(a, b, fb)`` says which are done.
    Returns the right ends ``b`` (where the condition has crossed).
    """
    side = torch.zeros_like(a)
    for _ in range(_MAX_ITERS):
        done = converged(a, b, fb)
        if bool(done.all()):
            break
        denom = fb - fa
        x = torch.where(denom != 0, b - fb * (b - a) / torch.where(denom != 0, denom, torch.ones_like(denom)), 0.5 * (a + b))
        inside = (x > a) & (x < b)
        # fall back to bisection when regula falsi stalls at an end
        x = torch.where(inside & ((b - a) > 2 * tol), x, 0.5 * (a + b))
        fx = h(x)
        right = fx <= 0
        upd = ~done
        # Illinois: halve the stale end's value when the same end moves twice in a row
        fa_new = torch.where(upd & right & (side < 0), fa * 0.5, fa)
        fb_new = torch.where(upd & ~right & (side > 0), fb * 0.5, fb)
        a = torch.where(upd & ~right, x, a)
        fa = torch.where(upd & ~right, fx, fa_new)
        b = torch.where(upd & right, x, b)
        fb = torch.where(upd & right, fx, fb_new)
        side = torch.where(upd, torch.where(right, -torch.ones_like(side), torch.ones_like(side)), side)
    return b


def _total_derivative(cond, tau, y, ydot):
    """``d/dtau cond(tau, y(tau))`` at one point through autograd; None when autograd cannot."""
    try:
        with torch.enable_grad():
            tt = tau.detach().clone().requires_grad_(True)
            yy = y.detach().clone().requires_grad_(True)
            c = cond(tt, yy)
            if not isinstance(c, torch.Tensor) or not c.requires_grad:
                return None
            gt, gy = torch.autograd.grad(c.sum(), (tt, yy), allow_unused=True)
    except RuntimeError:
        return None
    d = torch.zeros_like(c.detach())
    if gt is not None:
        d = d + gt.to(d.dtype).reshape(d.shape) if gt.numel() == d.numel() else d + gt.to(d.dtype).sum()
    if gy is not None:
        prod = (gy * ydot.detach())
        d = d + prod.reshape(d.shape[:1] + (-1,)).sum(-1).reshape(d.shape) if d.dim() > 0 else d + prod.sum()
    return d


class _JointTracker(_Tracker):
    """Event bookkeeping of a joint-mode solve (Python-float time)."""

    def __init__(self, event, p, y0):
        super().__init__(event, p)
        self.ydtype = y0.dtype
        self.device = y0.device
        self.ydim = y0.dim()
        with torch.no_grad():
            self.c_a = self._c(p.t0, y0)
        self.times = []
        self.states = []

    def _c(self, tau, y):
        tt = torch.tensor(tau, dtype=self.ydtype, device=self.device)
        return torch.as_tensor(self.cond(tt, y)).detach().reshape(-1)

    def _theta(self, x):
        return x.to(self.ydtype).reshape((1,) + (1,) * self.ydim)

    def step(self, t_a, t_b, y1, info):
        """After an accepted step: ``(hit, nfe)``; ``hit`` is ``(t_event, y_event)`` for a terminal event."""
        with torch.no_grad():
            c_b = self._c(t_b, y1)
        s_a, s_b = torch.sign(self.c_a), torch.sign(c_b)
        crossed = _crossed(s_a, s_b, self.direction)
        if not bool(crossed.any()):
            self.c_a = c_b
            return None, 0
        nfe = [0]
        dt = t_b - t_a
        sgn = torch.where(crossed, s_a, torch.zeros_like(s_a))
        inf = torch.full_like(c_b, math.inf)

        def hvals(c):
            return torch.where(crossed, sgn * c, inf).min()

        def h(x):
            with torch.no_grad():
                val, n = self.dense(t_a, t_b, info, self._theta(x))
                nfe[0] += n
                return hvals(self._c(t_a + float(x) * dt, val[0])).reshape(1).to(torch.float64)

        f64 = torch.float64
        a = torch.zeros(1, dtype=f64)
        b = torch.ones(1, dtype=f64)
        fa = hvals(self.c_a).to(f64).reshape(1)
        fb = hvals(c_b).to(f64).reshape(1)
        tol = max(4 * torch.finfo(self.ydtype).eps, 4 * 2.0**-52 * max(abs(t_a), abs(t_b), 1e-300) / abs(dt))

        def converged(a_, b_, fb_):
            return ((b_ - a_) <= tol) | (fb_ == 0)

        theta = float(_illinois(h, a, fa, b, fb, tol, converged))
        t_ev, y_ev = self._differentiable(t_a, t_b, info, theta, crossed, sgn, y1, nfe)
        self.c_a = c_b
        if self.event.terminal:
            return (t_ev, y_ev), nfe[0]
        self.times.append(t_ev)
        self.states.append(y_ev)
        return None, nfe[0]

    def _differentiable(self, t_a, t_b, info, theta, crossed, sgn, y1, nfe):
        dt = t_b - t_a
        t_d = t_a + theta * dt
        th = self._theta(torch.tensor(theta, dtype=torch.float64))
        y_d, n = self.dense(t_a, t_b, info, th)
        nfe[0] += n
        y_d = y_d[0]
        t_ev = torch.tensor(t_d, dtype=torch.float64, device=self.device)
        if not torch.is_grad_enabled():
            return t_ev, y_d
        tt = torch.tensor(t_d, dtype=self.ydtype, device=self.device)
        c_all = torch.as_tensor(self.cond(tt, y_d)).reshape(-1)
        if not c_all.requires_grad:  # nothing the event time could depend on
            return t_ev, y_d
        with torch.no_grad():
            k = int(torch.where(crossed, sgn * c_all.detach(), torch.full_like(c_all.detach(), math.inf)).argmin())
            ydot, n = self.slope(t_a, t_b, info, th)
            nfe[0] += n

        def comp(tau, y):
            return torch.as_tensor(self.cond(tau, y)).reshape(-1)[k] * sgn[k]

        D = _total_derivative(comp, tt, y_d, ydot[0])
        if D is None or not bool(torch.isfinite(D)) or float(D) == 0.0:
            return t_ev, y_d
        g = c_all[k] * sgn[k]
        t_ev = t_ev - (g - g.detach()).to(torch.float64) / D.to(torch.float64)
        theta_g = (t_ev - t_a) / dt
        y_ev, n = self.dense(t_a, t_b, info, self._theta(theta_g))
        nfe[0] += n
        return t_ev, y_ev[0]

    def finish(self, sol, hit):
        """Write the event fields of the Solution."""
        sign = self.sign
        if self.event.terminal:
            if hit is not None:
                sol.event_t = hit[0] * sign
                sol.event_y = hit[1]
                sol.event_mask = torch.tensor(True)
            else:
                sol.event_t = torch.tensor(sol.t1 if not isinstance(sol.t1, torch.Tensor) else float(sol.t1), dtype=torch.float64)
                sol.event_y = None
                sol.event_mask = torch.tensor(False)
        else:
            if self.times:
                sol.event_t = torch.stack(self.times) * sign
                sol.event_y = torch.stack(self.states)
            else:
                sol.event_t = torch.zeros(0, dtype=torch.float64)
                sol.event_y = None
            sol.event_mask = torch.ones(len(self.times), dtype=torch.bool)
        return sol


class _IndependentTracker(_Tracker):
    """Event bookkeeping of an independent-mode solve: one event per sample, vectorised."""

    def __init__(self, event, p, yf, t0_full, tend_full, pad):
        super().__init__(event, p)
        self.pad = pad
        self.ydtype = yf.dtype
        self.B = yf.shape[0]
        with torch.no_grad():
            self.c_a = self._c(t0_full, yf)
        self.tend = tend_full
        self.hit_t = []  # (global indices, t_event)
        self.hit_y = []
        self.records = []  # non-terminal: (global indices, t_event, y_event)

    def _tb(self, x):
        return x.reshape((x.shape[0],) + self.pad)

    def _c(self, tau, y):
        c = self.cond(self._tb(tau).to(self.ydtype), y).detach()
        if c.dim() == 0 or c.shape[0] != y.shape[0]:
            raise ValueError(
                f"In independent batch mode the event condition must return one value per sample (shape "
                f"({y.shape[0]},) or ({y.shape[0]}, k)); got shape {tuple(c.shape)}."
            )
        return c.reshape(c.shape[0], -1)

    def step(self, widx, accept, t_a, t_b, y1, info):
        """After a step: ``(hit_mask | None, t_event, y_event, nfe)`` for the working samples."""
        with torch.no_grad():
            c_b = self._c(t_b, y1)
        c_a = self.c_a[widx]
        s_a, s_b = torch.sign(c_a), torch.sign(c_b)
        crossed = _crossed(s_a, s_b, self.direction) & accept.unsqueeze(1)
        any_c = crossed.any(1)
        self.c_a[widx] = torch.where(accept.unsqueeze(1), c_b, c_a)
        if not bool(any_c.any()):
            return None, None, None, 0
        nfe = [0]
        dt = torch.where(t_b > t_a, t_b - t_a, torch.ones_like(t_a))
        sgn = torch.where(crossed, s_a, torch.zeros_like(s_a))
        f64 = torch.float64

        def hvals(c):
            return torch.where(crossed, sgn * c, torch.full_like(c, math.inf)).min(1).values.to(f64)

        def dense(x):
            val, n = self.dense(self._tb(t_a), self._tb(t_b), info, self._tb(x).to(self.ydtype))
            nfe[0] += n
            return val

        def h(x):
            with torch.no_grad():
                return torch.where(any_c, hvals(self._c(t_a + x * dt, dense(x))), -torch.ones_like(x))

        a = torch.zeros_like(t_a)
        b = torch.ones_like(t_a)
        fa = torch.where(any_c, hvals(c_a), torch.ones_like(t_a))
        fb = torch.where(any_c, hvals(c_b), -torch.ones_like(t_a))
        eps = torch.finfo(self.ydtype).eps
        tol = torch.clamp(4 * 2.0**-52 * torch.maximum(t_a.abs(), t_b.abs()) / dt, min=4 * eps)

        def converged(a_, b_, fb_):
            return ~any_c | ((b_ - a_) <= tol) | (fb_ == 0)

        theta = _illinois(h, a, fa, b, fb, tol, converged)
        t_d = t_a + theta * (t_b - t_a)
        t_ev, y_ev = t_d, dense(theta)
        if torch.is_grad_enabled():
            t_ev, y_ev = self._differentiable(t_a, t_b, info, theta, t_d, y_ev, crossed, sgn, any_c, dense)
        idx = widx[any_c]
        if self.event.terminal:
            self.hit_t.append((idx, t_ev[any_c]))
            self.hit_y.append(y_ev[any_c])
            return any_c, t_d.detach(), y_ev, nfe[0]
        self.records.append((idx, t_ev[any_c], y_ev[any_c]))
        return None, None, None, nfe[0]

    def _differentiable(self, t_a, t_b, info, theta, t_d, y_d, crossed, sgn, any_c, dense):
        tt = self._tb(t_d).to(self.ydtype)
        c_all = self.cond(tt, y_d)
        if not (isinstance(c_all, torch.Tensor) and c_all.requires_grad):
            return t_d, y_d
        with torch.no_grad():
            c_d = c_all.detach().reshape(c_all.shape[0], -1)
            k = torch.where(crossed, sgn * c_d, torch.full_like(c_d, math.inf)).argmin(1, keepdim=True)
            ydot, _ = self.slope(self._tb(t_a), self._tb(t_b), info, self._tb(theta).to(self.ydtype))
            sk = sgn.gather(1, k).squeeze(1)

        def comp(tau, y):
            c = self.cond(tau, y)
            return c.reshape(c.shape[0], -1).gather(1, k).squeeze(1) * sk

        D = _total_derivative(comp, tt, y_d, ydot)
        if D is None:
            return t_d, y_d
        D = D.to(torch.float64)
        ok = any_c & torch.isfinite(D) & (D != 0)
        g = (c_all.reshape(c_all.shape[0], -1).gather(1, k).squeeze(1) * sk).to(torch.float64)
        corr = torch.where(ok, (g - g.detach()) / torch.where(ok, D, torch.ones_like(D)), torch.zeros_like(D))
        t_ev = t_d - corr
        theta_g = (t_ev - t_a) / torch.where(t_b > t_a, t_b - t_a, torch.ones_like(t_a))
        return t_ev, dense(theta_g)

    def after_save(self, ys_ts, ts_ptr, widx, hit, y_ev):
        """Fill the saved outputs after a terminal event with the state at the event."""
        if ys_ts is None:
            return ys_ts
        n_ts = ys_ts.shape[0]
        gl = widx[hit]
        ptr = ts_ptr[gl]
        later = torch.arange(n_ts, device=ptr.device).unsqueeze(1) >= ptr.unsqueeze(0)  # (n_ts, k)
        if not bool(later.any()):
            return ys_ts
        ti, ki = later.nonzero(as_tuple=True)
        return ys_ts.index_put((ti, gl[ki]), y_ev[hit][ki])

    def finish(self, sol, bshape, y0):
        f64 = torch.float64
        B = self.B
        if self.event.terminal:
            et = self.tend.clone() * 1.0
            mask = torch.zeros(B, dtype=torch.bool)
            ey = None
            if self.hit_t:
                idx = torch.cat([i for i, _ in self.hit_t])
                vals = torch.cat([v for _, v in self.hit_t]).to(f64)
                et = et.index_put((idx,), vals)
                mask[idx.cpu()] = True
                ey = y0.reshape((B,) + y0.shape[len(bshape):]).detach() * 0
                ey = ey.index_put((idx,), torch.cat(self.hit_y))
                ey = ey.reshape(y0.shape)
            sol.event_t = et.reshape(bshape) * self.sign
            sol.event_mask = mask.reshape(bshape)
            sol.event_y = ey
            return sol
        counts = torch.zeros(B, dtype=torch.long)
        for idx, _, _ in self.records:
            counts[idx.cpu()] += 1
        K = int(counts.max()) if B else 0
        et = torch.full((B, K), math.nan, dtype=f64)
        ey = y0.new_full((B, K) + tuple(y0.shape[len(bshape):]), math.nan)
        mask = torch.zeros(B, K, dtype=torch.bool)
        fill = torch.zeros(B, dtype=torch.long)
        for idx, t_ev, y_ev in self.records:
            ic = idx.cpu()
            col = fill[ic]
            et = et.index_put((ic, col), t_ev.to(f64).cpu())
            ey = ey.index_put((idx, col.to(idx.device)), y_ev)
            mask[ic, col] = True
            fill[ic] += 1
        sol.event_t = et.reshape(bshape + (K,)) * self.sign
        sol.event_mask = mask.reshape(bshape + (K,))
        sol.event_y = ey.reshape(bshape + (K,) + tuple(y0.shape[len(bshape):]))
        return sol


class ImplicitEventTime(torch.autograd.Function):
    """Give an event time computed without a graph the gradient of the implicit function theorem.

    Inputs ``(vf, cond, t_event, y_at_t_event)``, where ``y_at_t_event`` is the solution at the
    (fixed) time ``t_event`` with its graph; outputs ``(t_event, y_event)``. With ``c(t*, y(t*)) = 0``
    and ``D = dc/dt + dc/dy . f``, the gradients ``g_t, g_y`` of the outputs become the gradient
    ``g_y - (g_t + g_y . f) dc/dy / D`` of the state at the fixed time.
    """

    @staticmethod
    def forward(ctx, vf, cond, t_event, y):
        ctx.vf, ctx.cond = vf, cond
        ctx.save_for_backward(t_event, y)
        return t_event.detach().clone(), y.detach().clone()

    @staticmethod
    def backward(ctx, g_t, g_y):
        t_event, y = ctx.saved_tensors
        tt = t_event.detach().to(y.dtype)
        with torch.enable_grad():
            t_ = tt.clone().requires_grad_(True)
            y_ = y.detach().clone().requires_grad_(True)
            c = ctx.cond(t_, y_)
            dc_dt, dc_dy = torch.autograd.grad(c, (t_, y_), allow_unused=True)
        with torch.no_grad():
            f = ctx.vf(tt, y.detach())
            dc_dt = torch.zeros((), dtype=y.dtype, device=y.device) if dc_dt is None else dc_dt
            dc_dy = torch.zeros_like(y) if dc_dy is None else dc_dy
            D = dc_dt + (dc_dy * f).sum()
            g_y = torch.zeros_like(y) if g_y is None else g_y
            g_t = torch.zeros((), dtype=y.dtype, device=y.device) if g_t is None else g_t.to(y.dtype)
            total = g_t + (g_y * f).sum()
            return None, None, None, g_y - dc_dy * (total / D)
