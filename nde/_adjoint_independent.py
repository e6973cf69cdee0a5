"""The adjoints in independent batch mode.

Every sample has its own accepted steps. The recorded steps are replayed in lockstep: step ``i`` of
every sample at once, with per-sample times; samples with fewer steps take masked zero-length steps,
which leave their state untouched. For row-independent vector fields (the premise of independent
mode) each sample sees exactly the operations of the forward solve, so the gradients are those of
:class:`~nde.DirectAdjoint`.
"""

from __future__ import annotations

import math

import torch

from ._adjoint_common import assemble_grads, flatten_state, map_state, run_with_function


def _where_state(mask, new, old, tb):
    """``new`` where ``mask`` (per sample) else ``old``: exactly the loop's rule for solver states."""
    from ._solve import _tree_where

    return _tree_where(mask, new, old)


def _unflatten_like(template, tensors):
    it = iter(tensors)

    def rec(s):
        if isinstance(s, torch.Tensor):
            return next(it)
        if isinstance(s, list):
            return [rec(x) for x in s]
        if isinstance(s, tuple):
            return tuple(rec(x) for x in s)
        if isinstance(s, dict):
            return {k: rec(s[k]) for k in sorted(s)}
        return s

    return rec(template)


class _IndependentRecorder:
    """Accepted steps of every sample, and each sample's final state (O(1) memory in the steps)."""

    def __init__(self, y0f, state0):
        self.recs = []
        self.y = y0f.clone()
        self.template = state0
        self.state = [x.clone() for x in flatten_state(state0)]

    def __call__(self, widx, accept, t, tn, y, state):
        if not bool(accept.any()):
            return
        g = widx[accept]
        self.recs.append((g, tn[accept]))
        self.y[g] = y[accept]
        flat = flatten_state(state)
        if len(flat) != len(self.state):
            self.state = [torch.zeros((self.y.shape[0],) + x.shape[1:], dtype=x.dtype, device=x.device) for x in flat]
            self.template = state
        for buf, x in zip(self.state, flat):
            buf[g] = x[accept]

    def times(self, t0_full):
        B = t0_full.shape[0]
        cnt = torch.zeros(B, dtype=torch.long, device=t0_full.device)
        cols = []
        for g, tn in self.recs:
            cols.append((g, cnt[g].clone(), tn))
            cnt[g] += 1
        nmax = int(cnt.max()) if B else 0
        T = t0_full.unsqueeze(1).repeat(1, nmax + 1)
        for g, c, tn in cols:
            T[g, c + 1] = tn
        idx = torch.arange(nmax + 1, device=T.device).unsqueeze(0)
        T = torch.where(idx > cnt.unsqueeze(1), T.gather(1, cnt.unsqueeze(1)), T)
        return T, cnt


