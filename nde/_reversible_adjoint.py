"""Backpropagation through algebraically reversible solvers, reconstructing the forward states."""

from __future__ import annotations

import math
import warnings

import torch

from ._adjoint import AbstractAdjoint
from ._adjoint_common import (
    JointStepper, Recorder, assemble_grads, check_supported, function_inputs, output_map,
    run_with_function, time_grads, time_inputs,
)
from ._terms import add_product


def check_reversible(solver):
    if not getattr(solver, "reversible", False) or not hasattr(solver, "reverse_step"):
        raise ValueError(
            f"ReversibleAdjoint needs an algebraically reversible solver; {solver!r} is not. Use "
            "nde.solvers.ReversibleHeun(), nde.solvers.AsynchronousLeapfrog(), or wrap an explicit solver: "
            "nde.solvers.Reversible(nde.solvers.Tsit5())."
        )


class ReversibleAdjoint(AbstractAdjoint):
    """Exact gradients with O(1) memory in the number of steps, for reversible solvers.

    The forward solve keeps only the accepted step times and the final solver state. The backward pass
    walks the steps in reverse, reconstructing each step's input state in closed form with the solver's
    ``reverse_step`` and taking the vector-Jacobian product of the forward step at the reconstructed
    state. The gradient is :class:`~nde.DirectAdjoint`'s up to the error of the reconstruction;
    adaptive solves replay their accepted step sizes.

    The reconstruction is checked where the true state is known: the reconstructed ``y0`` against
    ``y0``, and every state saved at the end of a step (``SaveAt(steps=True)``, or ``ts`` landing on
    steps) against the saved value. Reversing the steps amplifies rounding and truncation errors like
    the inverse of the forward flow, exponentially in time on dissipative dynamics (for
    ``f = net(y) - 5 y`` on ``[0, 10]`` every reversible solver here reconstructs ``y0`` with an error
    of about 1e20), so a relative error above ``reconstruction_tol`` warns (``RuntimeWarning``) with the
    measured error, and a non-finite one or one above 1 (no correct digit) raises ``RuntimeError``.
    ``backward_stats`` holds ``nfe``, ``num_steps``, ``reconstruction_error`` (the largest absolute error
    of a checked state) and ``reconstruction_rel_error`` (the largest error of a checked state relative
    to the state's own largest entry).

    The gradients with respect to ``t0`` and ``t1`` are those of the exact flow,
    ``dL/dt1 = <dL/dy(t1), f(t1, y(t1))>`` and ``dL/dt0 = -<a(t0), f(t0, y0)>``, evaluated at the
    computed solution; they differ from the derivative of the discrete solution by the solver's error.

    Kidger, Foster, Li & Lyons (2021), "Efficient and accurate gradients for neural SDEs", NeurIPS;
    McCallum & Foster (2024), "Efficient, accurate and stable gradients for neural ODEs".

    Parameters
    ----------
    params:
        Optional extra tensors to differentiate (parameters found by inspection are always included).
    reconstruction_tol:
        Relative reconstruction error above which the backward pass warns; None: the square root of
        the machine epsilon of the state's dtype (1.5e-8 in float64, 3.5e-4 in float32).
    """

    def __init__(self, params=None, reconstruction_tol: float | None = None):
        if reconstruction_tol is not None and (isinstance(reconstruction_tol, bool)
                                               or not isinstance(reconstruction_tol, (int, float))
                                               or not reconstruction_tol > 0):
            raise ValueError(f"reconstruction_tol must be a positive number or None; got {reconstruction_tol!r}.")
        self.params = None if params is None else list(params)
        self.reconstruction_tol = reconstruction_tol
        self.backward_stats = None

    def run(self, problem):
        check_supported(problem, "ReversibleAdjoint")
        check_reversible(problem.solver)
        if problem.batch_mode == "independent":
            from ._adjoint_independent import run_independent

            return run_independent(problem, self, "reversible")
        t_in = time_inputs(problem)
        params = self._inputs(problem, t_in)
        runner = _ReversibleRunner(self, problem, params, t_in)
        return run_with_function(runner, problem, function_inputs(t_in, params))

    def __repr__(self):
        return "ReversibleAdjoint()" if self.reconstruction_tol is None else \
            f"ReversibleAdjoint(reconstruction_tol={self.reconstruction_tol})"


