"""The torchsde call conventions (``sdeint``, ``sdeint_adjoint``) on top of :func:`nde.solve`.

A script switches by changing its import line: the same SDE objects (``f``, ``g``, ``noise_type``,
``sde_type``, optional ``h``, ``g_prod``, ``f_and_g``, ``f_and_g_prod``), the same method names and
options, torchsde's own Brownian objects as ``bm``, and the same return conventions (``logqp``,
``extra``, ``extra_solver_state``). The layer is thin: it builds terms, a solver, a controller and a
Brownian motion, and hands over to the loop.
"""

from __future__ import annotations

import math
import warnings

import torch

from ._brownian import BrownianInterval
from ._controllers import ConstantStepSize, PIDController
from ._path import AbstractPath
from . import settings as _settings
from ._saveat import SaveAt
from ._solve import solve
from ._terms import ControlTerm, MultiTerm, ODETerm

METHODS = tuple(_settings.METHODS.all())
NOISE_TYPES = tuple(_settings.NOISE_TYPES.all())
SDE_TYPES = tuple(_settings.SDE_TYPES.all())
_ITO_METHODS = ("euler", "milstein", "srk")
_STRAT_ONLY = ("midpoint", "heun", "euler_heun", "reversible_heun", "adjoint_reversible_heun", "log_ode")
_NAME_KEYS = ("drift", "diffusion", "prior_drift", "drift_and_diffusion", "drift_and_diffusion_prod")
# methods that use the diffusion matrix g itself (the others need only products g(t, y) dW)
_NEEDS_MATRIX = ("milstein", "srk", "reversible_heun")
_SPACE_TIME = ("space-time", "davie", "foster")
_AREA = ("davie", "foster")
# the Stratonovich methods that can solve the (product-only) adjoint system backwards
_ADJOINT_SOLVERS = ("midpoint", "heun", "euler_heun")
# an Itô adjoint_method names the order wanted; the adjoint is solved in Stratonovich form with
_ITO_ADJOINT = {"euler": "euler_heun", "milstein": "midpoint", "srk": "midpoint"}


def _warn_unused(kwargs, fn):
    if kwargs:
        warnings.warn(f"`{fn}`: Unexpected arguments {kwargs}", stacklevel=3)


class _Renamed:
    """An SDE object seen through torchsde's ``names`` mapping (e.g. ``{"drift": "mu"}``)."""

    _DEFAULT = {"drift": "f", "diffusion": "g", "prior_drift": "h", "drift_and_diffusion": "f_and_g",
                "drift_and_diffusion_prod": "f_and_g_prod"}

    def __init__(self, sde, names):
        self.sde = sde
        self.names = {self._DEFAULT[k]: v for k, v in names.items()}

    def __getattr__(self, name):
        return getattr(self.sde, self.names.get(name, name))


class TorchsdeBrownian(AbstractPath):
    """A torchsde Brownian object (``BrownianInterval``, ``BrownianPath``, ``BrownianTree``) as an nde path.

    ``evaluate(s, u)`` calls ``bm(s, u)``; with ``use_levy=True`` it returns ``(W, H)`` with the
    space-time Lévy area ``H = U / h - W / 2`` from torchsde's ``U = int (W(r) - W(s)) dr``;
    :meth:`evaluate_area` returns ``(W, A)`` with torchsde's space-space Lévy area ``A``.
    """

    def __init__(self, bm):
        if not callable(bm):
            raise TypeError(f"bm must be callable as bm(ta, tb); got {type(bm).__name__}.")
        self.bm = bm
        self.shape = tuple(getattr(bm, "shape", ()))
        self.levy_area = getattr(bm, "levy_area_approximation", "none")

    @property
    def t0(self):
        return float(getattr(self.bm, "_start", getattr(self.bm, "t0", float("-inf"))))

    @property
    def t1(self):
        return float(getattr(self.bm, "_end", getattr(self.bm, "t1", float("inf"))))

    @staticmethod
    def _one_time(t):
        if isinstance(t, torch.Tensor) and t.numel() > 1:
            raise ValueError("torchsde Brownian objects take one time for the whole batch; use batch_mode='joint' "
                             "or an nde.BrownianInterval.")
        return float(t)

    def evaluate(self, t0, t1=None, left=True, use_levy=False):
        s = self._one_time(t0)
        if t1 is None:
            return self.bm(s)
        u = self._one_time(t1)
        flip = u < s
        a, b = (u, s) if flip else (s, u)
        if not use_levy:
            w = self.bm(a, b)
            return -w if flip else w
        if self.levy_area not in _SPACE_TIME:
            raise ValueError("This solver needs space-time Lévy areas: create the torchsde Brownian motion with "
                             "levy_area_approximation='space-time' (or 'davie' / 'foster').")
        w, U = self.bm(a, b, return_U=True)
        H = U / (b - a) - 0.5 * w
        return (-w if flip else w), H

    def evaluate_area(self, t0, t1):
        """``(W, A)`` over the interval between ``t0`` and ``t1`` (``(-W, -A)`` of the reversed interval)."""
        if self.levy_area not in _AREA:
            raise ValueError("This solver needs space-space Lévy areas: create the torchsde Brownian motion with "
                             "levy_area_approximation='davie' or 'foster'.")
        s, u = self._one_time(t0), self._one_time(t1)
        flip = u < s
        a, b = (u, s) if flip else (s, u)
        w, A = self.bm(a, b, return_A=True)
        return (-w, -A) if flip else (w, A)


