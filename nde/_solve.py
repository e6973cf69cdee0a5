"""The solve loop: owns time, saving, statistics and failure codes."""

from __future__ import annotations

import bisect
import math
from typing import Any

import numpy as np
import torch

from ._controllers import AbstractController, ConstantStepSize, PIDController, device_times, host_times, rms_norm
from ._errors import SolveError
from ._saveat import SaveAt
from ._solution import RESULTS, DenseIndependent, DenseJoint, Solution
from ._terms import AbstractTerm, ODETerm, only_ode_terms, reverse_time

_BATCH_MODES = ("joint", "independent")


class Problem:
    """Everything one solve needs, validated; adjoints transform and integrate it."""

    __slots__ = (
        "terms", "solver", "t0", "t1", "y0", "dt0", "args", "saveat", "controller", "max_steps", "batch_mode",
        "batch_ndim", "throw", "progress", "sign", "ts", "ts_per_sample", "user_terms", "t0_in", "t1_in", "ts_in",
        "event", "on_accept",
    )

    def replace(self, **kw):
        new = Problem.__new__(Problem)
        for k in Problem.__slots__:
            setattr(new, k, kw[k] if k in kw else getattr(self, k, None))
        return new


def _as_time(x, name, batch_shape=None):
    if isinstance(x, torch.Tensor):
        if x.dtype.is_complex or not (x.dtype.is_floating_point or x.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a real number or real tensor; got dtype {x.dtype}.")
        if x.numel() != 1 and (batch_shape is None or tuple(x.shape) != tuple(batch_shape)):
            expect = "a scalar" if batch_shape is None else f"a scalar or a tensor of the batch shape {tuple(batch_shape)}"
            raise ValueError(f"{name} must be {expect}; got a tensor of shape {tuple(x.shape)}.")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} must be finite; got {x.tolist()}.")
        if x.numel() == 1:
            return float(x.detach().reshape(()))
        return x.detach().to(torch.float64)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a number or a 0-d tensor; got {type(x).__name__}.")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite; got {x}.")
    return x


def solve(
    terms,
    solver,
    t0,
    t1,
    y0: torch.Tensor,
    dt0=None,
    args: Any = None,
    saveat: SaveAt | None = None,
    controller: AbstractController | None = None,
    adjoint=None,
    max_steps: int | None = "auto",
    batch_mode: str = "joint",
    batch_ndim: int = 1,
    throw: bool = True,
    progress: bool = False,
    event=None,
) -> Solution:
    """Solve a differential equation from ``t0`` to ``t1``.

    ``dy = sum_i f_i(t, y, args) dX_i(t)``, with the terms given by ``terms`` (an
    :class:`~nde.ODETerm` for ``dy/dt = f(t, y, args)``), one step at a time by ``solver``,
    step sizes chosen by ``controller`` and gradients computed as ``adjoint`` says.

    Parameters
    ----------
    terms:
        A term (``ODETerm(f)``, ``ControlTerm``, ``MultiTerm``); a plain callable or ``nn.Module``
        ``f(t, y, args)`` / ``f(t, y)`` is taken as ``ODETerm(f)``.
    solver:
        A solver instance, e.g. ``nde.solvers.Tsit5()``.
    t0, t1:
        Start and end times (``t1 < t0`` integrates backwards). In independent mode either may be
        a tensor of the batch shape: every sample its own interval.
    y0:
        Initial state: a floating-point tensor of any shape. dtype and device of the solve follow it.
    dt0:
        Initial (or, with ``ConstantStepSize``, the constant) step size; None picks one automatically.
    args:
        Passed to the vector field unchanged.
    saveat:
        What to keep; default ``SaveAt(t1=True)``.
    controller:
        ``ConstantStepSize()`` or ``PIDController(rtol, atol)``. Default: constant steps when
        ``dt0`` is given, else ``PIDController()`` for adaptive solvers.
    adjoint:
        How gradients are computed; default ``DirectAdjoint()`` (backpropagate through the solve).
    max_steps:
        Most steps allowed (per sample in independent mode). ``"auto"``: unlimited for constant
        steps, 16384 for adaptive ones. ``None``: unlimited.
    batch_mode:
        ``"joint"``: one step size for the whole batch. ``"independent"``: the first ``batch_ndim``
        dimensions of ``y0`` are samples, each with its own time, step size, accept/reject,
        statistics and result; the vector field then receives ``t`` as a tensor of shape
        ``batch_shape + (1,) * (y0.dim() - batch_ndim)``.
    batch_ndim:
        Number of leading batch dimensions in independent mode.
    throw:
        Raise :class:`~nde.SolveError` on failure (True), or return the partial solution with
        per-sample ``result`` codes (False).
    progress:
        Show a tqdm progress bar of the integration from t0 to t1.
    event:
        An :class:`~nde.Event` that stops the solve (where supported).

    Returns
    -------
    Solution
    """
    from ._adjoint import AbstractAdjoint, DirectAdjoint
    from nde.solvers.base import AbstractSolver

    problem = _prepare(terms, solver, t0, t1, y0, dt0, args, saveat, controller, max_steps, batch_mode,
                       batch_ndim, throw, progress, event, AbstractSolver)
    if adjoint is None:
        adjoint = DirectAdjoint()
    if not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(f"adjoint must be an nde adjoint such as nde.DirectAdjoint(); got {type(adjoint).__name__}.")
    return adjoint.run(problem)