class ReconstructionMonitor:
    """Errors of reconstructed states where the true ones are known (``y0`` and step-end outputs).

    ``at(i, y)`` is called with the reconstructed state at the end of step ``i``; ``finish(y)`` with the
    reconstructed ``y0``. The errors stay on the device until :meth:`report` (one host sync).
    """

    def __init__(self, T, per_step, ys, y0, y_final):
        self.T, self.per_step, self.ys, self.y0 = T, per_step, ys, y0
        self.last = len(T) - 2
        self.y_final = y_final
        self.errs, self.sizes, self.times = [], [], []

    def _add(self, t, y, ref):
        self.errs.append((y - ref).abs().amax())
        self.sizes.append(ref.abs().amax())
        self.times.append(t)

    def at(self, i, y):
        if i >= self.last or self.ys is None:  # the last step's end state is the exact final state
            return
        for k, th in self.per_step[i]:
            if th is None:
                self._add(self.T[i + 1], y, self.ys[k])
                return

    def finish(self, y):
        self._add(self.T[0], y, self.y0)

    def report(self):
        """``(absolute error, relative error, time of the worst state)``; zeros when nothing was reversed."""
        if not self.errs or self.last < 0:
            return 0.0, 0.0, self.T[0]
        errs, sizes = torch.stack(self.errs), torch.stack(self.sizes)
        # each state relative to its own size; a state that is exactly zero relative to the largest one
        floor = torch.maximum(sizes.max(), self.y_final.abs().amax())
        rel = errs / torch.where(sizes > 0, sizes, floor)
        rel = torch.where(errs == 0, torch.zeros_like(rel), rel).nan_to_num(nan=math.inf).tolist()
        j = max(range(len(rel)), key=lambda m: rel[m])
        return float(errs.max()), rel[j], self.times[j]


def check_reconstruction(adjoint, solver, n_steps, err, rel, t, dtype, sample=None):
    """Warn (relative error above the tolerance) or raise (non-finite, or above 1) about a reconstruction."""
    tol = adjoint.reconstruction_tol
    if tol is None:
        tol = math.sqrt(torch.finfo(dtype).eps)
    if math.isfinite(rel) and rel <= tol:
        return
    where = f"at t={t:.6g}" + ("" if sample is None else f" (sample {sample})")
    msg = (
        f"ReversibleAdjoint: reversing {n_steps} steps of {solver!r} reconstructed the state {where} with a "
        f"relative error of {rel:.3g} (absolute {err:.3g}); the gradients carry errors of this size. Reversing "
        "the steps amplifies rounding and truncation errors like the inverse flow does, exponentially in time on "
        "dissipative dynamics (and the reversible solvers' second state grows the same way in the forward solve). "
        "Use adjoint=nde.CheckpointAdjoint() with a non-reversible solver such as nde.solvers.Tsit5() (exact "
        "discrete gradients from stored states), or nde.BacksolveAdjoint(); smaller steps or a shorter interval "
        "reduce the error."
    )
    if not math.isfinite(rel) or rel > 1.0:
        raise RuntimeError(msg + " The reconstructed state has no correct digit, so no gradient is returned.")
    warnings.warn(msg, RuntimeWarning, stacklevel=2)


class _ReversibleRunner:
    def __init__(self, adjoint, problem, params, t_in):
        self.adj, self.p, self.params, self.t_in = adjoint, problem, params, t_in
        self.solution = None

    def forward(self):
        from ._solve import integrate

        p = self.p
        self.rec = Recorder(p.t0)
        with torch.no_grad():
            sol = integrate(p.replace(on_accept=self.rec))
        if any(self.rec.jumps):
            raise ValueError(
                "ReversibleAdjoint cannot step over jump_ts (the solver restarts there); use CheckpointAdjoint."
            )
        self.solution = sol
        self.ys = sol.ys
        return sol.ys

    def backward(self, ct):
        p, rec = self.p, self.rec
        T = rec.T
        n = len(T) - 1
        at_start, per_step, at_t1, n_out = output_map(p, T)
        if n_out != ct.shape[0]:
            raise RuntimeError("ReversibleAdjoint cannot differentiate a solve that stopped early (result != successful).")
        stepper = JointStepper(p, T, rec.jumps, per_step, self.params)
        grads = [None] * len(self.params)
        y0 = p.y0.detach()
        mon = ReconstructionMonitor(T, per_step, self.ys, y0, rec.y if rec.y is not None else y0)
        fused = _fused_backward(p, rec, per_step)
        if fused is not None:
            a_y, nfe = fused(p, T, rec, per_step, ct, self.params, grads, mon)
        else:
            a_y, a_st = torch.zeros_like(y0), None
            y, st = rec.y, rec.state
            rnfe = 0
            for i in range(n - 1, -1, -1):
                mon.at(i, y)
                with torch.no_grad():
                    y, st, k = p.solver.reverse_step(p.terms, T[i], T[i + 1], y, p.args, st)
                rnfe += k
                a_y, a_st = stepper.vjp(i, y, st, a_y, a_st, ct, grads)
            if n:
                mon.finish(y)
            a_y = stepper.vjp_init(y0, a_y, a_st, grads)
            nfe = stepper.nfe + rnfe
        for k in at_start:
            a_y = a_y + ct[k]
        err, rel, t_bad = mon.report()
        self.adj.backward_stats = {"nfe": nfe, "num_steps": n, "reconstruction_error": err,
                                   "reconstruction_rel_error": rel}
        check_reconstruction(self.adj, p.solver, n, err, rel, p.sign * t_bad, y0.dtype)
        g0, g1 = time_grads(p, self.t_in, y0, rec.y if rec.y is not None else y0, a_y, ct, at_t1)
        return assemble_grads(self.t_in, self.params, a_y, g0, g1, grads)