class _ZeroChannel(AbstractPath):
    """A path with one more channel, identically zero."""

    def __init__(self, path):
        self.path = path
        self.shape = tuple(getattr(path, "shape", ()))[:-1] + (tuple(getattr(path, "shape", (0,)))[-1] + 1,)
        self.levy_area = getattr(path, "levy_area", "none")

    @property
    def t0(self):
        return self.path.t0

    @property
    def t1(self):
        return self.path.t1

    def evaluate(self, t0, t1=None, left=True, use_levy=False):
        out = self.path.evaluate(t0, t1, left=left, use_levy=use_levy) if use_levy else self.path.evaluate(t0, t1)
        if use_levy:
            return tuple(torch.cat([x, torch.zeros_like(x[..., :1])], -1) for x in out)
        return torch.cat([out, torch.zeros_like(out[..., :1])], -1)


# ---- the SDE object's functions, shape-checked at their first call ---------------------------
class _Checked:
    """``fn(t, y, ...)`` whose output shape is checked against ``y`` once, at the first call.

    ``expect(y)`` gives the expected shape; ``index`` picks an entry of a tuple output
    (``f_and_g``); the error names ``label`` and both shapes."""

    def __init__(self, fn, label, expect, index=None, what="Drift"):
        self.fn, self.label, self.expect, self.index, self.what = fn, label, expect, index, what
        self.checked = False

    def __call__(self, t, y, *rest):
        out = self.fn(t, y, *rest)
        if self.index is not None:
            out = out[self.index]
        if not self.checked:
            want = self.expect(y)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"{self.what} {self.label} must return a tensor; got {type(out).__name__}.")
            if want is not None and tuple(out.shape) != tuple(want):
                raise ValueError(f"{self.what} {self.label} must be of shape {tuple(want)}, but got {tuple(out.shape)} "
                                 f"(y has shape {tuple(y.shape)}).")
            self.checked = True
        return out


def _label(sde, name):
    real = sde.names.get(name, name) if isinstance(sde, _Renamed) else name
    return f"sde.{real}"


def _functions(sde, m):
    """``(f, g, g_prod)`` of the SDE object as ``fn(t, y)`` / ``fn(t, y, v)``, shape-checked (``g`` or
    ``g_prod`` may be None); ``m`` is the number of Brownian channels."""
    noise = sde.noise_type

    def g_shape(y):
        if noise == "diagonal":
            return tuple(y.shape)
        return tuple(y.shape) + ((1,) if noise == "scalar" else (m,))

    same = lambda y: tuple(y.shape)  # noqa: E731
    if hasattr(sde, "f"):
        f = _Checked(sde.f, f"{_label(sde, 'f')}(t, y)", same)
    elif hasattr(sde, "f_and_g"):
        f = _Checked(sde.f_and_g, f"{_label(sde, 'f_and_g')}(t, y)[0]", same, index=0)
    elif hasattr(sde, "f_and_g_prod"):
        fgp = sde.f_and_g_prod
        zeros = {}

        def f_only(t, y):
            # the drift part of f_and_g_prod, with a zero Brownian increment (m channels)
            key = (tuple(y.shape[:-1]), y.dtype, y.device)
            if key not in zeros:
                zeros[key] = torch.zeros(y.shape[:-1] + (m,), dtype=y.dtype, device=y.device)
            return fgp(t, y, zeros[key])[0]

        f = _Checked(f_only, f"{_label(sde, 'f_and_g_prod')}(t, y, v)[0]", same)
    else:
        raise ValueError("sde must define at least one of `f`, `f_and_g`, or `f_and_g_prod`. (Or possibly more "
                         "depending on the method chosen.)")
    g = None
    if hasattr(sde, "g"):
        g = _Checked(sde.g, f"{_label(sde, 'g')}(t, y)", g_shape, what="Diffusion")
    elif hasattr(sde, "f_and_g"):
        g = _Checked(sde.f_and_g, f"{_label(sde, 'f_and_g')}(t, y)[1]", g_shape, index=1, what="Diffusion")
    gp = None
    if hasattr(sde, "g_prod"):
        gp = _Checked(sde.g_prod, f"{_label(sde, 'g_prod')}(t, y, v)", same, what="Diffusion-vector product")
    elif hasattr(sde, "f_and_g_prod"):
        gp = _Checked(sde.f_and_g_prod, f"{_label(sde, 'f_and_g_prod')}(t, y, v)[1]", same, index=1,
                      what="Diffusion-vector product")
    if g is None and gp is None:
        raise ValueError("sde must define at least one of `g`, `f_and_g`, `g_prod` or `f_and_g_prod`. (Or possibly "
                         "more depending on the method chosen.)")
    return f, g, gp


def _check_sde(sde):
    for attr, allowed in (("noise_type", NOISE_TYPES), ("sde_type", SDE_TYPES)):
        if not hasattr(sde, attr):
            raise ValueError(f"sde does not have the attribute {attr}; set it to one of {allowed}.")
        if getattr(sde, attr) not in allowed:
            raise ValueError(f"Expected {attr} in {allowed}, but found {getattr(sde, attr)!r}.")


