"""Neural SDE models: a neural SDE layer, the latent SDE (variational, with the KL path term) and the SDE-GAN."""

from __future__ import annotations

import math

import torch
from torch import nn

import nde
from nde import BrownianInterval, ControlTerm, MultiTerm, ODETerm, SaveAt
from nde import solvers as _solvers


class LipSwish(nn.Module):
    """``0.909 * x * sigmoid(x)``: a 1-Lipschitz smooth activation (Chen et al. 2019, "Residual flows")."""

    def forward(self, x):
        return 0.909 * nn.functional.silu(x)


def mlp(in_size: int, out_size: int, width: int = 64, depth: int = 2, activation=nn.SiLU, final=None) -> nn.Sequential:
    """``depth`` hidden layers of ``width`` units with ``activation``; optional ``final`` module."""
    if depth < 0 or width < 1:
        raise ValueError(f"need depth >= 0 and width >= 1; got depth={depth}, width={width}.")
    layers, size = [], in_size
    for _ in range(depth):
        layers += [nn.Linear(size, width), activation()]
        size = width
    layers.append(nn.Linear(size, out_size))
    if final is not None:
        layers.append(final)
    return nn.Sequential(*layers)


def _with_time(t, y):
    tt = torch.as_tensor(t, dtype=y.dtype, device=y.device)
    return torch.cat([tt.expand(y.shape[:-1] + (1,)), y], -1)


def _times(ts, ref):
    if not isinstance(ts, torch.Tensor):
        ts = torch.as_tensor(ts, dtype=torch.float64)
    if ts.dim() != 1 or ts.numel() < 2:
        raise ValueError(f"ts must be a 1-D tensor of at least two increasing times; got shape {tuple(ts.shape)}.")
    if not bool((ts[1:] > ts[:-1]).all()):
        raise ValueError("ts must be strictly increasing.")
    return ts.detach().to(torch.float64)


def _solver_for(sde_type):
    return _solvers.EulerMaruyama() if sde_type == "ito" else _solvers.ReversibleHeun()


def _brownian(ts, shape, dt, bm, seed, like, levy="none"):
    if bm is not None:
        return bm
    return BrownianInterval(float(ts[0]), float(ts[-1]), shape, seed=seed, dtype=like.dtype, device=like.device,
                            dt=dt, levy_area=levy)


class NeuralSDE(nn.Module):
    """A neural SDE ``dy = f_theta(t, y) dt + g_theta(t, y) dW`` with MLP drift and diffusion.

    Parameters
    ----------
    state_size:
        Dimension of ``y``.
    brownian_size:
        Number of Brownian channels for ``noise="general"`` (default ``state_size``).
    width, depth:
        Size of the drift and diffusion MLPs (inputs ``(t, y)``).
    noise:
        ``"diagonal"`` (``g`` returns ``(batch, d)``, sigmoid output) or ``"general"`` (``(batch, d, m)``, tanh).
    sde_type:
        ``"ito"`` (default solver Euler--Maruyama) or ``"stratonovich"`` (default solver reversible Heun).
    solver, adjoint:
        Override the solver (an ``nde.solvers`` instance) and the adjoint (e.g. ``nde.ReversibleAdjoint()``).
    dt:
        Step size.

    Kidger, Foster, Li, Oberhauser & Lyons (2021), "Neural SDEs as infinite-dimensional GANs", ICML.
    """

    def __init__(self, state_size: int, brownian_size: int | None = None, width: int = 64, depth: int = 2,
                 noise: str = "diagonal", sde_type: str = "ito", solver=None, adjoint=None, dt: float = 0.05):
        super().__init__()
        if noise not in ("diagonal", "general"):
            raise ValueError(f"noise must be 'diagonal' or 'general'; got {noise!r}.")
        if sde_type not in ("ito", "stratonovich"):
            raise ValueError(f"sde_type must be 'ito' or 'stratonovich'; got {sde_type!r}.")
        self.state_size = state_size
        self.brownian_size = state_size if (brownian_size is None or noise == "diagonal") else brownian_size
        self.noise, self.sde_type, self.dt = noise, sde_type, dt
        self.drift = mlp(state_size + 1, state_size, width, depth)
        if noise == "diagonal":
            self.diffusion = mlp(state_size + 1, state_size, width, depth, final=nn.Sigmoid())
        else:
            self.diffusion = mlp(state_size + 1, state_size * self.brownian_size, width, depth, final=nn.Tanh())
        self.solver = solver if solver is not None else _solver_for(sde_type)
        self.adjoint = adjoint

    def f(self, t, y):
        """The drift."""
        return self.drift(_with_time(t, y))

    def g(self, t, y):
        """The diffusion: ``(batch, d)`` (diagonal) or ``(batch, d, m)`` (general)."""
        out = self.diffusion(_with_time(t, y))
        if self.noise == "general":
            out = out.reshape(y.shape[:-1] + (self.state_size, self.brownian_size))
        return out

    def terms(self, bm):
        """The SDE as nde terms driven by ``bm``."""
        return MultiTerm(ODETerm(self.f), ControlTerm(self.g, bm, noise=self.noise))

    def forward(self, y0: torch.Tensor, ts, bm=None, seed: int | None = None) -> torch.Tensor:
        """Sample paths at ``ts``: returns ``(len(ts), *y0.shape)``.

        ``bm`` (an :class:`nde.BrownianInterval` of shape ``(*batch, brownian_size)``) fixes the noise;
        otherwise a new one is drawn (from ``seed`` when given).
        """
        ts = _times(ts, y0)
        bm = _brownian(ts, tuple(y0.shape[:-1]) + (self.brownian_size,), self.dt, bm, seed, y0)
        sol = nde.solve(self.terms(bm), self.solver, float(ts[0]), float(ts[-1]), y0, dt0=self.dt,
                        saveat=SaveAt(ts=ts), adjoint=self.adjoint)
        return sol.ys


