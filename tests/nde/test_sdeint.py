"""The torchsde drop-in: same SDE objects, same Brownian path, same method -> same sample paths."""

import math

import numpy as np
import pytest
import torch
import torchsde

import nde


@pytest.fixture(autouse=True)
def _one_thread():
    # small tensors: one thread avoids oversubscription when the suite runs in parallel
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


DT = torch.float64
B, D = 16, 3


class SDE(torch.nn.Module):
    def __init__(self, noise_type, sde_type, m=2):
        super().__init__()
        self.noise_type, self.sde_type = noise_type, sde_type
        self.lin = torch.nn.Linear(D, D).double()
        self.gen = torch.nn.Linear(D, D * m).double()
        self.m = m

    def f(self, t, y):
        return torch.tanh(self.lin(y)) - 0.3 * y + 0.1 * torch.sin(t)

    def h(self, t, y):
        return -y

    def g(self, t, y):
        if self.noise_type == "diagonal":
            return 0.3 * torch.sigmoid(y) + 0.1
        if self.noise_type == "scalar":
            return (0.3 * torch.cos(y)).unsqueeze(-1)
        if self.noise_type == "additive":
            return (0.2 * torch.ones(D, self.m, dtype=DT)).expand(y.shape[0], D, self.m) + 0.0 * t
        return 0.2 * torch.tanh(self.gen(y)).reshape(-1, D, self.m)


CASES = [
    ("euler", "diagonal", "ito"), ("euler", "general", "ito"), ("euler", "additive", "ito"),
    ("milstein", "diagonal", "ito"), ("milstein", "scalar", "ito"), ("milstein", "diagonal", "stratonovich"),
    ("srk", "diagonal", "ito"), ("srk", "scalar", "ito"), ("srk", "additive", "ito"),
    ("midpoint", "general", "stratonovich"), ("heun", "diagonal", "stratonovich"),
    ("euler_heun", "general", "stratonovich"), ("reversible_heun", "diagonal", "stratonovich"),
]


@pytest.mark.parametrize("method,noise,kind", CASES)
def test_same_paths_as_torchsde(method, noise, kind):
    torch.manual_seed(0)
    sde = SDE(noise, kind)
    m = 1 if noise == "scalar" else (D if noise == "diagonal" else 2)
    y0 = torch.randn(B, D, dtype=DT)
    ts = torch.linspace(0, 1, 5, dtype=DT)
    levy = "space-time" if method == "srk" else "none"
    bm = torchsde.BrownianInterval(0.0, 1.0, (B, m), dtype=DT, levy_area_approximation=levy, entropy=1)
    with torch.no_grad():
        ref = torchsde.sdeint(sde, y0, ts, bm=bm, method=method, dt=2**-5)
        out = nde.sdeint(sde, y0, ts, bm=bm, method=method, dt=2**-5)
    assert out.shape == ref.shape == (5, B, D)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_derivative_free_milstein_option():
    sde = SDE("diagonal", "ito")
    y0 = torch.randn(B, D, dtype=DT)
    ts = torch.linspace(0, 1, 3, dtype=DT)
    bm = torchsde.BrownianInterval(0.0, 1.0, (B, D), dtype=DT, entropy=3)
    with torch.no_grad():
        ref = torchsde.sdeint(sde, y0, ts, bm=bm, method="milstein", dt=2**-5, options={"grad_free": True})
        out = nde.sdeint(sde, y0, ts, bm=bm, method="milstein", dt=2**-5, options={"grad_free": True})
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_logqp_matches_torchsde():
    sde = SDE("diagonal", "ito")
    y0 = torch.randn(B, D, dtype=DT)
    ts = torch.linspace(0, 1, 4, dtype=DT)
    # with logqp the diagonal-noise state gains a channel (the log-ratio), and so does the Brownian motion
    bm = torchsde.BrownianInterval(0.0, 1.0, (B, D + 1), dtype=DT, entropy=2)
    with torch.no_grad():
        ys_ref, lr_ref = torchsde.sdeint(sde, y0, ts, bm=bm, method="euler", dt=2**-5, logqp=True)
        ys, lr = nde.sdeint(sde, y0, ts, bm=bm, method="euler", dt=2**-5, logqp=True)
    assert lr.shape == lr_ref.shape == (3, B)
    torch.testing.assert_close(ys, ys_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lr, lr_ref, rtol=1e-7, atol=1e-9)