def _default_method(sde):
    if sde.sde_type == "ito":
        return "euler" if sde.noise_type == "general" else "srk"
    return "midpoint"


def _check_method(method, sde):
    if method not in METHODS:
        raise ValueError(f"Expected method in {METHODS}, but found {method!r}.")
    kind, noise = sde.sde_type, sde.noise_type
    if method in _STRAT_ONLY and kind != "stratonovich":
        raise ValueError(f"Method {method!r} is for Stratonovich SDEs; sde.sde_type is {kind!r}.")
    if method in ("euler", "srk") and kind != "ito":
        raise ValueError(f"Method {method!r} is for Itô SDEs; sde.sde_type is {kind!r}.")
    if method in ("milstein", "srk") and noise == "general":
        raise ValueError(f"Method {method!r} needs diagonal, scalar or additive noise; sde.noise_type is 'general'.")
    if method == "adjoint_reversible_heun":
        raise ValueError("Method 'adjoint_reversible_heun' is only an adjoint_method of sdeint_adjoint; "
                         "use method='reversible_heun'.")


def _solver(method, sde, options):
    from nde import solvers as S

    _check_method(method, sde)
    noise, kind = sde.noise_type, sde.sde_type
    if method == "euler":
        return S.EulerMaruyama()
    if method == "milstein":
        return S.Milstein(kind, derivative_free=bool(options.get("grad_free", False)) and noise != "additive")
    if method == "srk":
        return S.SRA1() if noise == "additive" else S.SRID2()
    if method == "midpoint":
        return S.Midpoint()
    if method == "log_ode":
        return S.LogODEMidpoint()
    if method == "heun":
        return S.Heun()
    if method == "euler_heun":
        return S.EulerHeun()
    return _TorchsdeReversibleHeun()


def _reversible_heun_class():
    from nde.solvers import ReversibleHeun

    return ReversibleHeun


class _TorchsdeReversibleHeun:
    """Placeholder resolved to :class:`_StatefulReversibleHeun` or a plain ReversibleHeun in :func:`_build`."""


def _stateful_reversible_heun(state):
    ReversibleHeun = _reversible_heun_class()

    class _StatefulReversibleHeun(ReversibleHeun):
        """Reversible Heun started from a given solver state (torchsde's ``extra_solver_state``), recording the
        state after its last step (returned with ``extra=True``)."""

        def __init__(self):
            self.given, self.last = state, None

        def init(self, terms, t0, t1, y0, args):
            if self.given is None:
                st, n = super().init(terms, t0, t1, y0, args)
            else:
                from nde.solvers.sde import _check_interpretation

                _check_interpretation(self, terms)
                st, n = self.given, 0
            self.last = st
            return st, n

        def step(self, terms, t0, t1, y0, args, solver_state):
            out = super().step(terms, t0, t1, y0, args, solver_state)
            self.last = out[3]
            return out

        def __repr__(self):
            return "ReversibleHeun()"

    return _StatefulReversibleHeun()


class _LogqpDrift:
    """Drift of ``[y, log q/p]``: ``(f, |u|^2 / 2)`` with ``u = g^{-1} (f - h)`` (diagonal: elementwise)."""

    def __init__(self, sde, f, g, h):
        self.sde, self.f, self.g, self.h = sde, f, g, h

    def __call__(self, t, yz, args):
        y = yz[..., :-1]
        f = self.f(t, y)
        h = self.h(t, y)
        g = self.g(t, y)
        diff = f - h
        noise = self.sde.noise_type
        if noise == "diagonal":
            safe = torch.where(g.detach().abs() > 1e-7, g, torch.full_like(g, 1e-7) * torch.sign(g))
            u = diff / safe
        else:
            u = (torch.linalg.pinv(g) @ diff.unsqueeze(-1)).squeeze(-1)
        return torch.cat([f, 0.5 * (u * u).sum(-1, keepdim=True)], -1)


class _LogqpDiffusion:
    def __init__(self, g, noise):
        self.g, self.noise = g, noise

    def __call__(self, t, yz, args):
        g = self.g(t, yz[..., :-1])
        if self.noise == "diagonal":
            return torch.cat([g, torch.zeros_like(g[..., :1])], -1)
        return torch.cat([g, torch.zeros_like(g[..., :1, :])], -2)


def _noise_channels(sde, y0, ts, bm, logqp):
    """The number of Brownian channels, checking ``bm``'s shape against ``y0`` and the noise type."""
    noise = sde.noise_type
    d = y0.shape[-1] if y0.dim() else 1
    if bm is not None and getattr(bm, "shape", None) is not None and len(tuple(bm.shape)) >= 1:
        shape = tuple(bm.shape)
        if shape[:-1] != tuple(y0.shape[:-1]):
            raise ValueError(f"Batch sizes not consistent: bm has shape {shape} but y0 has shape {tuple(y0.shape)}; "
                             f"the Brownian motion must have shape y0.shape[:-1] + (noise channels,) = "
                             f"{tuple(y0.shape[:-1]) + ('m',)}.")
        m = shape[-1]
        if noise == "scalar" and m != 1:
            raise ValueError(f"The Brownian motion for scalar SDEs must be of dimension 1; bm has shape {shape}.")
        if noise == "diagonal" and m not in ((d, d + 1) if logqp else (d,)):
            raise ValueError(f"Noise sizes not consistent: diagonal noise needs a Brownian motion of shape "
                             f"{tuple(y0.shape[:-1]) + (d + 1 if logqp else d,)}, but bm has shape {shape}.")
        return m
    if noise == "diagonal":
        return d
    if noise == "scalar":
        return 1
    g = getattr(sde, "g", None)
    if g is None and hasattr(sde, "f_and_g"):
        g = lambda t, y: sde.f_and_g(t, y)[1]  # noqa: E731
    if g is None:
        raise ValueError("Cannot infer noise size (i.e. number of Brownian motion channels). Either pass `bm` "
                         "explicitly, or specify one of the `g`, `f_and_g` functions.")
    with torch.no_grad():
        g0 = g(ts[0], y0)
    if g0.dim() < 2 or tuple(g0.shape[:-1]) != tuple(y0.shape):
        raise ValueError(f"Diffusion {_label(sde, 'g')}(t, y) must be of shape y.shape + (noise channels,) = "
                         f"{tuple(y0.shape) + ('m',)} for noise_type {noise!r}, but got {tuple(g0.shape)}.")
    return g0.shape[-1]