def _prepare(terms, solver, t0, t1, y0, dt0, args, saveat, controller, max_steps, batch_mode, batch_ndim, throw,
             progress, event, AbstractSolver):
    if not isinstance(terms, AbstractTerm):
        if callable(terms):
            terms = ODETerm(terms)
        else:
            raise TypeError(f"terms must be an nde term (e.g. ODETerm(f)) or a callable f(t, y, args); got {type(terms).__name__}.")
    if isinstance(solver, type):
        raise TypeError(f"solver must be an instance: pass {solver.__name__}() rather than {solver.__name__}.")
    if not isinstance(solver, AbstractSolver):
        raise TypeError(f"solver must be an nde solver such as nde.solvers.Tsit5(); got {type(solver).__name__}.")
    if not isinstance(y0, torch.Tensor):
        raise TypeError(f"y0 must be a torch.Tensor; got {type(y0).__name__}.")
    if not y0.dtype.is_floating_point:
        raise TypeError(f"y0 must have a floating-point dtype (float32 or float64); got {y0.dtype}.")
    if y0.device.type == "meta":
        raise ValueError("y0 is on the meta device, which holds no values: create it on 'cpu' or 'cuda'.")
    for name, x in (("t0", t0), ("t1", t1), ("dt0", dt0), ("SaveAt(ts=...)", getattr(saveat, "ts", None))):
        # per-sample times live with the state; a scalar time may sit anywhere (it is read once)
        if isinstance(x, torch.Tensor) and x.numel() > 1 and x.device != y0.device and name != "SaveAt(ts=...)":
            raise ValueError(f"{name} is on device {x.device} but y0 is on {y0.device}: move {name} to {y0.device}.")
    if not _all_finite(y0):
        raise ValueError("y0 contains NaN or inf.")
    if batch_mode not in _BATCH_MODES:
        raise ValueError(f"batch_mode must be one of {_BATCH_MODES}; got {batch_mode!r}.")
    if not isinstance(batch_ndim, int) or batch_ndim < 0 or (batch_mode == "independent" and batch_ndim > y0.dim()):
        raise ValueError(f"batch_ndim must be an integer between 0 and y0.dim()={y0.dim()}; got {batch_ndim!r}.")
    independent = batch_mode == "independent"
    bshape = tuple(y0.shape[:batch_ndim]) if independent else None
    t0f = _as_time(t0, "t0", bshape)
    t1f = _as_time(t1, "t1", bshape)
    if isinstance(t0f, torch.Tensor) or isinstance(t1f, torch.Tensor):
        a = torch.as_tensor(t0f, dtype=torch.float64).expand(bshape)
        b = torch.as_tensor(t1f, dtype=torch.float64).expand(bshape)
        d = torch.sign(b - a)
        if bool((d > 0).any()) and bool((d < 0).any()):
            raise ValueError("With per-sample times, every sample must integrate in the same direction.")
        sign = -1.0 if bool((d < 0).any()) else 1.0
    else:
        sign = -1.0 if t1f < t0f else 1.0
    if saveat is None:
        saveat = SaveAt(t1=True)
    if not isinstance(saveat, SaveAt):
        raise TypeError(f"saveat must be an nde.SaveAt; got {type(saveat).__name__}.")
    if controller is None:
        if dt0 is not None:
            controller = ConstantStepSize()
        elif solver.adaptive:
            controller = PIDController()
        else:
            raise ValueError(
                f"{type(solver).__name__} takes fixed steps: pass dt0=... (and optionally controller=ConstantStepSize())."
            )
    if not isinstance(controller, AbstractController):
        raise TypeError(f"controller must be ConstantStepSize() or PIDController(...); got {type(controller).__name__}.")
    if max_steps == "auto":
        max_steps = None if isinstance(controller, ConstantStepSize) else 16384
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be a positive integer or None; got {max_steps!r}.")

    # internal time runs forwards: tau = sign * t
    it0 = t0f * sign
    it1 = t1f * sign
    ts_in = saveat.ts
    ts, per_sample = (None, False) if ts_in is None else _output_times(ts_in, t0f, t1f, it0, it1, sign, independent, bshape)
    if sign < 0:
        terms_int = reverse_time(terms)
        controller = _reverse_controller(controller)
    else:
        terms_int = terms

    p = Problem.__new__(Problem)
    p.terms, p.user_terms, p.solver = terms_int, terms, solver
    p.t0, p.t1, p.y0, p.dt0, p.args = it0, it1, y0, (None if dt0 is None else _signed_dt0(dt0, sign)), args
    p.saveat, p.controller, p.max_steps, p.batch_mode, p.batch_ndim = saveat, controller, max_steps, batch_mode, batch_ndim
    p.throw, p.progress, p.sign, p.ts, p.ts_per_sample = throw, progress, sign, ts, per_sample
    p.t0_in, p.t1_in, p.ts_in, p.event = t0, t1, ts_in, event
    return p


_FEW_TIMES = 4096