# ---------------------------------------------------------------------------------------------
# reversible Heun: reconstruction and adjoint fused, one vector-field evaluation (with its graph)
# and one vector-Jacobian product a step
def _fused_backward(p, rec, per_step):
    """The fused backward pass for this solve's solver, or None (then: reverse step + generic VJP)."""
    from nde.solvers.reversible import AsynchronousLeapfrog, Reversible, ReversibleHeun

    if rec.state is None or len(rec.T) < 2:
        return None
    if type(p.solver) is ReversibleHeun:
        v = rec.state[1]
        parts = v if isinstance(v, tuple) else (v,)
        return _heun_backward if all(isinstance(x, torch.Tensor) for x in parts) else None
    # the other two interpolate inside a step through their own dense output: fuse only without such outputs
    if any(th is not None for lst in per_step for _, th in lst):
        return None
    if type(p.solver) is AsynchronousLeapfrog:
        return _alf_backward
    if type(p.solver) is Reversible:
        return _wrapper_backward
    return None


def _parts(v):
    return v if isinstance(v, tuple) else (v,)


def _tmap(fn, *xs):
    """``fn`` applied to tensors, or elementwise to tuples of tensors (a MultiTerm's vector fields)."""
    if isinstance(xs[0], tuple):
        return tuple(fn(*z) for z in zip(*xs))
    return fn(*xs)


def _to_shape(x, like):
    return x if x.shape == like.shape else x.sum_to_size(like.shape)


def _transpose_elementwise(c, a, like, out=None):
    """``out + a * c`` summed to ``like``'s shape (``out`` may be None): the transpose of ``v -> v * c``."""
    if (out is not None and out.shape == like.shape == a.shape
            and (not isinstance(c, torch.Tensor) or c.dim() == 0 or c.shape == a.shape)):
        return add_product(out, a, c)  # no summing: one fused operation
    return _plus(out, _to_shape(a * c, like))


def _prod_transposes(terms):
    """Closed-form transposes ``(c, a, like, out=None) -> out + dprod/dv^T a`` of the terms' products, or None.

    Available for :class:`~nde.ODETerm` and :class:`~nde.ControlTerm` (and MultiTerms of them, in either
    time direction) with their own products; other terms go through autograd.
    """
    from ._terms import ControlTerm, MultiTerm, ODETerm, _ReversedTime

    parts = terms.terms if isinstance(terms, MultiTerm) else (terms,)
    out = []
    for term in parts:
        base = term.term if isinstance(term, _ReversedTime) else term
        if type(base).prod is ODETerm.prod or (type(base).prod is ControlTerm.prod and base.noise == "diagonal"):
            out.append(_transpose_elementwise)
        elif type(base).prod is ControlTerm.prod and base.noise == "scalar":
            out.append(lambda c, a, like, out=None: _plus(out, _to_shape((a * c).unsqueeze(-1), like)))
        elif type(base).prod is ControlTerm.prod:
            out.append(lambda c, a, like, out=None: _plus(out, _to_shape(a.unsqueeze(-1) * c.unsqueeze(-2), like)))
        else:
            return None
    return out


def _plus(out, x):
    return x if out is None else out + x


def _accumulate(grads, res):
    """Add the parameter gradients ``res`` into ``grads``: in place, in one fused call, on copies that
    this backward pass owns (a gradient autograd hands out may alias a cotangent)."""
    into, add = [], []
    for j, gp in enumerate(res):
        if gp is None:
            continue
        if grads[j] is None:
            grads[j] = gp.clone()
        elif gp.requires_grad or grads[j].requires_grad:
            grads[j] = grads[j] + gp
        else:
            into.append(grads[j])
            add.append(gp)
    if into:
        torch._foreach_add_(into, add)