# ---- latent SDE -------------------------------------------------------------------------------
class _Augmented:
    """Drift and diffusion of ``[z, l]`` with ``dl = |u|^2 / 2 dt``, ``u = (f - h) / g`` (the KL path term)."""

    def __init__(self, model, ctx):
        self.m, self.ctx = model, ctx

    def drift(self, t, zl, args):
        z = zl[..., :-1]
        f = self.m.posterior_drift(t, z, self.ctx)
        h = self.m.prior_drift(t, z)
        g = self.m.diffusion(t, z)
        u = (f - h) / g
        return torch.cat([f, 0.5 * (u * u).sum(-1, keepdim=True)], -1)

    def diffusion(self, t, zl, args):
        g = self.m.diffusion(t, zl[..., :-1])
        return torch.cat([g, torch.zeros_like(g[..., :1])], -1)


class LatentSDE(nn.Module):
    """A latent SDE trained by variational inference (Li et al. 2020).

    Prior ``dz = h(t, z) dt + g(t, z) dW``, posterior ``dz = f(t, z, c) dt + g(t, z) dW`` with a
    context ``c`` encoded (GRU, backwards in time) from the observations; shared diagonal diffusion.
    ``x_t ~ N(decoder(z_t), obs_noise^2)``. The evidence lower bound is
    ``E_q[log p(x | z)] - KL(q(z0) || p(z0)) - E_q[int 1/2 |(f - h)/g|^2 dt]``.

    Parameters
    ----------
    data_size, latent_size, context_size, hidden_size:
        Sizes of observations, latent state, encoder context and hidden layers.
    obs_noise:
        Standard deviation of the Gaussian observation model.
    dt:
        Solver step (Euler--Maruyama).

    Li, Wong, Chen & Duvenaud (2020), "Scalable gradients for stochastic differential equations", AISTATS.
    """

    def __init__(self, data_size: int, latent_size: int = 4, context_size: int = 16, hidden_size: int = 32,
                 obs_noise: float = 0.1, dt: float = 0.05):
        super().__init__()
        self.data_size, self.latent_size, self.dt, self.obs_noise = data_size, latent_size, dt, obs_noise
        self.encoder = nn.GRU(data_size + 1, hidden_size)
        self.to_context = nn.Linear(hidden_size, context_size)
        self.qz0 = nn.Linear(context_size, 2 * latent_size)
        self.f_net = mlp(latent_size + context_size + 1, latent_size, hidden_size, 2)
        self.h_net = mlp(latent_size + 1, latent_size, hidden_size, 2)
        self.g_net = mlp(latent_size + 1, latent_size, hidden_size, 1, final=nn.Sigmoid())
        self.decoder = nn.Linear(latent_size, data_size)
        self.pz0_mean = nn.Parameter(torch.zeros(latent_size))
        self.pz0_logstd = nn.Parameter(torch.zeros(latent_size))

    # vector fields
    def posterior_drift(self, t, z, ctx):
        return self.f_net(torch.cat([_with_time(t, z), ctx], -1))

    def prior_drift(self, t, z):
        return self.h_net(_with_time(t, z))

    def diffusion(self, t, z):
        return self.g_net(_with_time(t, z)) + 1e-3

    def encode(self, xs, ts):
        """Context and ``q(z0)`` parameters from observations ``xs`` ``(len(ts), batch, data_size)``."""
        tt = ts.to(xs.dtype).reshape(-1, 1, 1).expand(xs.shape[:-1] + (1,))
        inp = torch.cat([tt, xs], -1).flip(0)
        out, _ = self.encoder(inp)
        ctx = self.to_context(out[-1])
        mean, logstd = self.qz0(ctx).chunk(2, -1)
        return ctx, mean, logstd

    def forward(self, xs: torch.Tensor, ts, bm=None, seed: int | None = None) -> dict:
        """Evidence lower bound of observations ``xs`` ``(len(ts), batch, data_size)`` at times ``ts``.

        Returns a dict with ``elbo`` (mean over the batch), ``log_px``, ``kl_z0``, ``kl_path`` and the
        posterior reconstruction ``xs_hat``.
        """
        if xs.dim() != 3 or xs.shape[-1] != self.data_size:
            raise ValueError(f"xs must have shape (len(ts), batch, {self.data_size}); got {tuple(xs.shape)}.")
        ts = _times(ts, xs)
        if ts.numel() != xs.shape[0]:
            raise ValueError(f"ts has {ts.numel()} times but xs has {xs.shape[0]} observations.")
        ctx, mean, logstd = self.encode(xs, ts)
        z0 = mean + logstd.exp() * torch.randn_like(mean)
        batch = xs.shape[1]
        zl0 = torch.cat([z0, z0.new_zeros(batch, 1)], -1)
        aug = _Augmented(self, ctx)
        bm = _brownian(ts, (batch, self.latent_size + 1), self.dt, bm, seed, xs)
        terms = MultiTerm(ODETerm(aug.drift), ControlTerm(aug.diffusion, bm, noise="diagonal"))
        sol = nde.solve(terms, _solvers.EulerMaruyama(), float(ts[0]), float(ts[-1]), zl0, dt0=self.dt,
                        saveat=SaveAt(ts=ts))
        zs, ls = sol.ys[..., :-1], sol.ys[..., -1]
        xs_hat = self.decoder(zs)
        log_px = torch.distributions.Normal(xs_hat, self.obs_noise).log_prob(xs).sum((0, 2))
        q = torch.distributions.Normal(mean, logstd.exp())
        p = torch.distributions.Normal(self.pz0_mean, self.pz0_logstd.exp())
        kl_z0 = torch.distributions.kl_divergence(q, p).sum(-1)
        kl_path = ls[-1]
        elbo = log_px - kl_z0 - kl_path
        return {"elbo": elbo.mean(), "log_px": log_px.mean(), "kl_z0": kl_z0.mean(), "kl_path": kl_path.mean(),
                "xs_hat": xs_hat}

    @torch.no_grad()
    def sample(self, ts, batch_size: int, bm=None, seed: int | None = None) -> torch.Tensor:
        """Observations ``(len(ts), batch_size, data_size)`` (noise-free means) sampled from the prior."""
        ref = self.pz0_mean
        ts = _times(ts, ref)
        z0 = self.pz0_mean + self.pz0_logstd.exp() * torch.randn(batch_size, self.latent_size, dtype=ref.dtype,
                                                                   device=ref.device)
        bm = _brownian(ts, (batch_size, self.latent_size), self.dt, bm, seed, ref)
        terms = MultiTerm(ODETerm(lambda t, z: self.prior_drift(t, z)),
                          ControlTerm(lambda t, z: self.diffusion(t, z), bm, noise="diagonal"))
        sol = nde.solve(terms, _solvers.EulerMaruyama(), float(ts[0]), float(ts[-1]), z0, dt0=self.dt,
                        saveat=SaveAt(ts=ts))
        return self.decoder(sol.ys)