def _output_times(ts_in, t0f, t1f, it0, it1, sign, independent, bshape):
    """``SaveAt(ts=ts_in)`` checked and mapped to internal time (``sign * t``, clipped onto
    ``[it0, it1]``): ``(float64 tensor, per_sample)``."""
    tst = ts_in if isinstance(ts_in, torch.Tensor) else torch.as_tensor(ts_in, dtype=torch.float64)
    if tst.dtype.is_complex or not (tst.dtype.is_floating_point or tst.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"SaveAt(ts=...) must hold real times; got dtype {tst.dtype}.")
    # times given in float32 may sit a rounding error outside [t0, t1]
    rel = max(1e-12, 4 * torch.finfo(tst.dtype).eps) if tst.dtype.is_floating_point else 1e-12
    shared_ends = not isinstance(t0f, torch.Tensor) and not isinstance(t1f, torch.Tensor)
    if tst.dim() == 1 and 0 < tst.shape[0] <= _FEW_TIMES and shared_ends:
        # the common case, a few shared output times: checked as Python floats (one copy to the host
        # instead of a dozen small tensor operations)
        vals = tst.detach().tolist()
        if not all(math.isfinite(v) for v in vals):
            raise ValueError("SaveAt(ts=...) contains NaN or inf.")
        its = [v * sign for v in vals]
        if any(b < a for a, b in zip(its, its[1:])):
            raise ValueError(_not_monotone(sign))
        if its[0] < it0 - rel * (1 + abs(it0)) or its[-1] > it1 + rel * (1 + abs(it1)):
            raise ValueError(f"SaveAt(ts=...) must lie inside [t0, t1] = [{t0f}, {t1f}].")
        return torch.tensor([min(max(v, it0), it1) for v in its], dtype=torch.float64), False
    tst = tst.detach().to(torch.float64, copy=True).cpu()
    per_sample = False
    if tst.dim() == 0:
        tst = tst.reshape(1)
    if tst.dim() != 1:
        if not independent or tuple(tst.shape[:-1]) != bshape:
            raise ValueError(
                "SaveAt(ts=...) must be 1-D, or in independent mode of shape (*batch_shape, n); "
                f"got shape {tuple(tst.shape)}."
            )
        per_sample = True
    if tst.shape[-1] == 0:
        raise ValueError("SaveAt(ts=...) is empty.")
    if not per_sample and not shared_ends:
        # times shared by samples with intervals of their own: every sample saves at all of them
        tst = tst.expand(bshape + (tst.shape[-1],)).clone()
        per_sample = True
    if not bool(torch.isfinite(tst).all()):
        raise ValueError("SaveAt(ts=...) contains NaN or inf.")
    its = tst * sign
    if bool((its[..., 1:] < its[..., :-1]).any()):
        raise ValueError(_not_monotone(sign))
    lo = torch.as_tensor(it0, dtype=torch.float64)
    hi = torch.as_tensor(it1, dtype=torch.float64)
    if per_sample:
        lo, hi = lo.expand(bshape).unsqueeze(-1), hi.expand(bshape).unsqueeze(-1)
    if bool(((its < lo - rel * (1 + lo.abs())) | (its > hi + rel * (1 + hi.abs()))).any()):
        raise ValueError(f"SaveAt(ts=...) must lie inside [t0, t1] = [{t0f if not isinstance(t0f, torch.Tensor) else 't0'}, {t1f if not isinstance(t1f, torch.Tensor) else 't1'}].")
    return torch.minimum(torch.maximum(its, lo), hi), per_sample


def _not_monotone(sign):
    return ("SaveAt(ts=...) must be monotone in the direction of integration "
            f"({'increasing' if sign > 0 else 'decreasing'}, since t1 {'>' if sign > 0 else '<'} t0).")


def _signed_dt0(dt0, sign):
    direction = "positive (t1 > t0)" if sign > 0 else "negative (t1 < t0)"
    if isinstance(dt0, torch.Tensor) and dt0.numel() > 1:
        if not bool(torch.isfinite(dt0).all()):
            raise ValueError("dt0 must be finite.")
        if bool((dt0 * sign <= 0).any()):
            raise ValueError(f"dt0 must be nonzero and point from t0 to t1: every entry {direction}.")
        return dt0.detach().to(torch.float64) * sign
    v = _as_time(dt0, "dt0")
    if v == 0.0:
        raise ValueError("dt0 must be nonzero.")
    if v * sign < 0:
        raise ValueError(f"dt0={v} points away from t1: integrating from t0 to t1 needs dt0 {direction}.")
    return v * sign


def _reverse_controller(c):
    import copy

    c = copy.copy(c)
    for name in ("step_ts", "jump_ts"):
        if getattr(c, name, None):
            setattr(c, name, sorted(-x for x in getattr(c, name)))
    return c


def _seed(controller, solver, state):
    """``f0=f(t0, y0)`` for the first-step estimate when the solver's state already holds it."""
    first = getattr(solver, "first_stage", None)
    if first is None or not isinstance(controller, PIDController):
        return {}
    f0 = first(state)
    return {} if f0 is None else {"f0": f0}


def _merge_jump_ts(controller, terms):
    j = terms.jump_ts
    if j is None or not isinstance(controller, PIDController):
        return controller
    import copy

    c = copy.copy(controller)
    c.jump_ts = sorted(set(c.jump_ts) | set(torch.as_tensor(j, dtype=torch.float64).reshape(-1).tolist()))
    return c


# ----------------------------------------------------------------------------------------------
def integrate(p: Problem) -> Solution:
    """Run the loop of a prepared problem (what :class:`~nde.DirectAdjoint` does)."""
    if p.batch_mode == "independent":
        return _integrate_independent(p)
    return _integrate_joint(p)


