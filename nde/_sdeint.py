"""The torchsde call conventions (``sdeint``, ``sdeint_adjoint``) on top of :func:`nde.solve`.

A script switches by changing its import line: the same SDE objects (``f``, ``g``, ``noise_type``,
``sde_type``, optional ``h``, ``g_prod``, ``f_and_g``, ``f_and_g_prod``), the same method names and
options, torchsde's own Brownian objects as ``bm``, and the same return conventions (``logqp``,
``extra``). The layer is thin: it builds terms, a solver, a controller and a Brownian motion, and
hands over to the loop.
"""

from __future__ import annotations

import warnings

import torch

from ._brownian import BrownianInterval
from ._controllers import ConstantStepSize, PIDController
from ._path import AbstractPath
from ._saveat import SaveAt
from ._solve import solve
from ._terms import ControlTerm, MultiTerm, ODETerm

METHODS = ("euler", "milstein", "srk", "midpoint", "heun", "euler_heun", "reversible_heun",
           "adjoint_reversible_heun", "log_ode")
NOISE_TYPES = ("diagonal", "additive", "scalar", "general")
SDE_TYPES = ("ito", "stratonovich")
_STRAT_ONLY = ("midpoint", "heun", "euler_heun", "reversible_heun", "adjoint_reversible_heun", "log_ode")
_NAME_KEYS = ("drift", "diffusion", "prior_drift", "drift_and_diffusion", "drift_and_diffusion_prod")


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
    space-time Lévy area ``H = U / h - W / 2`` from torchsde's ``U = int (W(r) - W(s)) dr``.
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

    def evaluate(self, t0, t1=None, left=True, use_levy=False):
        if isinstance(t0, torch.Tensor) and t0.numel() > 1:
            raise ValueError("torchsde Brownian objects take one time for the whole batch; use batch_mode='joint' "
                             "or an nde.BrownianInterval.")
        s = float(t0)
        if t1 is None:
            return self.bm(s)
        u = float(t1)
        flip = u < s
        a, b = (u, s) if flip else (s, u)
        if not use_levy:
            w = self.bm(a, b)
            return -w if flip else w
        try:
            w, U = self.bm(a, b, return_U=True)
        except (TypeError, ValueError) as e:
            raise TypeError(
                "This solver needs space-time Lévy areas: create the torchsde Brownian motion with "
                f"levy_area_approximation='space-time' ({e})."
            ) from None
        h = b - a
        H = U / h - 0.5 * w
        return (-w if flip else w), H


class _ZeroChannel(AbstractPath):
    """A path with one more channel, identically zero."""

    def __init__(self, path):
        self.path = path

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


def _vf(fn):
    return lambda t, y, args: fn(t, y)


def _drift_fn(sde):
    if hasattr(sde, "f"):
        return sde.f
    if hasattr(sde, "f_and_g"):
        return lambda t, y: sde.f_and_g(t, y)[0]
    if hasattr(sde, "f_and_g_prod"):
        raise ValueError("sde defines only f_and_g_prod: nde needs f(t, y) (or f_and_g) as well.")
    raise ValueError("sde must define at least one of `f` or `f_and_g`.")


def _diffusion_fn(sde):
    if hasattr(sde, "g"):
        return sde.g
    if hasattr(sde, "f_and_g"):
        return lambda t, y: sde.f_and_g(t, y)[1]
    return None


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


def _solver(method, sde, options):
    from nde import solvers as S

    if method not in METHODS:
        raise ValueError(f"Expected method in {METHODS}, but found {method!r}.")
    noise, kind = sde.noise_type, sde.sde_type
    if method in _STRAT_ONLY and kind != "stratonovich":
        raise ValueError(f"Method {method!r} is for Stratonovich SDEs; sde.sde_type is {kind!r}.")
    if method in ("euler", "srk") and kind != "ito":
        raise ValueError(f"Method {method!r} is for Itô SDEs; sde.sde_type is {kind!r}.")
    if method == "euler":
        return S.EulerMaruyama()
    if method == "milstein":
        if noise == "general":
            raise ValueError("Method 'milstein' needs diagonal, scalar or additive noise.")
        return S.Milstein(kind, derivative_free=bool(options.get("grad_free", False)) and noise != "additive")
    if method == "srk":
        if noise == "general":
            raise ValueError("Method 'srk' needs diagonal, scalar or additive noise.")
        if noise == "additive":
            return S.SRA1()
        return S.SRID2()
    if method == "midpoint" or method == "log_ode":
        return S.Midpoint()
    if method == "heun":
        return S.Heun()
    if method == "euler_heun":
        return S.EulerHeun()
    if method == "reversible_heun":
        return S.ReversibleHeun()
    raise ValueError("Method 'adjoint_reversible_heun' is only an adjoint_method of sdeint_adjoint; "
                     "use method='reversible_heun'.")