def _end_cotangents(per_step, i, ct, a_y):
    for k, _ in per_step[i]:
        a_y = a_y + ct[k]
    return a_y


def _alf_backward(p, T, rec, per_step, ct, params, grads, mon):
    """Adjoint of asynchronous-leapfrog steps fused with their reconstruction.

    A step is ``k = y0 + v0 h/2``, ``u = f(t0 + h/2, k)``, ``v1 = 2u - v0``, ``y1 = k + v1 h/2``; the
    reconstruction evaluates ``f`` at the same ``k``, so its graph serves the transpose as well.
    """
    terms, args = p.terms, p.args
    solver = p.solver
    y, v = rec.y, rec.state
    a_y, a_v = torch.zeros_like(y), torch.zeros_like(y)
    nfe = 0
    for i in range(len(T) - 2, -1, -1):
        mon.at(i, y)
        h, s = solver._half(T[i], T[i + 1], y)
        a_y = _end_cotangents(per_step, i, ct, a_y)
        with torch.enable_grad():
            k = (y - (0.5 * h) * v).detach().requires_grad_(True)
            u = terms.ode(s, k, args)
        nfe += 1
        with torch.no_grad():
            v0 = 2 * u.detach() - v
            y0 = k.detach() - (0.5 * h) * v0
        a_v1 = a_v + (0.5 * h) * a_y
        with torch.enable_grad():
            res = torch.autograd.grad(u, [k] + params, 2 * a_v1, allow_unused=True)
        _accumulate(grads, res[1:])
        a_k = a_y + (res[0] if res[0] is not None else 0)
        a_y, a_v = a_k, -a_v1 + (0.5 * h) * a_k
        y, v = y0, v0
    mon.finish(y)
    # the initial state v0 = f(t0, y0)
    from nde.solvers.reversible import _time

    with torch.enable_grad():
        yl = y.detach().requires_grad_(True)
        f0 = terms.ode(_time(T[0], yl), yl, args)
        res = torch.autograd.grad(f0, [yl] + params, a_v, allow_unused=True)
    _accumulate(grads, res[1:])
    a_y = a_y + (res[0] if res[0] is not None else 0)
    return a_y, nfe + 1


def _wrapper_backward(p, T, rec, per_step, ct, params, grads, mon):
    """Adjoint of ``Reversible(solver)`` steps fused with their reconstruction.

    A step is ``y1 = c y0 + (1 - c) z0 + D0(z0)``, ``z1 = z0 - D1(y1)`` with ``D0``/``D1`` the base
    solver's increments forwards from ``z0`` and backwards from ``y1``; the reconstruction takes exactly
    these two base steps, and their graphs give the transpose.
    """
    terms, args = p.terms, p.args
    solver = p.solver
    c = solver.coupling
    y, z = rec.y, rec.state
    a_y, a_z = torch.zeros_like(y), torch.zeros_like(y)
    nfe = 0
    for i in range(len(T) - 2, -1, -1):
        t0, t1 = T[i], T[i + 1]
        mon.at(i, y)
        a_y = _end_cotangents(per_step, i, ct, a_y)
        with torch.enable_grad():
            yl = y.detach().requires_grad_(True)
            d1, _, _, n1 = solver._increment(terms, t1, t0, yl, args)
            z0 = (z + d1.detach())
            zl = z0.detach().requires_grad_(True)
            d0, _, _, n2 = solver._increment(terms, t0, t1, zl, args)
        nfe += n1 + n2
        with torch.no_grad():
            y0 = (y - (1 - c) * z0 - d0.detach()) / c if c != 1 else y - d0.detach()
        with torch.enable_grad():
            res = torch.autograd.grad(d1, [yl] + params, -a_z, allow_unused=True)
        _accumulate(grads, res[1:])
        a_y1 = a_y + (res[0] if res[0] is not None else 0)
        with torch.enable_grad():
            res = torch.autograd.grad(d0, [zl] + params, a_y1, allow_unused=True)
        _accumulate(grads, res[1:])
        a_z = a_z + (1 - c) * a_y1 + (res[0] if res[0] is not None else 0)
        a_y = c * a_y1
        y, z = y0, z0
    # the initial state z0 = y0
    mon.finish(y)
    return a_y + a_z, nfe