def _check_step_output(y0, y1, terms, solver, t0, args):
    if not isinstance(y1, torch.Tensor) or y1.shape != y0.shape or y1.dtype != y0.dtype or y1.device != y0.device:
        _raise_shape(terms, solver, t0, y0, args, y1)


class _diagnose_vector_field:
    """Turn a broadcasting failure inside the first solver call into a clear shape/dtype error."""

    def __init__(self, terms, solver, t0, y0, args):
        self.a = (terms, solver, t0, y0, args)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, (RuntimeError, TypeError, AttributeError)):
            _raise_shape(*self.a)
        return False


def _raise_shape(terms, solver, t0, y0, args, y1=None):
    tt = torch.as_tensor(t0, dtype=y0.dtype, device=y0.device)
    try:
        if solver.term_structure == "ode" and terms.is_ode:
            out = terms.ode(tt, y0, args)
        else:
            out = y1
    except Exception as e:  # the vector field itself fails: report that
        raise ValueError(f"The vector field failed on y of shape {tuple(y0.shape)}: {e}") from e
    if out is None and solver.term_structure == "ode" and terms.is_ode:
        raise TypeError("The vector field returned None: it must return a tensor of the shape of y (a missing return?).")
    if out is not None and isinstance(out, torch.Tensor):
        if out.device != y0.device:
            raise ValueError(
                f"The vector field returned a tensor on {out.device} but y is on {y0.device}; return it on {y0.device}."
            )
        if out.shape != y0.shape:
            raise ValueError(
                f"The vector field returned shape {tuple(out.shape)} but y has shape {tuple(y0.shape)}; "
                "they must be equal."
            )
        if out.dtype != y0.dtype:
            raise TypeError(
                f"The vector field returned dtype {out.dtype} but y has dtype {y0.dtype}; nde does not promote "
                "the state silently: make the vector field return the dtype of y0."
            )
    if out is not None and not isinstance(out, torch.Tensor):
        raise TypeError(f"The vector field must return a tensor; got {type(out).__name__}.")


def _progress_bar(p):
    if not p.progress:
        return None
    from tqdm.auto import tqdm

    total = float(torch.as_tensor(p.t1 - p.t0).max()) if isinstance(p.t0, torch.Tensor) or isinstance(p.t1, torch.Tensor) else p.t1 - p.t0
    return tqdm(total=total, unit="t", desc="nde.solve", bar_format="{l_bar}{bar}| {n:.3g}/{total:.3g} [{elapsed}<{remaining}]")


def _fail(p, code, t, step, samples=None):
    names = {
        RESULTS.max_steps_reached: f"reached max_steps={p.max_steps}; raise max_steps or loosen the tolerances",
        RESULTS.dt_underflow: "the step size underflowed (the problem may be stiff or singular); loosen rtol/atol or use an implicit solver",
        RESULTS.nonfinite: "the state became NaN or inf; reduce the step size or check the vector field",
    }
    where = f" for samples {samples}" if samples is not None else ""
    raise SolveError(
        f"The solve failed at t={t * p.sign if isinstance(t, float) else t} (step {step}){where}: {names[code]}.",
        result=code, t=t, step=step, samples=samples,
    )