# ---- SDE-GAN ----------------------------------------------------------------------------------
class SDEGenerator(nn.Module):
    """The generator of an SDE-GAN: ``z0 = zeta(V)``, ``dz = mu(t, z) dt + sigma(t, z) o dW``, ``y = l(z)``.

    Stratonovich, general noise, solved by reversible Heun (with ``nde.ReversibleAdjoint`` gradients
    when ``adjoint`` is given). Returns paths ``(len(ts), batch, data_size)``.
    """

    def __init__(self, data_size: int, initial_noise_size: int = 5, noise_size: int = 3, hidden_size: int = 16,
                 width: int = 32, depth: int = 1, dt: float = 0.05, adjoint=None):
        super().__init__()
        self.initial_noise_size, self.noise_size, self.hidden_size = initial_noise_size, noise_size, hidden_size
        self.dt, self.adjoint = dt, adjoint
        self.initial = mlp(initial_noise_size, hidden_size, width, depth, activation=LipSwish)
        self.mu = mlp(hidden_size + 1, hidden_size, width, depth, activation=LipSwish, final=nn.Tanh())
        self.sigma = mlp(hidden_size + 1, hidden_size * noise_size, width, depth, activation=LipSwish, final=nn.Tanh())
        self.readout = nn.Linear(hidden_size, data_size)

    def f(self, t, z):
        return self.mu(_with_time(t, z))

    def g(self, t, z):
        return self.sigma(_with_time(t, z)).reshape(z.shape[:-1] + (self.hidden_size, self.noise_size))

    def forward(self, ts, batch_size: int, bm=None, seed: int | None = None) -> torch.Tensor:
        ref = self.readout.weight
        ts = _times(ts, ref)
        v = torch.randn(batch_size, self.initial_noise_size, dtype=ref.dtype, device=ref.device)
        z0 = self.initial(v)
        bm = _brownian(ts, (batch_size, self.noise_size), self.dt, bm, seed, ref)
        terms = MultiTerm(ODETerm(self.f), ControlTerm(self.g, bm))
        sol = nde.solve(terms, _solvers.ReversibleHeun(), float(ts[0]), float(ts[-1]), z0, dt0=self.dt,
                        saveat=SaveAt(ts=ts), adjoint=self.adjoint)
        return self.readout(sol.ys)


