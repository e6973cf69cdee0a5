"""Machinery shared by the adjoints that take over the backward pass of a solve.

An adjoint of this kind runs the forward solve without recording a graph, returns the saved states
through one :class:`torch.autograd.Function`, and computes in its backward pass the vector-Jacobian
products with respect to ``y0``, the times and every tensor the vector field depends on.
"""

from __future__ import annotations

import bisect
import types

import torch

_MAX_DEPTH = 4


# ---------------------------------------------------------------------------------------------
# which tensors a solve depends on
def _add(out, seen, x):
    if isinstance(x, torch.Tensor) and x.requires_grad and id(x) not in seen:
        seen.add(id(x))
        out.append(x)


def _walk(obj, out, seen, visited, depth, modules=None):
    if depth > _MAX_DEPTH or obj is None or id(obj) in visited:
        return
    if isinstance(obj, torch.Tensor):
        _add(out, seen, obj)
        return
    if isinstance(obj, (str, bytes, int, float, bool, complex, types.ModuleType, type)):
        return
    visited.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        if modules is not None:
            modules.append(obj)
        for prm in obj.parameters():
            _add(out, seen, prm)
        for buf in obj.buffers():
            _add(out, seen, buf)
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for x in obj:
            _walk(x, out, seen, visited, depth + 1, modules)
        return
    if isinstance(obj, dict):
        for x in obj.values():
            _walk(x, out, seen, visited, depth + 1, modules)
        return
    if isinstance(obj, types.MethodType):
        _walk(obj.__self__, out, seen, visited, depth + 1, modules)
        _walk(obj.__func__, out, seen, visited, depth + 1, modules)
        return
    if isinstance(obj, types.FunctionType):
        for cell in obj.__closure__ or ():
            try:
                _walk(cell.cell_contents, out, seen, visited, depth + 1, modules)
            except ValueError:  # empty cell
                pass
        for x in obj.__defaults__ or ():
            _walk(x, out, seen, visited, depth + 1, modules)
        g = obj.__globals__
        for name in obj.__code__.co_names:
            if name in g:
                _walk(g[name], out, seen, visited, depth + 1, modules)
        _walk(getattr(obj, "__wrapped__", None), out, seen, visited, depth + 1, modules)
        return
    if hasattr(obj, "__dict__"):
        for x in vars(obj).values():
            _walk(x, out, seen, visited, depth + 1, modules)


def collect_params(problem, extra=None):
    """The tensors requiring grad that the vector fields, their controls and ``args`` depend on.

    Found by inspection: parameters and buffers of ``nn.Module`` vector fields, tensors and modules
    captured by closures or referenced as globals by plain functions, tensors inside ``args`` and
    inside control paths; ``extra`` (an iterable of tensors) is added as given.
    """
    out, seen, visited = [], set(), set()
    _walk(problem.user_terms, out, seen, visited, 0)
    _walk(problem.args, out, seen, visited, 0)
    if extra is not None:
        for x in extra:
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"params must be an iterable of tensors; got an element of type {type(x).__name__}.")
            _add(out, seen, x)
    return [x for x in out if x is not problem.y0]


def time_inputs(problem):
    """``t0``/``t1`` when they are 0-d (or 1-element) tensors requiring grad, else None each."""
    res = []
    for t in (problem.t0_in, problem.t1_in):
        ok = isinstance(t, torch.Tensor) and t.requires_grad and t.numel() == 1 and t.dtype.is_floating_point
        res.append(t if ok else None)
    return res


def check_supported(problem, name):
    if problem.saveat.dense:
        raise ValueError(
            f"{name} does not differentiate dense output: use saveat=SaveAt(ts=...) or adjoint=nde.DirectAdjoint()."
        )
    if getattr(problem, "event", None) is not None:
        raise ValueError(f"{name} does not support events; use adjoint=nde.DirectAdjoint().")


# ---------------------------------------------------------------------------------------------
# the autograd node
class SolveFunction(torch.autograd.Function):
    """``ys = solve(y0, inputs)``; forward and backward are delegated to a runner object."""

    @staticmethod
    def forward(ctx, runner, y0, *inputs):
        ctx.runner = runner
        ys = runner.forward()
        return ys

    @staticmethod
    def backward(ctx, ct):
        runner = ctx.runner
        with _leaf_aliases(runner):
            grads = runner.backward(ct)
        return (None,) + tuple(grads)


class _leaf_aliases:
    """Inside the backward pass, buffers that are collected inputs computed from other tensors (e.g. the
    slopes of a path built from data requiring grad) are replaced by detached leaves.

    The vector-Jacobian products then stop at every input instead of backpropagating through the graph
    between inputs (which the first product frees, and which would count a gradient twice when an input
    depends on another); the graph outside the solve carries the gradients on from the inputs.
    """

    def __init__(self, runner):
        self.runner, self.swapped, self.params = runner, [], None

    def __enter__(self):
        runner = self.runner
        params, p = getattr(runner, "params", None), getattr(runner, "p", None)
        targets = {id(x): i for i, x in enumerate(params or ()) if x.grad_fn is not None}
        if not targets or p is None:
            return self
        modules = []
        _walk(p.user_terms, [], set(), set(), 0, modules)
        _walk(p.args, [], set(), set(), 0, modules)
        new = list(params)
        for module in modules:
            for m in module.modules():
                for name, x in m._buffers.items():
                    i = targets.get(id(x)) if x is not None else None
                    if i is not None:
                        if new[i] is params[i]:
                            new[i] = x.detach().requires_grad_(True)
                        self.swapped.append((m._buffers, name, x))
                        m._buffers[name] = new[i]
        self.params, runner.params = params, new
        return self

    def __exit__(self, *exc):
        for store, name, x in reversed(self.swapped):
            store[name] = x
        if self.params is not None:
            self.runner.params = self.params
        return False


