"""nde: neural differential equations in PyTorch."""

from ._path import AbstractPath
from ._terms import AbstractTerm, ControlTerm, MultiTerm, ODETerm
from ._saveat import SaveAt
from ._solution import RESULTS, Solution
from ._errors import SolveError
from ._controllers import AbstractController, ConstantStepSize, PIDController, rms_norm
from ._adjoint import AbstractAdjoint, DirectAdjoint
from ._solve import solve
from . import solvers

__version__ = "0.1.0"

# ---- exports added by the individual feature modules below (one line each) ----
from ._event import Event
from ._checkpoint import CheckpointAdjoint
from ._backsolve import BacksolveAdjoint
from ._interpolation import (
    CubicSpline, InterpolationBase, LinearInterpolation, TupleControl, hermite_cubic_coefficients_with_backward_differences,
    last_observation_times, linear_interpolation_coeffs, natural_cubic_coeffs, natural_cubic_spline_coeffs,
    rectilinear_interpolation_coeffs,
)
from ._brownian import BrownianInterval
from ._sde_base import (BaseBrownian, BaseSDE, BrownianPath, BrownianTree, ReverseBrownian, SDEIto, SDEStratonovich,
                        brownian_interval_like)
from . import settings
from ._odeint import odeint, odeint_adjoint, odeint_event
from ._reversible_adjoint import ReversibleAdjoint
from . import symbolic
from .symbolic import SymbolicModel, distill, sample_vector_field
from ._cdeint import cdeint
from ._implicit import ImplicitAdjoint
from ._sdeint import sdeint, sdeint_adjoint
from ._deq import deq_fixed_point, implicit_vjp, jacobian_regularisation, spectral_radius
from ._logsig import LogODETerm, logsig_windows, logsignature, logsignature_channels, logsignature_windows