def _heun_backward(p, T, rec, per_step, ct, params, grads, mon):
    """Adjoint of reversible Heun's steps, reconstructing them on the way.

    A step is ``z1 = 2 y0 - z0 + P(v0)``, ``v1 = f(t1, z1)``, ``y1 = y0 + (P(v0) + P(v1)) / 2`` with
    ``P(v) = prod(v, dX)``; its transpose needs ``f``'s VJP at ``z1`` only, whose graph the previous
    reconstruction (which evaluated ``f(t1, z1)``) left behind.
    """
    from nde.solvers.reversible import _cast, _time

    terms, args = p.terms, p.args

    def f_graph(t, z):
        with torch.enable_grad():
            zl = z.detach().requires_grad_(True)
            return zl, terms.vf(_time(t, zl), zl, args)

    transposes = _prod_transposes(terms)

    def prod_t(c, a, like, out=None):
        # out + the transpose of v -> prod(v, c) (linear in v) applied to a, for a vector field or a tuple
        # of them (MultiTerm); out may be None
        if transposes is not None:
            if isinstance(like, tuple):
                if out is None:
                    return tuple(tr(ci, a, v) for tr, ci, v in zip(transposes, c, like))
                return tuple(tr(ci, a, v, o) for tr, ci, v, o in zip(transposes, c, like, out))
            return transposes[0](c, a, like, out)
        with torch.enable_grad():
            vl = _tmap(lambda x: x.detach().requires_grad_(True), like)
            res = torch.autograd.grad(terms.prod(vl, c), list(_parts(vl)), a, allow_unused=True)
        g = [torch.zeros_like(x) if r is None else r for x, r in zip(_parts(vl), res)]
        g = tuple(g) if isinstance(like, tuple) else g[0]
        return g if out is None else _tmap(torch.add, out, g)

    def vjp_f(vv, zl, a):
        keep = [(o, g) for o, g in zip(_parts(vv), _parts(a)) if o.requires_grad]
        if not keep:
            return torch.zeros_like(zl)
        with torch.enable_grad():
            res = torch.autograd.grad([o for o, _ in keep], [zl] + params, [g for _, g in keep], allow_unused=True)
        _accumulate(grads, res[1:])
        return res[0] if res[0] is not None else torch.zeros_like(zl)

    def control(t0, t1, like):
        # a control holding tensors that require grad (a CDE's interpolated data): keep its graph
        with torch.enable_grad():
            c = _cast(terms.contr(t0, t1), like)
        cs = [x for x in (c if isinstance(c, (tuple, list)) else (c,)) if isinstance(x, torch.Tensor)]
        return c, bool(params) and any(x.requires_grad for x in cs)

    def prod_tc(c, pairs):
        # cotangents of the increments prod(v, c) pulled back through the control to the parameters
        with torch.enable_grad():
            outs = [terms.prod(v, c) for v, _ in pairs]
            res = torch.autograd.grad(outs, params, [a for _, a in pairs], allow_unused=True)
        _accumulate(grads, res)

    y, (z, _) = rec.y, rec.state
    zl, vv = f_graph(T[-1], z)
    nfe = 1
    # adjoints of y, of z (kept negated: m = -a_z) and of the stored vector field; None while zero
    a_y, m, a_v = torch.zeros_like(y), None, None
    for i in range(len(T) - 2, -1, -1):
        t0, t1 = T[i], T[i + 1]
        mon.at(i, y)
        c, c_grad = control(t0, t1, y)
        extra = None
        for k, th in per_step[i]:
            if th is None:
                a_y = a_y + ct[k]
            else:
                a_y = a_y + th * ct[k]
                extra = (1 - th) * ct[k] if extra is None else extra + (1 - th) * ct[k]
        v1 = _tmap(torch.Tensor.detach, vv)
        with torch.no_grad():
            d1 = terms.prod(v1, c)
            z0 = 2 * y - zl.detach() - d1
        zl0, vv0 = f_graph(t0, z0)
        nfe += 1
        with torch.no_grad():
            v0 = _tmap(torch.Tensor.detach, vv0)
            y0 = torch.add(y, terms._prod_add(d1, v0, c), alpha=-0.5)  # y - (prod(v0, c) + d1) / 2
        half_a_y = 0.5 * a_y
        half = prod_t(c, half_a_y, v1)
        g = vjp_f(vv, zl, half if a_v is None else _tmap(torch.add, a_v, half))
        a_z1 = g if m is None else g - m
        if c_grad:
            prod_tc(c, [(v1, half_a_y), (v0, half_a_y + a_z1)])
        a_y = torch.add(a_y, a_z1, alpha=2)
        if extra is not None:
            a_y = a_y + extra
        m = a_z1
        a_v = prod_t(c, a_z1, v1, out=half)
        y, zl, vv = y0, zl0, vv0
    mon.finish(y)
    a_y = a_y + (vjp_f(vv, zl, a_v) if a_v is not None else 0)
    if m is not None:
        a_y = a_y - m
    return a_y, nfe
