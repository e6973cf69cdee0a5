"""Backpropagation through algebraically reversible solvers, reconstructing the forward states."""

from __future__ import annotations

import torch

from ._adjoint import AbstractAdjoint
from ._adjoint_common import (
    JointStepper, Recorder, assemble_grads, check_supported, collect_params, function_inputs, output_map,
    run_with_function, time_grads, time_inputs,
)


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
    state. The gradient is :class:`~nde.DirectAdjoint`'s up to the rounding error of the reconstruction;
    adaptive solves replay their accepted step sizes.

    Kidger, Foster, Li & Lyons (2021), "Efficient and accurate gradients for neural SDEs", NeurIPS;
    McCallum & Foster (2024), "Efficient, accurate and stable gradients for neural ODEs".

    Parameters
    ----------
    params:
        Optional extra tensors to differentiate (parameters found by inspection are always included).
    """

    def __init__(self, params=None):
        self.params = None if params is None else list(params)
        self.backward_stats = None

    def run(self, problem):
        check_supported(problem, "ReversibleAdjoint")
        check_reversible(problem.solver)
        if problem.batch_mode == "independent":
            from ._adjoint_independent import run_independent

            return run_independent(problem, self, "reversible")
        t_in = time_inputs(problem)
        params = [x for x in collect_params(problem, self.params) if all(x is not t for t in t_in)]
        runner = _ReversibleRunner(self, problem, params, t_in)
        return run_with_function(runner, problem, function_inputs(t_in, params))

    def __repr__(self):
        return "ReversibleAdjoint()"


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
        if _fused_heun_applies(p, rec):
            a_y, rnfe, self.reconstruction_error = _heun_backward(p, T, rec, per_step, ct, self.params, grads)
            for k in at_start:
                a_y = a_y + ct[k]
            self.adj.backward_stats = {"nfe": rnfe, "num_steps": n, "reconstruction_error": self.reconstruction_error}
            g0, g1 = time_grads(p, self.t_in, y0, rec.y if rec.y is not None else y0, a_y, ct, at_start, at_t1)
            return assemble_grads(self.t_in, self.params, a_y, g0, g1, grads)
        a_y, a_st = torch.zeros_like(y0), None
        y, st = rec.y, rec.state
        rnfe = 0
        for i in range(n - 1, -1, -1):
            with torch.no_grad():
                y, st, k = p.solver.reverse_step(p.terms, T[i], T[i + 1], y, p.args, st)
            rnfe += k
            a_y, a_st = stepper.vjp(i, y, st, a_y, a_st, ct, grads)
        self.reconstruction_error = None if n == 0 else float((y - y0).abs().max())
        a_y = stepper.vjp_init(y0, a_y, a_st, grads)
        for k in at_start:
            a_y = a_y + ct[k]
        self.adj.backward_stats = {"nfe": stepper.nfe + rnfe, "num_steps": n,
                                   "reconstruction_error": self.reconstruction_error}
        g0, g1 = time_grads(p, self.t_in, y0, rec.y if rec.y is not None else y0, a_y, ct, at_start, at_t1)
        return assemble_grads(self.t_in, self.params, a_y, g0, g1, grads)


# ---------------------------------------------------------------------------------------------
# reversible Heun: reconstruction and adjoint fused, one vector-field evaluation (with its graph)
# and one vector-Jacobian product a step
def _fused_heun_applies(p, rec):
    from nde.solvers.reversible import ReversibleHeun

    return (type(p.solver) is ReversibleHeun and rec.state is not None and isinstance(rec.state[1], torch.Tensor)
            and len(rec.T) > 1)


def _heun_backward(p, T, rec, per_step, ct, params, grads):
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

    def prod_t(c, a, like):
        with torch.enable_grad():
            vl = like.detach().requires_grad_(True)
            out = terms.prod(vl, c)
            (g,) = torch.autograd.grad(out, vl, a)
        return g

    def vjp_f(vv, zl, a):
        with torch.enable_grad():
            res = torch.autograd.grad(vv, [zl] + params, a, allow_unused=True)
        for j, gp in enumerate(res[1:]):
            if gp is not None:
                grads[j] = gp if grads[j] is None else grads[j] + gp
        return res[0] if res[0] is not None else torch.zeros_like(zl)

    y, (z, _) = rec.y, rec.state
    zl, vv = f_graph(T[-1], z)
    nfe = 1
    a_y, a_z, a_v = torch.zeros_like(y), torch.zeros_like(y), torch.zeros_like(vv)
    for i in range(len(T) - 2, -1, -1):
        t0, t1 = T[i], T[i + 1]
        c = _cast(terms.contr(t0, t1), y)
        extra = None
        for k, th in per_step[i]:
            if th is None:
                a_y = a_y + ct[k]
            else:
                a_y = a_y + th * ct[k]
                extra = (1 - th) * ct[k] if extra is None else extra + (1 - th) * ct[k]
        v1 = vv.detach()
        with torch.no_grad():
            d1 = terms.prod(v1, c)
            z0 = 2 * y - zl.detach() - d1
        zl0, vv0 = f_graph(t0, z0)
        nfe += 1
        with torch.no_grad():
            y0 = y - 0.5 * (terms.prod(vv0.detach(), c) + d1)
        half = 0.5 * prod_t(c, a_y, v1)
        a_z1 = a_z + vjp_f(vv, zl, a_v + half)
        a_y = a_y + 2 * a_z1 + (extra if extra is not None else 0)
        a_z = -a_z1
        a_v = half + prod_t(c, a_z1, v1)
        y, zl, vv = y0, zl0, vv0
    a_y = a_y + a_z + vjp_f(vv, zl, a_v)
    return a_y, nfe, float((y - p.y0.detach()).abs().max())
