"""The stochastic adjoint of Stratonovich SDEs: gradients converge to those of the discretised solve."""

import pytest
import torch

import nde
from nde import BrownianInterval, ControlTerm, MultiTerm, ODETerm
from nde._sde_adjoint import stratonovich_adjoint_terms
from nde.solvers import Heun

DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _problem(dt, noise="diagonal"):
    torch.manual_seed(0)
    lin, gl = torch.nn.Linear(2, 2).double(), torch.nn.Linear(2, 4 if noise == "general" else 2).double()
    m = 2
    bm = BrownianInterval(0.0, 1.0, (8, m), seed=3, dtype=DT, dt=dt)
    drift = ODETerm(lambda t, y: torch.tanh(lin(y)))
    if noise == "general":
        diff = ControlTerm(lambda t, y: 0.3 * torch.tanh(gl(y)).reshape(-1, 2, 2), bm)
    else:
        diff = ControlTerm(lambda t, y: 0.3 * torch.sigmoid(gl(y)), bm, noise="diagonal")
    y0 = torch.randn(8, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    return drift, diff, [*lin.parameters(), *gl.parameters()], y0


@pytest.mark.parametrize("noise", ["diagonal", "general"])
def test_adjoint_sde_gradients_converge_to_discrete_gradients(noise):
    errs = []
    for dt in (2**-4, 2**-6, 2**-8):
        drift, diff, params, y0 = _problem(dt, noise)
        y0 = y0.requires_grad_(True)
        yT = nde.solve(MultiTerm(drift, diff), Heun(), 0.0, 1.0, y0, dt0=dt).ys[-1]
        direct = torch.autograd.grad((yT**2).sum(), [y0, *params])
        aug = stratonovich_adjoint_terms(drift, diff, params, None, (8, 2))
        z = torch.cat([yT.detach().reshape(-1), 2 * yT.detach().reshape(-1)] + [torch.zeros(p.numel(), dtype=DT)
                                                                             for p in params])
        zs = nde.solve(aug, Heun(), 1.0, 0.0, z, dt0=-dt).ys[-1]
        y_back, a0, ath = zs[:16].reshape(8, 2), zs[16:32].reshape(8, 2), zs[32:]
        flat = torch.cat([g.reshape(-1) for g in direct[1:]])
        errs.append(max((a0 - direct[0]).abs().max().item(), (ath - flat).abs().max().item() / flat.abs().max().item(),
                        (y_back - y0.detach()).abs().max().item()))
    assert errs[-1] < 1e-5 and errs[-1] < errs[0] / 50, errs


def test_sdeint_adjoint_stochastic_adjoint_matches_sdeint():
    class SDE(torch.nn.Module):
        noise_type, sde_type = "diagonal", "stratonovich"

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3).double()
            self.s = torch.nn.Parameter(torch.tensor(0.3, dtype=DT))

        def f(self, t, y):
            return torch.tanh(self.lin(y))

        def g(self, t, y):
            return self.s * torch.cos(y)

    sde = SDE()
    y0 = torch.randn(6, 3, dtype=DT, requires_grad=True)
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    w = torch.randn(3, 6, 3, dtype=DT)
    errs = []
    for dt in (2**-5, 2**-9):
        bm = BrownianInterval(0.0, 1.0, (6, 3), seed=2, dtype=DT, dt=dt)
        grads = []
        for fn in (nde.sdeint, nde.sdeint_adjoint):
            ys = fn(sde, y0, ts, bm=bm, method="midpoint", dt=dt)
            grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad((ys * w).sum(), [y0, *sde.parameters()])]))
        errs.append(((grads[0] - grads[1]).abs().max() / grads[0].abs().max()).item())
    # the stochastic adjoint solves the continuous adjoint SDE: it agrees with the gradients of the
    # discretised solve up to the discretisation error, which shrinks with dt
    assert errs[1] < 1e-3 and errs[1] < errs[0] / 4, errs


