"""What a solve keeps."""

from __future__ import annotations

import torch


class SaveAt:
    """Which outputs :func:`nde.solve` stores.

    Parameters
    ----------
    t0:
        Save the initial state.
    t1:
        Save the final state. Default ``None``: True unless ``ts``, ``steps`` or ``dense`` is given,
        so that ``SaveAt()`` and ``SaveAt(t0=True)`` keep the final state while ``SaveAt(ts=...)``
        returns exactly the requested times.
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

    def __init__(self, t0: bool = False, t1: bool | None = None, ts=None, steps: bool = False, dense: bool = False):
        for name, v in (("t0", t0), ("t1", t1), ("steps", steps), ("dense", dense)):
            if isinstance(v, (torch.Tensor, list, tuple)):
                raise TypeError(f"SaveAt({name}=...) is a flag (True or False); to save at given times use SaveAt(ts=...).")
        self.t0 = bool(t0)
        self.ts = ts
        self.steps = bool(steps)
        self.dense = bool(dense)
        if t1 is None:
            t1 = not (ts is not None or self.steps or self.dense)
        self.t1 = bool(t1)

    def __repr__(self):
        return f"SaveAt(t0={self.t0}, t1={self.t1}, ts={'...' if self.ts is not None else None}, steps={self.steps}, dense={self.dense})"
