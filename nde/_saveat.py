"""What a solve keeps."""

from __future__ import annotations

import torch


class SaveAt:
    """Which outputs :func:`nde.solve` stores.

    Parameters
    ----------
    t0, t1:
        Save the initial / final state.
    ts:
        Times at which to save (by interpolation of each step's dense output). A 1-D sequence
        shared by all samples, or in independent batch mode a tensor of shape
        ``(*batch_shape, n)`` giving every sample its own times. Must be monotone in the
        direction of integration and inside ``[t0, t1]``.
    steps:
        Save the state after every accepted step.
    dense:
        Keep every step's interpolant so that ``Solution.evaluate(t)`` works anywhere in ``[t0, t1]``.
    """

    def __init__(self, t0: bool = False, t1: bool = False, ts=None, steps: bool = False, dense: bool = False):
        self.t0 = bool(t0)
        self.ts = ts
        self.steps = bool(steps)
        self.dense = bool(dense)
        if not (t0 or t1 or ts is not None or steps or dense):
            t1 = True
        self.t1 = bool(t1)

    def __repr__(self):
        return f"SaveAt(t0={self.t0}, t1={self.t1}, ts={'...' if self.ts is not None else None}, steps={self.steps}, dense={self.dense})"
