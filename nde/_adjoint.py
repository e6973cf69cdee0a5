"""Adjoints: how gradients flow back through a solve."""

from __future__ import annotations

import abc


class AbstractAdjoint(abc.ABC):
    """An adjoint owns how the forward solve is recorded and how gradients come back."""

    @abc.abstractmethod
    def run(self, problem):
        """Solve a prepared problem (see ``nde._solve.Problem``) and return a Solution."""


class DirectAdjoint(AbstractAdjoint):
    """Backpropagate through every operation of the solve (discretise-then-optimise).

    Exact gradients of the computed solution; memory grows linearly with the number of steps.
    """

    def run(self, problem):
        from ._solve import integrate

        return integrate(problem)

    def __repr__(self):
        return "DirectAdjoint()"