class _LogqpDrift:
    """Drift of ``[y, log q/p]``: ``(f, |u|^2 / 2)`` with ``u = g^{-1} (f - h)`` (diagonal: elementwise)."""

    def __init__(self, sde, f, g):
        self.sde, self.f, self.g = sde, f, g

    def __call__(self, t, yz, args):
        y = yz[..., :-1]
        f = self.f(t, y)
        h = self.sde.h(t, y)
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


def _build(sde, y0, ts, bm, method, dt, adaptive, rtol, atol, dt_min, options, names, logqp, levy_needed_by=None):
    if names:
        bad = [k for k in names if k not in _NAME_KEYS]
        if bad:
            raise ValueError(f"names may only map {_NAME_KEYS}; got {bad}.")
        sde = _Renamed(sde, {k: names[k] for k in names})
    _check_sde(sde)
    if not isinstance(y0, torch.Tensor):
        raise ValueError("`y0` must be a torch.Tensor.")
    if not torch.is_tensor(ts):
        if not isinstance(ts, (tuple, list)) or not all(isinstance(t, (float, int)) for t in ts):
            raise ValueError("Evaluation times `ts` must be a 1-D Tensor or list/tuple of floats.")
        ts = torch.tensor(ts, dtype=y0.dtype, device=y0.device)
    if ts.dim() != 1 or ts.numel() < 1:
        raise ValueError("Evaluation times `ts` must be a non-empty 1-D tensor.")
    if ts.numel() > 1 and not bool((ts[1:] > ts[:-1]).all()):
        raise ValueError("Evaluation times `ts` must be strictly increasing.")
    options = {} if options is None else dict(options)
    method = _default_method(sde) if method is None else method
    solver = _solver(method, sde, options)
    f = _drift_fn(sde)
    g = _diffusion_fn(sde)
    t0f, t1f = float(ts[0]), float(ts[-1])
    if g is None and not hasattr(sde, "g_prod"):
        raise ValueError("sde must define at least one of `g`, `f_and_g` or `g_prod`.")
    if logqp:
        if not hasattr(sde, "h"):
            raise ValueError("logqp=True needs the prior drift sde.h(t, y).")
        if g is None:
            raise ValueError("logqp=True needs the diffusion sde.g(t, y).")
    # noise channels
    if bm is not None and getattr(bm, "shape", None) is not None and len(tuple(bm.shape)) >= 1:
        m = tuple(bm.shape)[-1]
    elif sde.noise_type in ("diagonal", "scalar"):
        m = y0.shape[-1] if sde.noise_type == "diagonal" else 1
    elif g is not None:
        with torch.no_grad():
            g0 = g(ts[0], y0)
        m = g0.shape[-1]
    else:
        raise ValueError("Cannot infer the number of Brownian channels: pass `bm`, or define `g` or `f_and_g`.")
    if sde.noise_type == "scalar" and m != 1:
        raise ValueError(f"Scalar noise must have only one channel; the diffusion has {m} noise channels.")
    pad = False
    if logqp and sde.noise_type == "diagonal":
        # the log-ratio channel is a state of its own, with zero diffusion (and a Brownian channel of its own)
        pad = bm is not None and m == y0.shape[-1]
        m = y0.shape[-1] + 1
    wants_levy = method == "srk"
    if bm is None:
        bm = BrownianInterval(t0f, t1f if t1f > t0f else t0f + 1.0, tuple(y0.shape[:-1]) + (m,), dtype=y0.dtype,
                              device=y0.device, levy_area="space-time" if wants_levy else "none",
                              dt=None if adaptive else dt)
    path = bm if isinstance(bm, AbstractPath) else TorchsdeBrownian(bm)
    if pad:
        path = _ZeroChannel(path)
    if adaptive and method == "euler" and sde.noise_type != "additive":
        warnings.warn("Adaptive Euler--Maruyama need not converge to the right solution for non-additive noise; "
                      "prefer a Stratonovich method.", stacklevel=3)
    noise = sde.noise_type
    if logqp:
        drift = ODETerm(_LogqpDrift(sde, f, g))
        diffusion = ControlTerm(_LogqpDiffusion(g, noise), path, noise=noise, sde_type=sde.sde_type)
        y0 = torch.cat([y0, y0.new_zeros(y0.shape[:-1] + (1,))], -1)
    else:
        drift = ODETerm(_vf(f))
        gprod = None
        if hasattr(sde, "g_prod"):
            gp = sde.g_prod
            gprod = lambda t, y, args, v: gp(t, y, v)  # noqa: E731
        vf = _vf(g) if g is not None else _missing_g
        diffusion = ControlTerm(vf, path, noise=noise, vf_prod=gprod, sde_type=sde.sde_type)
    terms = MultiTerm(drift, diffusion)
    if adaptive:
        from nde.solvers import StepDoubling

        if solver.error_order is None:
            solver = StepDoubling(solver)
        controller = PIDController(rtol=rtol, atol=atol, dtmin=dt_min, force_dtmin=True)
    else:
        controller = ConstantStepSize()
    return terms, solver, controller, y0, ts, sde