def test_sdeint_adjoint_ito_diagonal_converted_to_stratonovich():
    class SDE(torch.nn.Module):
        noise_type, sde_type = "diagonal", "ito"

        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor(-0.5, dtype=DT))
            self.s = torch.nn.Parameter(torch.tensor(0.6, dtype=DT))

        def f(self, t, y):
            return self.a * y

        def g(self, t, y):
            return self.s * y

    # Itô GBM: y(1) = y0 exp(a - s^2/2 + s W(1)), so the exact gradients are known
    sde = SDE()
    y0 = torch.full((2000, 1), 1.0, dtype=DT, requires_grad=True)
    ts = torch.tensor([0.0, 1.0], dtype=DT)
    bm = BrownianInterval(0.0, 1.0, (2000, 1), seed=7, dtype=DT, dt=2**-8)
    ys = nde.sdeint_adjoint(sde, y0, ts, bm=bm, method="euler", dt=2**-8)
    g = torch.autograd.grad(ys[-1].sum(), [y0, sde.a, sde.s])
    w = bm.evaluate(0.0, 1.0)
    with torch.no_grad():
        exact = torch.exp(sde.a - sde.s**2 / 2 + sde.s * w)
    torch.testing.assert_close(g[0], exact, rtol=0.05, atol=0.02)
    torch.testing.assert_close(g[1], exact.sum(), rtol=0.02, atol=0)
    torch.testing.assert_close(g[2], (exact * (w - sde.s.detach())).sum(), rtol=0.05, atol=2.0)


def test_sdeint_adjoint_ito_general_noise_is_checkpointed_and_exact():
    class SDE(torch.nn.Module):
        noise_type, sde_type = "general", "ito"

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 4).double()

        def f(self, t, y):
            return -y

        def g(self, t, y):
            return 0.3 * torch.tanh(self.lin(y)).reshape(-1, 2, 2)

    sde = SDE()
    y0 = torch.randn(5, 2, dtype=DT, requires_grad=True)
    ts = torch.tensor([0.0, 1.0], dtype=DT)
    bm = BrownianInterval(0.0, 1.0, (5, 2), seed=1, dtype=DT, dt=0.1)
    grads = [torch.autograd.grad(fn(sde, y0, ts, bm=bm, method="euler", dt=0.1)[-1].pow(2).sum(), [y0, *sde.parameters()])
             for fn in (nde.sdeint, nde.sdeint_adjoint)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


class _ItoNonDiagonal(torch.nn.Module):
    """Itô SDE whose diffusion has a non-diagonal (non-symmetric) Jacobian: scalar or general noise."""

    def __init__(self, noise):
        super().__init__()
        self.noise_type, self.sde_type = noise, "ito"
        self.a = torch.nn.Parameter(torch.tensor([-0.5, 0.3], dtype=DT))
        self.s = torch.nn.Parameter(torch.tensor(0.8, dtype=DT))
        self.register_buffer("P", torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=DT))
        self.register_buffer("c", torch.tensor([0.0, 0.5], dtype=DT))

    def f(self, t, y):
        return self.a * y

    def g(self, t, y):
        col = self.s * torch.sin(y @ self.P + self.c * y)
        if self.noise_type == "scalar":
            return col.unsqueeze(-1)
        return torch.stack([col, 0.5 * torch.cos(y @ self.P - self.c * y)], -1)


def _adjoint_error(noise, dt, method="euler", **kw):
    sde = _ItoNonDiagonal(noise)
    y0 = torch.full((64, 2), 0.4, dtype=DT, requires_grad=True)
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    bm = BrownianInterval(0.0, 1.0, (64, 1 if noise == "scalar" else 2), seed=4, dtype=DT, dt=dt)
    grads = []
    for fn in (nde.sdeint, nde.sdeint_adjoint):
        ys = fn(sde, y0, ts, bm=bm, method=method, dt=dt, **(kw if fn is nde.sdeint_adjoint else {}))
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(ys.pow(2).sum(), [y0, *sde.parameters()])]))
    return ((grads[0] - grads[1]).norm() / grads[0].norm()).item()