def _levy_of(path):
    return getattr(path, "levy_area", "none")


def _build(sde, y0, ts, bm, method, dt, adaptive, rtol, atol, dt_min, options, names, logqp, extra_state=None,
           want_state=False):
    if names:
        bad = [k for k in names if k not in _NAME_KEYS]
        if bad:
            warnings.warn(f"names: the keys {bad} are not used; the keys are {_NAME_KEYS}.", stacklevel=4)
        names = {k: names[k] for k in names if k in _NAME_KEYS}
        if names:
            sde = _Renamed(sde, names)
    _check_sde(sde)
    if not isinstance(y0, torch.Tensor):
        raise ValueError("`y0` must be a torch.Tensor.")
    if y0.dim() < 1:
        raise ValueError("`y0` must have at least one dimension (the state channels); got a 0-d tensor.")
    if not torch.is_tensor(ts):
        if not isinstance(ts, (tuple, list)) or not all(isinstance(t, (float, int)) for t in ts):
            raise ValueError("Evaluation times `ts` must be a 1-D Tensor or list/tuple of floats.")
        ts = torch.tensor(ts, dtype=y0.dtype, device=y0.device)
    if ts.dim() != 1 or ts.numel() < 1:
        raise ValueError("Evaluation times `ts` must be a non-empty 1-D tensor.")
    if ts.numel() > 1 and not bool((ts[1:] > ts[:-1]).all()):
        raise ValueError("Evaluation times `ts` must be strictly increasing.")
    for name, v in (("ts", ts), ("dt", dt), ("rtol", rtol), ("atol", atol), ("dt_min", dt_min)):
        if torch.is_tensor(v) and v.requires_grad:
            raise ValueError(f"Argument {name} must not require gradient.")
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options must be a dict or None; got {type(options).__name__}.")
    options = {} if options is None else dict(options)
    method = _default_method(sde) if method is None else method
    noise, kind = sde.noise_type, sde.sde_type
    if adaptive and method == "euler" and noise != "additive":
        warnings.warn("Numerical solution is not guaranteed to converge to the correct solution when using adaptive "
                      "time-stepping with the Euler--Maruyama method with non-additive noise.", stacklevel=4)
    _check_method(method, sde)
    m = _noise_channels(sde, y0, ts, bm, logqp)
    f, g, gprod = _functions(sde, m if not (logqp and noise == "diagonal") else y0.shape[-1])
    if g is None and (method in _NEEDS_MATRIX or (method == "log_ode" and noise == "general") or logqp):
        raise ValueError(f"{'logqp=True' if logqp else f'Method {method!r}'} needs the diffusion g(t, y) itself "
                         "(define `g` or `f_and_g`); the sde defines only a diffusion-vector product.")
    if logqp and not hasattr(sde, "h"):
        raise ValueError("logqp=True needs the prior drift sde.h(t, y).")
    solver = _solver(method, sde, options)
    unused = [k for k in options if not (k == "grad_free" and method == "milstein")]
    if unused:
        warnings.warn(f"options {unused} are not used by method {method!r}.", stacklevel=4)
    t0f, t1f = float(ts[0]), float(ts[-1])
    pad = False
    if logqp and noise == "diagonal":
        # the log-ratio channel is a state of its own, with zero diffusion (and a Brownian channel of its own)
        pad = bm is not None and m == y0.shape[-1]
        m = y0.shape[-1] + 1
    levy = "space-time" if method == "srk" else ("foster" if method == "log_ode" else "none")
    if bm is None:
        bm = BrownianInterval(t0f, t1f if t1f > t0f else t0f + 1.0, tuple(y0.shape[:-1]) + (m,), dtype=y0.dtype,
                              device=y0.device, levy_area=levy, dt=None if adaptive else dt,
                              dt_min=dt_min if adaptive else None)
    path = bm if isinstance(bm, AbstractPath) else TorchsdeBrownian(bm)
    if method == "srk" and _levy_of(path) not in _SPACE_TIME:
        raise ValueError(f"SDE solver requires one of {_SPACE_TIME} set as the `levy_area_approximation` on the "
                         "Brownian motion (method 'srk' uses space-time Lévy areas).")
    if method == "log_ode" and _levy_of(path) not in _AREA:
        raise ValueError(f"SDE solver requires one of {_AREA} set as the `levy_area_approximation` on the Brownian "
                         "motion (method 'log_ode' uses space-space Lévy areas).")
    if pad:
        path = _ZeroChannel(path)
    if logqp:
        h = _Checked(sde.h, f"{_label(sde, 'h')}(t, y)", lambda y: tuple(y.shape), what="Prior drift")
        drift = ODETerm(_LogqpDrift(sde, f, g, h))
        diffusion = ControlTerm(_LogqpDiffusion(g, noise), path, noise=noise, sde_type=kind)
        y0 = torch.cat([y0, y0.new_zeros(y0.shape[:-1] + (1,))], -1)
    else:
        drift = ODETerm(lambda t, y, args: f(t, y))
        vf_prod = None if gprod is None else (lambda t, y, args, v: gprod(t, y, v))
        vf = (lambda t, y, args: g(t, y)) if g is not None else _missing_g
        diffusion = ControlTerm(vf, path, noise=noise, vf_prod=vf_prod, sde_type=kind)
    terms = MultiTerm(drift, diffusion)
    if isinstance(solver, _TorchsdeReversibleHeun):
        state = None
        if extra_state is not None:
            state = _reversible_state(extra_state, y0)
        solver = _stateful_reversible_heun(state) if (state is not None or want_state) else _reversible_heun_class()()
    elif extra_state is not None and len(tuple(extra_state)) > 0:
        warnings.warn(f"extra_solver_state is not used by method {method!r} (it keeps no extra state).", stacklevel=4)
    if adaptive:
        from nde.solvers import StepDoubling

        if solver.error_order is None:
            solver = StepDoubling(solver)
        controller = PIDController(rtol=rtol, atol=atol, dtmin=dt_min, force_dtmin=True)
    else:
        controller = ConstantStepSize()
    return terms, solver, controller, y0, ts, sde, path