def _missing_g(t, y, args):
    raise ValueError("This method needs the diffusion g(t, y) itself; the sde defines only g_prod.")


def _finish(ys, y0_shape, logqp, extra, state=None):
    if logqp:
        ys, lr = ys[..., :-1], ys[..., -1]
        log_ratio = lr[1:] - lr[:-1]
        return (ys, log_ratio, state) if extra else (ys, log_ratio)
    return (ys, state) if extra else ys


def _run(sde, y0, ts, bm, method, dt, adaptive, rtol, atol, dt_min, options, names, logqp, extra, adjoint):
    terms, solver, controller, y0a, ts, sde = _build(sde, y0, ts, bm, method, dt, adaptive, rtol, atol, dt_min,
                                                     options, names, logqp)
    if ts.numel() == 1:
        ys = y0a.unsqueeze(0)
        return _finish(ys, y0.shape, logqp, extra)
    sol = solve(terms, solver, float(ts[0]), float(ts[-1]), y0a, dt0=dt, saveat=SaveAt(ts=ts), controller=controller,
                adjoint=adjoint, max_steps=None)
    return _finish(sol.ys, y0.shape, logqp, extra, state=getattr(sol, "solver_state", None))


def sdeint(sde, y0, ts, bm=None, method=None, dt=1e-3, adaptive=False, rtol=1e-5, atol=1e-4, dt_min=1e-5,
           options=None, names=None, logqp=False, extra=False, extra_solver_state=None):
    """Solve an SDE given as a torchsde-style object; the call conventions of ``torchsde.sdeint``.

    ``dy = f(t, y) dt + g(t, y) dW`` (Itô or Stratonovich, as ``sde.sde_type`` says), saved at ``ts``.

    Parameters
    ----------
    sde:
        Object with ``f(t, y)``, ``g(t, y)`` (or ``f_and_g``, ``g_prod``), ``noise_type`` in
        ``{"diagonal", "additive", "scalar", "general"}`` and ``sde_type`` in ``{"ito", "stratonovich"}``;
        ``h(t, y)`` (prior drift) when ``logqp=True``.
    y0:
        Initial state ``(batch, d)`` (any leading shape works).
    ts:
        Increasing output times (1-D tensor or list).
    bm:
        A Brownian motion: an :class:`nde.BrownianInterval`, or a torchsde ``BrownianInterval`` /
        ``BrownianPath`` / ``BrownianTree``. None creates an nde ``BrownianInterval`` whose cells match
        ``dt`` (so the default is the fast path).
    method:
        One of ``euler, milstein, srk, midpoint, heun, euler_heun, reversible_heun, log_ode``; None picks
        ``srk`` (Itô, non-general noise), ``euler`` (Itô, general noise) or ``midpoint`` (Stratonovich).
        ``log_ode`` is solved with the midpoint method.
    dt, adaptive, rtol, atol, dt_min:
        Step size (initial step size when adaptive); adaptive steps by step doubling (or the solver's
        embedded estimate) with a PI controller.
    options:
        ``{"grad_free": True}`` selects derivative-free Milstein.
    names:
        Rename the methods looked up on ``sde``, e.g. ``{"drift": "mu", "diffusion": "sigma"}``.
    logqp:
        Also return the increments between consecutive ``ts`` of the KL path term
        ``int 1/2 |g^{-1}(f - h)|^2 dt`` (Li et al. 2020).
    extra:
        Also return the final solver state (None for these solvers).

    Returns
    -------
    ys ``(len(ts), *y0.shape)``, plus ``log_ratio`` ``(len(ts) - 1, *batch)`` when ``logqp``, plus the
    solver state when ``extra``.

    Li, Wong, Chen & Duvenaud (2020), "Scalable gradients for stochastic differential equations", AISTATS.
    """
    return _run(sde, y0, ts, bm, method, dt, adaptive, rtol, atol, dt_min, options, names, logqp, extra, None)


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
    """The Stratonovich drift ``f - 1/2 g dg/dy`` of an Itô SDE with diagonal or scalar noise.

    For diagonal noise (``g_i`` depending on ``y_i`` only) the Jacobian of ``g`` is diagonal, so the
    vector-Jacobian product ``(dg/dy)^T g`` computed by autograd is the needed ``g_i dg_i/dy_i``.
    """

    def __init__(self, drift, diffusion):
        self.drift, self.diffusion = drift, diffusion
        super().__init__(self._corrected)

    def _corrected(self, t, y, args):
        f = self.drift.vf(t, y, args)
        with torch.enable_grad():
            y_ = y if y.requires_grad else y.detach().requires_grad_(True)
            g = self.diffusion.vf(t, y_, args)
            gv = g[..., 0] if self.diffusion.noise == "scalar" else g
            if not gv.requires_grad:
                return f
            (dg,) = torch.autograd.grad(gv, y_, gv, create_graph=True, allow_unused=True)
        return f if dg is None else f - 0.5 * dg


