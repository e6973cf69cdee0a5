"""Errors raised by a solve."""

from __future__ import annotations


class SolveError(RuntimeError):
    """A solve failed (``throw=True``): max_steps, step-size underflow or a non-finite state.

    Attributes ``result`` (a :class:`~nde.RESULTS` code), ``t`` (time of failure), ``step``
    (step number) and ``samples`` (indices of the failing samples, or None in joint mode).
    """

    def __init__(self, message, result=None, t=None, step=None, samples=None):
        super().__init__(message)
        self.result = result
        self.t = t
        self.step = step
        self.samples = samples