def _reversible_state(extra, y0):
    """torchsde's reversible Heun state ``(f, g, z)`` as nde's ``(z, (f, g))``, checked."""
    if not isinstance(extra, (tuple, list)) or len(extra) != 3 or not all(isinstance(x, torch.Tensor) for x in extra):
        raise ValueError("extra_solver_state for method 'reversible_heun' must be the tuple (f, g, z) of tensors that "
                         "sdeint(..., extra=True) returns.")
    f0, g0, z0 = extra
    for name, x in (("f", f0), ("z", z0)):
        if tuple(x.shape) != tuple(y0.shape):
            raise ValueError(f"extra_solver_state: {name} must have the shape of y0, {tuple(y0.shape)}; "
                             f"got {tuple(x.shape)}.")
    return z0, (f0, g0)


def _missing_g(t, y, args):
    raise ValueError("This method needs the diffusion g(t, y) itself; the sde defines only g_prod.")


def _extra_out(solver):
    """torchsde's ``extra_solver_state``: ``(f, g, z)`` for reversible Heun, ``()`` otherwise."""
    last = getattr(solver, "last", None)
    if last is None:
        return ()
    z, (f, g) = last
    return f, g, z


def _finish(ys, logqp, extra, state=()):
    if logqp:
        ys, lr = ys[..., :-1], ys[..., -1]
        log_ratio = lr[1:] - lr[:-1]
        return (ys, log_ratio, state) if extra else (ys, log_ratio)
    return (ys, state) if extra else ys


def _initial_state(solver, terms, ts, y0):
    """The extra state at ``ts[0]`` when no step is taken (a single output time)."""
    if not hasattr(solver, "last"):
        return ()
    solver.init(terms, float(ts[0]), float(ts[0]), y0, None)
    return _extra_out(solver)


def _run(sde, y0, ts, bm, method, dt, adaptive, rtol, atol, dt_min, options, names, logqp, extra, extra_state,
         adjoint, params=None):
    from ._reversible_adjoint import ReversibleAdjoint

    terms, solver, controller, y0a, ts, sde, _ = _build(sde, y0, ts, bm, method, dt, adaptive, rtol, atol, dt_min,
                                                        options, names, logqp, extra_state, want_state=extra)
    if ts.numel() == 1:
        return _finish(y0a.unsqueeze(0), logqp, extra, _initial_state(solver, terms, ts, y0a) if extra else ())
    if isinstance(adjoint, ReversibleAdjoint) and getattr(solver, "given", None) is not None:
        # gradients reach a given initial state through the adjoint's parameters
        given = [x for x in (solver.given[0], *solver.given[1]) if isinstance(x, torch.Tensor) and x.requires_grad]
        adjoint = ReversibleAdjoint(params=list(params or []) + given)
    sol = solve(terms, solver, float(ts[0]), float(ts[-1]), y0a, dt0=dt, saveat=SaveAt(ts=ts), controller=controller,
                adjoint=adjoint, max_steps=None)
    state = _extra_out(solver) if extra else ()
    if extra and adjoint is not None:
        state = tuple(x.detach() for x in state)
    return _finish(sol.ys, logqp, extra, state)


