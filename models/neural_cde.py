"""Neural controlled differential equations for irregular, partially observed time series."""

from __future__ import annotations

import torch
from torch import nn

import nde

_INTERPOLATIONS = ("cubic", "hermite", "linear", "rectilinear")


class CDEVectorField(nn.Module):
    """An MLP ``z -> f(z)`` with values in ``hidden x channels`` matrices, the last layer squashed by tanh.

    Parameters
    ----------
    hidden_channels, input_channels:
        Size of the hidden state and number of channels of the control path.
    width, depth:
        Width and number of hidden layers of the MLP.
    """

    def __init__(self, hidden_channels: int, input_channels: int, width: int = 64, depth: int = 2):
        super().__init__()
        self.hidden_channels, self.input_channels = hidden_channels, input_channels
        layers, size = [], hidden_channels
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.Softplus()]
            size = width
        layers += [nn.Linear(size, hidden_channels * input_channels), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, t, z):
        return self.net(z).view(*z.shape[:-1], self.hidden_channels, self.input_channels)


def _positive_int(v, name):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive integer; got {v!r}.")
    return v


class NeuralCDE(nn.Module):
    """A neural CDE ``z(t) = z(t_0) + int f_theta(z) dX``, ``z(t_0) = zeta_theta(X(t_0))``, output ``l_theta(z)``.

    ``X`` interpolates the observations (time included as a channel by default, so the model knows
    how much time passed between irregular observations); missing values are NaN. The output is the
    readout of the final state (classification/regression of the whole series) or, with ``ts``, of
    the state at every requested time (sequence-to-sequence).

    Parameters
    ----------
    input_channels:
        Number of data channels (not counting the time channel added by ``include_time``).
    hidden_channels, output_channels:
        Size of the hidden state and of the output.
    width, depth:
        Size of the vector field's MLP.
    interpolation:
        ``"cubic"`` (natural cubic spline), ``"hermite"`` (Hermite cubic with backward differences:
        causal on every piece), ``"linear"`` or ``"rectilinear"`` (causal; needs ``include_time``).
    include_time:
        Add the observation times as channel 0 of the path.
    solver, rtol, atol, dt0, controller, adjoint, batch_mode:
        How the CDE is solved (see :func:`nde.solve`); default Tsit5 with ``PIDController(rtol, atol)``,
        or RK4 with constant steps ``dt0`` when ``dt0`` is given.
    vector_field, initial, readout:
        Replace the default networks (``CDEVectorField``, and linear maps).

    Attributes
    ----------
    stats:
        Statistics of the last solve.

    References
    ----------
    Kidger, Morrill, Foster & Lyons (2020), "Neural controlled differential equations for irregular time
    series", NeurIPS.
    """

    def __init__(self, input_channels: int, hidden_channels: int, output_channels: int, width: int = 64,
                 depth: int = 2, interpolation: str = "hermite", include_time: bool = True, solver=None,
                 rtol: float = 1e-3, atol: float = 1e-5, dt0=None, controller=None, adjoint=None,
                 batch_mode: str = "joint", vector_field: nn.Module | None = None, initial: nn.Module | None = None,
                 readout: nn.Module | None = None):
        super().__init__()
        _positive_int(input_channels, "input_channels")
        _positive_int(hidden_channels, "hidden_channels")
        _positive_int(output_channels, "output_channels")
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}; got {interpolation!r}.")
        if interpolation == "rectilinear" and not include_time:
            raise ValueError("interpolation='rectilinear' needs the time channel: set include_time=True.")
        self.input_channels = input_channels
        self.hidden_channels = hidden_channels
        self.output_channels = output_channels
        self.interpolation = interpolation
        self.include_time = bool(include_time)
        channels = input_channels + int(self.include_time)
        self.path_channels = channels
        self.vector_field = vector_field if vector_field is not None else CDEVectorField(hidden_channels, channels, width, depth)
        self.initial = initial if initial is not None else nn.Linear(channels, hidden_channels)
        self.readout = readout if readout is not None else nn.Linear(hidden_channels, output_channels)
        self.solver = solver
        self.rtol, self.atol, self.dt0 = rtol, atol, dt0
        self.controller = controller
        self.adjoint = adjoint
        self.batch_mode = batch_mode
        self.stats = None

    # ---- data -> path ------------------------------------------------------------------------
    def coeffs(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Interpolation coefficients of observations ``x`` ``(..., length, input_channels)`` at times ``t``.

        Compute them once per dataset (they do not depend on the model's parameters) and pass them
        to :meth:`forward` as ``coeffs=``.
        """
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-1] != self.input_channels:
            raise ValueError(
                f"x must have shape (..., length, input_channels={self.input_channels}); got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}."
            )
        length = x.shape[-2]
        if t is None:
            t = torch.arange(length, dtype=x.dtype, device=x.device)
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if self.include_time:
            x = torch.cat([t.expand(x.shape[:-1]).unsqueeze(-1), x], dim=-1)
        if self.interpolation == "cubic":
            return nde.natural_cubic_coeffs(x, t)
        if self.interpolation == "hermite":
            return nde.hermite_cubic_coefficients_with_backward_differences(x, t)
        if self.interpolation == "linear":
            return nde.linear_interpolation_coeffs(x, t)
        return nde.rectilinear_interpolation_coeffs(x, 0)

    def path(self, coeffs: torch.Tensor, t: torch.Tensor | None = None):
        """The control path of precomputed coefficients (``t``: the knots; ignored for rectilinear paths)."""
        if self.interpolation in ("cubic", "hermite"):
            return nde.CubicSpline(coeffs, t, smooth=self.interpolation == "cubic")
        if self.interpolation == "rectilinear":
            return nde.LinearInterpolation(coeffs)
        return nde.LinearInterpolation(coeffs, t)

    # ---- solve ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor | None = None, t: torch.Tensor | None = None, *, coeffs: torch.Tensor | None = None,
                ts: torch.Tensor | None = None, t_end: torch.Tensor | None = None) -> torch.Tensor:
        """Run the model on raw observations ``x`` (NaN = missing) or on precomputed ``coeffs``.

        Parameters
        ----------
        x:
            ``(batch, length, input_channels)`` observations at times ``t``; or None when ``coeffs`` is given.
        t:
            Observation times ``(length,)``; default ``0, 1, ..., length - 1``.
        coeffs:
            Output of :meth:`coeffs` (precomputed once per dataset).
        ts:
            Times at which to read out (sequence-to-sequence); default: the end of the series only.
        t_end:
            For series of unequal length (NaN-padded at the end): every series' last observation time,
            shape ``(batch,)`` (see :func:`nde.last_observation_times`). The CDE is then solved in
            independent batch mode, every series up to its own end, and read out there.

        Returns
        -------
        torch.Tensor
            ``(batch, output_channels)``, or ``(batch, len(ts), output_channels)`` when ``ts`` is given.
        """
        if (x is None) == (coeffs is None):
            raise ValueError("Pass exactly one of x (raw observations) or coeffs (from NeuralCDE.coeffs).")
        if coeffs is None:
            coeffs = self.coeffs(x, t)
        if self.interpolation == "rectilinear":
            if ts is not None or t_end is not None:
                raise ValueError(
                    "A rectilinear path runs on its own clock (two knots an observation): ts and t_end are not "
                    "available with interpolation='rectilinear'."
                )
            t = None
        X = self.path(coeffs, t)
        z0 = self.initial(X.evaluate(X.t0))
        term = nde.ControlTerm(self.vector_field, X)
        solver = self.solver
        if solver is None:
            solver = nde.solvers.RK4() if self.dt0 is not None else nde.solvers.Tsit5()
        controller = self.controller
        if controller is None:
            controller = nde.ConstantStepSize() if self.dt0 is not None else nde.PIDController(self.rtol, self.atol)
        saveat = nde.SaveAt(t1=True) if ts is None else nde.SaveAt(ts=ts)
        t1, batch_mode = X.t1, self.batch_mode
        if t_end is not None:
            if ts is not None:
                raise ValueError("Pass either ts (read out along the way) or t_end (read out at every series' end).")
            t1 = torch.as_tensor(t_end, dtype=torch.float64).reshape(z0.shape[:-1])
            batch_mode = "independent"
        sol = nde.solve(term, solver, X.t0, t1, z0, dt0=self.dt0, saveat=saveat, controller=controller,
                        adjoint=self.adjoint, batch_mode=batch_mode)
        self.stats = sol.stats
        if ts is None:
            return self.readout(sol.ys[-1])
        return self.readout(sol.ys.movedim(0, -2))
