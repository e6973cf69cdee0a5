"""Numerical methods of nde: Runge--Kutta tableaux and steppers, reversible, SDE and implicit solvers, fixed-point and root solvers."""

from .base import AbstractSolver
from .rk import (
    RK4, RK38, Bosh3, ButcherTableau, Dopri5, Dopri8, Euler, ExplicitRK, Fehlberg2, Heun, Heun3, Midpoint, Ralston,
    Tsit5,
)

# ---- exports added by the individual solver modules below (one line each) ----
from .implicit import ImplicitEuler, ImplicitMidpoint, Trapezoid, SDIRK2, TRBDF2, Kvaerno3, Kvaerno5, RadauIIA3, RadauIIA5, GaussLegendre4, GaussLegendre6, AbstractImplicitRK, ImplicitTableau  # noqa: E501
from .adams import AdamsBashforthMoulton, ExplicitAdams, ImplicitAdams, FixedAdams, AdaptiveAdams
from .reversible import AsynchronousLeapfrog, Reversible, ReversibleHeun
from .sde import AbstractSDESolver, EulerHeun, EulerMaruyama, Heun, LogODEMidpoint, Midpoint, Milstein, ShARK, SRA1, SRID2, StepDoubling  # noqa: E501
from .fixed_point import AbstractFixedPointSolver, Anderson, Broyden, FixedPointError, FixedPointIteration, FixedPointResult, FixedPointWarning, NewtonKrylov, get_fixed_point_solver, gmres  # noqa: E501
