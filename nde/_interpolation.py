"""Control paths built from time series: linear, rectilinear, natural cubic and Hermite cubic interpolation.

Data arrive as ``x`` of shape ``(..., length, channels)`` observed at times ``t`` (shape ``(length,)``
shared by the batch, or ``(..., length)`` one grid a series). Missing values are NaN, in any
channel and at any time; series of unequal length are NaN-padded at the end. Preprocessing turns
the data into coefficients (a tensor that can be stored, batched and moved by a DataLoader); the
path classes turn coefficients into an :class:`~nde.AbstractPath` that drives a
:class:`~nde.ControlTerm`.

Coefficient layout (shared with torchcde, so that its preprocessing keeps working):

* linear and rectilinear: the knot values, ``(..., length, channels)``;
* cubic (natural or Hermite): ``cat([a, b, two_c, three_d], -1)`` of shape
  ``(..., length - 1, 4 * channels)``, the piece on ``[t_i, t_{i+1}]`` being
  ``a + b s + two_c / 2 s^2 + three_d / 3 s^3`` with ``s = t - t_i``.

Unequal lengths without padding waste: pad every series with NaN after its last observation.
The path is then constant after that observation (its derivative is zero), so the CDE state does
not change any more; solve with ``batch_mode="independent"`` and ``t1`` a tensor holding every
series' last observation time (:func:`last_observation_times`), so that no sample takes steps past
its own end.
"""

from __future__ import annotations

import abc
import bisect

import torch

from ._path import AbstractPath

__all__ = [
    "linear_interpolation_coeffs", "rectilinear_interpolation_coeffs", "natural_cubic_coeffs",
    "natural_cubic_spline_coeffs", "hermite_cubic_coefficients_with_backward_differences", "LinearInterpolation",
    "CubicSpline", "last_observation_times", "InterpolationBase", "TupleControl",
]


