"""Discretise-then-optimise with recursive (binomial) checkpointing."""

from __future__ import annotations

import math

import torch

from ._adjoint import AbstractAdjoint
from ._adjoint_common import (
    JointStepper, Recorder, assemble_grads, check_supported, function_inputs, output_map,
    run_with_function, time_grads, time_inputs,
)


def _beta(s, r):
    """``C(s + r, s)``: the most steps reversible with ``s`` checkpoints and ``r`` repetitions."""
    return math.comb(s + r, s)


def binomial_split(length, slots):
    """How far to advance before storing the next checkpoint (Griewank's binomial rule).

    For ``length`` steps and ``slots >= 1`` free checkpoints, with ``r`` the least number of repetitions
    for which ``beta(slots, r) >= length``, the first checkpoint goes ``m`` steps ahead with
    ``length - beta(slots - 1, r) <= m <= beta(slots, r - 1)``; the right part is then reversed with one
    checkpoint fewer and the left part with the same number, both within ``r`` (resp. ``r - 1``) repetitions.
    """
    r = 1
    while _beta(slots, r) < length:
        r += 1
    m = max(1, length - _beta(slots - 1, r))
    return min(m, max(1, _beta(slots, r - 1)), length - 1)


def default_checkpoints(n_steps):
    """Checkpoints enough that every step is recomputed at most twice.

    The initial state occupies one of them, so this is ``1 +`` the least ``c`` with ``C(c + 2, 2) >= n``.
    """
    c = 1
    while _beta(c, 2) < n_steps:
        c += 1
    return c + 1


class CheckpointAdjoint(AbstractAdjoint):
    """Backpropagate through the solve with binomial checkpointing (Griewank--Walther's *revolve*).

    The forward solve keeps only the accepted step times. The backward pass reverses the steps with at
    most ``checkpoints`` stored states: it advances from a stored state to the binomially optimal next
    checkpoint, reverses the right part with one checkpoint fewer, then the left part. Each step's
    vector-Jacobian product is taken through the solver's own operations, so the gradient is the one
    :class:`~nde.DirectAdjoint` computes, with memory ``O(checkpoints)`` instead of ``O(steps)`` and
    every step recomputed at most ``r`` times, ``C(checkpoints + r, r) >= steps``.

    After a backward pass, ``backward_stats`` holds ``nfe`` (vector-field evaluations of the backward
    pass), ``num_steps``, ``recomputed_steps`` (steps re-taken without a graph to rebuild states, at most
    ``r * num_steps``), ``checkpoints`` (the slots available) and ``max_checkpoints`` (the most states
    stored at once, the initial state included).

    The gradients with respect to ``t0`` and ``t1`` are those of the exact flow,
    ``dL/dt1 = <dL/dy(t1), f(t1, y(t1))>`` and ``dL/dt0 = -<a(t0), f(t0, y0)>``, evaluated at the
    computed solution, not the derivative of the discrete solution with respect to its end points
    (which differs from it by the solver's error).

    Griewank & Walther (2000), "Algorithm 799: revolve", *ACM Trans. Math. Softw.* 26(1).

    Parameters
    ----------
    checkpoints:
        Number of states stored during the backward pass. None: the least number for which every step
        is recomputed at most twice (about ``sqrt(2 * steps)``).
    params:
        Optional extra tensors to differentiate, for vector fields whose parameters cannot be found
        by inspection (parameters of ``nn.Module`` s, closures and globals of plain functions and tensors
        in ``args`` are found automatically).
    """

    def __init__(self, checkpoints: int | None = None, params=None):
        if checkpoints is not None and (isinstance(checkpoints, bool) or not isinstance(checkpoints, int) or checkpoints < 1):
            raise ValueError(f"checkpoints must be a positive integer or None; got {checkpoints!r}.")
        self.checkpoints = checkpoints
        self.params = None if params is None else list(params)
        self.backward_stats = None

    def run(self, problem):
        check_supported(problem, "CheckpointAdjoint")
        if problem.batch_mode == "independent":
            from ._adjoint_independent import run_independent

            return run_independent(problem, self, "checkpoint")
        t_in = time_inputs(problem)
        params = self._inputs(problem, t_in)
        runner = _CheckpointRunner(self, problem, params, t_in)
        return run_with_function(runner, problem, function_inputs(t_in, params))

    def __repr__(self):
        return f"CheckpointAdjoint(checkpoints={self.checkpoints})"


def reverse_with_checkpoints(n, slots, state0, advance, vjp, cot):
    """Reverse ``n`` steps with at most ``slots`` stored states, on Griewank's binomial schedule.

    ``state0`` is the initial state (it occupies one slot); ``advance(i, state) -> state`` takes step ``i``
    without a graph; ``vjp(i, state, cot) -> cot`` pulls the cotangent of step ``i``'s output back to its
    input. Returns ``(*cot, stats)`` with the cotangent of the initial state and the schedule's counts:
    ``recomputed_steps`` and ``checkpoints``/``max_checkpoints``.
    """
    stack = [(0, state0)]
    end, advances, most = n, 0, 1
    while end > 0:
        i0, st = stack[-1]
        if end - i0 == 1:
            cot = vjp(i0, st, cot)
            end = i0
            if i0 > 0:
                stack.pop()
            continue
        free = slots - len(stack)
        if free <= 0:
            for i in range(i0, end - 1):
                st = advance(i, st)
            advances += end - 1 - i0
            cot = vjp(end - 1, st, cot)
            end -= 1
            continue
        m = i0 + binomial_split(end - i0, free)
        for i in range(i0, m):
            st = advance(i, st)
        advances += m - i0
        stack.append((m, st))
        most = max(most, len(stack))
    return (*cot, {"recomputed_steps": advances, "checkpoints": slots, "max_checkpoints": most})


class _CheckpointRunner:
    def __init__(self, adjoint, problem, params, t_in):
        self.adj, self.p, self.params, self.t_in = adjoint, problem, params, t_in
        self.checkpoints = adjoint.checkpoints
        self.solution = None

    def forward(self):
        from ._solve import integrate

        p = self.p
        self.rec = Recorder(p.t0)
        with torch.no_grad():
            sol = integrate(p.replace(on_accept=self.rec))
        self.solution = sol
        return sol.ys

    def backward(self, ct):
        p, rec = self.p, self.rec
        T = rec.T
        n = len(T) - 1
        at_start, per_step, at_t1, n_out = output_map(p, T)
        if n_out != ct.shape[0]:
            raise RuntimeError("CheckpointAdjoint cannot differentiate a solve that stopped early (result != successful).")
        stepper = JointStepper(p, T, rec.jumps, per_step, self.params)
        grads = [None] * len(self.params)
        y0 = p.y0.detach()
        st0 = stepper.init_state(y0)
        slots = self.checkpoints if self.checkpoints is not None else default_checkpoints(n)
        a_y, a_st, sched = reverse_with_checkpoints(
            n, slots, (y0, st0), lambda i, s: stepper.advance(i, *s),
            lambda i, s, a: stepper.vjp(i, *s, *a, ct, grads), (torch.zeros_like(y0), None))
        a_y = stepper.vjp_init(y0, a_y, a_st, grads)
        for k in at_start:
            a_y = a_y + ct[k]
        self.adj.backward_stats = dict(nfe=stepper.nfe, num_steps=n, **sched)
        y_final = rec.y if rec.y is not None else y0
        g0, g1 = time_grads(p, self.t_in, y0, y_final, a_y, ct, at_t1)
        return assemble_grads(self.t_in, self.params, a_y, g0, g1, grads)
