"""ImplicitAdjoint: gradients of steady states agree with backpropagation through a long solve."""

import pytest
import torch

import nde
from nde.solvers import Tsit5


def _problem():
    torch.manual_seed(0)
    W = (0.4 * torch.randn(4, 4, dtype=torch.float64)).requires_grad_(True)
    u = torch.randn(4, dtype=torch.float64, requires_grad=True)
    y0 = torch.randn(5, 4, dtype=torch.float64)
    return W, u, y0


@pytest.mark.parametrize("batch_mode", ["joint", "independent"])
def test_implicit_matches_direct_at_equilibrium(batch_mode):
    W, u, y0 = _problem()

    def f(t, y, args):
        return torch.tanh(y @ W.T + args) - y

    ctrl = nde.PIDController(rtol=1e-10, atol=1e-12)
    res = {}
    for name, adj in (("direct", nde.DirectAdjoint()), ("implicit", nde.ImplicitAdjoint())):
        sol = nde.solve(f, Tsit5(), 0.0, 40.0, y0, args=u, controller=ctrl, adjoint=adj, batch_mode=batch_mode)
        loss = (sol.ys[-1] ** 2).sum() + sol.ys[-1][:, 0].sum()
        res[name] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, [W, u])])
        if name == "implicit":
            assert adj.backward_stats["steady_state_residual"] < 1e-9
            assert adj.backward_stats["matvecs"] < 60
    assert float((res["implicit"] - res["direct"]).abs().max() / res["direct"].abs().max()) < 1e-7


def test_implicit_gradcheck_and_errors():
    W, u, y0 = _problem()

    def fn(W_, u_):
        sol = nde.solve(lambda t, y, a: torch.tanh(y @ W_.T + a) - y, Tsit5(), 0.0, 40.0, y0, args=u_,
                        controller=nde.PIDController(rtol=1e-11, atol=1e-13),
                        adjoint=nde.ImplicitAdjoint(params=[W_]))
        return sol.ys

    assert torch.autograd.gradcheck(fn, (W, u), atol=1e-5, rtol=1e-4, nondet_tol=1e-12)
    with pytest.raises(ValueError, match="steady state"):
        nde.solve(lambda t, y: -y, Tsit5(), 0.0, 1.0, y0, saveat=nde.SaveAt(ts=[0.5]), adjoint=nde.ImplicitAdjoint())
    with pytest.warns(RuntimeWarning, match="steady state"):
        sol = nde.solve(lambda t, y, a: torch.tanh(y @ W.T + a) - y, Tsit5(), 0.0, 0.5, y0, args=u,
                        adjoint=nde.ImplicitAdjoint())
        sol.ys.sum().backward()