@pytest.mark.parametrize("noise", ["scalar", "general"])
def test_ito_to_stratonovich_correction_is_the_jacobian_vector_product(noise):
    # 1/2 sum_j (dg_j/dy) g_j against central differences (a transposed Jacobian was used before)
    from nde._sdeint import _ItoToStratonovich

    sde = _ItoNonDiagonal(noise)
    bm = BrownianInterval(0.0, 1.0, (5, 1 if noise == "scalar" else 2), seed=4, dtype=DT)
    drift = ODETerm(lambda t, y: sde.f(t, y))
    diff = ControlTerm(lambda t, y: sde.g(t, y), bm, noise=noise)
    y = torch.randn(5, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    corr = 2 * (drift.vf(0.0, y, None) - _ItoToStratonovich(drift, diff).vf(0.0, y, None))
    g = sde.g(0.0, y)
    eps = 1e-6
    fd = sum((sde.g(0.0, y + eps * g[..., j])[..., j] - sde.g(0.0, y - eps * g[..., j])[..., j]) / (2 * eps)
             for j in range(g.shape[-1]))
    torch.testing.assert_close(corr, fd, rtol=0, atol=1e-8)


def test_ito_scalar_noise_adjoint_converges_with_a_non_diagonal_jacobian():
    # Milstein forwards (strong order 1): the stochastic adjoint's gradients approach the direct ones;
    # with the transposed Jacobian in the Itô-Stratonovich correction they stalled near 5e-2
    errs = [_adjoint_error("scalar", dt, "milstein") for dt in (2**-4, 2**-8)]
    assert errs[1] < 1e-2 and errs[1] < errs[0] / 4, errs  # measured 4.6e-2, 4.9e-3


def test_ito_general_noise_stochastic_adjoint_converges():
    # with an explicit adjoint_method, general Itô noise goes through the stochastic adjoint too
    errs = [_adjoint_error("general", dt, adjoint_method="euler") for dt in (2**-4, 2**-9)]
    assert errs[1] < 0.6 * errs[0], errs


def test_adjoint_options_are_honoured():
    class Strat(torch.nn.Module):
        noise_type, sde_type = "diagonal", "stratonovich"

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3).double()

        def f(self, t, y):
            return torch.tanh(self.lin(y))

        def g(self, t, y):
            return 0.5 * torch.cos(y)

    sde = Strat()
    y0 = torch.randn(8, 3, dtype=DT, requires_grad=True)
    ts = torch.tensor([0.0, 1.0], dtype=DT)
    bm = BrownianInterval(0.0, 1.0, (8, 3), seed=1, dtype=DT, dt=2**-6)

    def grad(fn=nde.sdeint_adjoint, **kw):
        ys = fn(sde, y0, ts, bm=bm, dt=2**-6, method="midpoint", **kw)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(ys[-1].pow(2).sum(), [y0, *sde.parameters()])])

    direct = grad(nde.sdeint)
    mid, heun, eh = grad(), grad(adjoint_method="heun"), grad(adjoint_method="euler_heun")
    loose = grad(adjoint_adaptive=True, adjoint_rtol=1e-1, adjoint_atol=1e-1)
    tight = grad(adjoint_adaptive=True, adjoint_rtol=1e-4, adjoint_atol=1e-4)
    scale = direct.abs().max()
    for g in (mid, heun, eh, tight):
        assert (g - direct).abs().max() / scale < 2e-2
    # each choice changes the backward solve
    for a, b in ((mid, heun), (mid, eh), (loose, tight), (mid, tight)):
        assert (a - b).abs().max() / scale > 1e-6
    with pytest.warns(UserWarning, match="adjoint_options"):
        grad(adjoint_options={"grad_free": True})
    with pytest.raises(ValueError, match="for Itô SDEs"):
        grad(adjoint_method="euler")
    with pytest.raises(ValueError, match="Log-ODE"):
        grad(adjoint_method="log_ode")
    with pytest.raises(ValueError, match="needs method='reversible_heun'"):
        grad(adjoint_method="adjoint_reversible_heun")


def test_sdeint_adjoint_default_method_is_torchsdes():
    # method=None picks srk for Itô SDEs with diagonal noise, as torchsde does (it was reversible_heun)
    sde = _ItoNonDiagonal("scalar")
    y0 = torch.full((4, 2), 0.4, dtype=DT)
    bm = BrownianInterval(0.0, 1.0, (4, 1), seed=4, dtype=DT, dt=0.05, levy_area="space-time")
    a = nde.sdeint_adjoint(sde, y0, [0.0, 1.0], bm=bm, dt=0.05)
    b = nde.sdeint(sde, y0, [0.0, 1.0], bm=bm, dt=0.05, method="srk")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