class _IndependentRunner:
    """Forward solve with recording, and the lockstep replay used by every independent-mode adjoint."""

    def __init__(self, adjoint, problem, kind, params, t_in):
        self.adj, self.p, self.kind, self.params, self.t_in = adjoint, problem, kind, params, t_in
        self.solution = None
        p = problem
        nb = p.batch_ndim
        self.bshape = tuple(p.y0.shape[:nb])
        self.B = math.prod(self.bshape)
        self.ev = tuple(p.y0.shape[nb:])
        self.pad = (1,) * len(self.ev)
        self.nfe = 0  # vector-field evaluations (of the lockstep batch) since the last reset

    def tb(self, x):
        return x.reshape((x.shape[0],) + self.pad)

    def _times(self):
        p, dev = self.p, self.p.y0.device
        t0 = torch.as_tensor(p.t0, dtype=torch.float64, device=dev).expand(self.bshape).reshape(self.B)
        t1 = torch.as_tensor(p.t1, dtype=torch.float64, device=dev).expand(self.bshape).reshape(self.B)
        return t0, t1

    def init_state(self, yf):
        p = self.p
        t0, t1 = self._times()
        st, k = p.solver.init(p.terms, self.tb(t0), self.tb(t1), yf, p.args)
        self.nfe += k
        return st

    def forward(self):
        from ._solve import integrate

        p = self.p
        yf = p.y0.detach().reshape((self.B,) + self.ev)
        with torch.no_grad():
            st0 = self.init_state(yf)
            self.rec = _IndependentRecorder(yf, st0)
            sol = integrate(p.replace(on_accept=self.rec))
        if not bool((sol.result == 0).all()):
            raise RuntimeError(f"{type(self.adj).__name__} cannot differentiate a solve that did not succeed.")
        self.solution = sol
        self.ys = sol.ys
        t0, _ = self._times()
        self.T, self.cnt = self.rec.times(t0)
        return sol.ys

    # ---- output bookkeeping ------------------------------------------------------------------
    def _layout(self):
        p = self.p
        off = 1 if p.saveat.t0 else 0
        n_ts = 0
        ts_full = None
        if p.ts is not None:
            ts = p.ts.to(p.y0.device)
            ts_full = ts.expand(self.bshape + (ts.shape[-1],)).reshape(self.B, -1) if not p.ts_per_sample else ts.reshape(self.B, -1)
            n_ts = ts_full.shape[1]
        at_t1 = off + n_ts if p.saveat.t1 else None
        return off, n_ts, ts_full, at_t1

    def _prepare_outputs(self):
        off, n_ts, ts_full, at_t1 = self._layout()
        T = self.T
        self.off, self.n_ts, self.at_t1 = off, n_ts, at_t1
        if n_ts:
            self.ts_start = ts_full <= T[:, :1]
            self.ts_step = torch.searchsorted(T[:, 1:].contiguous(), ts_full.contiguous(), right=False)
            self.ts_full = ts_full

    def _slots(self, i):
        """Saves made inside lockstep step ``i``: a list of ``(has, j, theta)`` per slot."""
        if not self.n_ts:
            return []
        mask = (self.ts_step == i) & ~self.ts_start
        if not bool(mask.any()):
            return []
        rank = torch.cumsum(mask.long(), 1) - 1
        t, tn = self.T[:, i], self.T[:, i + 1]
        denom = torch.where(tn > t, tn - t, torch.ones_like(t))
        out = []
        for r in range(int(mask.sum(1).max())):
            sel = mask & (rank == r)
            has = sel.any(1)
            j = sel.long().argmax(1)
            cand = self.ts_full.gather(1, j.unsqueeze(1)).squeeze(1)
            theta = torch.where(has, ((cand - t) / denom).clamp(0, 1), torch.zeros_like(t))
            out.append((has, j, theta))
        return out

    # ---- one lockstep step ---------------------------------------------------------------------
    def step(self, i, y, st, slots=()):
        p = self.p
        t, tn = self.T[:, i], self.T[:, i + 1]
        real = i < self.cnt
        y1, _, info, st1, n = p.solver.step(p.terms, self.tb(t), self.tb(tn), y, p.args, st)
        self.nfe += n
        outs = []
        for has, j, theta in slots:
            vals, _ = p.solver.dense_eval(p.terms, p.args, self.tb(t), self.tb(tn), info, self.tb(theta).to(y.dtype))
            vals = torch.where(self.tb(theta == 1), y1, vals)
            outs.append((has, j, vals))
        y1 = torch.where(self.tb(real), y1, y)
        st1 = _where_state(real, st1, st, self.tb)
        return y1, st1, outs

    def advance(self, i, y, st):
        with torch.no_grad():
            y1, st1, _ = self.step(i, y, st)
        return y1, st1

    def reverse(self, i, y, st):
        p = self.p
        t, tn = self.T[:, i], self.T[:, i + 1]
        real = i < self.cnt
        with torch.no_grad():
            y0, st0, k = p.solver.reverse_step(p.terms, self.tb(t), self.tb(tn), y, p.args, st)
            self.nfe += k
            return torch.where(self.tb(real), y0, y), _where_state(real, st0, st, self.tb)

    def vjp(self, i, y, st, a_y, a_st, ctf, grads):
        slots = self._slots(i)
        with torch.enable_grad():
            y_ = y.detach().requires_grad_(True)
            st_ = map_state(st, lambda x: x.detach().requires_grad_(True))
            y1, st1, outs = self.step(i, y_, st_, slots)
            o, g = [y1], [a_y]
            for has, j, vals in outs:
                c = ctf[self.off + j, torch.arange(self.B, device=j.device)]
                o.append(vals)
                g.append(torch.where(self.tb(has), c, torch.zeros_like(c)))
            for x, a in zip(flatten_state(st1), a_st if a_st is not None else []):
                if a is not None:
                    o.append(x)
                    g.append(a)
            keep = [(x, a) for x, a in zip(o, g) if x.requires_grad]
            ins = [y_] + flatten_state(st_) + self.params
            res = torch.autograd.grad([x for x, _ in keep], ins, [a for _, a in keep], allow_unused=True)
        ns = len(flatten_state(st_))
        for k, gp in enumerate(res[1 + ns:]):
            if gp is not None:
                grads[k] = gp if grads[k] is None else grads[k] + gp
        return (res[0] if res[0] is not None else torch.zeros_like(y)), list(res[1:1 + ns])

    def vjp_init(self, yf, a_y, a_st, grads):
        if a_st is None or all(a is None for a in a_st):
            return a_y
        with torch.enable_grad():
            y_ = yf.detach().requires_grad_(True)
            st = self.init_state(y_)
            keep = [(x, a) for x, a in zip(flatten_state(st), a_st) if a is not None and x.requires_grad]
            if not keep:
                return a_y
            res = torch.autograd.grad([x for x, _ in keep], [y_] + self.params, [a for _, a in keep], allow_unused=True)
        for k, gp in enumerate(res[1:]):
            if gp is not None:
                grads[k] = gp if grads[k] is None else grads[k] + gp
        return a_y if res[0] is None else a_y + res[0]

    # ---- backward ----------------------------------------------------------------------------
    def backward(self, ct):
        p = self.p
        ctf = ct.reshape((ct.shape[0], self.B) + self.ev)
        self._prepare_outputs()
        grads = [None] * len(self.params)
        yf0 = p.y0.detach().reshape((self.B,) + self.ev)
        a_y = torch.zeros_like(yf0)
        if self.at_t1 is not None:
            a_y = a_y + ctf[self.at_t1]
        n = self.T.shape[1] - 1
        self.nfe = 0
        if self.kind == "checkpoint":
            a_y, a_st = self._backward_checkpoint(n, yf0, a_y, ctf, grads)
        elif self.kind == "reversible":
            a_y, a_st = self._backward_reversible(n, a_y, ctf, grads)
        else:
            raise AssertionError(self.kind)
        a_y = self.vjp_init(yf0, a_y, a_st, grads)
        self.adj.backward_stats["nfe"] = self.nfe
        a_y = self._add_start(a_y, ctf)
        g0, g1 = self._time_grads(yf0, a_y, ctf)
        return assemble_grads(self.t_in, self.params, a_y.reshape(p.y0.shape), g0, g1, grads)

    def _add_start(self, a_y, ctf):
        if self.p.saveat.t0:
            a_y = a_y + ctf[0]
        if self.n_ts:
            m = self.ts_start.to(ctf.dtype)  # (B, n_ts)
            blk = ctf[self.off:self.off + self.n_ts]  # (n_ts, B, ...)
            a_y = a_y + (blk * m.t().reshape(m.t().shape + self.pad)).sum(0)
        return a_y

    def _time_grads(self, yf0, a_total, ctf):
        p = self.p
        tin0, tin1 = self.t_in
        g0 = g1 = None
        if tin0 is None and tin1 is None:
            return g0, g1
        terms, args = p.terms, p.args
        t0, t1 = self._times()
        with torch.no_grad():
            if tin1 is not None:
                if self.at_t1 is None:
                    g1 = torch.zeros_like(tin1)
                else:
                    f1 = terms.ode(self.tb(t1).to(yf0.dtype), self.rec.y, args) * p.sign
                    g1 = self._reduce(ctf[self.at_t1] * f1, tin1)
            if tin0 is not None:
                # only the SaveAt(t0=True) output is y0 whatever t0 is; an output of ts at t0 is y(ts)
                a = a_total - ctf[0] if p.saveat.t0 else a_total
                f0 = terms.ode(self.tb(t0).to(yf0.dtype), yf0, args) * p.sign
                g0 = self._reduce(-(a * f0), tin0)
        return g0, g1

    def _reduce(self, x, t):
        """Sum ``x`` (per sample) to the shape of the time tensor ``t``: a scalar, or one value a sample."""
        if t.numel() == 1:
            return x.sum().reshape(t.shape).to(t.dtype)
        return x.reshape(self.B, -1).sum(1).reshape(t.shape).to(t.dtype)

    def _backward_checkpoint(self, n, yf0, a_y, ctf, grads):
        from ._checkpoint import default_checkpoints, reverse_with_checkpoints

        slots = self.adj.checkpoints if self.adj.checkpoints is not None else default_checkpoints(n)
        a_y, a_st, sched = reverse_with_checkpoints(
            n, slots, (yf0, self.init_state(yf0)), lambda i, s: self.advance(i, *s),
            lambda i, s, a: self.vjp(i, *s, *a, ctf, grads), (a_y, None))
        self.adj.backward_stats = dict(num_steps=self.cnt.reshape(self.bshape), lockstep_steps=n, **sched)
        return a_y, a_st

    def _backward_reversible(self, n, a_y, ctf, grads):
        y = self.rec.y
        st = _unflatten_like(self.rec.template, self.rec.state)
        a_st = None
        for i in range(n - 1, -1, -1):
            y, st = self.reverse(i, y, st)
            a_y, a_st = self.vjp(i, y, st, a_y, a_st, ctf, grads)
        from ._reversible_adjoint import check_reconstruction

        yf0 = self.p.y0.detach().reshape((self.B,) + self.ev)
        err = rel = 0.0
        worst = None
        if n and self.B:
            e = (y - yf0).abs().reshape(self.B, -1).amax(1)
            scale = yf0.abs().reshape(self.B, -1).amax(1)
            scale = torch.where(scale > 0, scale, self.rec.y.abs().reshape(self.B, -1).amax(1))
            r = torch.where(e == 0, torch.zeros_like(e), e / scale)
            r = torch.where(torch.isnan(r), torch.full_like(r, math.inf), r)
            worst = int(r.argmax())
            err, rel = float(e.max()), float(r[worst])
        self.adj.backward_stats = {"num_steps": self.cnt.reshape(self.bshape), "lockstep_steps": n, "reconstruction_error": err,
                                   "reconstruction_rel_error": rel}
        if worst is not None:
            idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), self.bshape)) if self.bshape else None
            t0 = float(self._times()[0][worst]) * self.p.sign
            check_reconstruction(self.adj, self.p.solver, int(self.cnt[worst]), err, rel, t0, yf0.dtype,
                                 sample=idx[0] if idx is not None and len(idx) == 1 else idx)
        return a_y, a_st