def sdeint(sde, y0, ts, bm=None, method=None, dt=1e-3, adaptive=False, rtol=1e-5, atol=1e-4, dt_min=1e-5,
           options=None, names=None, logqp=False, extra=False, extra_solver_state=None, **unused_kwargs):
    """Solve an SDE given as a torchsde-style object; the call conventions of ``torchsde.sdeint``.

    ``dy = f(t, y) dt + g(t, y) dW`` (Itô or Stratonovich, as ``sde.sde_type`` says), saved at ``ts``.

    Parameters
    ----------
    sde:
        Object with ``noise_type`` in ``{"diagonal", "additive", "scalar", "general"}``, ``sde_type`` in
        ``{"ito", "stratonovich"}``, a drift (``f(t, y)``, or ``f_and_g``, or ``f_and_g_prod``) and a
        diffusion (``g(t, y)``, ``f_and_g``, ``g_prod(t, y, v)`` or ``f_and_g_prod(t, y, v)``);
        ``h(t, y)`` (prior drift) when ``logqp=True``. Methods that use the diffusion matrix
        (``milstein``, ``srk``, ``reversible_heun``, ``log_ode`` for general noise) and ``logqp``
        need ``g`` or ``f_and_g``. Shapes are checked at the first evaluation: ``f`` returns
        ``y.shape``; ``g`` returns ``y.shape`` (diagonal), ``y.shape + (1,)`` (scalar) or
        ``y.shape + (m,)`` (general, additive).
    y0:
        Initial state ``(batch, d)`` (any leading shape works).
    ts:
        Increasing output times (1-D tensor or list).
    bm:
        A Brownian motion of shape ``y0.shape[:-1] + (m,)``: an :class:`nde.BrownianInterval`, or a
        torchsde ``BrownianInterval`` / ``BrownianPath`` / ``BrownianTree``. None creates an nde
        ``BrownianInterval`` whose cells match ``dt`` (so the default is the fast path), resolving
        steps down to ``dt_min`` when ``adaptive``; with the Lévy area the method needs.
    method:
        One of ``euler, milstein, srk, midpoint, heun, euler_heun, reversible_heun, log_ode``; None picks
        ``srk`` (Itô, non-general noise), ``euler`` (Itô, general noise) or ``midpoint`` (Stratonovich).
        ``srk`` needs a Brownian motion with space-time Lévy area; ``log_ode`` (the log-ODE midpoint
        method, :class:`nde.solvers.LogODEMidpoint`) one with ``davie`` or ``foster`` Lévy area.
    dt, adaptive, rtol, atol, dt_min:
        Step size (initial step size when adaptive); adaptive steps by step doubling (or the solver's
        embedded estimate) with a PI controller, never shorter than ``dt_min``.
    options:
        ``{"grad_free": True}`` selects derivative-free Milstein.
    names:
        Rename the methods looked up on ``sde``, e.g. ``{"drift": "mu", "diffusion": "sigma"}``
        (keys ``drift``, ``diffusion``, ``prior_drift``, ``drift_and_diffusion``, ``drift_and_diffusion_prod``).
    logqp:
        Also return the increments between consecutive ``ts`` of the KL path term
        ``int 1/2 |g^{-1}(f - h)|^2 dt`` (Li et al. 2020).
    extra:
        Also return the solver's extra state at ``ts[-1]``: ``(f, g, z)`` (drift, diffusion and the
        second state, at ``z``) for ``reversible_heun``, ``()`` for the other methods.
    extra_solver_state:
        Start ``reversible_heun`` from such a state (to continue a solve); ignored (with a warning
        when not empty) by the other methods.
    **unused_kwargs:
        Unknown keyword arguments are ignored with a warning, as torchsde does.

    Returns
    -------
    ys ``(len(ts), *y0.shape)``, plus ``log_ratio`` ``(len(ts) - 1, *batch)`` when ``logqp``, plus the
    extra solver state when ``extra``.

    Li, Wong, Chen & Duvenaud (2020), "Scalable gradients for stochastic differential equations", AISTATS.
    """
    _warn_unused(unused_kwargs, "sdeint")
    return _run(sde, y0, ts, bm, method, dt, adaptive, rtol, atol, dt_min, options, names, logqp, extra,
                extra_solver_state, None)


# ---- the stochastic adjoint ------------------------------------------------------------------
class _StochasticAdjoint(torch.autograd.Function):
    """Forward solve without a graph; the backward pass solves the Stratonovich adjoint SDE from each
    output time to the previous one on the same Brownian path (resetting ``y`` to the saved value)."""

    @staticmethod
    def forward(ctx, run, y0, *params):
        with torch.no_grad():
            ys = run["forward"](y0)
        ctx.run = run
        ctx.save_for_backward(ys)
        return ys

    @staticmethod
    def backward(ctx, ct):
        from ._sde_adjoint import stratonovich_adjoint_terms

        (ys,) = ctx.saved_tensors
        run = ctx.run
        params, terms, ts = run["params"], run["terms"], run["ts"]
        drift, diffusion = terms.terms
        if run["ito"]:
            drift = _ItoToStratonovich(drift, diffusion)
        shape = tuple(ys.shape[1:])
        n = ys[0].numel()
        aug = stratonovich_adjoint_terms(drift, diffusion, params, None, shape)
        a = ct[-1]
        a_th = [torch.zeros(p.numel(), dtype=ys.dtype, device=ys.device) for p in params]
        for i in range(ts.numel() - 1, 0, -1):
            z = torch.cat([ys[i].reshape(-1), a.reshape(-1)] + a_th)
            with torch.no_grad():
                z = run["backward"](aug, float(ts[i]), float(ts[i - 1]), z)
            a = z[n:2 * n].reshape(shape) + ct[i - 1]
            off = 2 * n
            a_th = []
            for p in params:
                a_th.append(z[off:off + p.numel()])
                off += p.numel()
        grads = [g.reshape(p.shape).to(p.dtype) for g, p in zip(a_th, params)]
        return (None, a) + tuple(grads)