def _stochastic_adjoint(sde, y0, ts, bm, method, dt, adaptive, rtol, atol, dt_min, options, names, logqp, extra,
                        params):
    from nde import solvers as S

    terms, solver, controller, y0a, ts, sde = _build(sde, y0, ts, bm, method, dt, adaptive, rtol, atol, dt_min,
                                                     options, names, logqp)
    if ts.numel() == 1:
        return _finish(y0a.unsqueeze(0), y0.shape, logqp, extra)
    back_solver = solver if type(solver) in (S.Heun, S.Midpoint, S.EulerHeun) else S.Midpoint()

    def forward(y):
        sol = solve(terms, solver, float(ts[0]), float(ts[-1]), y, dt0=dt, saveat=SaveAt(ts=ts),
                    controller=controller, max_steps=None)
        return sol.ys

    def backward(aug, t_from, t_to, z):
        c = controller if isinstance(controller, ConstantStepSize) else PIDController(
            rtol=rtol, atol=atol, dtmin=dt_min, force_dtmin=True)
        return solve(aug, back_solver, t_from, t_to, z, dt0=-min(dt, t_from - t_to), controller=c,
                     max_steps=None).ys[-1]

    run = {"forward": forward, "backward": backward, "params": params, "terms": terms, "ts": ts,
           "ito": sde.sde_type == "ito" and sde.noise_type != "additive"}
    ys = _StochasticAdjoint.apply(run, y0a, *params)
    return _finish(ys, y0.shape, logqp, extra)


def sdeint_adjoint(sde, y0, ts, bm=None, method="reversible_heun", adjoint_method=None, dt=1e-3, adaptive=False,
                   adjoint_adaptive=False, rtol=1e-5, adjoint_rtol=1e-5, atol=1e-4, adjoint_atol=1e-4, dt_min=1e-5,
                   options=None, adjoint_options=None, adjoint_params=None, names=None, logqp=False, extra=False,
                   extra_solver_state=None, **unused):
    """``torchsde.sdeint_adjoint``: :func:`sdeint` with memory-efficient gradients.

    ``method="reversible_heun"`` (with ``adjoint_method`` None or ``"adjoint_reversible_heun"``) uses
    :class:`nde.ReversibleAdjoint`: exact gradients of the discretised solve with O(1) memory in the
    number of steps. Other methods use the stochastic adjoint (Li et al. 2020): the adjoint SDE is
    solved backwards on the same Brownian path (O(1) memory; gradients converge to the discrete ones as
    ``dt -> 0``); Itô SDEs with diagonal, scalar or additive noise are converted to Stratonovich form
    for it. Itô SDEs with general noise use :class:`nde.CheckpointAdjoint` (exact gradients of the
    discretisation with checkpointed memory). ``adjoint_params`` are the tensors to differentiate;
    by default the parameters of ``sde`` (when it is an ``nn.Module``).

    Kidger, Foster, Li & Lyons (2021), "Efficient and accurate gradients for neural SDEs", NeurIPS;
    Li, Wong, Chen & Duvenaud (2020), "Scalable gradients for stochastic differential equations", AISTATS.
    """
    from ._checkpoint import CheckpointAdjoint
    from ._reversible_adjoint import ReversibleAdjoint

    if adjoint_method not in (None, "adjoint_reversible_heun") + METHODS:
        raise ValueError(f"Expected adjoint_method in {METHODS}, but found {adjoint_method!r}.")
    if adjoint_params is None and isinstance(sde, torch.nn.Module):
        adjoint_params = tuple(sde.parameters())
    params = None if adjoint_params is None else [p for p in adjoint_params if p.requires_grad]
    if method == "reversible_heun" and adjoint_method in (None, "adjoint_reversible_heun"):
        adjoint = ReversibleAdjoint(params=params)
    else:
        view = _Renamed(sde, names) if names else sde
        kind, noise = getattr(view, "sde_type", None), getattr(view, "noise_type", None)
        if kind == "stratonovich" or (kind == "ito" and noise in ("diagonal", "scalar", "additive")):
            return _stochastic_adjoint(sde, y0, ts, bm, method, dt, adaptive, rtol, atol, dt_min, options, names,
                                       logqp, extra, params or [])
        adjoint = CheckpointAdjoint(params=params)
    return _run(sde, y0, ts, bm, method, dt, adaptive, rtol, atol, dt_min, options, names, logqp, extra, adjoint)