def run_with_function(runner, problem, inputs):
    """Apply :class:`SolveFunction` and return the runner's Solution holding the differentiable ``ys``."""
    needs_grad = torch.is_grad_enabled() and (problem.y0.requires_grad or any(x.requires_grad for x in inputs))
    if not needs_grad:
        with torch.no_grad():
            runner.forward()
        return runner.solution
    ys = SolveFunction.apply(runner, problem.y0, *inputs)
    sol = runner.solution
    sol.ys = ys
    return sol


def flatten_state(state):
    """The tensors of a solver state (a tensor, None, or nested lists/tuples/dicts) in a fixed order."""
    out = []

    def rec(s):
        if isinstance(s, torch.Tensor):
            out.append(s)
        elif isinstance(s, (list, tuple)):
            for x in s:
                rec(x)
        elif isinstance(s, dict):
            for k in sorted(s):
                rec(s[k])

    rec(state)
    return out


def map_state(state, fn):
    """A copy of ``state`` with every tensor replaced by ``fn(tensor)``."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, list):
        return [map_state(x, fn) for x in state]
    if isinstance(state, tuple):
        return tuple(map_state(x, fn) for x in state)
    if isinstance(state, dict):
        return {k: map_state(v, fn) for k, v in state.items()}
    return state


# ---------------------------------------------------------------------------------------------
# joint mode: replay of recorded steps
class Recorder:
    """Collects the accepted steps of a joint-mode solve through the loop's ``on_accept`` hook."""

    def __init__(self, t0):
        self.T = [t0]
        self.jumps = []
        self.y = None
        self.state = None

    def __call__(self, t, y, state, jump):
        self.T.append(t)
        self.jumps.append(bool(jump))
        self.y = y
        self.state = state


def output_map(problem, T):
    """Where every saved output of a joint-mode solve comes from.

    Returns ``(at_start, per_step, at_t1, n)``: output indices equal to ``y0``; for every step ``i`` a
    list of ``(index, theta)`` (``theta`` None: the step's end state, else the fraction of the step at
    which the interpolant is evaluated); the index of the ``SaveAt(t1=True)`` output (or None); and
    the number of outputs.
    """
    saveat = problem.saveat
    n_steps = len(T) - 1
    at_start, per_step = [], [[] for _ in range(n_steps)]
    k = 0
    if saveat.t0:
        at_start.append(k)
        k += 1
    ts_list = problem.ts.tolist() if problem.ts is not None else []
    idx = 0
    while idx < len(ts_list) and ts_list[idx] <= T[0]:
        at_start.append(k)
        k += 1
        idx += 1
    for i in range(n_steps):
        t, tn = T[i], T[i + 1]
        if idx < len(ts_list) and ts_list[idx] <= tn:
            j = bisect.bisect_right(ts_list, tn, lo=idx)
            for s in ts_list[idx:j]:
                per_step[i].append((k, None if s == tn else (s - t) / (tn - t)))
                k += 1
            idx = j
    at_t1 = None
    if saveat.t1:
        at_t1 = k
        if n_steps:
            per_step[-1].append((k, None))
        else:
            at_start.append(k)
        k += 1
    if saveat.steps:
        for i in range(n_steps):
            per_step[i].append((k, None))
            k += 1
    return at_start, per_step, at_t1, k