def _integrate_joint(p: Problem) -> Solution:
    terms, solver, args, y = p.terms, p.solver, p.args, p.y0
    t0, tend = p.t0, p.t1
    saveat = p.saveat
    controller = _merge_jump_ts(p.controller, terms)
    constant = isinstance(controller, ConstantStepSize)
    with _diagnose_vector_field(terms, solver, t0, y, args):
        state, nfe = solver.init(terms, t0, tend, y, args)
    ys_out = []
    ts_list = p.ts[...].tolist() if p.ts is not None else []
    n_ts = len(ts_list)
    ts_idx = 0
    if saveat.t0:
        ys_out.append(y)
    while ts_idx < n_ts and ts_list[ts_idx] <= t0:
        ys_out.append(y)
        ts_idx += 1
    step_ts, step_ys = [], []
    dense = DenseJoint(solver, terms, args, p.sign, y) if saveat.dense else None
    result = RESULTS.successful
    num_steps = accepted = rejected = 0
    t = t0
    if tend == t0:
        t_next = t0
    else:
        with _diagnose_vector_field(terms, solver, t0, y, args):
            t_next, cstate, n = controller.init_joint(terms, t0, tend, y, p.dt0, args, solver, solver.error_order,
                                                      **_seed(controller, solver, state))
        nfe += n
    bar = _progress_bar(p)
    max_steps = p.max_steps
    on_accept = getattr(p, "on_accept", None)
    first = True
    ev = None if p.event is None else p.event._joint(p, y)
    hit = None
    restart = False
    while t < tend:
        if max_steps is not None and num_steps >= max_steps:
            result = RESULTS.max_steps_reached
            if p.throw:
                _fail(p, result, t, num_steps)
            break
        if restart:
            # the last step landed on a discontinuity: restart the solver there (no FSAL across it),
            # once the next step is known
            state, n = solver.init(terms, t, tend, y, args)
            nfe += n
            restart = False
        try:
            y1, y_err, info, new_state, n = solver.step(terms, t, t_next, y, args, state)
        except (RuntimeError, TypeError, AttributeError):
            if first:
                _raise_shape(terms, solver, t, y, args)
            raise
        if first:
            _check_step_output(y, y1, terms, solver, t, args)
            first = False
        nfe += n
        num_steps += 1
        if constant:
            accept, nt0, nt1, jump, cstate, _ = controller.adapt_joint(t, t_next, y, y1, y_err, cstate)
            if not _all_finite(y1):
                result = RESULTS.nonfinite
                if p.throw:
                    _fail(p, result, t_next, num_steps, _bad_samples(y1, p))
                break
        else:
            accept, nt0, nt1, jump, cstate, _ = controller.adapt_joint(t, t_next, y, y1, y_err, cstate)
        if accept:
            accepted += 1
            t_hi = t_full = t_next
            if ev is not None:
                hit, n = ev.step(t, t_next, y1, info)
                nfe += n
                if hit is not None:  # a terminal event: the solve ends inside this step
                    t_hi = float(hit[0].detach())
            if ts_idx < n_ts and ts_list[ts_idx] <= t_hi:
                j = bisect.bisect_right(ts_list, t_hi, lo=ts_idx)
                nfe += _save_interp(ys_out, solver, terms, args, t, t_next, info, y1, ts_list[ts_idx:j])
                ts_idx = j
            if hit is not None:
                y1, t_next, result = hit[1], t_hi, RESULTS.event_occurred
            if saveat.steps:
                step_ts.append(t_next)
                step_ys.append(y1)
            if dense is not None:
                dense.add(t, t_full, info)
            if bar is not None:
                bar.update(t_next - t)
            y = y1
            state = new_state
            restart = bool(jump)
            t = t_next
            if on_accept is not None:
                on_accept(t, y, state, jump)
            if hit is not None:
                break
        else:
            rejected += 1
            if nt1 - nt0 <= 8 * math.ulp(max(abs(nt0), 1e-300)) or (
                controller.dtmin is not None and nt1 - nt0 < controller.dtmin and not controller.force_dtmin
            ):
                result = RESULTS.dt_underflow
                if p.throw:
                    _fail(p, result, t, num_steps)
                break
        if t >= tend:
            break
        # the step's stages and error are not needed any more (the dense output keeps its own
        # reference): freed before the next step allocates its own, the working set stays one step's
        info = y_err = None
        # the next step, landing exactly on t1 when it is within rounding of it
        if constant:
            t_next = nt1 if tend - nt1 > 1e-9 * (nt1 - t) else tend
        else:
            t_next = controller._next_t1(t, nt1, tend)
            if tend - t_next <= 1e-10 * (t_next - t):
                t_next = tend
    if bar is not None:
        bar.close()
    if hit is not None:  # outputs after a terminal event hold the state at the event
        ys_out.extend([y] * (n_ts - ts_idx))
    if saveat.t1:
        ys_out.append(y)
    if saveat.steps:
        ys_out.extend(step_ys)
    ys = torch.stack(ys_out) if ys_out else None
    out_ts = _output_ts_joint(p, step_ts, t)
    stats = {"num_steps": num_steps, "num_accepted_steps": accepted, "num_rejected_steps": rejected, "nfe": nfe}
    res = torch.tensor(int(result))
    sol = Solution(out_ts, ys, stats, res, p.t0_in, p.t1_in, dense=dense, batch_mode="joint")
    return sol if ev is None else ev.finish(sol, hit)


def _all_finite(y):
    """Whether every element of ``y`` is finite, in one reduction: a NaN or inf makes the sum non-finite;
    a non-finite sum of finite values (an overflow) is settled by the elementwise check."""
    with torch.no_grad():
        s = float(y.sum())
        return math.isfinite(s) or bool(torch.isfinite(y).all())


def _finite_per_sample(y):
    """Per sample (leading dimension): whether all its elements are finite (as :func:`_all_finite`)."""
    with torch.no_grad():
        flat = y.reshape(y.shape[0], -1)
        ok = torch.isfinite(flat.sum(1))
        if bool(ok.all()):
            return ok
        return torch.isfinite(flat).all(1)


def _bad_samples(y1, p):
    if y1.dim() == 0:
        return None
    bad = ~torch.isfinite(y1.reshape(y1.shape[0], -1)).all(1)
    return bad.nonzero().flatten().tolist()


def _save_interp(ys_out, solver, terms, args, t0, t1, info, y1, tsv):
    nfe = 0
    if tsv[-1] == t1:
        inner, at_end = tsv[:-1], True
    else:
        inner, at_end = tsv, False
    if inner:
        dt = t1 - t0
        theta = torch.tensor([(s - t0) / dt for s in inner], dtype=y1.dtype, device=y1.device)
        theta = theta.reshape((-1,) + (1,) * y1.dim())
        vals, nfe = solver.dense_eval(terms, args, t0, t1, info, theta)
        ys_out.extend(vals.unbind(0))
    if at_end:
        ys_out.append(y1)
    return nfe


def _output_ts_joint(p, step_ts, t_final):
    parts = []
    if p.saveat.t0:
        parts.append(torch.tensor([p.t0], dtype=torch.float64))
    if p.ts is not None:
        parts.append(p.ts.clone())
    if p.saveat.t1:
        parts.append(torch.tensor([t_final], dtype=torch.float64))
    if p.saveat.steps:
        parts.append(torch.tensor(step_ts, dtype=torch.float64))
    if not parts:
        return None
    return torch.cat(parts) * p.sign


