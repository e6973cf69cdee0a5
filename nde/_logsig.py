"""The log-ODE method: a long time series summarised window by window by log-signatures.

Over a window ``[r_k, r_{k+1}]`` a path is summarised, to depth 2, by its increment
``dX^i = X^i(r_{k+1}) - X^i(r_k)`` and its Levy areas
``A^{ij} = 1/2 int (X^i - X^i(r_k)) dX^j - (X^j - X^j(r_k)) dX^i``. The CDE
``dz = f(z) dX`` is then replaced on every window by the ODE
``dz/ds = f(z) dX + sum_{i<j} [f_i, f_j](z) A^{ij}`` over one unit of time (``f_i`` the i-th column,
``[f_i, f_j] = J_{f_j} f_i - J_{f_i} f_j``), which a solver crosses in one or a few steps however many
observations the window holds. Depth 1 keeps only the increments (a linear path per window).

The log-signatures here are those of the piecewise-linear interpolation of the data, in the Lyndon
basis (increments, then the areas ``A^{ij}``, ``i < j``, in lexicographic order).
"""

from __future__ import annotations

import bisect
import math

import torch

from ._interpolation import LinearInterpolation, _validate, linear_interpolation_coeffs
from ._path import AbstractPath
from ._terms import ODEForm, as_vector_field

__all__ = ["logsignature", "logsignature_channels", "logsig_windows", "logsignature_windows", "lyndon_words", "LogODETerm"]


