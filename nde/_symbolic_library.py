"""Candidate-function libraries and sequentially thresholded least squares (SINDy).

Brunton, Proctor & Kutz (2016), "Discovering governing equations from data by sparse
identification of nonlinear dynamical systems", PNAS: regress ``dy/dt ~ Theta(y) Xi``
over a library ``Theta`` of candidate functions with a sparse coefficient matrix ``Xi``.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Callable, Sequence

import numpy as np

from ._symbolic_module import _require_sympy


class Library:
    """A library of candidate functions of the state variables for sparse regression.

    Libraries are built from generators (``polynomial_library``, ``trigonometric_library``,
    ``rational_library``, ``custom_library``) and combined with ``+``. The functions are
    sympy expressions; floating-point constants inside them (the ``1.0`` of ``y/(1.0 + y)``)
    become trainable constants of the distilled :class:`~nde.symbolic.SymbolicModel`.

    Parameters
    ----------
    generators:
        Callables ``symbols -> list of sympy expressions``.
    """

    def __init__(self, generators: Sequence[Callable]):
        self._generators = list(generators)

    def __add__(self, other: "Library") -> "Library":
        if not isinstance(other, Library):
            return NotImplemented
        return Library(self._generators + other._generators)

    def features(self, symbols) -> list:
        """The candidate functions for the given state symbols (duplicates removed, order kept)."""
        out, seen = [], set()
        for gen in self._generators:
            for e in gen(list(symbols)):
                if e not in seen:
                    seen.add(e)
                    out.append(e)
        return out

    def evaluate(self, symbols, states: np.ndarray):
        """``(features, Theta)``: the candidate functions and their values ``(N, n_features)`` on ``states``.

        Functions that are not finite somewhere on the data (a pole of ``1/(1+y)`` at ``y = -1``)
        are dropped with a warning.
        """
        sympy = _require_sympy()
        feats = self.features(symbols)
        cols, kept, dropped = [], [], []
        args = [states[:, i] for i in range(states.shape[1])]
        with np.errstate(all="ignore"):
            for f in feats:
                v = np.asarray(sympy.lambdify(list(symbols), f, "numpy")(*args), dtype=np.float64)
                v = np.broadcast_to(v, (states.shape[0],))
                if np.all(np.isfinite(v)):
                    cols.append(v)
                    kept.append(f)
                else:
                    dropped.append(f)
        if dropped:
            warnings.warn(f"Dropped library functions that are not finite on the data: {dropped}.", stacklevel=3)
        if not kept:
            raise ValueError("No library function is finite on the data; choose another library.")
        return kept, np.stack(cols, axis=1)

    def __repr__(self):
        return f"Library({len(self._generators)} generator(s))"


def polynomial_library(degree: int = 2, include_bias: bool = True) -> Library:
    """All monomials of the state variables up to total degree ``degree`` (and the constant 1)."""
    if not isinstance(degree, int) or degree < 0:
        raise ValueError(f"degree must be a non-negative integer; got {degree!r}.")

    def gen(symbols):
        sympy = _require_sympy()
        out = [sympy.Integer(1)] if include_bias else []
        for k in range(1, degree + 1):
            for combo in itertools.combinations_with_replacement(symbols, k):
                out.append(sympy.Mul(*combo))
        return out
    return Library([gen])


def trigonometric_library(frequencies: Sequence[float] = (1.0,)) -> Library:
    """``sin(w v)`` and ``cos(w v)`` of every state variable ``v`` and frequency ``w``."""
    freqs = [float(w) for w in frequencies]
    if not freqs or any(w == 0 for w in freqs):
        raise ValueError(f"frequencies must be a non-empty list of non-zero numbers; got {frequencies!r}.")

    def gen(symbols):
        sympy = _require_sympy()
        out = []
        for w in freqs:
            for s in symbols:
                arg = s if w == 1.0 else sympy.Float(w) * s
                out += [sympy.sin(arg), sympy.cos(arg)]
        return out
    return Library([gen])


def rational_library(shifts: Sequence[float] = (1.0,), kind: str = "saturating") -> Library:
    """Rational functions of every state variable ``v``: ``v/(c + v)`` (``kind="saturating"``),
    ``1/(c + v)`` (``"reciprocal"``) or both (``"both"``), for every shift ``c``.

    The shift is a float constant, so it stays trainable after distillation.
    """
    if kind not in ("saturating", "reciprocal", "both"):
        raise ValueError(f"kind must be 'saturating', 'reciprocal' or 'both'; got {kind!r}.")
    cs = [float(c) for c in shifts]
    if not cs:
        raise ValueError("shifts must hold at least one number.")

    def gen(symbols):
        sympy = _require_sympy()
        out = []
        for c in cs:
            for s in symbols:
                den = sympy.Float(c) + s
                if kind in ("saturating", "both"):
                    out.append(s / den)
                if kind in ("reciprocal", "both"):
                    out.append(1 / den)
        return out
    return Library([gen])


def custom_library(functions) -> Library:
    """Candidate functions given by strings (``"exp(-x)"``) or by a callable ``symbols -> expressions``."""
    if callable(functions):
        return Library([lambda symbols: list(functions(symbols))])
    functions = list(functions)

    def gen(symbols):
        sympy = _require_sympy()
        local = {s.name: s for s in symbols}
        return [sympy.sympify(f, locals=local) if isinstance(f, str) else f for f in functions]
    return Library([gen])


def stlsq(theta: np.ndarray, targets: np.ndarray, threshold: float = 0.05, alpha: float = 1e-8,
          max_iter: int = 20, unbias: bool = True) -> np.ndarray:
    """Sequentially thresholded least squares.

    Repeats ``Xi = argmin |Theta Xi - Y|^2 + alpha |Xi|^2`` restricted to the current support,
    then zeroes every coefficient with ``|Xi| < threshold``, until the support stops changing;
    finally refits without the ridge penalty on the support (``unbias``). Columns are scaled
    to unit norm internally; the threshold applies to the unscaled coefficients.
    Brunton, Proctor & Kutz (2016), PNAS.

    Parameters
    ----------
    theta:
        Library values ``(N, n_features)``.
    targets:
        Derivatives ``(N, n_targets)``.
    threshold, alpha, max_iter, unbias:
        As above.

    Returns
    -------
    ndarray
        Coefficients ``(n_targets, n_features)``.
    """
    theta = np.asarray(theta, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    if targets.ndim == 1:
        targets = targets[:, None]
    if theta.ndim != 2 or theta.shape[0] != targets.shape[0]:
        raise ValueError(f"theta must be (N, n_features) and targets (N, n_targets); got {theta.shape} and {targets.shape}.")
    if threshold < 0 or alpha < 0:
        raise ValueError(f"threshold and alpha must be non-negative; got {threshold} and {alpha}.")
    scale = np.linalg.norm(theta, axis=0)
    scale[scale == 0] = 1.0
    a = theta / scale
    n_feat = theta.shape[1]
    coef = np.zeros((targets.shape[1], n_feat))

    def fit(cols, y, ridge):
        sub = a[:, cols]
        if ridge > 0:
            g = sub.T @ sub + ridge * np.eye(len(cols))
            return np.linalg.solve(g, sub.T @ y)
        return np.linalg.lstsq(sub, y, rcond=None)[0]

    for j in range(targets.shape[1]):
        y = targets[:, j]
        support = np.ones(n_feat, dtype=bool)
        xi = np.zeros(n_feat)
        for _ in range(max_iter):
            cols = np.flatnonzero(support)
            if cols.size == 0:
                break
            xi = np.zeros(n_feat)
            xi[cols] = fit(cols, y, alpha) / scale[cols]
            new_support = np.abs(xi) >= threshold
            if np.array_equal(new_support, support):
                break
            support = new_support
        xi[~support] = 0.0
        cols = np.flatnonzero(support)
        if unbias and cols.size:
            xi = np.zeros(n_feat)
            xi[cols] = fit(cols, y, 0.0) / scale[cols]
        coef[j] = xi
    return coef


def pysindy_stlsq(theta, targets, threshold=0.05, alpha=1e-8, max_iter=20, unbias=True) -> np.ndarray:
    """The same regression through pysindy's ``STLSQ`` optimiser (pysindy imported here)."""
    import pysindy

    opt = pysindy.STLSQ(threshold=threshold, alpha=alpha, max_iter=max_iter, unbias=unbias)
    targets = np.asarray(targets, dtype=np.float64)
    if targets.ndim == 1:
        targets = targets[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.fit(np.asarray(theta, dtype=np.float64), targets)
    return np.asarray(opt.coef_, dtype=np.float64).reshape(targets.shape[1], -1)
