"""The interface shared by every control path: interpolated data and Brownian motion alike."""

from __future__ import annotations

import abc

import torch


class AbstractPath(abc.ABC):
    """A path ``X: [t0, t1] -> R^shape`` that drives a :class:`~nde.ControlTerm`.

    Subclasses are interpolations of data (CDE controls) and Brownian motions
    (SDE noise). Both are queried the same way:

    * ``evaluate(t0)`` gives ``X(t0)``; ``evaluate(t0, t1)`` gives the increment
      ``X(t1) - X(t0)``;
    * ``derivative(t)`` gives ``dX/dt`` where the path is differentiable.

    Times are Python floats, 0-d tensors, or (in independent batch mode) tensors
    holding one time per sample.
    """

    @property
    @abc.abstractmethod
    def t0(self) -> float:
        """Start of the interval on which the path is defined."""

    @property
    @abc.abstractmethod
    def t1(self) -> float:
        """End of the interval on which the path is defined."""

    @abc.abstractmethod
    def evaluate(self, t0, t1=None, left: bool = True) -> torch.Tensor:
        """``X(t0)`` if ``t1`` is None, else the increment ``X(t1) - X(t0)``."""

    def derivative(self, t, left: bool = True) -> torch.Tensor:
        """``dX/dt`` at ``t``. Paths that are not differentiable raise ``NotImplementedError``."""
        raise NotImplementedError(
            f"{type(self).__name__} is not differentiable in time; use a solver that "
            "works with increments (an SDE solver) instead of an ODE solver."
        )

    @property
    def jump_ts(self):
        """Times at which the path is not smooth (e.g. interpolation knots), or None."""
        return None
