"""ImplicitAdjoint: gradients of steady states agree with backpropagation through a long solve."""

import warnings

import pytest
import torch

import nde
from nde.solvers import Dopri5, FixedPointError, FixedPointIteration, FixedPointWarning, Kvaerno5, Tsit5

F64 = torch.float64


def _problem(scale=0.4):
    torch.manual_seed(0)
    W = (scale * torch.randn(4, 4, dtype=F64)).requires_grad_(True)
    u = torch.randn(4, dtype=F64, requires_grad=True)
    y0 = torch.randn(5, 4, dtype=F64)
    return W, u, y0


@pytest.mark.parametrize("batch_mode", ["joint", "independent"])
@pytest.mark.parametrize("linear_solver", ["gmres", "anderson", "broyden"])
def test_implicit_matches_direct_at_equilibrium(batch_mode, linear_solver):
    W, u, y0 = _problem()

    def f(t, y, args):
        return torch.tanh(y @ W.T + args) - y

    ctrl = nde.PIDController(rtol=1e-10, atol=1e-12)
    res = {}
    for name, adj in (("direct", nde.DirectAdjoint()), ("implicit", nde.ImplicitAdjoint(linear_solver))):
        sol = nde.solve(f, Tsit5(), 0.0, 40.0, y0, args=u, controller=ctrl, adjoint=adj, batch_mode=batch_mode)
        loss = (sol.ys[-1] ** 2).sum() + sol.ys[-1][:, 0].sum()
        res[name] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, [W, u])])
        if name == "implicit":
            assert adj.backward_stats["steady_state_residual"] < 1e-9
            assert adj.backward_stats["matvecs"] < 60
            assert adj.backward_stats["result"].converged.shape == ((5,) if batch_mode == "independent" else ())
    assert float((res["implicit"] - res["direct"]).abs().max() / res["direct"].abs().max()) < 1e-7


@pytest.mark.parametrize("solver,batch_mode,linear_solver,rtol", [
    (Tsit5(), "joint", "gmres", 1e-11),
    (Dopri5(), "independent", "gmres", 1e-11),
    (Dopri5(), "independent", FixedPointIteration(rtol=0, atol=1e-13, max_steps=2000, damping=0.5), 1e-11),
    (Kvaerno5(), "joint", "anderson", 1e-10),  # an implicit solver (costlier steps: a looser tolerance)
])
def test_implicit_gradcheck(solver, batch_mode, linear_solver, rtol):
    # gradients w.r.t. the vector field's parameters, args and y0 (zero: the equilibrium does not
    # depend on it, and neither does the state at t1 = 60 to within gradcheck's tolerance)
    W, u, y0 = _problem(scale=0.25)
    y0 = y0[:2].clone().requires_grad_(True)

    def fn(W_, u_, y0_):
        sol = nde.solve(lambda t, y, a: torch.tanh(y @ W_.T + a) - y, solver, 0.0, 60.0, y0_, args=u_,
                        controller=nde.PIDController(rtol=rtol, atol=rtol * 1e-2), batch_mode=batch_mode,
                        adjoint=nde.ImplicitAdjoint(linear_solver, rtol=1e-12, atol=1e-14, params=[W_]))
        return sol.ys

    # finite differences (step 1e-4) of an adaptive solve at tolerance rtol are accurate to about
    # rtol / 1e-4; independent mode steps every sample on its own: W, covered in joint mode, is left out
    inputs = (W, u, y0) if batch_mode == "joint" else (W.detach(), u, y0)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-4, atol=1e-5, rtol=1e-4, nondet_tol=1e-12,
                                    fast_mode=isinstance(solver, Kvaerno5))
    (gy0,) = torch.autograd.grad(fn(W, u, y0).sum(), y0)
    assert torch.equal(gy0, torch.zeros_like(y0))