class _ItoToStratonovich(ODETerm):
    """The Stratonovich drift ``f - 1/2 sum_j (dg_j/dy) g_j`` of an Itô SDE (``g_j`` the columns of ``g``).

    Diagonal noise (``g_i`` a function of ``y_i``): the correction is ``g_i dg_i/dy_i``, one
    vector-Jacobian product ``(dg/dy)^T g`` (the Jacobian is diagonal). Scalar and general noise: one
    Jacobian-vector product ``(dg_j/dy) g_j`` per column (:func:`nde.solvers.sde.jvp_columns`, double
    backward), differentiable for the adjoint. Additive noise needs none.
    """

    def __init__(self, drift, diffusion):
        self.drift, self.diffusion = drift, diffusion
        super().__init__(self._corrected)

    def _corrected(self, t, y, args):
        from nde.solvers.sde import jvp_columns

        f = self.drift.vf(t, y, args)
        noise = self.diffusion.noise
        if noise == "additive":
            return f
        if noise == "diagonal":
            with torch.enable_grad():
                y_ = y if y.requires_grad else y.detach().requires_grad_(True)
                g = self.diffusion.vf(t, y_, args)
                if not g.requires_grad:
                    return f
                (corr,) = torch.autograd.grad(g, y_, g, create_graph=True, allow_unused=True)
            return f if corr is None else f - 0.5 * corr
        g = self.diffusion.vf(t, y, args)
        return f - 0.5 * jvp_columns(lambda z: self.diffusion.vf(t, z, args), y, g)


def _adjoint_solver(adjoint_method, sde, adjoint_adaptive, adjoint_options):
    """The Stratonovich solver of the backward adjoint solve that ``adjoint_method`` names."""
    from nde import solvers as S

    kind = sde.sde_type
    if adjoint_method is None:
        name = "midpoint"
    elif kind == "ito":
        if adjoint_method not in _ITO_ADJOINT:
            raise ValueError(f"adjoint_method {adjoint_method!r} is not an Itô method (the SDE is Itô); use one of "
                             f"{tuple(_ITO_ADJOINT)} or None.")
        name = _ITO_ADJOINT[adjoint_method]
    else:
        if adjoint_method in _ITO_METHODS and adjoint_method != "milstein":
            raise ValueError(f"adjoint_method {adjoint_method!r} is for Itô SDEs; sde.sde_type is 'stratonovich'.")
        if adjoint_method == "log_ode":
            raise ValueError("Log-ODE schemes cannot be used for adjoint SDEs, because they require direct access to "
                             "the diffusion, whilst adjoint SDEs rely on a diffusion-vector product. Use a different "
                             "method instead.")
        if adjoint_method not in _ADJOINT_SOLVERS:
            raise ValueError(f"adjoint_method {adjoint_method!r} cannot solve the adjoint SDE (it is available only "
                             f"as a diffusion-vector product); use one of {_ADJOINT_SOLVERS}.")
        name = adjoint_method
    if adjoint_options:
        warnings.warn(f"adjoint_options {list(adjoint_options)} are not used by the adjoint method {name!r}.",
                      stacklevel=4)
    solver = {"midpoint": S.Midpoint, "heun": S.Heun, "euler_heun": S.EulerHeun}[name]()
    if adjoint_adaptive and solver.error_order is None:
        solver = S.StepDoubling(solver)
    return solver


def _stochastic_adjoint(sde, y0, ts, bm, method, dt, adaptive, rtol, atol, dt_min, options, names, logqp, extra,
                        params, adjoint_method, adjoint_adaptive, adjoint_rtol, adjoint_atol, adjoint_options,
                        extra_state):
    terms, solver, controller, y0a, ts, sde, _ = _build(sde, y0, ts, bm, method, dt, adaptive, rtol, atol, dt_min,
                                                        options, names, logqp, extra_state)
    back_solver = _adjoint_solver(adjoint_method, sde, adjoint_adaptive, adjoint_options)
    if ts.numel() == 1:
        return _finish(y0a.unsqueeze(0), logqp, extra)

    def forward(y):
        sol = solve(terms, solver, float(ts[0]), float(ts[-1]), y, dt0=dt, saveat=SaveAt(ts=ts),
                    controller=controller, max_steps=None)
        return sol.ys

    def backward(aug, t_from, t_to, z):
        if adjoint_adaptive:
            c = PIDController(rtol=adjoint_rtol, atol=adjoint_atol, dtmin=dt_min, force_dtmin=True)
        else:
            c = ConstantStepSize()
        return solve(aug, back_solver, t_from, t_to, z, dt0=-min(dt, t_from - t_to), controller=c,
                     max_steps=None).ys[-1]

    run = {"forward": forward, "backward": backward, "params": params, "terms": terms, "ts": ts,
           "ito": sde.sde_type == "ito"}
    ys = _StochasticAdjoint.apply(run, y0a, *params)
    return _finish(ys, logqp, extra, ())