# ----------------------------------------------------------------------------------------------
def _tree_where(mask, new, old):
    if type(new) is list and len(new) == 1 and type(old) is list and isinstance(new[0], torch.Tensor) \
            and isinstance(old[0], torch.Tensor):  # the common FSAL state: one stage
        a = new[0]
        return [torch.where(mask.reshape(mask.shape + (1,) * (a.dim() - mask.dim())), a, old[0])]
    if new is None or old is None:
        return None
    if isinstance(new, torch.Tensor):
        m = mask.reshape(mask.shape + (1,) * (new.dim() - mask.dim())) if new.dim() >= mask.dim() else mask
        return torch.where(m, new, old)
    if isinstance(new, (list, tuple)):
        if any(a is None or b is None for a, b in zip(new, old)):
            return type(new)(None for _ in new)
        return type(new)(_tree_where(mask, a, b) for a, b in zip(new, old))
    if isinstance(new, dict):
        return {k: _tree_where(mask, new[k], old[k]) for k in new}
    return new


def tb_like(x, pad):
    """A per-sample tensor ``(n,)`` reshaped to ``(n, 1, ..., 1)`` against states with ``pad`` trailing dims."""
    return x.reshape((x.shape[0],) + pad)


def _tree_index(tree, idx, nb, bshape):
    """Select samples ``idx`` (flat indices; a tensor, or an array for NumPy leaves) of every
    batch-leading tensor or array in ``tree``."""
    if tree is None:
        return None
    if isinstance(tree, (torch.Tensor, np.ndarray)):
        if tree.ndim >= nb and tuple(tree.shape[:nb]) == tuple(bshape):
            return tree.reshape((-1,) + tree.shape[nb:])[idx]
        return tree
    if isinstance(tree, (list, tuple)):
        return type(tree)(_tree_index(x, idx, nb, bshape) for x in tree)
    if isinstance(tree, dict):
        return {k: _tree_index(v, idx, nb, bshape) for k, v in tree.items()}
    return tree