@pytest.mark.parametrize("per_sample_t1", [False, True])
def test_time_gradients_are_those_of_the_returned_state(per_sample_t1):
    # short of the equilibrium, dL/dt1 = <g, f(t1, y(t1))> is not zero: it equals DirectAdjoint's,
    # for a shared t1 and for one t1 per sample (independent mode); y0 and t0 get zero
    W, u, y0 = _problem()
    f = lambda t, y, a: torch.tanh(y @ W.T + a) - y  # noqa: E731
    t1_value = torch.tensor([2.0, 3.0, 4.0, 5.0, 6.0], dtype=F64) if per_sample_t1 else torch.tensor(3.0, dtype=F64)
    grads = {}
    for name, adj in (("direct", nde.DirectAdjoint()), ("implicit", nde.ImplicitAdjoint())):
        t0 = torch.tensor(0.0, dtype=F64, requires_grad=True)
        t1 = t1_value.clone().requires_grad_(True)
        y0_ = y0.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # not a steady state yet
            sol = nde.solve(f, Tsit5(), t0, t1, y0_, args=u, controller=nde.PIDController(rtol=1e-10, atol=1e-12),
                            adjoint=adj, batch_mode="independent")
            grads[name] = torch.autograd.grad((sol.ys[-1] ** 2).sum(), [t1, t0, y0_])
    g1_dir, g1_imp = grads["direct"][0], grads["implicit"][0]
    assert g1_imp.shape == t1_value.shape and g1_dir.abs().min() > 1e-3
    torch.testing.assert_close(g1_imp, g1_dir, rtol=1e-8, atol=1e-12)
    assert torch.equal(grads["implicit"][1], torch.zeros(())) and not grads["implicit"][2].any()


def test_y0_gradient_vanishes_at_equilibrium():
    # DirectAdjoint's exact dy(t1)/dy0 decays like the transient: zero (ImplicitAdjoint's value) is its limit
    W, u, y0 = _problem()
    f = lambda t, y, a: torch.tanh(y @ W.T + a) - y  # noqa: E731
    y0_ = y0.clone().requires_grad_(True)
    sol = nde.solve(f, Tsit5(), 0.0, 40.0, y0_, args=u, controller=nde.PIDController(rtol=1e-10, atol=1e-12))
    (g,) = torch.autograd.grad(sol.ys[-1].sum(), y0_)
    assert g.abs().max() < 1e-8


def test_failed_linear_solve_follows_throw():
    # f(y) = A y - b with a singular A: a line of equilibria, no isolated steady state, and the
    # adjoint system has no solution for a cotangent outside A's range
    A = torch.tensor([[-1.0, 0.0], [0.0, 0.0]], dtype=F64)
    b = torch.tensor([1.0, 0.0], dtype=F64, requires_grad=True)
    f = lambda t, y, b: y @ A.T - b  # noqa: E731
    y0 = torch.tensor([[0.5, 0.3]], dtype=F64)

    def run(**kw):
        sol = nde.solve(f, Tsit5(), 0.0, 40.0, y0, args=b, controller=nde.PIDController(rtol=1e-10, atol=1e-12),
                        adjoint=nde.ImplicitAdjoint(max_steps=60, **kw), **kw.pop("solve_kw", {}))
        return torch.autograd.grad(sol.ys[-1].sum(), b)

    with pytest.raises(FixedPointError, match="ImplicitAdjoint: the linear solve .* not converge.*not isolated"):
        run()  # nde.solve's default throw=True
    with pytest.warns(FixedPointWarning, match="ImplicitAdjoint: the linear solve"):
        run(throw=False)
    sol = nde.solve(f, Tsit5(), 0.0, 40.0, y0, args=b, controller=nde.PIDController(rtol=1e-10, atol=1e-12),
                    adjoint=nde.ImplicitAdjoint(max_steps=60), throw=False)
    with pytest.warns(FixedPointWarning):
        torch.autograd.grad(sol.ys[-1].sum(), b)  # follows the solve's throw=False
    # a solver instance reports through its own throw
    sol = nde.solve(f, Tsit5(), 0.0, 40.0, y0, args=b, controller=nde.PIDController(rtol=1e-10, atol=1e-12),
                    adjoint=nde.ImplicitAdjoint(nde.solvers.Anderson(rtol=0, atol=1e-10, max_steps=30)))
    with pytest.raises(FixedPointError, match="ImplicitAdjoint"):
        torch.autograd.grad(sol.ys[-1].sum(), b)


def test_errors():
    W, u, y0 = _problem()
    with pytest.raises(ValueError, match="steady state"):
        nde.solve(lambda t, y: -y, Tsit5(), 0.0, 1.0, y0, saveat=nde.SaveAt(ts=[0.5]), adjoint=nde.ImplicitAdjoint())
    with pytest.raises(ValueError, match="Unknown fixed-point solver"):
        nde.ImplicitAdjoint("bicgstab")
    with pytest.raises(TypeError, match="solver must be"):
        nde.ImplicitAdjoint(3)
    with pytest.raises(ValueError, match="max_steps"):
        nde.ImplicitAdjoint(max_steps=0)
    with pytest.warns(RuntimeWarning, match="steady state"):
        sol = nde.solve(lambda t, y, a: torch.tanh(y @ W.T + a) - y, Tsit5(), 0.0, 0.5, y0, args=u,
                        adjoint=nde.ImplicitAdjoint())
        sol.ys.sum().backward()