def logsignature_channels(channels: int, depth: int) -> int:
    """Size of the depth-``depth`` log-signature of a ``channels``-dimensional path.

    The number of Lyndon words of length at most ``depth`` over ``channels`` letters (Witt's formula).
    """
    _check_depth(depth, any_depth=True)
    total = 0
    for n in range(1, depth + 1):
        total += sum(_mobius(n // d) * channels**d for d in range(1, n + 1) if n % d == 0) // n
    return total


def _mobius(n):
    out, p = 1, 2
    while p * p <= n:
        if n % p == 0:
            n //= p
            if n % p == 0:
                return 0
            out = -out
        p += 1
    return -out if n > 1 else out


def _check_depth(depth, any_depth=False):
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1 or (not any_depth and depth > 2):
        allowed = "a positive integer" if any_depth else "1 or 2 (increments, and Levy areas)"
        raise ValueError(f"depth must be {allowed}; got {depth!r}.")


def _deep_logsignature(x, depth, lyndon_basis=False):
    """Depth > 2 through pysiglib (differentiable): the coefficients of the tensor logarithm at the Lyndon
    words (``lyndon_basis=False``, torchcde's and Signatory's default), or in the Lyndon basis of the free
    Lie algebra (the coefficients of the iterated brackets, what the log-ODE method needs)."""
    try:
        import pysiglib
    except ImportError:
        raise ValueError(
            f"depth={depth} needs the optional package pysiglib (pip install pysiglib); depths 1 and 2 are built in."
        ) from None
    method = 2 if lyndon_basis else 1
    pysiglib.prepare_log_sig(x.shape[-1], depth, method)
    flat = x.reshape((-1,) + x.shape[-2:]).clone(memory_format=torch.contiguous_format)
    return pysiglib.torch_api.log_sig(flat, depth, method=method).reshape(x.shape[:-2] + (-1,))


def lyndon_words(channels: int, depth: int):
    """The Lyndon words of length at most ``depth`` over ``0, ..., channels - 1``, in the order of the
    log-signature's coefficients (by length, then lexicographically)."""
    out = []
    for n in range(1, depth + 1):
        out += sorted(w for w in _words(channels, n) if _is_lyndon(w))
    return out


def _words(channels, n):
    if n == 0:
        return [()]
    return [w + (c,) for w in _words(channels, n - 1) for c in range(channels)]


def _is_lyndon(w):
    return all(w < w[i:] + w[:i] for i in range(1, len(w)))


def _standard_factorisation(w):
    """``w = u v`` with ``v`` the longest proper suffix of ``w`` that is a Lyndon word."""
    for i in range(1, len(w)):
        if _is_lyndon(w[i:]):
            return w[:i], w[i:]
    raise ValueError(f"{w} has no standard factorisation.")


def _triu(channels, device):
    return torch.triu_indices(channels, channels, offset=1, device=device)


def logsignature(x: torch.Tensor, depth: int) -> torch.Tensor:
    """Log-signature of the piecewise-linear path through the points ``x`` ``(..., length, channels)``.

    Depth 1: the increment ``x_{-1} - x_0``. Depth 2: followed by the Levy areas
    ``A^{ij} = 1/2 sum_m ((x_m - x_0)^i d_m^j - (x_m - x_0)^j d_m^i)``, ``d_m = x_{m+1} - x_m``, ``i < j``.
    Deeper log-signatures use the optional package pysiglib.

    Returns
    -------
    torch.Tensor
        ``(..., logsignature_channels(channels, depth))``.

    References
    ----------
    Lyons (1998), "Differential equations driven by rough signals", *Rev. Mat. Iberoam.* 14.
    """
    _check_depth(depth, any_depth=True)
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-2] < 1:
        raise ValueError("x must be a tensor of shape (..., length, channels).")
    if depth > 2:
        return _deep_logsignature(x, depth)
    inc = x[..., -1, :] - x[..., 0, :]
    if depth == 1:
        return inc
    rel = x[..., :-1, :] - x[..., :1, :]
    d = x[..., 1:, :] - x[..., :-1, :]
    area = 0.5 * (rel.transpose(-1, -2) @ d)  # sum_m rel_m^i d_m^j
    area = area - area.transpose(-1, -2)
    i, j = _triu(x.shape[-1], x.device)
    return torch.cat([inc, area[..., i, j]], dim=-1)


def _windows(x, t, window_length):
    """Window boundaries and the data (linearly filled) on the union of sample times and boundaries."""
    if not isinstance(window_length, (int, float)) or isinstance(window_length, bool) or not window_length > 0:
        raise ValueError(f"window_length must be a positive number (in units of t); got {window_length!r}.")
    t = _validate(x, t)
    if t.dim() != 1:
        raise ValueError("The log-ODE method needs times shared by the batch: t of shape (length,).")
    t0, t1 = float(t[0]), float(t[-1])
    n = max(1, math.ceil((t1 - t0) / window_length - 1e-9))
    r = torch.tensor([min(t0 + k * window_length, t1) for k in range(n + 1)], dtype=t.dtype, device=t.device)
    r[-1] = t[-1]
    grid = torch.unique(torch.cat([t.detach(), r]))
    # merge boundaries lying within rounding of a sample time
    keep = torch.cat([torch.tensor([True], device=grid.device), grid[1:] - grid[:-1] > 1e-12 * (1 + grid[1:].abs())])
    grid = grid[keep]
    path = LinearInterpolation(linear_interpolation_coeffs(x, t), t)
    pts = path.evaluate(grid)  # (..., M, C)
    # a boundary merged into a nearby sample time is that sample time
    bidx = torch.searchsorted(grid, r - 1e-12 * (1 + r.abs())).clamp(max=grid.numel() - 1)
    return grid[bidx], grid, pts, bidx


def _window_logsig(pts, bidx, depth):
    """Increments ``(..., n, C)`` and (depth 2) antisymmetric areas ``(..., n, C, C)`` of every window."""
    start, end = bidx[:-1], bidx[1:]
    inc = pts[..., end, :] - pts[..., start, :]
    if depth == 1:
        return inc, None
    M = pts.shape[-2]
    seg = torch.arange(M - 1, device=pts.device)
    win = (torch.searchsorted(bidx, seg, right=True) - 1).clamp(0, len(start) - 1)
    rel = pts[..., :-1, :] - pts[..., bidx[win], :]
    d = pts[..., 1:, :] - pts[..., :-1, :]
    outer = rel.unsqueeze(-1) * d.unsqueeze(-2)  # (..., M-1, C, C)
    n = len(start)
    sums = outer.new_zeros(outer.shape[:-3] + (n,) + outer.shape[-2:]).index_add(-3, win, outer)
    area = 0.5 * (sums - sums.transpose(-1, -2))
    return inc, area


def logsig_windows(x: torch.Tensor, depth: int, window_length: float, t: torch.Tensor | None = None):
    """The log-signature path of a long series: cumulative window log-signatures, for a neural RDE.

    Row 0 is ``[x(t_0), 0, ...]``; row ``k`` adds the log-signature of the k-th window of length
    ``window_length``. Interpolated linearly (at times ``0, 1, ..., n``) this path drives a CDE whose
    vector field acts on log-signature channels: a neural rough differential equation.

    Parameters
    ----------
    x:
        ``(..., length, channels)``, NaN where missing (filled linearly).
    depth:
        1, 2, or deeper with the optional package pysiglib.
    window_length:
        Length of every window in units of ``t`` (the last one may be shorter).
    t:
        Observation times ``(length,)``; default ``0, 1, ..., length - 1``.

    Returns
    -------
    torch.Tensor
        ``(..., n_windows + 1, logsignature_channels(channels, depth))``.

    References
    ----------
    Morrill, Salvi, Kidger, Foster & Lyons (2021), "Neural rough differential equations for long time series", ICML.
    """
    _check_depth(depth, any_depth=True)
    r, grid, pts, bidx = _windows(x, t, window_length)
    ls = _window_logsigs(pts, bidx, depth, x.shape[-1])
    first = torch.zeros_like(ls[..., :1, :])
    first[..., 0, : x.shape[-1]] = pts[..., 0, :]
    return torch.cat([first, ls], dim=-2).cumsum(-2)


def _window_logsigs(pts, bidx, depth, channels):
    """The log-signature of every window, ``(..., n_windows, logsignature_channels(channels, depth))``."""
    if depth > 2:
        b = bidx.tolist()
        return torch.stack([logsignature(pts[..., b[k]:b[k + 1] + 1, :], depth) for k in range(len(b) - 1)], dim=-2)
    inc, area = _window_logsig(pts, bidx, depth)
    if depth == 1:
        return inc
    i, j = _triu(channels, pts.device)
    return torch.cat([inc, area[..., i, j]], dim=-1)


def logsignature_windows(x: torch.Tensor, depth: int, window_length: float, t: torch.Tensor | None = None):
    """torchcde's earlier form of :func:`logsig_windows`: every window's log-signature scaled by the window's length.

    Kept so that scripts written for it keep working; prefer :func:`logsig_windows`, whose path is
    meant to be interpolated at times ``0, 1, ..., n`` (one unit a window).

    Returns
    -------
    tuple of torch.Tensor
        The values ``(..., n_windows + 1, logsignature_channels(channels, depth))`` and their times
        ``(n_windows + 1,)`` (the window boundaries).
    """
    _check_depth(depth, any_depth=True)
    r, grid, pts, bidx = _windows(x, t, window_length)
    ls = _window_logsigs(pts, bidx, depth, x.shape[-1]) * (r[1:] - r[:-1]).unsqueeze(-1).to(pts.dtype)
    first = torch.zeros_like(ls[..., :1, :])
    first[..., 0, : x.shape[-1]] = pts[..., 0, :]
    return torch.cat([first, ls], dim=-2).cumsum(-2), r


class LogODETerm(ODEForm):
    """The log-ODE approximation of the CDE ``dz = f(t, z) dX`` for data ``x`` observed at times ``t``.

    On window ``k`` (``[r_k, r_{k+1}]``, ``H_k`` long) the term is the ODE
    ``dz/dt = phi'((t - r_k)/H_k)/H_k * (f(z) dX_k + sum_j J_{f_j}(z) (f(z) A_k)_j)`` with ``dX_k`` the window's
    increment and ``A_k`` its antisymmetric Levy-area matrix (depth 2), i.e. the log-ODE
    ``dz/ds = f(z) dX + sum_{i<j} [f_i, f_j](z) A^{ij}`` crossed in the window's time at constant
    speed (``phi' = 1``). The Lie brackets are computed by one batched Jacobian-vector product per
    evaluation. At depth ``N > 2`` the ODE is ``dz/ds = sum_w lambda_w f_w(z)`` over the Lyndon words
    ``w`` of length at most ``N``, ``lambda`` the window's log-signature in the Lyndon basis and ``f_w``
    the iterated bracket of the columns of ``f`` that ``w`` spells.

    Use an ODE solver without FSAL for fixed steps; one RK4 step per window (``dt0=window_length``) is
    typical. Every stage of a step sees the window the step lies in (stages at the step's ends are
    evaluated from inside it), forwards and backwards in time.

    Parameters
    ----------
    vector_field:
        ``f(t, z, args)`` or ``f(t, z)`` returning ``(..., hidden, channels)``.
    x:
        Data ``(..., length, channels)`` (NaN where missing).
    depth:
        1 (increments only), 2 (with Levy areas), or deeper (the optional package pysiglib computes the
        log-signature in the Lyndon basis; the iterated Lie brackets of ``f`` are nested Jacobian-vector
        products, so the cost of an evaluation grows quickly with the depth).
    window_length:
        Window length in units of ``t``.
    t:
        Observation times ``(length,)``; default ``0, 1, ..., length - 1``.
    smooth:
        Cross every window at speed ``phi'(s) = 6 s (1 - s)`` instead, which vanishes at the window ends
        (the ODE is then continuous across windows and adaptive solvers need not stop on the
        boundaries; a single fixed step per window is less accurate).

    References
    ----------
    Morrill, Salvi, Kidger, Foster & Lyons (2021), "Neural rough differential equations for long time series",
    ICML; Boutaib, Gyurko, Lyons & Yang (2014), "Dimension-free Euler estimates of rough differential
    equations", *Rev. Roumaine Math. Pures Appl.*
    """

    def __init__(self, vector_field, x: torch.Tensor, depth: int = 2, window_length: float = 32.0,
                 t: torch.Tensor | None = None, smooth: bool = False):
        _check_depth(depth, any_depth=True)
        self.vector_field = vector_field
        self._fn = as_vector_field(vector_field)
        self.depth = depth
        self.smooth = bool(smooth)
        r, grid, pts, bidx = _windows(x, t, window_length)
        if depth > 2:
            # the window's log-signature in the Lyndon basis, and the iterated brackets it multiplies
            b = bidx.tolist()
            self.lyndon = torch.stack([_deep_logsignature(pts[..., b[k]:b[k + 1] + 1, :], depth, lyndon_basis=True)
                                       for k in range(len(b) - 1)], dim=-2)  # (..., n, logsignature_channels)
            self.words = lyndon_words(x.shape[-1], depth)
            by_length = {n: [w for w in self.words if len(w) == n] for n in range(1, depth + 1)}
            index = {w: i for n in by_length for i, w in enumerate(by_length[n])}
            self._sizes = {n: len(ws) for n, ws in by_length.items()}
            # for every word of length n: the lengths of its factors u, v and their places in their levels
            self._plans = {n: [(len(u), len(v), index[u], index[v]) for u, v in map(_standard_factorisation, ws)]
                           for n, ws in by_length.items() if n > 1}
            inc, area = self.lyndon[..., : x.shape[-1]], None
        else:
            self.lyndon = None
            inc, area = _window_logsig(pts, bidx, depth)
        self.boundaries = r
        self._knots = r.tolist()
        width = r[1:] - r[:-1]
        self._width = width
        self.increments = inc  # (..., n, C)
        self.areas = area  # (..., n, C, C) or None
        self.control = _WindowPath(self)

    @property
    def jump_ts(self):
        return None if self.smooth else self.boundaries.detach()

    @property
    def num_windows(self) -> int:
        return len(self._knots) - 1

    def _locate(self, t):
        """Window index and rate ``phi'(theta)/H`` for time ``t`` (scalar or one time a sample).

        Stateless: a time lies in the window containing it, and a time exactly on a boundary in the
        window on its left. Solvers evaluate the stages at a step's ends from inside the step (and
        fixed steps are moved onto the boundaries when they are within rounding of them), so every
        stage of a step sees the window the step lies in, in either time direction.
        """
        r = self.boundaries
        nmax = len(self._knots) - 2
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            tb = t
            bshape = self.increments.shape[:-2]
            while tb.dim() > len(bshape) and tb.shape[-1] == 1:
                tb = tb.squeeze(-1)
            tb = tb.detach().to(r.dtype).expand(bshape)
            k = (torch.bucketize(tb, r) - 1).clamp(0, nmax)
            h = self._width[k]
            if not self.smooth:
                return "sample", k, 1 / h
            theta = ((tb - r[k]) / h).clamp(0, 1)
            return "sample", k, 6 * theta * (1 - theta) / h
        tf = float(t)
        knots = self._knots
        k = min(max(bisect.bisect_left(knots, tf) - 1, 0), nmax)
        h = knots[k + 1] - knots[k]
        if not self.smooth:
            return "scalar", k, 1 / h
        theta = min(max((tf - knots[k]) / h, 0.0), 1.0)
        return "scalar", k, 6 * theta * (1 - theta) / h

    def _window(self, mode, k, z):
        if mode == "scalar":
            inc = self.increments[..., k, :]
            area = None if self.areas is None else self.areas[..., k, :, :]
            return inc, area
        inc = self.increments.gather(-2, k.reshape(k.shape + (1, 1)).expand(k.shape + (1, self.increments.shape[-1]))).squeeze(-2)
        if self.areas is None:
            return inc, None
        c = self.areas.shape[-1]
        area = self.areas.gather(-3, k.reshape(k.shape + (1, 1, 1)).expand(k.shape + (1, c, c))).squeeze(-3)
        return inc, area

    def _level(self, n, t, args):
        """``z -> (..., H, K_n)``: the brackets ``f_w`` of the ``K_n`` Lyndon words ``w`` of length ``n``.

        ``f_w = [f_u, f_v] = J_{f_v} f_u - J_{f_u} f_v`` for the standard factorisation ``w = u v``; the
        Jacobian-vector products of a whole level in the directions of another are one batched
        ``torch.func.jvp``, so an evaluation costs a few calls per level rather than a few per word.
        """
        if n == 1:
            return lambda z: self._fn(t, z, args)
        plan = self._plans[n]

        def level(z):
            values, products, cols = {}, {}, []

            def value(m):
                if m not in values:
                    values[m] = self._level(m, t, args)(z)
                return values[m]

            def jvp(m, d):
                # J_{f_w} (f_u) for every word w of length m and u of length d: (K_d, ..., H, K_m)
                if (m, d) not in products:
                    dirs = value(d).movedim(-1, 0).contiguous()
                    zs = z.unsqueeze(0).expand((dirs.shape[0],) + z.shape).contiguous()
                    products[m, d] = torch.func.jvp(self._level(m, t, args), (zs,), (dirs,))[1]
                return products[m, d]

            for a, b, iu, iv in plan:
                cols.append(jvp(b, a)[iu, ..., iv] - jvp(a, b)[iv, ..., iu])
            return torch.stack(cols, -1)

        return level

    def _deep_ode(self, mode, k, t, y, args):
        if mode == "scalar":
            lam = self.lyndon[..., k, :]
        else:
            lam = self.lyndon.gather(-2, k.reshape(k.shape + (1, 1)).expand(k.shape + (1, self.lyndon.shape[-1])))
            lam = lam.squeeze(-2)
        out, start = None, 0
        for n in range(1, self.depth + 1):
            size = self._sizes[n]
            part = (self._level(n, t, args)(y) @ lam[..., start:start + size].unsqueeze(-1)).squeeze(-1)
            out = part if out is None else out + part
            start += size
        return out

    def ode(self, t, y, args):
        mode, k, rate = self._locate(t)
        if self.lyndon is not None:
            out = self._deep_ode(mode, k, t, y, args)
            return out * rate if mode == "scalar" else out * rate.to(out.dtype).unsqueeze(-1)
        inc, area = self._window(mode, k, y)
        f = self._fn(t, y, args)  # (..., H, C)
        out = (f @ inc.unsqueeze(-1)).squeeze(-1)
        if area is not None:
            w = f @ area  # column j: sum_i A^{ij} f_i
            channels = f.shape[-1]
            ys = y.unsqueeze(0).expand((channels,) + y.shape).contiguous()
            _, jf = torch.func.jvp(lambda yy: self._fn(t, yy, args), (ys,), (w.movedim(-1, 0).contiguous(),))
            out = out + jf.diagonal(dim1=0, dim2=-1).sum(-1)
        if mode == "scalar":
            return out * rate
        return out * rate.to(out.dtype).unsqueeze(-1)

    def __repr__(self):
        return f"LogODETerm(depth={self.depth}, windows={self.num_windows})"


class _WindowPath(AbstractPath):
    """The windows of a :class:`LogODETerm` seen as a path (for inspection: ``t0``, ``t1``, ``jump_ts``)."""

    def __init__(self, term):
        self._term = term

    @property
    def t0(self):
        return self._term._knots[0]

    @property
    def t1(self):
        return self._term._knots[-1]

    def evaluate(self, t0, t1=None, left=True):
        raise NotImplementedError("A log-ODE term summarises windows; it has no pointwise values.")

    @property
    def jump_ts(self):
        return self._term.boundaries.detach()
