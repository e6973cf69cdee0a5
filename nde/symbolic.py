"""Symbolic regression of learned vector fields: from a neural ODE to equations and back.

The workflow of Kidger (2021), "On neural differential equations", §6.1:

1. train a neural ODE ``dy/dt = f_theta(y)`` on trajectories;
2. :func:`sample_vector_field`: evaluate ``f_theta`` on the states the trajectories visit;
3. :func:`distill`: regress those samples symbolically, one expression per dimension
   (``backend="sindy"``: sparse regression over a library of candidate functions, offline;
   ``backend="pysr"``: PySR's genetic programming, which needs Julia);
4. :class:`SymbolicModel`: the equations as an ``nn.Module`` with trainable constants;
   :meth:`SymbolicModel.fine_tune` fits them to the trajectories and
   :meth:`SymbolicModel.round` rounds them.

Neither sympy, pysindy nor PySR is imported until they are used.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ._symbolic_library import (
    Library,
    custom_library,
    polynomial_library,
    pysindy_stlsq,
    rational_library,
    stlsq,
    trigonometric_library,
)
from ._symbolic_module import SymbolicModel, _default_names, _require_sympy, as_symbols
from ._terms import AbstractTerm, as_vector_field

__all__ = [
    "VectorFieldData", "sample_vector_field", "distill", "SymbolicModel", "Library", "polynomial_library",
    "trigonometric_library", "rational_library", "custom_library", "stlsq", "julia_available", "pysr_inputs",
    "pysr_expressions",
]


@dataclass
class VectorFieldData:
    """Samples ``(y_n, f(t_n, y_n))`` of a vector field: the data set of a symbolic regression.

    Attributes
    ----------
    states:
        ``(N, d)`` inputs.
    derivatives:
        ``(N, d)`` outputs of the vector field.
    times:
        ``(N,)`` times, or None for an autonomous field sampled at ``t = 0``.
    variable_names:
        One name per state dimension.
    """

    states: torch.Tensor
    derivatives: torch.Tensor
    times: torch.Tensor | None = None
    variable_names: list = field(default_factory=list)

    def __post_init__(self):
        self.states = torch.as_tensor(self.states)
        self.derivatives = torch.as_tensor(self.derivatives)
        if self.states.dim() != 2 or self.states.shape != self.derivatives.shape:
            raise ValueError(
                f"states and derivatives must both have shape (N, d); got {tuple(self.states.shape)} and "
                f"{tuple(self.derivatives.shape)}."
            )
        if not self.variable_names:
            self.variable_names = _default_names(self.states.shape[1])
        self.variable_names = list(self.variable_names)
        if len(self.variable_names) != self.states.shape[1]:
            raise ValueError(
                f"variable_names must have one name per state dimension ({self.states.shape[1]}); "
                f"got {self.variable_names}."
            )

    def __len__(self):
        return self.states.shape[0]

    def numpy(self):
        """``(states, derivatives)`` as float64 numpy arrays."""
        return (self.states.detach().cpu().double().numpy(), self.derivatives.detach().cpu().double().numpy())


def _resolve_vector_field(model_or_f) -> Callable:
    if isinstance(model_or_f, AbstractTerm):
        return model_or_f.vf
    vf = getattr(model_or_f, "vector_field", None)
    if vf is not None and vf is not model_or_f and not isinstance(model_or_f, SymbolicModel):
        return _resolve_vector_field(vf)
    return as_vector_field(model_or_f)


def sample_vector_field(model_or_f, ys, ts=None, args=None, variable_names: Sequence[str] | None = None,
                        batch_size: int | None = 65536) -> VectorFieldData:
    """Evaluate a (learned) vector field on given states: the data set for :func:`distill`.

    Computes ``f(t_n, y_n)`` for every state ``y_n`` of ``ys``, without gradients.

    Parameters
    ----------
    model_or_f:
        A ``NeuralODE`` (its vector field is used), an ``ODETerm``, an ``nn.Module`` or a callable
        ``f(t, y, args)`` / ``f(t, y)``.
    ys:
        States ``(..., d)``, e.g. the trajectories ``(T, batch, d)`` a ``NeuralODE`` returns, or an
        :class:`nde.Solution` (its ``ys`` and ``ts`` are used).
    ts:
        Times of the states: None (the field is evaluated at ``t = 0``, right for autonomous fields),
        a 1-D tensor with one time per entry of the first dimension of ``ys`` (time first), or a
        tensor broadcastable to ``ys.shape[:-1]``. With times the field receives ``t`` as a tensor of
        shape ``(n, 1)``, as in independent batch mode.
    args:
        Passed to the vector field.
    variable_names:
        Names of the state dimensions (default ``x, y, z`` or ``y0, y1, ...``).
    batch_size:
        Most states per call of the vector field.

    Returns
    -------
    VectorFieldData
    """
    from ._solution import Solution

    if isinstance(ys, Solution):
        if ys.ys is None:
            raise ValueError("The Solution holds no states; solve with saveat=SaveAt(ts=...) or SaveAt(steps=True).")
        if ts is None:
            ts = ys.ts
        ys = ys.ys
    if not isinstance(ys, torch.Tensor):
        raise TypeError(f"ys must be a tensor of states (..., d) or an nde.Solution; got {type(ys).__name__}.")
    if ys.dim() < 1 or ys.shape[-1] == 0:
        raise ValueError(f"ys must have shape (..., d) with d >= 1; got {tuple(ys.shape)}.")
    f = _resolve_vector_field(model_or_f)
    d = ys.shape[-1]
    states = ys.detach().reshape(-1, d)
    times = None
    if ts is not None:
        ts = torch.as_tensor(ts, dtype=ys.dtype, device=ys.device).detach()
        lead = ys.shape[:-1]
        if ts.dim() == 1 and len(lead) >= 1 and ts.shape[0] == lead[0] and ts.shape != lead:
            ts = ts.reshape((-1,) + (1,) * (len(lead) - 1))
        try:
            times = torch.broadcast_to(ts, lead).reshape(-1)
        except RuntimeError:
            raise ValueError(
                f"ts must have one time per entry of the first dimension of ys ({lead[0] if lead else 0}) or be "
                f"broadcastable to ys.shape[:-1] = {tuple(lead)}; got shape {tuple(ts.shape)}."
            ) from None
    if batch_size is None or batch_size <= 0:
        batch_size = max(1, states.shape[0])
    outs = []
    with torch.no_grad():
        for i in range(0, states.shape[0], batch_size):
            y = states[i:i + batch_size]
            t = 0.0 if times is None else times[i:i + batch_size, None]
            out = f(t, y, args)
            if not isinstance(out, torch.Tensor) or out.shape != y.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(
                    f"The vector field must return a tensor of the shape of y {tuple(y.shape)}; got {got}."
                )
            outs.append(out.detach())
    return VectorFieldData(states, torch.cat(outs, 0), times, list(variable_names or _default_names(d)))


# ----------------------------------------------------------------------------------------------------------------------
# backends: each maps (states, derivatives, symbols, options) -> (expressions, info)


def _sindy_backend(inputs, derivs, symbols, library=None, threshold=0.05, alpha=1e-8, max_iter=20,
                   optimizer="auto", unbias=True, max_samples=None, seed=0):
    sympy = _require_sympy()
    if optimizer not in ("auto", "pysindy", "stlsq"):
        raise ValueError(f"optimizer must be 'auto', 'pysindy' or 'stlsq'; got {optimizer!r}.")
    has_pysindy = importlib.util.find_spec("pysindy") is not None
    if optimizer == "auto":
        optimizer = "pysindy" if has_pysindy else "stlsq"
    elif optimizer == "pysindy" and not has_pysindy:
        raise ImportError(
            "optimizer='pysindy' needs pysindy: `pip install nde[symbolic]`, or use optimizer='stlsq' (nde's own)."
        )
    library = library if library is not None else polynomial_library(2)
    if not isinstance(library, Library):
        raise TypeError(
            "library must be an nde.symbolic.Library, e.g. polynomial_library(2) + rational_library(); "
            f"got {type(library).__name__}."
        )
    inputs, derivs = _subsample(inputs, derivs, max_samples, seed)
    feats, theta = library.evaluate(symbols, inputs)
    regress = pysindy_stlsq if optimizer == "pysindy" else stlsq
    coef = regress(theta, derivs, threshold=threshold, alpha=alpha, max_iter=max_iter, unbias=unbias)
    exprs = []
    for row in coef:
        terms = [sympy.Float(float(c)) * f for c, f in zip(row, feats) if c != 0.0]
        exprs.append(sympy.Add(*terms) if terms else sympy.Integer(0))
    return exprs, {"library": feats, "coefficients": coef, "optimizer": optimizer}


def _subsample(states, derivs, max_samples, seed):
    if max_samples is not None and states.shape[0] > max_samples:
        idx = np.sort(np.random.default_rng(seed).choice(states.shape[0], size=int(max_samples), replace=False))
        return states[idx], derivs[idx]
    return states, derivs


def julia_available() -> bool:
    """Whether a Julia executable can be found without installing one (PATH, juliaup,
    ``PYTHON_JULIAPKG_EXE`` or a Julia that juliapkg installed earlier)."""
    return _find_julia() is not None


def _find_julia() -> str | None:
    if "juliacall" in sys.modules:
        return "juliacall"
    exe = os.environ.get("PYTHON_JULIAPKG_EXE")
    if exe and shutil.which(exe):
        return exe
    for name in ("julia", "juliaup"):
        found = shutil.which(name)
        if found:
            return found
    projects = [os.environ.get("PYTHON_JULIAPKG_PROJECT")]
    if sys.prefix != sys.base_prefix:
        projects.append(os.path.join(sys.prefix, "julia_env"))
    if os.environ.get("CONDA_PREFIX"):
        projects.append(os.path.join(os.environ["CONDA_PREFIX"], "julia_env"))
    depot = (os.environ.get("JULIA_DEPOT_PATH") or "").split(os.pathsep)[0] or os.path.expanduser("~/.julia")
    projects.append(os.path.join(depot, "environments", "pyjuliapkg"))
    for p in projects:
        if p:
            candidate = os.path.join(p, "pyjuliapkg", "install", "bin", "julia")
            if shutil.which(candidate):
                return candidate
    return None


_PYSR_HELP = (
    "Install PySR with `pip install nde[pysr]` (or `pip install pysr`) and install Julia "
    "(https://julialang.org/downloads, or juliaup); pass install_julia=True to let PySR download Julia itself "
    "(needs network access). The offline backend needs neither: distill(..., backend=\"sindy\")."
)


def _require_pysr(install_julia: bool = False):
    """Import PySR, or raise a clear error saying what is missing, without touching Julia if it is absent.

    A missing dependency (the ``pysr`` package, or Julia) raises ``ImportError``; a Julia that is
    found but cannot be started raises ``RuntimeError``.
    """
    if importlib.util.find_spec("pysr") is None:
        raise ImportError("The PySR backend needs the `pysr` package, which is not installed. " + _PYSR_HELP)
    if not install_julia and _find_julia() is None:
        raise ImportError("The PySR backend needs Julia, and no Julia installation was found. " + _PYSR_HELP)
    try:
        import pysr
    except Exception as e:  # juliacall raises plain Exceptions when Julia cannot be set up
        raise RuntimeError(f"PySR could not start Julia ({type(e).__name__}: {e}). " + _PYSR_HELP) from e
    return pysr


_PYSR_DEFAULTS = dict(
    binary_operators=["+", "-", "*", "/"],
    unary_operators=[],
    niterations=40,
    maxsize=20,
    populations=15,
    model_selection="best",
    random_state=0,
    deterministic=True,
    parallelism="serial",
    progress=False,
    verbosity=0,
    temp_equation_file=True,
)


def pysr_inputs(data: VectorFieldData, include_time: bool = False, max_samples: int | None = 1000, seed: int = 0,
                **pysr_options):
    """What the PySR backend hands to PySR: ``(X, Y, feature_names, regressor_options)``.

    ``X`` is a float64 array ``(n, d)`` of states (``(n, d + 1)`` with the time as last column when
    ``include_time``), ``Y`` the ``(n, d)`` derivatives (1-D when ``d == 1``), subsampled to at most
    ``max_samples`` rows; the features are named ``x0, x1, ...`` (mapped back to the variable names
    when the expressions come back); the options are nde's deterministic defaults updated by
    ``pysr_options``.
    """
    inputs, _ = _regression_inputs(data, include_time)
    return _pysr_arrays(inputs, data.numpy()[1], max_samples, seed, pysr_options)


def _pysr_arrays(inputs, derivs, max_samples, seed, pysr_options):
    inputs, derivs = _subsample(inputs, derivs, max_samples, seed)
    opts = dict(_PYSR_DEFAULTS)
    opts.update(pysr_options)
    if opts.get("deterministic") and opts.get("parallelism") != "serial":
        opts["deterministic"] = False
    names = [f"x{i}" for i in range(inputs.shape[1])]
    y = derivs[:, 0] if derivs.shape[1] == 1 else derivs
    return inputs, y, names, opts


def _regression_inputs(data: VectorFieldData, include_time: bool):
    """The regression inputs (states, plus the time as last column if asked) and their symbols."""
    sympy = _require_sympy()
    states = data.numpy()[0]
    symbols = as_symbols(data.variable_names)
    if not include_time:
        return states, symbols
    if data.times is None:
        raise ValueError(
            "include_time=True needs the times of the samples: pass ts to distill or sample_vector_field."
        )
    times = data.times.detach().cpu().double().numpy()[:, None]
    return np.concatenate([states, times], axis=1), symbols + [sympy.Symbol("t")]


def pysr_expressions(regressor, symbols, n_outputs: int | None = None) -> list:
    """The expressions of a fitted PySR regressor (anything with ``sympy(index)``), in nde's symbols.

    PySR names the features ``x0, x1, ...``; feature ``i`` is renamed to ``symbols[i]`` (the last one
    may be the time ``t``) and every float constant becomes a trainable constant of the resulting
    :class:`SymbolicModel`. ``n_outputs`` (default ``len(symbols)``) is the number of expressions.
    """
    sympy = _require_sympy()
    d = len(symbols) if n_outputs is None else n_outputs
    rename = {f"x{i}": s for i, s in enumerate(symbols)}
    out = []
    for i in range(d):
        e = regressor.sympy() if d == 1 else regressor.sympy(i)
        if isinstance(e, (list, tuple)):
            e = e[0]
        e = sympy.sympify(e)
        # PySR's symbols may carry assumptions (real=True): match them by name.
        out.append(e.xreplace({s: rename[s.name] for s in e.free_symbols if s.name in rename}))
    return out


def _pysr_backend(inputs, derivs, symbols, install_julia=False, max_samples=1000, seed=0, **pysr_options):
    pysr = _require_pysr(install_julia)
    x, y, names, opts = _pysr_arrays(inputs, derivs, max_samples, seed, pysr_options)
    reg = pysr.PySRRegressor(**opts)
    reg.fit(x, y, variable_names=names)
    return pysr_expressions(reg, symbols, derivs.shape[1]), {"regressor": reg}


_BACKENDS = {"sindy": _sindy_backend, "pysr": _pysr_backend}


def distill(model_or_f, data, backend: str | Callable = "sindy", variable_names: Sequence[str] | None = None,
            ts=None, args=None, dtype: torch.dtype | None = None, **backend_options) -> SymbolicModel:
    """Regress a vector field symbolically: one expression per state dimension.

    Finds expressions ``e_i`` with ``f_i(t, y) ~ e_i(y)`` on the samples of ``data`` and returns
    them as a :class:`SymbolicModel` with trainable constants. Kidger (2021), "On neural
    differential equations", §6.1; SINDy: Brunton, Proctor & Kutz (2016), PNAS; PySR: Cranmer
    (2023), "Interpretable machine learning for science with PySR and SymbolicRegression.jl".

    Parameters
    ----------
    model_or_f:
        The vector field (a ``NeuralODE``, ``ODETerm``, ``nn.Module`` or callable); may be None when
        ``data`` already holds its values.
    data:
        A :class:`VectorFieldData`, a pair ``(states, derivatives)`` of ``(N, d)`` tensors, or states
        ``(..., d)`` / an :class:`nde.Solution` on which the field is sampled with
        :func:`sample_vector_field` (``ts`` and ``args`` are passed on).
    backend:
        ``"sindy"`` (default, offline): sequentially thresholded least squares over a library of
        candidate functions, through pysindy's ``STLSQ`` when pysindy is installed and nde's own
        implementation otherwise. Options: ``library`` (default ``polynomial_library(2)``; combine
        ``polynomial_library``, ``trigonometric_library``, ``rational_library``, ``custom_library`` with
        ``+``), ``threshold`` (0.05; coefficients below it are zeroed), ``alpha`` (ridge, 1e-8),
        ``max_iter``, ``optimizer`` (``"auto"``, ``"pysindy"``, ``"stlsq"``), ``max_samples``.

        ``"pysr"``: PySR's ``PySRRegressor`` (needs ``pip install nde[pysr]`` and Julia; without
        either it raises ``ImportError`` saying what to install, and ``RuntimeError`` if a Julia is
        found but fails to start). Options:
        ``install_julia`` (False: raise when no Julia is installed rather than downloading one),
        ``max_samples`` (1000) and any ``PySRRegressor`` argument (``niterations``,
        ``binary_operators``, ``unary_operators``, ...).

        Both accept ``include_time=True``: the time ``t`` becomes an input of the regression (for
        non-autonomous fields; needs the times of the samples).

        A callable ``backend(inputs, derivatives, symbols, **options) -> list of sympy expressions``
        plugs in any other regression: ``inputs`` is ``(N, d)`` (``(N, d + 1)`` with the time
        last under ``include_time``), ``derivatives`` ``(N, d)``, both numpy float64, and
        ``symbols`` names the columns of ``inputs``.
    variable_names:
        Names of the state variables (default: those of ``data``, else ``x, y, z`` / ``y0, y1, ...``).
    ts, args:
        Used when the field has to be sampled.
    dtype:
        dtype of the returned model's constants.

    Returns
    -------
    SymbolicModel
        Its ``info`` holds the backend, the relative root-mean-square error of the fit on the data
        (``fit_error``) and backend details (library and coefficients for SINDy).
    """
    if isinstance(data, VectorFieldData):
        pass
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        data = VectorFieldData(data[0], data[1], None, list(variable_names or []))
    else:
        if model_or_f is None:
            raise ValueError(
                "model_or_f is None, so data must already hold the field's values: a VectorFieldData or a pair "
                "(states, derivatives)."
            )
        data = sample_vector_field(model_or_f, data, ts=ts, args=args, variable_names=variable_names)
    names = list(variable_names) if variable_names is not None else data.variable_names
    if len(names) != data.states.shape[1]:
        raise ValueError(f"variable_names must have {data.states.shape[1]} names; got {names}.")
    symbols = as_symbols(names)
    if isinstance(backend, str):
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {sorted(_BACKENDS)} or a callable; got {backend!r}.")
        fn = _BACKENDS[backend]
    elif callable(backend):
        fn = backend
    else:
        raise TypeError(f"backend must be a string or a callable; got {type(backend).__name__}.")
    include_time = backend_options.pop("include_time", False)
    data = VectorFieldData(data.states, data.derivatives, data.times, names)
    inputs, in_symbols = _regression_inputs(data, include_time)
    result = fn(inputs, data.numpy()[1], in_symbols, **backend_options)
    exprs, info = result if isinstance(result, tuple) else (result, {})
    exprs = list(exprs)
    if len(exprs) != len(symbols):
        raise ValueError(f"The backend returned {len(exprs)} expressions for {len(symbols)} state dimensions.")
    model = SymbolicModel(exprs, symbols, dtype=dtype if dtype is not None else data.states.dtype)
    with torch.no_grad():
        pred = model(0.0 if data.times is None else data.times[:, None], data.states.to(model.constants.dtype))
        target = data.derivatives.to(pred.dtype)
        err = torch.sqrt(torch.mean((pred - target) ** 2) / torch.mean(target ** 2).clamp_min(1e-300))
    model.info = dict(info, backend=backend if isinstance(backend, str) else getattr(backend, "__name__", "custom"),
                      fit_error=float(err))
    return model
