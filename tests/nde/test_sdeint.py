"""The torchsde drop-in: same SDE objects, same Brownian path, same method -> same sample paths."""

import math

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