# ----------------------------------------------------------------------------------------------
# validation
def _validate(x, t, name="x"):
    """Check ``x`` of shape ``(..., length, channels)`` and return the times ``(length,)`` or ``(..., length)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (..., length, channels); got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype; got {x.dtype}.")
    if x.dim() < 2:
        raise ValueError(
            f"{name} must have shape (..., length, channels) with at least two dimensions; got shape {tuple(x.shape)}."
        )
    length = x.shape[-2]
    if length < 2:
        raise ValueError(f"{name} needs at least two observations along its length dimension (-2); got {length}.")
    if t is None:
        return torch.linspace(0, length - 1, length, dtype=x.dtype, device=x.device)
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if not t.is_floating_point():
        raise TypeError(f"t must have a floating-point dtype; got {t.dtype}.")
    if t.dim() == 0 or t.shape[-1] != length:
        raise ValueError(
            f"t must have shape (length,) or (..., length) with length = {name}.shape[-2] = {length}; "
            f"got shape {tuple(t.shape)}."
        )
    if t.dim() > 1 and tuple(t.shape[:-1]) != tuple(x.shape[:-2]):
        raise ValueError(
            f"Per-series times t must have shape {tuple(x.shape[:-2]) + (length,)} (the batch shape of {name} "
            f"then its length); got {tuple(t.shape)}."
        )
    if not bool(torch.isfinite(t).all()):
        raise ValueError("t must be finite (NaN marks missing values in x, never in t).")
    if bool((t[..., 1:] <= t[..., :-1]).any()):
        raise ValueError("t must be strictly increasing along its last dimension.")
    return t.to(x.dtype)


class _MissingTimeError(ValueError, AssertionError):
    """Time missing in the time channel of a rectilinear interpolation (an AssertionError too, as torchcde raises)."""


def _channels_first(x, t):
    """``x`` as ``(..., channels, length)`` and ``t`` broadcast to it."""
    xc = x.transpose(-1, -2)
    tc = t.unsqueeze(-2) if t.dim() > 1 else t
    return xc, tc.expand(xc.shape)


# ----------------------------------------------------------------------------------------------
# missing values
def _fill_missing_linear(xc, tc):
    """Fill NaNs along the last dimension by linear interpolation in time; constant before the first and
    after the last observation; all-NaN series become zero."""
    mask = ~torch.isnan(xc)
    if bool(mask.all()):
        return xc
    n = xc.shape[-1]
    idx = torch.arange(n, device=xc.device).expand(xc.shape)
    prev_i = torch.where(mask, idx, torch.full_like(idx, -1)).cummax(-1).values
    next_i = torch.where(mask, idx, torch.full_like(idx, n)).flip(-1).cummin(-1).values.flip(-1)
    prev_i = torch.where(prev_i < 0, next_i, prev_i)
    next_i = torch.where(next_i >= n, prev_i, next_i)
    none = (~mask).all(-1, keepdim=True)
    prev_i = torch.where(none, torch.zeros_like(prev_i), prev_i)
    next_i = torch.where(none, torch.zeros_like(next_i), next_i)
    x0 = torch.where(mask, xc, torch.zeros_like(xc))
    xp, xn = x0.gather(-1, prev_i), x0.gather(-1, next_i)
    tp, tn = tc.gather(-1, prev_i), tc.gather(-1, next_i)
    same = next_i == prev_i
    ratio = torch.where(same, torch.zeros_like(tc), (tc - tp) / torch.where(same, torch.ones_like(tc), tn - tp))
    return torch.where(mask, xc, xp + ratio * (xn - xp))


def _forward_fill(x, dim=-2):
    """Replace each NaN by the last observation before it along ``dim`` (NaN before the first one)."""
    mask = torch.isnan(x)
    if not bool(mask.any()):
        return x
    n = x.shape[dim]
    shape = [1] * x.dim()
    shape[dim] = n
    idx = torch.arange(n, device=x.device).reshape(shape).expand(x.shape)
    last = torch.where(mask, torch.zeros_like(idx), idx).cummax(dim).values
    return x.gather(dim, last)


# ----------------------------------------------------------------------------------------------
# coefficient functions
def linear_interpolation_coeffs(x: torch.Tensor, t: torch.Tensor | None = None, rectilinear: int | None = None):
    """Knots of the linear interpolation of (possibly irregular, partially missing) time series.

    ``X(t) = x_i + (t - t_i) / (t_{i+1} - t_i) (x_{i+1} - x_i)`` on ``[t_i, t_{i+1}]``; a missing value is
    filled by linear interpolation between the neighbouring observations of its channel (constant
    before the first and after the last one; an all-missing channel is zero).

    Parameters
    ----------
    x:
        Values ``(..., length, channels)``, NaN where missing.
    t:
        Observation times ``(length,)`` or ``(..., length)``, strictly increasing; default ``0, 1, ..., length-1``.
    rectilinear:
        Index of the time channel of ``x``: build the rectilinear (causal) interpolation instead, see
        :func:`rectilinear_interpolation_coeffs`.

    Returns
    -------
    torch.Tensor
        Coefficients ``(..., length, channels)`` for :class:`LinearInterpolation` (``(..., 2 length - 1,
        channels)`` when ``rectilinear`` is given).

    References
    ----------
    Kidger, Morrill, Foster & Lyons (2020), "Neural controlled differential equations for irregular time series", NeurIPS.
    """
    if rectilinear is not None:
        return rectilinear_interpolation_coeffs(x, rectilinear)
    t = _validate(x, t)
    if not bool(torch.isnan(x).any()):
        return x
    xc, tc = _channels_first(x, t)
    return _fill_missing_linear(xc, tc).transpose(-1, -2)


def rectilinear_interpolation_coeffs(x: torch.Tensor, time_index: int):
    """Knots of the rectilinear interpolation: first time moves with the values held, then the values jump.

    Between observations ``(t_i, x_i)`` and ``(t_{i+1}, x_{i+1})`` the path goes to ``(t_{i+1}, x_i)``
    and then to ``(t_{i+1}, x_{i+1})``, so ``X(s)`` depends only on observations made up to ``s``
    (causal, for online prediction). Missing values are forward-filled. Use the result with
    :class:`LinearInterpolation` and its default times ``0, 1, ..., 2 length - 2``.

    Parameters
    ----------
    x:
        Values ``(..., length, channels)`` with time as channel ``time_index`` (which may not be missing).
    time_index:
        Which channel of ``x`` holds time.

    Returns
    -------
    torch.Tensor
        ``(..., 2 length - 1, channels)``.

    References
    ----------
    Morrill, Kidger, Yang & Lyons (2021), "Neural controlled differential equations for online prediction
    tasks", arXiv:2106.11028.
    """
    _validate(x, None)
    channels = x.shape[-1]
    if isinstance(time_index, bool) or not isinstance(time_index, int) or not -channels <= time_index < channels:
        raise ValueError(f"rectilinear / time_index must be an integer channel index in [0, {channels}); got {time_index!r}.")
    time_index %= channels
    if bool(torch.isnan(x[..., time_index]).any()):
        raise _MissingTimeError(
            "The time channel of x contains NaN; time may not be missing (forward-fill the times of padded "
            "series, e.g. repeat the last time)."
        )
    if bool(torch.isnan(x[..., 0, :]).any()):
        import warnings

        warnings.warn(
            "x starts with missing values; they are filled backwards from the first observation, which is not "
            "causal. Fill the first value of every channel yourself (e.g. with the channel mean) if causality matters.",
            stacklevel=3,
        )
    filled = _forward_fill(x)
    if bool(torch.isnan(filled).any()):
        xc = filled.transpose(-1, -2)
        tc = torch.arange(x.shape[-2], dtype=x.dtype, device=x.device).expand(xc.shape)
        filled = _fill_missing_linear(xc, tc).transpose(-1, -2)
    rep = filled.repeat_interleave(2, dim=-2)[..., :-1, :]
    # every second knot: the time has already moved on while the values are still the previous ones
    times = filled[..., time_index].repeat_interleave(2, dim=-1)[..., 1:]
    return torch.cat([rep[..., :time_index], times.unsqueeze(-1), rep[..., time_index + 1:]], dim=-1)


def _thomas(lower, diag, upper, rhs):
    """Solve tridiagonal systems along the last dimension (lower/upper of length n-1)."""
    n = diag.shape[-1]
    cs, ds = [], []
    c_prev = d_prev = None
    for i in range(n):
        if i == 0:
            denom = diag[..., 0]
            d_i = rhs[..., 0] / denom
        else:
            denom = diag[..., i] - lower[..., i - 1] * c_prev
            d_i = (rhs[..., i] - lower[..., i - 1] * d_prev) / denom
        c_i = upper[..., i] / denom if i < n - 1 else None
        cs.append(c_i)
        ds.append(d_i)
        c_prev, d_prev = c_i, d_i
    out = [None] * n
    out[-1] = ds[-1]
    for i in range(n - 2, -1, -1):
        out[i] = ds[i] - cs[i] * out[i + 1]
    return torch.stack(out, dim=-1)


def _natural_cubic(xc, tc):
    """Natural cubic spline through the non-NaN points of every series (last dim), re-expanded on every interval.

    Returns ``a, b, two_c, three_d`` of shape ``(..., length - 1)``.
    """
    n = xc.shape[-1]
    mask = ~torch.isnan(xc)
    idx = torch.arange(n, device=xc.device).expand(xc.shape)
    none = (~mask).all(-1, keepdim=True)
    if not bool(mask.all()):
        # hold the first/last observation constant towards the ends (the spline then settles quickly)
        first = torch.where(mask, idx, torch.full_like(idx, n)).min(-1, keepdim=True).values
        last = torch.where(mask, idx, torch.full_like(idx, -1)).max(-1, keepdim=True).values
        x0 = torch.where(mask, xc, torch.zeros_like(xc))
        xf = x0.gather(-1, first.clamp(max=n - 1))
        xl = x0.gather(-1, last.clamp(min=0))
        x0 = torch.where(idx < first, xf, torch.where(idx > last, xl, x0))
        mask = mask | (idx < first) | (idx > last) | none
        x0 = torch.where(none, torch.zeros_like(x0), x0)
        # move the observed points of every series to its front
        order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices
        tau, v = tc.gather(-1, order), x0.gather(-1, order)
        count = mask.sum(-1, keepdim=True)
    else:
        tau, v, count = tc, xc, None
    if count is None:
        seg_valid = None
        h = tau[..., 1:] - tau[..., :-1]
        r = h.reciprocal()
        delta = v[..., 1:] - v[..., :-1]
    else:
        seg_valid = idx[..., 1:] < count
        h = tau[..., 1:] - tau[..., :-1]
        r = torch.where(seg_valid, h.reciprocal(), torch.zeros_like(h))
        delta = torch.where(seg_valid, v[..., 1:] - v[..., :-1], torch.zeros_like(h))
    s = 3 * delta * r * r
    zero = torch.zeros_like(r[..., :1])
    r_l, r_r = torch.cat([zero, r], -1), torch.cat([r, zero], -1)
    diag = 2 * (r_l + r_r)
    if count is not None:
        diag = diag + (idx >= count).to(diag.dtype)
    rhs = torch.cat([zero, s], -1) + torch.cat([s, zero], -1)
    k = _thomas(r, diag, r, rhs)
    k0, k1 = k[..., :-1], k[..., 1:]
    a = v[..., :-1]
    b = k0
    dr = delta * r
    two_c = (6 * dr - 4 * k0 - 2 * k1) * r
    three_d = (-6 * dr + 3 * (k0 + k1)) * r * r
    if count is None:
        return a, b, two_c, three_d
    # re-expand the observed pieces around every original interval start
    piece = (mask.long().cumsum(-1) - 1)[..., :-1].clamp(min=0)
    piece = torch.minimum(piece, (count - 2).clamp(min=0))
    a, b, two_c, three_d, t_start = (z.gather(-1, piece) for z in (a, b, two_c, three_d, tau[..., :-1]))
    u = tc[..., :-1] - t_start
    a = a + u * (b + u * (two_c / 2 + u * three_d / 3))
    b = b + u * (two_c + u * three_d)
    two_c = two_c + 2 * u * three_d
    zero = torch.zeros_like(a)
    nz = none.expand(a.shape)
    return tuple(torch.where(nz, zero, z) for z in (a, b, two_c, three_d))


def natural_cubic_coeffs(x: torch.Tensor, t: torch.Tensor | None = None):
    """Coefficients of the natural cubic spline through (possibly irregular, partially missing) time series.

    The spline is twice continuously differentiable with ``X'' = 0`` at both ends; on every channel it
    interpolates the observed values only. Before the first and after the last observation of a channel
    the path is held at that observation (an all-missing channel is zero).

    Parameters
    ----------
    x:
        Values ``(..., length, channels)``, NaN where missing.
    t:
        Observation times ``(length,)`` or ``(..., length)``; default ``0, 1, ..., length - 1``.

    Returns
    -------
    torch.Tensor
        ``(..., length - 1, 4 * channels)`` = ``cat([a, b, two_c, three_d], -1)`` for :class:`CubicSpline`.

    References
    ----------
    Kidger, Morrill, Foster & Lyons (2020), "Neural controlled differential equations for irregular time series", NeurIPS.
    """
    t = _validate(x, t)
    xc, tc = _channels_first(x, t)
    parts = _natural_cubic(xc, tc)
    return torch.cat([p.transpose(-1, -2) for p in parts], dim=-1)


def natural_cubic_spline_coeffs(x: torch.Tensor, t: torch.Tensor | None = None):
    """Natural cubic spline coefficients that impute missing start/end values by the nearest observation.

    Kept for older preprocessing pipelines; prefer :func:`natural_cubic_coeffs`. Arguments and return as there.
    """
    t = _validate(x, t)
    mask = ~torch.isnan(x)
    if bool(mask.all()):
        return natural_cubic_coeffs(x, t)
    xc, tc = _channels_first(x, t)
    m = ~torch.isnan(xc)
    n = xc.shape[-1]
    idx = torch.arange(n, device=x.device).expand(xc.shape)
    x0 = torch.where(m, xc, torch.zeros_like(xc))
    first = torch.where(m, idx, torch.full_like(idx, n)).min(-1, keepdim=True).values.clamp(max=n - 1)
    last = torch.where(m, idx, torch.full_like(idx, -1)).max(-1, keepdim=True).values.clamp(min=0)
    # only the very first and last entries are imputed; the spline runs through them
    xc = xc.clone()
    start_nan, end_nan = torch.isnan(xc[..., :1]), torch.isnan(xc[..., -1:])
    xc[..., :1] = torch.where(start_nan, x0.gather(-1, first), xc[..., :1])
    xc[..., -1:] = torch.where(end_nan, x0.gather(-1, last), xc[..., -1:])
    parts = _natural_cubic(xc, tc)
    return torch.cat([p.transpose(-1, -2) for p in parts], dim=-1)


def hermite_cubic_coefficients_with_backward_differences(x: torch.Tensor, t: torch.Tensor | None = None):
    """Coefficients of the Hermite cubic spline with backward differences.

    On ``[t_i, t_{i+1}]`` the cubic matches ``x_i, x_{i+1}`` and has slopes ``m_{i-1}`` at ``t_i`` and
    ``m_i`` at ``t_{i+1}``, where ``m_i = (x_{i+1} - x_i) / (t_{i+1} - t_i)`` (``m_{-1} = m_0``). The path
    is continuously differentiable and, unlike a natural spline, on ``[t_i, t_{i+1}]`` depends only on
    observations up to ``t_{i+1}``. Missing values are filled as in :func:`linear_interpolation_coeffs`.

    Parameters
    ----------
    x, t:
        As :func:`linear_interpolation_coeffs`.

    Returns
    -------
    torch.Tensor
        ``(..., length - 1, 4 * channels)`` for :class:`CubicSpline`.

    References
    ----------
    Morrill, Kidger, Yang & Lyons (2021), "Neural controlled differential equations for online prediction
    tasks", arXiv:2106.11028.
    """
    t = _validate(x, t)
    knots = linear_interpolation_coeffs(x, t)
    dt = (t[..., 1:] - t[..., :-1]).unsqueeze(-1)
    delta = knots[..., 1:, :] - knots[..., :-1, :]
    m = delta / dt
    m_prev = torch.cat([m[..., :1, :], m[..., :-1, :]], dim=-2)
    a = knots[..., :-1, :]
    two_c = 4 * (m - m_prev) / dt
    three_d = 3 * (m_prev - m) / dt**2
    return torch.cat([a, m_prev, two_c, three_d], dim=-1)


def last_observation_times(x: torch.Tensor, t: torch.Tensor | None = None):
    """Time of the last observation (in any channel) of every series: ``t1`` for an independent-mode solve.

    Parameters
    ----------
    x, t:
        As :func:`linear_interpolation_coeffs`; series of unequal length are NaN-padded at the end.

    Returns
    -------
    torch.Tensor
        Shape ``x.shape[:-2]``.
    """
    t = _validate(x, t)
    observed = (~torch.isnan(x)).any(-1)
    n = x.shape[-2]
    idx = torch.arange(n, device=x.device).expand(observed.shape)
    last = torch.where(observed, idx, torch.zeros_like(idx)).max(-1, keepdim=True).values
    return t.expand(observed.shape).gather(-1, last).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# paths
class InterpolationBase(torch.nn.Module, metaclass=abc.ABCMeta):
    """Base class of control paths in torchcde's convention: ``grid_points``, ``interval``, ``evaluate(t)``
    and ``derivative(t)``.

    Subclass it (as ``torchcde.InterpolationBase``) to drive :func:`~nde.cdeint` with a path of your
    own; its ``grid_points`` are then the times where adaptive steps land. nde's
    :class:`LinearInterpolation` and :class:`CubicSpline` are instances of it.
    """

    @property
    @abc.abstractmethod
    def grid_points(self):
        """The knots of the path."""

    @property
    @abc.abstractmethod
    def interval(self):
        """``[t_first, t_last]``."""

    @abc.abstractmethod
    def evaluate(self, t):
        """``X(t)``, ``(..., channels)``."""

    @abc.abstractmethod
    def derivative(self, t):
        """``dX/dt`` at ``t``, ``(..., channels)``."""


class TupleControl(torch.nn.Module):
    """Several controls over the same interval, driving a CDE whose state is a tuple of tensors.

    ``evaluate(t)`` and ``derivative(t)`` return tuples (one entry a control). Use it with a tuple
    ``z0`` and a vector field returning a tuple of ``(..., hidden_i, channels_i)`` matrices.

    Parameters
    ----------
    *controls:
        Paths with ``interval`` and ``grid_points`` (e.g. :class:`CubicSpline`).
    """

    def __init__(self, *controls):
        super().__init__()
        if len(controls) == 0:
            raise ValueError("TupleControl needs one or more controls to batch together.")
        interval = torch.as_tensor(controls[0].interval)
        grid = controls[0].grid_points
        same = True
        for c in controls[1:]:
            other = torch.as_tensor(c.interval)
            if other.shape != interval.shape or bool((other != interval).any()):
                raise ValueError(
                    "TupleControl can only batch together controls over the same interval; got "
                    f"{interval.tolist()} and {other.tolist()}."
                )
            g = c.grid_points
            if same and (g.shape != grid.shape or bool((g != grid).any())):
                same = False
        self._interval = interval
        self._grid_points = grid if same else None
        self.controls = torch.nn.ModuleList(controls)

    @property
    def interval(self):
        return self._interval

    @property
    def grid_points(self):
        if self._grid_points is None:
            raise ValueError("The controls of this TupleControl have different grid points.")
        return self._grid_points

    @property
    def jump_ts(self):
        """The knots of every control (where steps land)."""
        ts = []
        for c in self.controls:
            j = c.jump_ts if isinstance(c, AbstractPath) else getattr(c, "grid_points", None)
            if j is not None:
                ts.append(torch.as_tensor(j, dtype=torch.float64).detach().reshape(-1))
        return torch.unique(torch.cat(ts)) if ts else None

    def evaluate(self, t):
        return tuple(c.evaluate(t) for c in self.controls)

    def derivative(self, t):
        return tuple(c.derivative(t) for c in self.controls)


class _Interpolation(InterpolationBase, AbstractPath):
    """Shared machinery: locating times on the knots (joint, multi-time and per-sample queries)."""

    def _init_knots(self, t, like, n_pieces, per_sample_ok=True):
        if t is None:
            t = torch.linspace(0, n_pieces, n_pieces + 1, dtype=like.dtype, device=like.device)
        else:
            t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
            if t.shape[-1] != n_pieces + 1:
                raise ValueError(
                    f"t must hold {n_pieces + 1} times (one a knot of the coefficients); got shape {tuple(t.shape)}."
                )
            if t.dim() > 1 and tuple(t.shape[:-1]) != tuple(like.shape[:-2]):
                raise ValueError(
                    f"Per-series times t must have shape {tuple(like.shape[:-2]) + (n_pieces + 1,)}; got {tuple(t.shape)}."
                )
            if bool((t[..., 1:] <= t[..., :-1]).any()):
                raise ValueError("t must be strictly increasing.")
        self.register_buffer("_t", t)
        self._refresh()

    def _refresh(self):
        t = self._t.detach()
        self._shared = t.dim() == 1
        self._knots = t.tolist() if self._shared else None
        self._t0 = float(t[..., 0].min())
        self._t1 = float(t[..., -1].max())

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._refresh()
        return out

    @property
    def grid_points(self) -> torch.Tensor:
        """The knots: ``(length,)``, or ``(..., length)`` with one grid a series."""
        return self._t

    @property
    def interval(self) -> torch.Tensor:
        """``[t_first, t_last]`` (for per-series grids: the earliest start and the latest end)."""
        if self._shared:
            return torch.stack([self._t[0], self._t[-1]])
        return torch.stack([self._t[..., 0].min(), self._t[..., -1].max()])

    @property
    def t0(self) -> float:
        return self._t0

    @property
    def t1(self) -> float:
        return self._t1

    @property
    def jump_ts(self):
        if self._shared:
            return self._t.detach()
        return torch.unique(self._t.detach().reshape(-1))

    def _batch_shape(self):
        raise NotImplementedError

    def _locate(self, t, left):
        """Return ``(mode, index, frac)``.

        ``mode`` is ``"scalar"`` (one time, ``index`` an int or 0-d tensor, ``frac`` a 0-d tensor / float),
        ``"multi"`` (a tensor of times of any shape, torchcde style: outputs gain its dimensions before the
        channels) or ``"sample"`` (one time a series, shape ``batch_shape + (1, ...)``: ``index`` and
        ``frac`` of the batch shape).
        """
        nmax = self._t.shape[-1] - 2
        if not isinstance(t, torch.Tensor):
            if isinstance(t, bool) or not isinstance(t, (int, float)):
                raise TypeError(f"t must be a number or a tensor; got {type(t).__name__}.")
            t = float(t)
            if self._shared:
                i = (bisect.bisect_left if left else bisect.bisect_right)(self._knots, t) - 1
                i = min(max(i, 0), nmax)
                return "scalar", i, t - self._knots[i]
            t = torch.tensor(t, dtype=self._t.dtype, device=self._t.device)
        if t.dim() == 0:
            if self._shared:
                if t.requires_grad or t.device.type != "cpu":
                    i = int((torch.bucketize(t.detach(), self._t, right=not left) - 1).clamp(0, nmax))
                    return "scalar", i, t.to(self._t.dtype) - self._t[i]
                tf = float(t)
                i = (bisect.bisect_left if left else bisect.bisect_right)(self._knots, tf) - 1
                i = min(max(i, 0), nmax)
                return "scalar", i, tf - self._knots[i]
            bshape = self._batch_shape()
            tb = t.expand(bshape)
        else:
            bshape = self._batch_shape()
            # one time a series: the batch shape of the path followed by ones (what independent batch mode passes)
            lead = t.shape[:len(bshape)]
            per_sample = (len(bshape) >= 1 and t.dim() > len(bshape) and tuple(lead) == bshape
                          and all(n == 1 for n in t.shape[len(bshape):]))
            if per_sample:
                tb = t.reshape(bshape)
            else:
                # torchcde's convention: a tensor of times of any shape, outputs (..., *t.shape, channels)
                if not self._shared:
                    raise ValueError(
                        "Paths with per-series knots take a scalar time or one time a series (shape batch_shape + "
                        f"(1, ...) = {bshape + (1,)}); got shape {tuple(t.shape)}."
                    )
                i = (torch.bucketize(t.detach().to(self._t.dtype), self._t, right=not left) - 1).clamp(0, nmax)
                return "multi", i, t.to(self._t.dtype) - self._t[i]
        tb = tb.to(self._t.dtype)
        if self._shared:
            i = (torch.bucketize(tb.detach(), self._t, right=not left) - 1).clamp(0, nmax)
            return "sample", i, tb - self._t[i]
        i = (torch.searchsorted(self._t, tb.detach().unsqueeze(-1), right=not left) - 1).clamp(0, nmax)
        return "sample", i.squeeze(-1), tb - self._t.gather(-1, i).squeeze(-1)

    def _scalar(self, t, left):
        """``(piece, offset)`` as Python numbers for one time without gradient on the CPU (the solver's
        stages in joint mode), else None."""
        if isinstance(t, torch.Tensor):
            if t.dim() != 0 or t.requires_grad or t.device.type != "cpu":
                return None
        elif isinstance(t, bool) or not isinstance(t, (int, float)):
            return None
        if not self._shared:
            return None
        tf = float(t)
        knots = self._knots
        i = min(max((bisect.bisect_left if left else bisect.bisect_right)(knots, tf) - 1, 0), len(knots) - 2)
        return i, tf - knots[i]

    @staticmethod
    def _take(coef, mode, i):
        """Rows ``i`` of ``coef`` (``(..., n, k)``) in the given mode."""
        if mode == "scalar":
            return coef[..., i, :]
        if mode == "multi":
            return coef[..., i, :]
        return coef.gather(-2, i.reshape(i.shape + (1, 1)).expand(i.shape + (1, coef.shape[-1]))).squeeze(-2)

    @staticmethod
    def _frac(mode, frac):
        if mode == "scalar":
            return frac
        return frac.unsqueeze(-1)

    def evaluate(self, t0, t1=None, left: bool = True) -> torch.Tensor:
        """``X(t0)``, or the increment ``X(t1) - X(t0)`` when ``t1`` is given.

        ``t0`` is a number or 0-d tensor (returns ``(..., channels)``), a tensor of times of shape ``S``
        (returns ``(..., *S, channels)``, as torchcde), or one time a series of shape
        ``batch_shape + (1, ...)`` (returns ``(..., channels)``, each series at its own time). Outside the
        knots the end pieces are extended.
        """
        if t1 is not None:
            return self._value(t1, left) - self._value(t0, left)
        return self._value(t0, left)

    def forward(self, t):
        return self.evaluate(t)


class LinearInterpolation(_Interpolation):
    """The piecewise-linear path through the knots given by :func:`linear_interpolation_coeffs`.

    ``X(t) = x_i + (t - t_i) (x_{i+1} - x_i) / (t_{i+1} - t_i)`` on ``[t_i, t_{i+1}]``; its derivative is
    piecewise constant and jumps at the knots (``jump_ts``), where adaptive solvers step exactly.

    Parameters
    ----------
    coeffs:
        ``(..., length, channels)`` from :func:`linear_interpolation_coeffs` (or
        :func:`rectilinear_interpolation_coeffs`).
    t:
        The times passed to the coefficient function; default ``0, 1, ..., length - 1``.

    References
    ----------
    Kidger, Morrill, Foster & Lyons (2020), "Neural controlled differential equations for irregular time series", NeurIPS.
    """

    def __init__(self, coeffs: torch.Tensor, t: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(coeffs, torch.Tensor) or coeffs.dim() < 2 or coeffs.shape[-2] < 2:
            raise ValueError(
                "coeffs must be a tensor of shape (..., length, channels) with length >= 2, as returned by "
                "nde.linear_interpolation_coeffs."
            )
        if bool(torch.isnan(coeffs).any()):
            raise ValueError("coeffs contain NaN: pass the data through nde.linear_interpolation_coeffs first.")
        self._init_knots(t, coeffs, coeffs.shape[-2] - 1)
        dt = (self._t[..., 1:] - self._t[..., :-1]).unsqueeze(-1)
        # The path keeps the start of every piece and its slope, and never the coefficients themselves:
        # an adjoint that differentiates with respect to the path's tensors then stops at these two,
        # instead of backpropagating through the slopes' graph (built once, here) on every evaluation.
        self.register_buffer("_left", coeffs[..., :-1, :])
        self.register_buffer("_derivs", (coeffs[..., 1:, :] - coeffs[..., :-1, :]) / dt)
        self.register_buffer("_last", coeffs[..., -1:, :])

    @property
    def _coeffs(self):
        """The knot values ``(..., length, channels)`` (rebuilt from the pieces)."""
        return torch.cat([self._left, self._last], dim=-2)

    def _batch_shape(self):
        return tuple(self._left.shape[:-2])

    def _value(self, t, left=True):
        mode, i, frac = self._locate(t, left)
        return self._take(self._left, mode, i) + self._frac(mode, frac) * self._take(self._derivs, mode, i)

    def derivative(self, t, left: bool = True) -> torch.Tensor:
        """``dX/dt`` at ``t`` (left-continuous at the knots unless ``left=False``); time conventions as
        :meth:`evaluate`."""
        fast = self._scalar(t, left)
        if fast is not None:
            return self._derivs[..., fast[0], :]
        mode, i, _ = self._locate(t, left)
        return self._take(self._derivs, mode, i)


class CubicSpline(_Interpolation):
    """A piecewise-cubic path from :func:`natural_cubic_coeffs` or
    :func:`hermite_cubic_coefficients_with_backward_differences`.

    ``X(t) = a_i + b_i s + two_c_i s^2 / 2 + three_d_i s^3 / 3`` with ``s = t - t_i`` on ``[t_i, t_{i+1}]``,
    ``dX/dt = b_i + two_c_i s + three_d_i s^2``.

    Parameters
    ----------
    coeffs:
        ``(..., length - 1, 4 * channels)``.
    t:
        The times passed to the coefficient function; default ``0, 1, ..., length - 1``.
    smooth:
        Whether the second derivative is continuous at the knots (natural splines). When False (the
        default, right for Hermite splines) the knots are reported as ``jump_ts`` so that adaptive solvers
        step onto them.

    References
    ----------
    Kidger, Morrill, Foster & Lyons (2020), "Neural controlled differential equations for irregular time series",
    NeurIPS; Morrill, Kidger, Yang & Lyons (2021), arXiv:2106.11028.
    """

    def __init__(self, coeffs: torch.Tensor, t: torch.Tensor | None = None, smooth: bool = False):
        super().__init__()
        if not isinstance(coeffs, torch.Tensor) or coeffs.dim() < 2 or coeffs.shape[-1] % 4 != 0 or coeffs.shape[-1] == 0:
            raise ValueError(
                "coeffs must be a tensor of shape (..., length - 1, 4 * channels), as returned by "
                "nde.natural_cubic_coeffs or nde.hermite_cubic_coefficients_with_backward_differences; got "
                f"{tuple(coeffs.shape) if isinstance(coeffs, torch.Tensor) else type(coeffs).__name__}."
            )
        if bool(torch.isnan(coeffs).any()):
            raise ValueError("coeffs contain NaN: pass the data through a coefficient function first.")
        self._init_knots(t, coeffs, coeffs.shape[-2])
        c = coeffs.shape[-1] // 4
        self.register_buffer("_a", coeffs[..., :c])
        self.register_buffer("_b", coeffs[..., c:2 * c])
        self.register_buffer("_two_c", coeffs[..., 2 * c:3 * c])
        self.register_buffer("_three_d", coeffs[..., 3 * c:])
        # the derivative's coefficients piece by piece, each piece contiguous: one time costs two fused operations
        self.register_buffer("_dpoly", torch.stack([self._b, self._two_c, self._three_d]).movedim(-2, 0).contiguous(),
                             persistent=False)
        self.smooth = bool(smooth)

    def _batch_shape(self):
        return tuple(self._a.shape[:-2])

    @property
    def jump_ts(self):
        return None if self.smooth else super().jump_ts

    def _value(self, t, left=True):
        mode, i, s = self._locate(t, left)
        s = self._frac(mode, s)
        take = self._take
        inner = take(self._two_c, mode, i) * 0.5 + take(self._three_d, mode, i) * (s / 3)
        return take(self._a, mode, i) + (take(self._b, mode, i) + inner * s) * s

    def derivative(self, t, left: bool = True) -> torch.Tensor:
        """``dX/dt`` at ``t``; time conventions as :meth:`evaluate`."""
        fast = self._scalar(t, left)
        if fast is not None:  # one time, no gradient through it
            i, s = fast
            p = self._dpoly[i]
            return torch.add(p[0], p[1], alpha=s).add_(p[2], alpha=s * s)
        mode, i, s = self._locate(t, left)
        s = self._frac(mode, s)
        take = self._take
        return take(self._b, mode, i) + (take(self._two_c, mode, i) + take(self._three_d, mode, i) * s) * s