def sdeint_adjoint(sde, y0, ts, bm=None, method=None, adjoint_method=None, dt=1e-3, adaptive=False,
                   adjoint_adaptive=False, rtol=1e-5, adjoint_rtol=1e-5, atol=1e-4, adjoint_atol=1e-4, dt_min=1e-5,
                   options=None, adjoint_options=None, adjoint_params=None, names=None, logqp=False, extra=False,
                   extra_solver_state=None, **unused_kwargs):
    """``torchsde.sdeint_adjoint``: :func:`sdeint` with memory-efficient gradients.

    ``method="reversible_heun"`` (with ``adjoint_method`` None or ``"adjoint_reversible_heun"``) uses
    :class:`nde.ReversibleAdjoint`: exact gradients of the discretised solve with O(1) memory in the
    number of steps (``adjoint_adaptive`` and the adjoint tolerances have nothing to do there: the
    backward pass replays the forward steps). Other methods use the stochastic adjoint (Li et al.
    2020): the adjoint SDE is solved backwards on the same Brownian path (O(1) memory; gradients
    converge to the discrete ones as ``dt -> 0``), in Stratonovich form (Itô SDEs are converted with
    the drift correction ``-1/2 sum_j (dg_j/dy) g_j``).

    ``adjoint_method`` chooses the backward solver: for Stratonovich SDEs ``midpoint`` (the default),
    ``heun`` or ``euler_heun`` (the adjoint diffusion exists only as a product, so ``milstein``,
    ``reversible_heun`` and ``log_ode`` are refused); for Itô SDEs torchsde's Itô names select the
    Stratonovich solver of the converted adjoint: ``euler`` -> ``euler_heun``, ``milstein`` and ``srk`` ->
    ``midpoint`` (default ``midpoint``). ``adjoint_adaptive`` steps the backward solve adaptively with
    ``PIDController(adjoint_rtol, adjoint_atol)`` (never below ``dt_min``); otherwise it takes steps
    of ``dt``. Itô SDEs with general noise and no ``adjoint_method`` use
    :class:`nde.CheckpointAdjoint` instead (exact gradients of the discretisation, checkpointed memory).

    ``adjoint_params`` are the tensors to differentiate; by default the parameters of ``sde`` (when it
    is an ``nn.Module``) and any tensors its functions capture. With ``extra=True`` the returned extra
    solver state is a constant (it is not differentiated). Unknown keyword arguments are ignored with
    a warning, as torchsde does.

    Kidger, Foster, Li & Lyons (2021), "Efficient and accurate gradients for neural SDEs", NeurIPS;
    Li, Wong, Chen & Duvenaud (2020), "Scalable gradients for stochastic differential equations", AISTATS.
    """
    from ._checkpoint import CheckpointAdjoint
    from ._reversible_adjoint import ReversibleAdjoint

    _warn_unused(unused_kwargs, "sdeint_adjoint")
    if adjoint_method not in (None,) + METHODS:
        raise ValueError(f"Expected adjoint_method in {METHODS}, but found {adjoint_method!r}.")
    if adjoint_options is not None and not isinstance(adjoint_options, dict):
        raise TypeError(f"adjoint_options must be a dict or None; got {type(adjoint_options).__name__}.")
    for name, v in (("adjoint_rtol", adjoint_rtol), ("adjoint_atol", adjoint_atol)):
        if torch.is_tensor(v) and v.requires_grad:
            raise ValueError(f"Argument {name} must not require gradient.")
    if adjoint_params is None and isinstance(sde, torch.nn.Module):
        adjoint_params = tuple(sde.parameters())
    params = None if adjoint_params is None else [p for p in adjoint_params if p.requires_grad]
    view = _Renamed(sde, {k: v for k, v in names.items() if k in _NAME_KEYS}) if names else sde
    _check_sde(view)
    kind, noise = view.sde_type, view.noise_type
    if method is None:
        method = _default_method(view)
    if adjoint_method == "adjoint_reversible_heun" and method != "reversible_heun":
        raise ValueError("adjoint_method='adjoint_reversible_heun' needs method='reversible_heun'.")
    if method == "reversible_heun":
        if adjoint_method in (None, "adjoint_reversible_heun"):
            if adjoint_adaptive:
                warnings.warn("adjoint_adaptive has no effect with method='reversible_heun': the reversible adjoint "
                              "replays the forward steps exactly.", stacklevel=2)
            return _run(sde, y0, ts, bm, method, dt, adaptive, rtol, atol, dt_min, options, names, logqp, extra,
                        extra_solver_state, ReversibleAdjoint(params=params), params)
        warnings.warn(f"method='reversible_heun', but adjoint_method!='adjoint_reversible_heun': the gradients come "
                      f"from the stochastic adjoint solved with {adjoint_method!r}.", stacklevel=2)
    if kind == "ito" and noise == "general" and adjoint_method is None:
        return _run(sde, y0, ts, bm, method, dt, adaptive, rtol, atol, dt_min, options, names, logqp, extra,
                    extra_solver_state, CheckpointAdjoint(params=params), params)
    return _stochastic_adjoint(sde, y0, ts, bm, method, dt, adaptive, rtol, atol, dt_min, options, names, logqp,
                               extra, params or [], adjoint_method, adjoint_adaptive, adjoint_rtol, adjoint_atol,
                               adjoint_options, extra_solver_state)