def test_nde_brownian_names_extra_and_adaptive():
    class Renamed:
        noise_type, sde_type = "diagonal", "stratonovich"

        def mu(self, t, y):
            return -y

        def sigma(self, t, y):
            return 0.5 * y

    y0 = torch.ones(64, 1, dtype=DT)
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    bm = nde.BrownianInterval(0.0, 1.0, (64, 1), dtype=DT, seed=0, dt=2**-8)
    ys, state = nde.sdeint(Renamed(), y0, ts, bm=bm, method="heun", dt=2**-8, names={"drift": "mu", "diffusion": "sigma"},
                           extra=True)
    exact = torch.exp(-1.0 + 0.5 * bm.evaluate(0.0, 1.0))  # Stratonovich GBM
    assert (ys[-1] - exact).abs().max().item() < 1e-3
    ya = nde.sdeint(Renamed(), y0, ts, bm=bm, method="heun", dt=0.1, adaptive=True, rtol=1e-4, atol=1e-4,
                    names={"drift": "mu", "diffusion": "sigma"})
    assert (ya[-1] - exact).abs().mean().item() < 5e-3
    # default Brownian motion (bm=None) and default method
    out = nde.sdeint(Renamed(), y0, ts, dt=0.01, names={"drift": "mu", "diffusion": "sigma"})
    assert out.shape == (3, 64, 1) and torch.isfinite(out).all()


def test_adjoint_gradients():
    torch.manual_seed(0)
    sde = SDE("diagonal", "stratonovich")
    y0 = torch.randn(B, D, dtype=DT, requires_grad=True)
    ts = torch.linspace(0, 1, 3, dtype=DT)
    bm = nde.BrownianInterval(0.0, 1.0, (B, D), dtype=DT, seed=1, dt=2**-5)
    grads = []
    for fn in (nde.sdeint, nde.sdeint_adjoint):
        kw = {} if fn is nde.sdeint else {"adjoint_method": "adjoint_reversible_heun"}
        ys = fn(sde, y0, ts, bm=bm, method="reversible_heun", dt=2**-5, **kw)
        grads.append(torch.autograd.grad(ys[-1].pow(2).sum(), [y0, *sde.parameters()], allow_unused=True))
    for a, b in zip(*grads):
        if a is None:
            assert b is None or b.abs().max() == 0
            continue
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_errors():
    sde = SDE("diagonal", "ito")
    y0 = torch.randn(B, D, dtype=DT)
    ts = torch.linspace(0, 1, 3, dtype=DT)
    with pytest.raises(ValueError, match="Stratonovich"):
        nde.sdeint(sde, y0, ts, method="midpoint")
    with pytest.raises(ValueError, match="method"):
        nde.sdeint(sde, y0, ts, method="rk4")
    with pytest.raises(ValueError, match="strictly increasing"):
        nde.sdeint(sde, y0, torch.tensor([0.0, 0.0, 1.0], dtype=DT))
    bad = SDE("diagonal", "ito")
    bad.noise_type = "weird"
    with pytest.raises(ValueError, match="noise_type"):
        nde.sdeint(bad, y0, ts)
    with pytest.raises(ValueError, match="prior drift"):
        class NoH:
            noise_type, sde_type = "diagonal", "ito"

            def f(self, t, y):
                return -y

            def g(self, t, y):
                return y

        nde.sdeint(NoH(), y0, ts, logqp=True)


