"""The result of a solve."""

from __future__ import annotations

import bisect
import enum

import torch


class RESULTS(enum.IntEnum):
    """Per-sample status codes of a solve."""

    successful = 0
    max_steps_reached = 1
    dt_underflow = 2
    nonfinite = 3
    event_occurred = 4


class Solution:
    """What :func:`nde.solve` returns.

    Attributes
    ----------
    ts:
        The saved times: ``(n,)``, or ``(*batch_shape, n)`` when every sample has its own.
    ys:
        The saved states, ``(n, *y0.shape)`` (time first); None when nothing was saved.
    stats:
        ``num_steps``, ``num_accepted_steps``, ``num_rejected_steps``, ``nfe``: integers in joint
        mode, tensors of shape ``batch_shape`` in independent mode.
    result:
        Status codes (:class:`RESULTS`): a 0-d tensor in joint mode, ``batch_shape`` in independent mode.
    event_t, event_mask, event_y:
        Event times, which samples had an event, and the states at the events (solves with an
        event only; differentiable).
    """

    def __init__(self, ts, ys, stats, result, t0, t1, dense=None, event_t=None, event_mask=None, batch_mode="joint",
                 event_y=None):
        self.ts = ts
        self.ys = ys
        self.stats = stats
        self.result = result
        self.t0 = t0
        self.t1 = t1
        self._dense = dense
        self.event_t = event_t
        self.event_mask = event_mask
        self.event_y = event_y
        self.batch_mode = batch_mode

    @property
    def success(self) -> bool:
        """Whether every sample finished successfully (or stopped at an event)."""
        r = self.result
        return bool(((r == RESULTS.successful) | (r == RESULTS.event_occurred)).all())

    def evaluate(self, t) -> torch.Tensor:
        """The dense solution at ``t`` (needs ``SaveAt(dense=True)``).

        ``t`` is a scalar (returns ``y0.shape``), a 1-D tensor of times (returns ``(n, *y0.shape)``),
        or in independent mode a tensor of shape ``batch_shape`` with one time per sample.
        """
        return self._dense_query(t, derivative=False)

    def derivative(self, t) -> torch.Tensor:
        """Time derivative of the dense solution at ``t``; conventions as :meth:`evaluate`."""
        return self._dense_query(t, derivative=True)

    def _dense_query(self, t, derivative):
        if self._dense is None:
            raise ValueError("This solution has no dense output: solve with saveat=SaveAt(dense=True).")
        return self._dense.query(t, derivative)

    def __repr__(self):
        shape = None if self.ys is None else tuple(self.ys.shape)
        return f"Solution(ys={shape}, result={self.result.tolist()}, stats={self.stats})"


class DenseJoint:
    """Every accepted step's interpolant (joint mode), queried by bisection."""

    def __init__(self, solver, terms, args, sign, y0):
        self.solver = solver
        self.terms = terms
        self.args = args
        self.sign = sign
        self.starts = []
        self.ends = []
        self.infos = []
        self.y_like = y0

    def add(self, t0, t1, info):
        self.starts.append(t0)
        self.ends.append(t1)
        self.infos.append(info)

    def query(self, t, derivative):
        tt = torch.as_tensor(t, dtype=torch.float64)
        scalar = tt.dim() == 0
        tt = tt.reshape(-1) * self.sign
        if not self.starts:
            raise ValueError("The solve took no steps; there is no dense output to evaluate.")
        lo, hi = self.starts[0], self.ends[-1]
        if bool(((tt < lo - 1e-12 * max(1.0, abs(lo))) | (tt > hi + 1e-12 * max(1.0, abs(hi)))).any()):
            raise ValueError(
                f"t is outside the solved interval [{self.sign * lo}, {self.sign * hi}]; got {(tt * self.sign).tolist()}."
            )
        outs = []
        for ti in tt.tolist():
            i = min(max(bisect.bisect_right(self.starts, ti) - 1, 0), len(self.starts) - 1)
            a, b = self.starts[i], self.ends[i]
            theta = torch.tensor([(ti - a) / (b - a)], dtype=self.y_like.dtype, device=self.y_like.device)
            theta = theta.reshape((1,) + (1,) * self.y_like.dim())
            fn = self.solver.dense_derivative if derivative else self.solver.dense_eval
            val, _ = fn(self.terms, self.args, a, b, self.infos[i], theta)
            outs.append(val[0] * (self.sign if derivative else 1))
        out = torch.stack(outs)
        return out[0] if scalar else out


class DenseIndependent:
    """Every step's interpolant (independent mode); each sample looks up its own accepted steps."""

    def __init__(self, solver, terms, args, sign, y0, batch_ndim):
        self.solver = solver
        self.terms = terms
        self.args = args
        self.sign = sign
        self.y_like = y0
        self.nb = batch_ndim
        self.records = []  # (t0, t1, accepted, info)

    def add(self, t0, t1, accepted, info):
        self.records.append((t0, t1, accepted, info))

    def query(self, t, derivative):
        y = self.y_like
        bshape = y.shape[: self.nb]
        tt = torch.as_tensor(t, dtype=torch.float64, device=y.device) * self.sign
        if tt.dim() == 0:
            tt = tt.expand(bshape)
        if tuple(tt.shape) != tuple(bshape):
            raise ValueError(f"In independent mode t must be a scalar or have the batch shape {tuple(bshape)}; got {tuple(tt.shape)}.")
        T0 = torch.stack([r[0].reshape(bshape) for r in self.records])
        T1 = torch.stack([r[1].reshape(bshape) for r in self.records])
        acc = torch.stack([r[2].reshape(bshape) for r in self.records])
        inside = acc & (T0 <= tt) & (tt <= T1) & (T1 > T0)
        if not bool(inside.any(0).all()):
            raise ValueError("t is outside the solved interval of some sample.")
        idx = inside.to(torch.int8).argmax(0)  # first accepted step containing t
        flat_idx = idx.reshape(-1)
        ar = torch.arange(flat_idx.numel(), device=y.device)

        def gather(stacked):
            s = stacked.reshape((stacked.shape[0], -1) + stacked.shape[1 + self.nb:])
            return s[flat_idx, ar].reshape(stacked.shape[1:])

        info = _gather_infos([r[3] for r in self.records], gather)
        a = gather(T0.unsqueeze(-1)).reshape(bshape)
        b = gather(T1.unsqueeze(-1)).reshape(bshape)
        pad = (1,) * (y.dim() - self.nb)
        theta = ((tt - a) / (b - a)).to(y.dtype).reshape(tuple(bshape) + pad)
        fn = self.solver.dense_derivative if derivative else self.solver.dense_eval
        val, _ = fn(self.terms, self.args, a.reshape(tuple(bshape) + pad), b.reshape(tuple(bshape) + pad), info, theta)
        return val * self.sign if derivative else val


def _gather_infos(infos, gather):
    first = infos[0]
    if isinstance(first, torch.Tensor):
        return gather(torch.stack(infos))
    if isinstance(first, dict):
        return {k: _gather_infos([i[k] for i in infos], gather) for k in first}
    if isinstance(first, (list, tuple)):
        if any(x is None for i in infos for x in i):
            return type(first)(None for _ in first)
        return type(first)(_gather_infos([i[j] for i in infos], gather) for j in range(len(first)))
    return first