def _time_inputs_independent(problem):
    res = []
    for t in (problem.t0_in, problem.t1_in):
        ok = isinstance(t, torch.Tensor) and t.requires_grad and t.dtype.is_floating_point
        res.append(t if ok else None)
    return res


def run_independent(problem, adjoint, kind):
    """Run ``problem`` in independent batch mode under the adjoint ``kind``."""
    t_in = _time_inputs_independent(problem)
    params = adjoint._inputs(problem, t_in)
    if kind == "backsolve":
        return _run_backsolve_independent(problem, adjoint, params, t_in)
    runner = _IndependentRunner(adjoint, problem, kind, params, t_in)
    inputs = [t for t in t_in if t is not None] + params
    return run_with_function(runner, problem, inputs)


def _run_backsolve_independent(problem, adjoint, params, t_in):
    runner = _BacksolveIndependent(adjoint, problem, "backsolve", params, t_in)
    inputs = [t for t in t_in if t is not None] + params
    return run_with_function(runner, problem, inputs)


class _BacksolveIndependent(_IndependentRunner):
    """The continuous adjoint of an independent-mode solve: every sample on its own interval.

    Sample ``b``'s augmented system runs backwards over its own ``[t0_b, t1_b]``, written in a shared
    normalised time ``s`` in ``[0, 1]`` (``t = t1_b + s (t0_b - t1_b)``), so that one solve carries the
    whole batch and its parameter channel sums the samples' parameter adjoints. The solve stops at every
    distinct ``s`` of a saved output, where those samples' ``y`` is reset to the saved value and the
    output's cotangent is added to their adjoint.
    """

    def backward(self, ct):
        from ._backsolve import augmented_field, split_params
        from ._controllers import ConstantStepSize
        from ._solve import solve

        p, adj = self.p, self.adj
        B, pad = self.B, self.pad
        ctf = ct.reshape((ct.shape[0], B) + self.ev)
        ysf = self.ys.reshape((self.ys.shape[0], B) + self.ev)
        self._prepare_outputs()
        yf0 = p.y0.detach().reshape((B,) + self.ev)
        t0, t1 = self._times()
        length = t1 - t0
        # the normalised time of every output, (n_out, B)
        when = []
        if p.saveat.t0:
            when.append(t0)
        if self.n_ts:
            when.extend(self.ts_full.t().unbind(0))
        if self.at_t1 is not None:
            when.append(t1)
        safe = torch.where(length > 0, length, torch.ones_like(length))
        s_out = torch.stack([torch.where(length > 0, (t1 - w) / safe, torch.zeros_like(w)).clamp(0, 1) for w in when])
        stops = sorted(set(s_out.reshape(-1).tolist()) | {0.0, 1.0})
        dt = yf0.dtype
        rescale = (t1.to(dt).reshape((B,) + pad), -length.to(dt).reshape((B,) + pad))
        params = self.params
        n = yf0.numel()
        P = sum(x.numel() for x in params)
        f = augmented_field(p.terms, params, p.args, tuple(yf0.shape), n, rescale=rescale)
        solver = adj.solver or p.solver
        if adj.solver is None and getattr(solver, "reversible", False):
            from nde.solvers.rk import Tsit5

            solver = Tsit5()
        controller, dt0 = adj.backward_controller(p, 2 * n, solver, longest=float(length.max()) if B else 1.0,
                                                  param_sizes=[x.numel() for x in params])
        if isinstance(controller, ConstantStepSize):
            # the forward's step in every sample's own time: the smallest fraction of an interval
            d = torch.as_tensor(p.dt0, dtype=torch.float64).abs().expand(t0.shape)
            frac = torch.where(length > 0, d / safe, torch.ones_like(d))
            dt0 = float(frac.min())
        y = self.rec.y.clone()
        a = torch.zeros_like(yf0)
        a_th = torch.zeros(P, dtype=dt, device=yf0.device)
        nfe = steps = 0
        s_cur = 0.0
        for sg in stops:
            if sg > s_cur:
                z = torch.cat([y.reshape(-1), a.reshape(-1), a_th])
                h = dt0 if dt0 is not None else self._step_fraction_at(s_cur, length, safe)
                step0 = None if h is None else min(h, sg - s_cur)
                with torch.no_grad():
                    sol = solve(f, solver, s_cur, sg, z, dt0=step0, controller=controller, max_steps=p.max_steps)
                z = sol.ys[-1]
                nfe += sol.stats["nfe"]
                steps += sol.stats["num_steps"]
                y, a, a_th = z[:n].reshape(yf0.shape), z[n:2 * n].reshape(yf0.shape), z[2 * n:]
                s_cur = sg
            hit = s_out == sg  # (n_out, B)
            if bool(hit.any()):
                y, a = y.clone(), a.clone()
                for k in hit.any(1).nonzero().flatten().tolist():
                    m = hit[k].reshape((B,) + pad)
                    y = torch.where(m, ysf[k], y)
                    a = torch.where(m, a + ctf[k], a)
        adj.backward_stats = {"nfe": nfe, "num_steps": steps, "stops": len(stops) - 1}
        g0, g1 = self._time_grads(yf0, a, ctf)
        return assemble_grads(self.t_in, params, a.reshape(p.y0.shape), g0, g1, split_params(a_th, params))

    def _step_fraction_at(self, s, length, safe):
        """The forward steps at normalised time ``s`` as fractions of their samples' intervals; the least.

        Per sample as :func:`nde._backsolve.forward_step_at`: the step ending at or spanning the time,
        the larger of the last two for the shortened last step. A first step for the backward solve.
        """
        cnt = self.cnt
        if not bool((cnt > 0).any()):
            return None
        t1 = self.T.gather(1, cnt.unsqueeze(1)).squeeze(1)
        t = (t1 - s * length).unsqueeze(1)
        last = (cnt - 1).clamp(min=0)
        i = torch.minimum((torch.searchsorted(self.T.contiguous(), t.contiguous()).squeeze(1) - 1).clamp(min=0), last)
        h = self.T.gather(1, (i + 1).unsqueeze(1)).squeeze(1) - self.T.gather(1, i.unsqueeze(1)).squeeze(1)
        prev = self.T.gather(1, i.unsqueeze(1)).squeeze(1) - self.T.gather(1, (i - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        h = torch.where((i == last) & (cnt >= 2), torch.maximum(h, prev), h)
        frac = torch.where((cnt > 0) & (length > 0), h / safe, torch.full_like(h, math.inf))
        v = float(frac.min())
        return v if math.isfinite(v) and v > 0 else None