class JointStepper:
    """Re-takes recorded steps of a joint-mode solve, with or without a graph, and their VJPs."""

    def __init__(self, problem, T, jumps, per_step, params):
        self.p = problem
        self.T = T
        self.jumps = jumps
        self.per_step = per_step
        self.params = params
        self.nfe = 0

    def init_state(self, y0):
        p = self.p
        state, n = p.solver.init(p.terms, self.T[0], p.t1, y0, p.args)
        self.nfe += n
        return state

    def _step(self, i, y, state):
        p = self.p
        t, tn = self.T[i], self.T[i + 1]
        y1, _, info, st1, n = p.solver.step(p.terms, t, tn, y, p.args, state)
        self.nfe += n
        outs = []
        inner = [(k, th) for k, th in self.per_step[i] if th is not None]
        if inner:
            theta = torch.tensor([th for _, th in inner], dtype=y.dtype, device=y.device)
            theta = theta.reshape((-1,) + (1,) * y.dim())
            vals, n = p.solver.dense_eval(p.terms, p.args, t, tn, info, theta)
            self.nfe += n
            outs = list(zip([k for k, _ in inner], vals.unbind(0)))
        if self.jumps[i]:
            st1, n = p.solver.init(p.terms, tn, p.t1, y1, p.args)
            self.nfe += n
        return y1, st1, outs

    def advance(self, i, y, state):
        """Step ``i`` without a graph: ``(y_{i+1}, state_{i+1})``."""
        with torch.no_grad():
            y1, st1, _ = self._step(i, y, state)
        return y1, st1

    def vjp(self, i, y, state, a_y, a_state, ct, grads):
        """Pull the cotangents of step ``i``'s outputs back to its inputs; accumulate parameter grads.

        ``a_y``/``a_state`` are the cotangents of ``y_{i+1}`` and of the state's tensors; ``ct`` holds
        the cotangents of all saved outputs (those produced inside the step are added).
        Returns ``(a_y_i, a_state_i)``.
        """
        with torch.enable_grad():
            y_ = y.detach().requires_grad_(True)
            st_ = map_state(state, lambda x: x.detach().requires_grad_(True))
            y1, st1, outs = self._step(i, y_, st_)
            o, g = [], []
            for k, th in self.per_step[i]:
                if th is None:
                    o.append(y1)
                    g.append(ct[k])
            for k, v in outs:
                o.append(v)
                g.append(ct[k])
            o.append(y1)
            g.append(a_y)
            for x, a in zip(flatten_state(st1), a_state if a_state is not None else []):
                if a is not None:
                    o.append(x)
                    g.append(a)
            keep = [(x, a) for x, a in zip(o, g) if x.requires_grad]
            ins = [y_] + flatten_state(st_) + self.params
            res = torch.autograd.grad([x for x, _ in keep], ins, [a for _, a in keep], allow_unused=True)
        a_y0 = res[0] if res[0] is not None else torch.zeros_like(y)
        ns = len(flatten_state(st_))
        a_st0 = list(res[1:1 + ns])
        for j, gp in enumerate(res[1 + ns:]):
            if gp is not None:
                grads[j] = gp if grads[j] is None else grads[j] + gp
        return a_y0, a_st0

    def vjp_init(self, y0, a_y, a_state, grads):
        """Pull the cotangent of the initial solver state back to ``y0`` and the parameters."""
        if a_state is None or all(a is None for a in a_state):
            return a_y
        with torch.enable_grad():
            y_ = y0.detach().requires_grad_(True)
            st = self.init_state(y_)
            keep = [(x, a) for x, a in zip(flatten_state(st), a_state) if a is not None and x.requires_grad]
            if not keep:
                return a_y
            res = torch.autograd.grad([x for x, _ in keep], [y_] + self.params, [a for _, a in keep], allow_unused=True)
        for j, gp in enumerate(res[1:]):
            if gp is not None:
                grads[j] = gp if grads[j] is None else grads[j] + gp
        return a_y if res[0] is None else a_y + res[0]


def time_grads(problem, t_inputs, y0, y_final, a0_total, ct, at_t1):
    """Gradients with respect to ``t0`` and ``t1`` (continuous formula, ODE terms only).

    ``dL/dt1 = <ct_{t1}, f(t1, y(t1))>``, ``dL/dt0 = -<a(t0), f(t0, y0)>`` where ``a(t0)`` excludes the
    cotangent of the ``SaveAt(t0=True)`` output, which is ``y0`` itself whatever ``t0`` is. An output
    saved at a fixed time of ``SaveAt(ts=...)`` equal to ``t0`` is ``y(ts)`` and does depend on ``t0``
    (``dy(ts)/dt0 = -f(t0, y0)`` there, the limit from inside the interval).
    """
    g0 = g1 = None
    tin0, tin1 = t_inputs
    if tin0 is None and tin1 is None:
        return g0, g1
    terms, args = problem.user_terms, problem.args
    if not terms.is_ode:
        raise ValueError("Gradients with respect to t0/t1 need an ODE (or CDE with a differentiable control).")
    with torch.no_grad():
        if tin1 is not None and at_t1 is not None:
            t1 = torch.as_tensor(float(problem.t1_in), dtype=y0.dtype, device=y0.device)
            f1 = terms.ode(t1, y_final, args)
            g1 = (ct[at_t1] * f1).sum().reshape(tin1.shape).to(tin1.dtype)
        elif tin1 is not None:
            g1 = torch.zeros_like(tin1)
        if tin0 is not None:
            a = a0_total - ct[0] if problem.saveat.t0 else a0_total
            t0 = torch.as_tensor(float(problem.t0_in), dtype=y0.dtype, device=y0.device)
            f0 = terms.ode(t0, y0, args)
            g0 = (-(a * f0).sum()).reshape(tin0.shape).to(tin0.dtype)
    return g0, g1


def assemble_grads(t_inputs, params, a_y0, g0, g1, grads):
    """The tuple of gradients in the order of :class:`SolveFunction`'s inputs."""
    out = [a_y0]
    for t, g in zip(t_inputs, (g0, g1)):
        if t is not None:
            out.append(g)
    out.extend(grads)
    return out


def function_inputs(t_inputs, params):
    return [t for t in t_inputs if t is not None] + list(params)