class CDEDiscriminator(nn.Module):
    """The discriminator of an SDE-GAN: a neural CDE driven by the (time-augmented) path, linearly interpolated.

    ``h0 = xi(t0, y0)``, ``dh = f(t, h) dt + g(t, h) dY``, score ``m . h(T)``, with ``Y`` the linear
    interpolation (:class:`nde.LinearInterpolation`) of ``(t, y_t)`` through the observations; LipSwish
    MLPs, and :meth:`clip_weights` keeps every linear layer's weights in ``[-1/fan_out, 1/fan_out]``
    (Lipschitz control for the Wasserstein loss).

    Since ``dt`` is the first channel of ``dY``, the equation is the CDE ``dh = G(t, h) dY`` with
    ``G = g`` plus ``f`` in its first column: one :class:`nde.ControlTerm` over the interpolation,
    solved by :func:`nde.solve` with Heun steps from knot to knot. A CDE does not depend on how its
    control is parametrised, so the path is indexed by the observation number (knots at the integers,
    steps of exactly 1) and ``G`` receives the physical time ``t``.

    Kidger, Foster, Li, Oberhauser & Lyons (2021), "Neural SDEs as infinite-dimensional GANs", ICML.
    """

    def __init__(self, data_size: int, hidden_size: int = 16, width: int = 32, depth: int = 1):
        super().__init__()
        self.data_size, self.hidden_size = data_size, hidden_size
        self.initial = mlp(data_size + 1, hidden_size, width, depth, activation=LipSwish)
        self.f_net = mlp(hidden_size + 1, hidden_size, width, depth, activation=LipSwish, final=nn.Tanh())
        self.g_net = mlp(hidden_size + 1, hidden_size * (data_size + 1), width, depth, activation=LipSwish,
                         final=nn.Tanh())
        self.readout = nn.Linear(hidden_size, 1)

    def f(self, t, h):
        """The drift ``f(t, h)``."""
        return self.f_net(_with_time(t, h))

    def g(self, t, h):
        """The matrix ``g(t, h)`` acting on ``dY = (dt, dy)``: ``(..., hidden, 1 + data)``."""
        return self.g_net(_with_time(t, h)).reshape(h.shape[:-1] + (self.hidden_size, self.data_size + 1))

    def forward(self, ys: torch.Tensor, ts) -> torch.Tensor:
        """Scores ``(batch,)`` of paths ``ys`` ``(len(ts), batch, data_size)``."""
        if ys.dim() != 3 or ys.shape[-1] != self.data_size:
            raise ValueError(f"ys must have shape (len(ts), batch, {self.data_size}); got {tuple(ys.shape)}.")
        ts = _times(ts, ys)
        if ts.numel() != ys.shape[0]:
            raise ValueError(f"ts has {ts.numel()} times but ys has {ys.shape[0]} observations.")
        times = ts.to(ys.dtype)
        x = torch.cat([times.reshape(-1, 1, 1).expand(ys.shape[:-1] + (1,)), ys], -1).transpose(0, 1)
        path = nde.LinearInterpolation(nde.linear_interpolation_coeffs(x))  # knots at 0, 1, ..., len(ts) - 1
        last = ts.numel() - 2
        steps = times[1:] - times[:-1]

        def field(s, h):
            # the physical time at the path parameter s (piecewise linear through the knots)
            i = min(max(int(math.floor(float(s))), 0), last)
            t = times[i] + (s - i) * steps[i]
            th = _with_time(t, h)
            G = self.g_net(th).reshape(h.shape[:-1] + (self.hidden_size, self.data_size + 1))
            return torch.cat([G[..., :1] + self.f_net(th).unsqueeze(-1), G[..., 1:]], -1)

        sol = nde.solve(ControlTerm(field, path), _solvers.Heun(), 0.0, float(ts.numel() - 1), self.initial(x[:, 0]),
                        dt0=1.0)
        return self.readout(sol.ys[-1]).squeeze(-1)

    @torch.no_grad()
    def clip_weights(self):
        """Clip every linear layer's weights to ``[-1/fan_out, 1/fan_out]`` (``fan_out = out_features``), as
        Kidger et al. (2021) do; with LipSwish this bounds the discriminator's Lipschitz constant."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                lim = 1.0 / module.out_features
                module.weight.clamp_(-lim, lim)


class SDEGAN(nn.Module):
    """A Wasserstein GAN whose generator is a neural SDE and whose discriminator is a neural CDE.

    ``discriminator_loss = D(fake) - D(real)``, ``generator_loss = -D(fake)`` (means over the batch); call
    ``discriminator.clip_weights()`` after each discriminator update.

    Kidger, Foster, Li, Oberhauser & Lyons (2021), "Neural SDEs as infinite-dimensional GANs", ICML.
    """

    def __init__(self, data_size: int, initial_noise_size: int = 5, noise_size: int = 3, hidden_size: int = 16,
                 width: int = 32, depth: int = 1, dt: float = 0.05, adjoint=None):
        super().__init__()
        self.generator = SDEGenerator(data_size, initial_noise_size, noise_size, hidden_size, width, depth, dt, adjoint)
        self.discriminator = CDEDiscriminator(data_size, hidden_size, width, depth)

    def forward(self, ts, batch_size: int, seed: int | None = None) -> torch.Tensor:
        """Generated paths ``(len(ts), batch_size, data_size)``."""
        return self.generator(ts, batch_size, seed=seed)

    def generator_loss(self, ts, batch_size: int) -> torch.Tensor:
        return -self.discriminator(self.generator(ts, batch_size), ts).mean()

    def discriminator_loss(self, real: torch.Tensor, ts) -> torch.Tensor:
        with torch.no_grad():
            fake = self.generator(ts, real.shape[1])
        return self.discriminator(fake, ts).mean() - self.discriminator(real, ts).mean()


def ornstein_uhlenbeck(n: int, ts, theta: float = 2.0, mu: float = 0.5, sigma: float = 0.4, y0_std: float = 0.3,
                       seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Exact samples ``(len(ts), n, 1)`` of ``dy = theta (mu - y) dt + sigma dW``, ``y0 ~ N(0, y0_std^2)``."""
    g = torch.Generator().manual_seed(seed)
    ts = torch.as_tensor(ts, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64) * y0_std
    out = [y]
    for dt in (ts[1:] - ts[:-1]).tolist():
        a = math.exp(-theta * dt)
        std = sigma * math.sqrt((1 - a * a) / (2 * theta))
        y = mu + (y - mu) * a + std * torch.randn(n, generator=g, dtype=torch.float64)
        out.append(y)
    return torch.stack(out).unsqueeze(-1).to(dtype)