def _integrate_independent(p: Problem) -> Solution:
    """Every sample its own time, step size, accept/reject and statistics.

    The per-sample times, masks and counters are float64/bool/int64 NumPy arrays on the host (an
    operation on a few hundred numbers there costs a fraction of a small tensor operation); they
    meet the state as tensors on its device (``torch.from_numpy``, no copy on the CPU), and the
    error norms come back once a step. Arrays handed to tensors are never changed in place.

    The working batch is compacted (finished samples removed) when fewer than half of it is still
    running, so that finished samples stop costing vector-field work; only when ``args`` is None and
    all terms are ODE terms, since per-sample data inside them cannot be indexed.
    """
    terms, solver, args, y0 = p.terms, p.solver, p.args, p.y0
    if not solver.supports_independent:
        raise ValueError(f"{type(solver).__name__} does not support batch_mode='independent'.")
    nb = p.batch_ndim
    bshape = tuple(y0.shape[:nb])
    B = math.prod(bshape)
    dev = y0.device
    ev = y0.shape[nb:]
    pad = (1,) * len(ev)
    saveat = p.saveat
    controller = _merge_jump_ts(p.controller, terms)
    constant = isinstance(controller, ConstantStepSize)

    t0_np = host_times(p.t0, bshape).reshape(B)
    tend_np = host_times(p.t1, bshape).reshape(B)
    t0_full, tend_full = device_times(t0_np, y0), device_times(tend_np, y0)
    yf = y0.reshape((B,) + ev)

    def norm_fn(x):
        x = x.reshape(x.shape[0], -1)
        if controller.norm is None if isinstance(controller, PIDController) else True:
            return torch.linalg.vector_norm(x, dim=1) / math.sqrt(max(x.shape[1], 1))
        return torch.func.vmap(controller.norm)(x)

    def tb(a):  # per-sample times as a tensor broadcastable against the working states
        return device_times(a, y0).reshape((a.shape[0],) + pad)

    def mask(a):  # a NumPy mask or index array as a tensor on the state's device
        return device_times(a, y0)

    # outputs
    n_ts = 0
    if p.ts is not None:
        ts_full = p.ts.to(dev)
        ts_full = ts_full.expand(bshape + (ts_full.shape[-1],)).reshape(B, -1) if not p.ts_per_sample else ts_full.reshape(B, -1)
        n_ts = ts_full.shape[1]
        ys_ts = y0.new_zeros((n_ts, B) + ev)
        ts_ptr = torch.zeros(B, dtype=torch.long, device=dev)
        # outputs at t0
        at0 = ts_full <= t0_full.unsqueeze(1)
        if bool(at0.any()):
            i, b = at0.t().nonzero(as_tuple=True)
            ys_ts = ys_ts.index_put((i, b), yf[b])
            ts_ptr = at0.sum(1)
    if saveat.steps:
        raise ValueError(
            "SaveAt(steps=True) is not available with batch_mode='independent' (every sample has its own "
            "steps); use SaveAt(ts=...) or SaveAt(dense=True)."
        )
    # Finished samples are dropped from the working batch only when nothing per-sample can hide in
    # args or in control paths (those would need to be indexed too).
    compactable = saveat.dense is False and args is None and only_ode_terms(terms)
    jumps = getattr(controller, "jump_ts", None)
    jump_array = np.array(jumps, dtype=np.float64) if jumps else None
    dense = DenseIndependent(solver, terms, args, p.sign, y0, nb) if saveat.dense else None

    result = np.zeros(B, dtype=np.int64)
    num_steps = np.zeros(B, dtype=np.int64)
    n_rej = np.zeros(B, dtype=np.int64)
    nfe = np.zeros(B, dtype=np.int64)

    # working set
    widx = np.arange(B)
    t = t0_np
    y = yf
    with _diagnose_vector_field(terms, solver, tb(t), y, args):
        state, n = solver.init(terms, tb(t), tb(tend_np), y, args)
    nfe += n
    tend = tend_np
    active = t < tend
    if active.any():
        dt0 = p.dt0 if not isinstance(p.dt0, torch.Tensor) else host_times(p.dt0.reshape(B), (B,))
        with _diagnose_vector_field(terms, solver, tb(t), y, args):
            t_next, cstate, n = controller.init_batch(terms, t, tend, y, dt0, args, solver, norm_fn, solver.error_order, **_seed(controller, solver, state))
        nfe += n
    else:
        t_next, cstate = t, None
    t_next = np.where(active, t_next, t)
    first = True
    bar = _progress_bar(p)
    ev = None if p.event is None else p.event._independent(p, yf, t0_full, tend_full, pad)
    final_y = yf  # final states, filled in as samples leave the working batch (out of place: differentiable)
    step_no = 0
    on_accept = getattr(p, "on_accept", None)
    # statistics of the working batch, added to the per-sample counters when it changes and at the end
    steps_w = np.zeros(B, dtype=np.int64)
    rej_w = np.zeros(B, dtype=np.int64)
    nfe_w = np.zeros(B, dtype=np.int64)

    def flush(widx, steps_w, rej_w, nfe_w):
        num_steps[widx] += steps_w
        n_rej[widx] += rej_w
        nfe[widx] += nfe_w

    plain_next = not constant and not controller.step_ts and not controller.jump_ts
    while True:
        n_active = int(np.count_nonzero(active))
        if n_active == 0:
            break
        # compaction
        if compactable and 2 * n_active < active.size and active.size > 1:
            keep, gone = np.flatnonzero(active), np.flatnonzero(~active)
            flush(widx, steps_w, rej_w, nfe_w)
            keep_t = mask(keep)
            final_y = final_y.index_put((mask(widx[gone]),), y[mask(gone)])
            widx, t, t_next, tend, y = widx[keep], t[keep], t_next[keep], tend[keep], y[keep_t]
            state = _tree_index(state, keep_t, 1, (active.size,))
            cstate = _tree_index(cstate, keep, 1, (active.size,))
            active = active[keep]
            steps_w, rej_w, nfe_w = (np.zeros(keep.size, dtype=np.int64) for _ in range(3))
        deactivated = False  # whether a sample stopped early this step (failure or event)
        if p.max_steps is not None and step_no >= p.max_steps:  # no sample has taken more than step_no steps
            taken = num_steps[widx] + steps_w
            over = active & (taken >= p.max_steps)
            if over.any():
                result[widx[over]] = int(RESULTS.max_steps_reached)
                if p.throw:
                    _fail(p, RESULTS.max_steps_reached, float(t[over][0]), int(taken[over][0]), widx[over].tolist())
                active = active & ~over
                t_next = np.where(active, t_next, t)
                if not active.any():
                    break
        # samples that are not active have t_next == t: their step is empty and changes nothing
        tn = t_next
        t_t, tn_t = tb(t), tb(tn)
        if first:
            with _diagnose_vector_field(terms, solver, t_t, y, args):
                y1, y_err, info, new_state, n = solver.step(terms, t_t, tn_t, y, args, state)
            _check_step_output(y, y1, terms, solver, t_t, args)
            first = False
        else:
            y1, y_err, info, new_state, n = solver.step(terms, t_t, tn_t, y, args, state)
        step_no += 1
        steps_w += active
        nfe_w += n * active
        accept, nt0, nt1, cstate, _ = controller.adapt_batch(t, tn, y, y1, y_err, cstate, norm_fn)
        if constant:
            bad = active & ~_finite_per_sample(y1).cpu().numpy()
            if bad.any():
                rej_w += bad
                result[widx[bad]] = int(RESULTS.nonfinite)
                if p.throw:
                    _fail(p, RESULTS.nonfinite, float(tn[bad][0]), step_no, widx[bad].tolist())
                active = active & ~bad
                deactivated = True
            accept = accept & active
        else:
            accept = accept & active
            if np.count_nonzero(accept) < n_active:  # some step was rejected: did its next size underflow?
                rej = active & ~accept
                rej_w += rej
                under = rej & ((nt1 - nt0) <= 8 * np.finfo(np.float64).eps * np.maximum(np.abs(nt0), 1e-300))
                if controller.dtmin is not None and not controller.force_dtmin:
                    under = under | (rej & ((nt1 - nt0) < controller.dtmin))
                if under.any():
                    result[widx[under]] = int(RESULTS.dt_underflow)
                    if p.throw:
                        _fail(p, RESULTS.dt_underflow, float(t[under][0]), step_no, widx[under].tolist())
                    active = active & ~under
                    deactivated = True
        # the tensor views the outputs and hooks need, made once a step when needed
        need = n_ts or dense is not None or ev is not None or on_accept is not None
        widx_t = mask(widx) if need else None
        accept_t = mask(accept) if need or not accept.all() else None
        ev_hit, t_save = None, tn
        if ev is not None:
            hit_t, t_ev, y_ev, n = ev.step(widx_t, accept_t, t_t.reshape(-1), tn_t.reshape(-1), y1, info)
            if hit_t is not None:
                ev_hit = hit_t.cpu().numpy()
                t_save = np.where(ev_hit, t_ev.detach().to("cpu", torch.float64).numpy(), tn)
            if n:
                nfe[widx[active]] += n
        # saving
        if n_ts:
            gl = widx_t
            tv, tnv = t_t.reshape(-1), tn_t.reshape(-1)
            t_save_t = tnv if t_save is tn else device_times(t_save, y0)
            ptr = ts_ptr[gl]
            while True:
                cand = ts_full[gl, ptr.clamp(max=n_ts - 1)]
                pend = accept_t & (ptr < n_ts) & (cand <= t_save_t)
                if not bool(pend.any()):
                    break
                denom = torch.where(tnv > tv, tnv - tv, torch.ones_like(tv))
                theta = ((cand - tv) / denom).clamp(0, 1)
                vals, n = solver.dense_eval(terms, args, t_t, tn_t, info, tb_like(theta, pad).to(y.dtype))
                vals = torch.where(tb_like(theta == 1, pad), y1, vals)
                sel = pend.nonzero().flatten()
                if n:
                    nfe[widx[sel.cpu().numpy()]] += n
                ys_ts = ys_ts.index_put((ptr[sel], gl[sel]), vals[sel])
                ptr = ptr + pend.long()
            ts_ptr[gl] = ptr
        if dense is not None:
            dense.add(t_t, tn_t, accept_t, info)
        if bar is not None:
            bar.update(float(np.max(np.where(accept, tn - t, 0.0))))
        if ev_hit is not None:  # samples with a terminal event end inside this step
            hit_t = mask(ev_hit)
            if n_ts:
                ys_ts = ev.after_save(ys_ts, ts_ptr, widx_t, hit_t, y_ev)
            y1 = torch.where(tb_like(hit_t, pad), y_ev, y1)
            tn = t_save
            result[widx[ev_hit]] = int(RESULTS.event_occurred)
        if accept_t is None:  # every working sample accepted its step
            y, state = y1, new_state
        else:
            y = torch.where(tb_like(accept_t, pad), y1, y)
            state = _tree_where(accept_t, new_state, state)
        if jump_array is not None and (accept & np.isin(tn, jump_array)).any():
            # a sample stepped onto a discontinuity: restart the solver state (no FSAL across it)
            state, n = solver.init(terms, tb(np.where(accept, tn, t)), tb(tend), y, args)
            nfe[widx[active]] += n
        if on_accept is not None:
            on_accept(widx_t, accept_t, t_t.reshape(-1), tb(tn).reshape(-1), y, state)
        # the controller's next_t0 is the step's end where accepted, its start elsewhere
        t = nt0 if ev_hit is None and not constant else np.where(accept, tn, t)
        active = active & (t < tend)
        if ev_hit is not None:
            active = active & ~ev_hit
            deactivated = True
        # the next step, landing exactly on t1 when it is within rounding of it
        if constant:
            t_next = np.where(tend - nt1 > 1e-9 * (nt1 - t), nt1, tend)
        elif plain_next:
            t_next = np.where(nt1 + 1e-10 * (nt1 - t) >= tend, tend, nt1)
        else:
            t_next = controller._next_t1_batch(t, nt1, tend)
            t_next = np.where(tend - t_next <= 1e-10 * (t_next - t), tend, t_next)
        if deactivated:
            t_next = np.where(active, t_next, t)
    flush(widx, steps_w, rej_w, nfe_w)
    if bar is not None:
        bar.close()
    final_y = y if widx.size == B else final_y.index_put((mask(widx),), y)
    final = final_y.reshape(y0.shape) if B > 0 else y0
    # outputs
    outs, out_ts = [], []
    if saveat.t0:
        outs.append(y0.unsqueeze(0))
    if n_ts:
        outs.append(ys_ts.reshape((n_ts,) + tuple(y0.shape)))
    if saveat.t1:
        outs.append(final.unsqueeze(0))
    ys = torch.cat(outs) if outs else None
    res = torch.from_numpy(result).to(dev).reshape(bshape)

    def per_sample(a):
        return torch.from_numpy(a).to(dev).reshape(bshape)

    stats = {
        "num_steps": per_sample(num_steps), "num_accepted_steps": per_sample(num_steps - n_rej),
        "num_rejected_steps": per_sample(n_rej), "nfe": per_sample(nfe),
    }
    ts_parts = []
    if saveat.t0:
        ts_parts.append(torch.as_tensor(p.t0, dtype=torch.float64).expand(bshape).unsqueeze(-1) if isinstance(p.t0, torch.Tensor) else torch.tensor([p.t0], dtype=torch.float64))
    if p.ts is not None:
        ts_parts.append(p.ts.clone())
    if saveat.t1:
        ts_parts.append(torch.as_tensor(p.t1, dtype=torch.float64).expand(bshape).unsqueeze(-1) if isinstance(p.t1, torch.Tensor) else torch.tensor([p.t1], dtype=torch.float64))
    out_ts_t = None
    if ts_parts:
        if any(x.dim() > 1 for x in ts_parts):
            ts_parts = [x.expand(bshape + (x.shape[-1],)) if x.dim() == 1 else x for x in ts_parts]
        out_ts_t = torch.cat(ts_parts, dim=-1) * p.sign
    sol = Solution(out_ts_t, ys, stats, res, p.t0_in, p.t1_in, dense=dense, batch_mode="independent")
    if ev is not None:
        ev.finish(sol, bshape, y0)
    return sol