def test_any_state_shape_and_adjoint():
    class Grid(torch.nn.Module):
        noise_type, sde_type = "diagonal", "ito"

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.7, dtype=DT))

        def f(self, t, y):
            return -self.w * y

        def g(self, t, y):
            return 0.2 * torch.ones_like(y)

    sde = Grid()
    y0 = torch.randn(4, 5, 3, dtype=DT)  # (batch, rows, channels): three dimensions
    ts = torch.linspace(0, 1, 4, dtype=DT)
    bm = nde.BrownianInterval(0.0, 1.0, (4, 5, 3), dtype=DT, seed=0, dt=0.05)
    ys = nde.sdeint(sde, y0, ts, bm=bm, method="euler", dt=0.05)
    assert ys.shape == (4, 4, 5, 3)
    # additive-noise linear SDE: y(T) - y_noise(T) = y0 * (1 - w dt)^n exactly for Euler--Maruyama
    noise_only = nde.sdeint(sde, torch.zeros_like(y0), ts, bm=bm, method="euler", dt=0.05)
    torch.testing.assert_close(ys[-1] - noise_only[-1], y0 * (1 - 0.7 * 0.05) ** 20, rtol=1e-10, atol=1e-12)
    g1 = torch.autograd.grad(nde.sdeint(sde, y0, ts, bm=bm, method="euler", dt=0.05)[-1].sum(), sde.w)[0]
    g2 = torch.autograd.grad(nde.sdeint_adjoint(sde, y0, ts, bm=bm, method="euler", dt=0.05)[-1].sum(), sde.w)[0]
    # the stochastic adjoint differentiates the continuous solution: equal up to the discretisation error
    torch.testing.assert_close(g1, g2, rtol=5e-2, atol=0)


def test_log_ode_and_brownian_tree():
    # for diagonal noise the log-ODE midpoint method has no Lévy-area terms: it is the midpoint method
    sde = SDE("diagonal", "stratonovich")
    y0 = torch.randn(B, D, dtype=DT)
    ts = torch.linspace(0, 1, 3, dtype=DT)
    bm = torchsde.BrownianInterval(0.0, 1.0, (B, D), dtype=DT, levy_area_approximation="foster", entropy=5)
    tree = torchsde.BrownianTree(0.0, torch.zeros(B, D, dtype=DT), t1=1.0, entropy=5, tol=1e-8)
    with torch.no_grad():
        ref = torchsde.sdeint(sde, y0, ts, bm=bm, method="log_ode", dt=2**-4)
        out = nde.sdeint(sde, y0, ts, bm=bm, method="log_ode", dt=2**-4)
        torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-8)
        ref = torchsde.sdeint(sde, y0, ts, bm=tree, method="heun", dt=2**-4)
        out = nde.sdeint(sde, y0, ts, bm=tree, method="heun", dt=2**-4)
        torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="adjoint_method"):
        nde.sdeint(sde, y0, ts, method="adjoint_reversible_heun")


# ---- log-ODE with general noise: the Lévy-area term ---------------------------------------------
class _GeneralStrat(torch.nn.Module):
    noise_type, sde_type = "general", "stratonovich"

    def __init__(self):
        super().__init__()
        self.gen = torch.nn.Linear(D, D * 2).double()

    def f(self, t, y):
        return -0.5 * y + 0.2 * torch.sin(y)

    def g(self, t, y):
        # strongly non-commutative columns
        return 0.6 * torch.tanh(self.gen(y)).reshape(-1, D, 2) + 0.3 * torch.cos(y).unsqueeze(-1)


@pytest.mark.parametrize("levy", ["davie", "foster"])
def test_log_ode_general_noise_matches_torchsde(levy):
    torch.manual_seed(1)
    sde = _GeneralStrat()
    y0 = torch.randn(B, D, dtype=DT)
    ts = torch.linspace(0, 1, 4, dtype=DT)
    bm = torchsde.BrownianInterval(0.0, 1.0, (B, 2), dtype=DT, levy_area_approximation=levy, entropy=7)
    with torch.no_grad():
        ref = torchsde.sdeint(sde, y0, ts, bm=bm, method="log_ode", dt=2**-5)
        out = nde.sdeint(sde, y0, ts, bm=bm, method="log_ode", dt=2**-5)
        mid = nde.sdeint(sde, y0, ts, bm=bm, method="midpoint", dt=2**-5)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # the Lévy-area term is not negligible here (plain midpoint used to be returned)
    assert (mid - ref).abs().max() > 1e-3


