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