def test_log_ode_needs_a_levy_area():
    sde = _GeneralStrat()
    y0 = torch.randn(B, D, dtype=DT)
    ts = torch.linspace(0, 1, 3, dtype=DT)
    for levy in ("none", "space-time"):
        tbm = torchsde.BrownianInterval(0.0, 1.0, (B, 2), dtype=DT, levy_area_approximation=levy)
        nbm = nde.BrownianInterval(0.0, 1.0, (B, 2), dtype=DT, levy_area=levy)
        for bm in (tbm, nbm):
            with pytest.raises(ValueError, match="levy_area_approximation"):
                nde.sdeint(sde, y0, ts, bm=bm, method="log_ode", dt=0.1)
    # the default Brownian motion carries Foster's area; nde's own davie/foster Brownian motions work
    out = nde.sdeint(sde, y0, ts, method="log_ode", dt=0.05)
    assert out.shape == (3, B, D) and torch.isfinite(out).all()
    nbm = nde.BrownianInterval(0.0, 1.0, (B, 2), dtype=DT, levy_area="davie", seed=0, dt=0.05)
    assert torch.isfinite(nde.sdeint(sde, y0, ts, bm=nbm, method="log_ode", dt=0.05)).all()


def test_space_space_levy_area_moments():
    # A = H W^T - W H^T + s lambda: antisymmetric, mean zero, and (Davie and Foster alike) the exact
    # variance E[A_12^2] = h^2 / 4 of the Lévy area; Foster's s also matches E[A_12^2 | H]
    n = 40000
    for levy in ("davie", "foster"):
        bm = nde.BrownianInterval(0.0, 1.0, (n, 2), dtype=DT, levy_area=levy, seed=2, dt=0.1)
        for s, u in ((0.3, 0.4), (0.05, 0.77)):
            h = u - s
            w, a = bm.evaluate_area(s, u)
            assert a.shape == (n, 2, 2)
            torch.testing.assert_close(a, -a.transpose(-1, -2), rtol=0, atol=1e-15)
            a12 = a[:, 0, 1]
            assert abs(a12.mean().item()) < 4 * math.sqrt(h * h / 4 / n)
            assert abs(a12.var().item() / (h * h / 4) - 1) < 0.04, (levy, a12.var().item() / (h * h / 4))
            # the reversed interval gives the reversed path's (-W, -A); values are reproducible
            w2, a2 = bm.evaluate_area(u, s)
            torch.testing.assert_close((w2, a2), (-w, -a), rtol=0, atol=0)
            torch.testing.assert_close(a, bm.evaluate_area(s, u)[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="davie"):
        nde.BrownianInterval(0.0, 1.0, (3, 2), levy_area="space-time").evaluate_area(0.0, 0.5)


# ---- extra=True and extra_solver_state -------------------------------------------------------------
def test_extra_solver_state_matches_torchsde_and_continues_a_solve():
    torch.manual_seed(0)
    sde = SDE("diagonal", "stratonovich")
    y0 = torch.randn(B, D, dtype=DT)
    ts = torch.linspace(0, 1, 5, dtype=DT)
    tbm = torchsde.BrownianInterval(0.0, 1.0, (B, D), dtype=DT, entropy=4)
    with torch.no_grad():
        ys_ref, st_ref = torchsde.sdeint(sde, y0, ts, bm=tbm, method="reversible_heun", dt=2**-5, extra=True)
        ys, st = nde.sdeint(sde, y0, ts, bm=tbm, method="reversible_heun", dt=2**-5, extra=True)
    torch.testing.assert_close(ys, ys_ref, rtol=0, atol=1e-12)
    assert isinstance(st, tuple) and len(st) == 3
    for a, b in zip(st, st_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # the other methods keep no extra state
    assert nde.sdeint(sde, y0, ts, bm=tbm, method="heun", dt=2**-5, extra=True)[1] == ()
    # continuing from the returned state reproduces one long solve exactly
    bm = nde.BrownianInterval(0.0, 1.0, (B, D), dtype=DT, seed=3, dt=2**-6)
    full = nde.sdeint(sde, y0, torch.tensor([0.0, 0.5, 1.0], dtype=DT), bm=bm, method="reversible_heun", dt=2**-6)
    first, state = nde.sdeint(sde, y0, torch.tensor([0.0, 0.5], dtype=DT), bm=bm, method="reversible_heun",
                              dt=2**-6, extra=True)
    second = nde.sdeint(sde, first[-1], torch.tensor([0.5, 1.0], dtype=DT), bm=bm, method="reversible_heun",
                        dt=2**-6, extra_solver_state=state)
    torch.testing.assert_close(second[-1], full[-1], rtol=0, atol=1e-13)
    # without the state the second half restarts reversible Heun (z = y) and differs
    restart = nde.sdeint(sde, first[-1], torch.tensor([0.5, 1.0], dtype=DT), bm=bm, method="reversible_heun", dt=2**-6)
    assert (restart[-1] - full[-1]).abs().max() > 1e-8
    with pytest.raises(ValueError, match=r"\(f, g, z\)"):
        nde.sdeint(sde, y0, ts, bm=bm, method="reversible_heun", dt=2**-6, extra_solver_state=(y0,))


def test_reversible_heun_runs_backwards_from_its_extra_state():
    # torchsde's reversibility check: the negated SDE on the reversed Brownian motion retraces the solve
    torch.manual_seed(0)
    sde = SDE("general", "stratonovich")

    class Minus:
        noise_type, sde_type = sde.noise_type, sde.sde_type

        def f(self, t, y):
            return -sde.f(-t, y)

        def g(self, t, y):
            return -sde.g(-t, y)

    y0 = torch.full((B, D), 0.1, dtype=DT)
    ts = torch.linspace(0, 1.9, 20, dtype=DT)
    bm = torchsde.BrownianInterval(0.0, 1.9, (B, 2), dtype=DT, entropy=11)
    with torch.no_grad():
        ys, (f, g, z) = nde.sdeint(sde, y0, ts, bm=bm, method="reversible_heun", dt=0.1, extra=True)
        back = nde.sdeint(Minus(), ys[-1], -ts.flip(0), bm=torchsde.ReverseBrownian(bm), method="reversible_heun",
                          dt=0.1, extra_solver_state=(-f, -g, z))
    torch.testing.assert_close(back.flip(0), ys, rtol=0, atol=1e-7)  # measured 8e-9 (rounding, 19 steps)


def test_extra_state_gradients():
    torch.manual_seed(0)
    sde = SDE("diagonal", "stratonovich")
    bm = nde.BrownianInterval(0.0, 1.0, (B, D), dtype=DT, seed=5, dt=2**-5)
    y0 = torch.randn(B, D, dtype=DT)
    ts = torch.tensor([0.0, 1.0], dtype=DT)
    _, (f0, g0, z0) = nde.sdeint(sde, y0, torch.tensor([0.0, 0.25], dtype=DT), bm=bm, method="reversible_heun",
                                 dt=2**-5, extra=True)
    state = tuple(x.detach().requires_grad_(True) for x in (f0, g0, z0))
    grads = []
    for fn in (nde.sdeint, nde.sdeint_adjoint):
        ys, st = fn(sde, y0, torch.tensor([0.25, 1.0], dtype=DT), bm=bm, method="reversible_heun", dt=2**-5,
                    extra=True, extra_solver_state=state)
        grads.append(torch.autograd.grad(ys[-1].pow(2).sum(), [*state, *sde.parameters()], allow_unused=True))
    for a, b in zip(*grads):
        if a is None:
            assert b is None or b.abs().max() == 0
            continue
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert all(g is not None for g in grads[1][:3])
    # the direct solve's returned state carries gradients
    ys, st = nde.sdeint(sde, y0, ts, bm=bm, method="reversible_heun", dt=2**-5, extra=True,
                        extra_solver_state=state)
    assert all(x.requires_grad for x in st)


# ---- SDE objects and keyword arguments ---------------------------------------------------------
def _fg_variants():
    vec = torch.tensor([0.7, -0.4], dtype=DT)

    def f(self, t, y):
        return -y

    def g(self, t, y):
        return y.unsqueeze(-1).sigmoid() * vec

    def g_prod(self, t, y, v):
        return (g(self, t, y) @ v.unsqueeze(-1)).squeeze(-1)

    kinds = {"f_g": {"f": f, "g": g}, "f_and_g": {"f_and_g": lambda self, t, y: (f(self, t, y), g(self, t, y))},
             "f_g_prod": {"f": f, "g_prod": g_prod},
             "f_and_g_prod": {"f_and_g_prod": lambda self, t, y, v: (f(self, t, y), g_prod(self, t, y, v))}}
    return {k: type(k, (), {"noise_type": "general", "sde_type": "ito", **v})() for k, v in kinds.items()}


def test_every_way_of_giving_drift_and_diffusion():
    y0 = torch.randn(B, D, dtype=DT)
    bm = nde.BrownianInterval(0.0, 1.0, (B, 2), dtype=DT, seed=0, dt=0.05)
    outs = {k: nde.sdeint(s, y0, [0.0, 1.0], bm=bm, method="euler", dt=0.05) for k, s in _fg_variants().items()}
    for k, v in outs.items():
        torch.testing.assert_close(v, outs["f_g"], rtol=0, atol=1e-14, msg=k)
    # what needs the diffusion matrix says so
    with pytest.raises(ValueError, match="needs the diffusion g"):
        nde.sdeint(_fg_variants()["f_and_g_prod"], y0, [0.0, 1.0], bm=bm, method="euler", dt=0.05, logqp=True)


def test_unknown_keyword_arguments_warn_like_torchsde():
    sde = SDE("diagonal", "ito")
    y0 = torch.randn(B, D, dtype=DT)
    with pytest.warns(UserWarning, match="Unexpected arguments"):
        nde.sdeint(sde, y0, [0.0, 0.1], dt=0.05, method="euler", not_an_option=1)
    with pytest.warns(UserWarning, match="Unexpected arguments"):
        nde.sdeint_adjoint(sde, y0, [0.0, 0.1], dt=0.05, method="euler", not_an_option=1)


def test_shape_errors_name_the_function_and_both_shapes():
    y0 = torch.randn(B, D, dtype=DT)
    ts = [0.0, 0.1]

    class Bad:
        noise_type, sde_type = "scalar", "ito"

        def f(self, t, y):
            return -y

        def g(self, t, y):
            return torch.ones(y.shape + (2,), dtype=y.dtype)

    with pytest.raises(ValueError, match=r"sde.g\(t, y\) must be of shape \(16, 3, 1\), but got \(16, 3, 2\)"):
        nde.sdeint(Bad(), y0, ts, dt=0.05, method="euler")
    Bad.noise_type = "diagonal"
    Bad.g = lambda self, t, y: torch.ones(y.shape[0], 1, dtype=y.dtype)
    with pytest.raises(ValueError, match=r"sde.g\(t, y\) must be of shape \(16, 3\), but got \(16, 1\)"):
        nde.sdeint(Bad(), y0, ts, dt=0.05, method="euler")
    Bad.g = lambda self, t, y: torch.ones_like(y)
    Bad.f = lambda self, t, y: y[:, :1]
    with pytest.raises(ValueError, match=r"Drift sde.f\(t, y\) must be of shape \(16, 3\), but got \(16, 1\)"):
        nde.sdeint(Bad(), y0, ts, dt=0.05, method="euler")
    Bad.f = lambda self, t, y: -y
    bm = nde.BrownianInterval(0.0, 0.1, (B, 2), dtype=DT)
    with pytest.raises(ValueError, match=r"\(16, 3\).*\(16, 2\)"):
        nde.sdeint(Bad(), y0, ts, bm=bm, dt=0.05, method="euler")
    bm = nde.BrownianInterval(0.0, 0.1, (B + 1, D), dtype=DT)
    with pytest.raises(ValueError, match=r"Batch sizes not consistent.*\(17, 3\).*\(16, 3\)"):
        nde.sdeint(Bad(), y0, ts, bm=bm, dt=0.05, method="euler")


def test_torchsde_brownian_path_as_bm():
    sde = SDE("diagonal", "stratonovich")
    y0 = torch.randn(B, D, dtype=DT)
    ts = torch.linspace(0, 1, 3, dtype=DT)
    torch.manual_seed(3)
    path = torchsde.BrownianPath(t0=0.0, w0=torch.zeros(B, D, dtype=DT))
    with torch.no_grad():
        ref = torchsde.sdeint(sde, y0, ts, bm=path, method="midpoint", dt=2**-4)
        out = nde.sdeint(sde, y0, ts, bm=path, method="midpoint", dt=2**-4)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_adaptive_default_brownian_motion_resolves_short_steps():
    # adaptive steps far below (t1 - t0) / 2**20 used to see exactly zero increments
    seen = []

    class Rec:
        noise_type, sde_type = "diagonal", "stratonovich"

        def f(self, t, y):
            return -y

        def g_prod(self, t, y, v):
            seen.append(v.detach().clone())
            return 0.5 * v

    y0 = torch.ones(2000, 1, dtype=DT)
    nde.sdeint(Rec(), y0, [0.0, 1.0], method="heun", dt=1e-8, dt_min=1e-9, adaptive=True, rtol=1e-3, atol=1e-3)
    first = seen[0]
    assert (first != 0).all()
    assert abs(first.var().item() / 1e-8 - 1) < 0.15


# ---- scalar noise Milstein: (dg/dy) g, not (dg/dy)^T g -------------------------------------------
def test_scalar_milstein_uses_the_jacobian_vector_product():
    # g with a non-symmetric Jacobian, scalar noise. nde's Milstein uses (dg/dy) g and converges at strong
    # order 1 to the solution that the gradient-free Milstein (no Jacobian at all) approaches at a fine
    # step; torchsde's Milstein uses (dg/dy)^T g, which is right only for symmetric Jacobians, and
    # converges at order 1/2 (see docs/guides/sde.md)
    P = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=DT)
    c = torch.tensor([0.0, 1.5], dtype=DT)

    class Scalar:
        noise_type, sde_type = "scalar", "ito"

        def f(self, t, y):
            return -0.3 * y

        def g(self, t, y):
            return torch.sin(y @ P + c * y).unsqueeze(-1)

    y0 = torch.full((256, 2), 0.3, dtype=DT)
    ts = torch.tensor([0.0, 1.0], dtype=DT)
    bm = torchsde.BrownianInterval(0.0, 1.0, (256, 1), dtype=DT, entropy=2)
    hs = [2.0**-k for k in range(3, 8)]
    with torch.no_grad():
        ref = nde.sdeint(Scalar(), y0, ts, bm=bm, method="milstein", dt=2**-12, options={"grad_free": True})[-1]
        ours = [(nde.sdeint(Scalar(), y0, ts, bm=bm, method="milstein", dt=h)[-1] - ref).abs().mean().item() for h in hs]
        peer = [(torchsde.sdeint(Scalar(), y0, ts, bm=bm, method="milstein", dt=h)[-1] - ref).abs().mean().item()
                for h in hs]
    slope = lambda e: float(np.polyfit(np.log(hs), np.log(e), 1)[0])  # noqa: E731
    assert abs(slope(ours) - 1.0) < 0.2, ours  # measured 0.93
    assert slope(peer) < 0.7 and peer[-1] > 2.5 * ours[-1], peer  # measured 0.52 and 4.0x
