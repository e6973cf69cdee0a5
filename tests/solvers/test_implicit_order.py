"""Implicit Runge--Kutta solvers: convergence orders, exact agreement with the stability function on
linear problems, peers (torchdiffeq where it has the method, scipy's Radau), stiffness, batching and
gradients through the Newton iterations."""

import functools
import math

import numpy as np
import pytest
import torch

import nde
from nde.solvers import Tsit5
from nde.solvers.implicit import (
    SDIRK2, TRBDF2, GaussLegendre4, GaussLegendre6, ImplicitEuler, ImplicitMidpoint, Kvaerno3, Kvaerno5, RadauIIA3,
    RadauIIA5, Trapezoid,
)

A = torch.tensor([[-0.4, 1.0, 0.0], [-1.0, -0.4, 0.3], [0.0, -0.3, -0.2]], dtype=torch.float64)
Y0 = torch.tensor([1.0, 0.5, -0.7], dtype=torch.float64)
T1 = 2.0
K = 3.0
C = torch.tensor([0.2, 0.5, 0.7, 0.9], dtype=torch.float64)


def f_linear(t, y, args):
    return y @ A.T


def f_logistic(t, y, args):
    return K * y * (1 - y)


def f_nonautonomous(t, y, args):
    # y' = cos(t) y, y(t) = y0 exp(sin t): checks the stage times c
    return torch.cos(t) * y


def exact_linear(t):
    return torch.linalg.matrix_exp(A * t) @ Y0


def exact_logistic(t):
    e = math.exp(K * t)
    return C * e / (1 - C + C * e)


# solver, order, step counts (asymptotic, above the Newton tolerance)
CASES = [
    (ImplicitEuler, 1, [16, 32, 64]),
    (ImplicitMidpoint, 2, [16, 32, 64]),
    (Trapezoid, 2, [16, 32, 64]),
    (SDIRK2, 2, [16, 32, 64]),
    (TRBDF2, 2, [16, 32, 64]),
    (Kvaerno3, 3, [16, 32, 64]),
    (RadauIIA3, 3, [16, 32, 64]),
    (GaussLegendre4, 4, [8, 16, 32]),
    (Kvaerno5, 5, [16, 24, 32]),
    (RadauIIA5, 5, [8, 16, 32]),
    (GaussLegendre6, 6, [6, 8, 12]),
]
IDS = [c[0].__name__ for c in CASES]


def _solve_fixed(cls, f, y0, n, **kw):
    with torch.no_grad():
        return nde.solve(nde.ODETerm(f), cls(**kw), 0.0, T1, y0, dt0=T1 / n)


def _order(ns, errs):
    return -np.polyfit(np.log(ns), np.log(errs), 1)[0]


@pytest.mark.parametrize("cls,order,ns", CASES, ids=IDS)
def test_convergence_order(cls, order, ns):
    # linear, nonlinear and non-autonomous problems with exact solutions
    problems = ((f_linear, Y0, exact_linear(T1)), (f_logistic, C, exact_logistic(T1)),
                (f_nonautonomous, C, C * math.exp(math.sin(T1))))
    for f, y0, exact in problems:
        errs = []
        for n in ns:
            sol = _solve_fixed(cls, f, y0, n)
            assert sol.stats["num_steps"] == n
            errs.append((sol.ys[-1] - exact).abs().max().item())
        assert min(errs) > 1e-13, errs
        p = _order(ns, errs)
        assert abs(p - order) <= 0.3, (f.__name__, p, errs)
    assert cls().order == order


def _stability_step(tab, M):
    """``R(M) = I + (b^T x I) (I - A x M)^{-1} (1 x M)``: one step of the method on ``y' = (M/h) y``."""
    s, n = tab.stages, M.shape[0]
    big = np.eye(s * n) - np.kron(tab.a, M)
    rhs = np.kron(np.ones((s, 1)), M)
    return np.eye(n) + np.kron(tab.b[None, :], np.eye(n)) @ np.linalg.solve(big, rhs)


@pytest.mark.parametrize("cls", [c[0] for c in CASES], ids=IDS)
def test_linear_problem_is_solved_exactly_by_the_stage_equations(cls):
    # on y' = A y the Newton iteration must reproduce the method's stability function R(hA) to rounding
    n, h = 10, 0.2
    R = _stability_step(cls.tableau, (h * A).numpy())
    expected = np.linalg.matrix_power(R, n) @ Y0.numpy()
    sol = _solve_fixed(cls, f_linear, Y0, n)
    np.testing.assert_allclose(sol.ys[-1].numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,cls", [("implicit_euler", ImplicitEuler), ("implicit_midpoint", ImplicitMidpoint),
                                      ("trapezoid", Trapezoid), ("radauIIA3", RadauIIA3), ("radauIIA5", RadauIIA5),
                                      ("gl4", GaussLegendre4), ("gl6", GaussLegendre6), ("sdirk2", SDIRK2),
                                      ("trbdf2", TRBDF2)])
def test_agrees_with_torchdiffeq_same_method(name, cls):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    from torchdiffeq._impl.odeint import SOLVERS

    if name not in SOLVERS:
        pytest.skip(f"the installed torchdiffeq has no {name!r}")
    ts = torch.linspace(0, T1, 11, dtype=torch.float64)
    ref = torchdiffeq.odeint(lambda t, y: f_linear(t, y, None), Y0, ts, method=name, options=dict(step_size=0.05))
    sol = nde.solve(nde.ODETerm(f_linear), cls(), 0.0, T1, Y0, dt0=0.05, saveat=nde.SaveAt(ts=ts))
    torch.testing.assert_close(sol.ys, ref, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("cls", [Kvaerno3, Kvaerno5, TRBDF2, RadauIIA5], ids=lambda c: c.__name__)
def test_adaptive_agrees_with_scipy_radau(cls):
    from scipy.integrate import solve_ivp

    ref = solve_ivp(lambda t, y: K * y * (1 - y), (0, T1), C.numpy(), method="Radau", rtol=1e-11, atol=1e-12).y[:, -1]
    with torch.no_grad():
        sol = nde.solve(nde.ODETerm(f_logistic), cls(), 0.0, T1, C,
                        controller=nde.PIDController(rtol=1e-7, atol=1e-9))
    assert sol.stats["num_steps"] < {Kvaerno5: 60, Kvaerno3: 400, TRBDF2: 1500, RadauIIA5: 120}[cls]
    np.testing.assert_allclose(sol.ys[-1].numpy(), ref, rtol=0, atol={Kvaerno5: 1e-6, Kvaerno3: 2e-6, TRBDF2: 1e-5, RadauIIA5: 1e-6}[cls])


@pytest.mark.parametrize("cls", [Kvaerno3, Kvaerno5, TRBDF2, RadauIIA5], ids=lambda c: c.__name__)
def test_embedded_error_order(cls):
    s, term, errs, hs = cls(), nde.ODETerm(f_logistic), [], [0.2, 0.1]
    for h in hs:
        with torch.no_grad():
            st, _ = s.init(term, 0.0, h, C, None)
            _, err, _, _, _ = s.step(term, 0.0, h, C, None, st)
        errs.append(err.abs().max().item())
    q = math.log(errs[0] / errs[1]) / math.log(hs[0] / hs[1])
    assert abs(q - s.error_order) <= 0.35, q


def robertson(t, y, args):
    y1, y2, y3 = y.unbind(-1)
    return torch.stack([-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2**2, 3e7 * y2**2], -1)


@functools.lru_cache(maxsize=None)
def _tsit5_robertson():
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    with torch.no_grad():
        return nde.solve(robertson, Tsit5(), 0.0, 10.0, y0, controller=nde.PIDController(rtol=1e-6, atol=1e-8),
                         max_steps=4000, throw=False)


@pytest.mark.parametrize("cls", [Kvaerno5, RadauIIA5], ids=lambda c: c.__name__)
def test_stiff_robertson_far_fewer_steps_than_tsit5(cls):
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    ctrl = nde.PIDController(rtol=1e-6, atol=1e-8)
    with torch.no_grad():
        stiff = nde.solve(robertson, cls(), 0.0, 10.0, y0, controller=ctrl)
    explicit = _tsit5_robertson()
    assert stiff.stats["num_steps"] < 50, stiff.stats
    # Tsit5 is held back by stability, not accuracy: it needs 8674 steps (here it runs out at 4000)
    assert explicit.stats["num_steps"] > 80 * stiff.stats["num_steps"], explicit.stats
    # conservation y1 + y2 + y3 = 1, and the known value y1(10) = 0.8414
    assert abs(float(stiff.ys[-1].sum()) - 1) < 1e-8
    assert abs(float(stiff.ys[-1][0]) - 0.84136) < 1e-4


def test_independent_batch_matches_per_sample_solves():
    # three samples of the logistic problem with different rates; samples have their own steps
    rates = torch.tensor([[1.0], [10.0], [100.0]], dtype=torch.float64)
    y0 = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], dtype=torch.float64)

    def f(t, y, args):
        return args * y * (1 - y)

    ctrl = nde.PIDController(rtol=1e-8, atol=1e-10)
    with torch.no_grad():
        batch = nde.solve(f, Kvaerno5(), 0.0, 1.0, y0, args=rates, controller=ctrl, batch_mode="independent")
        for i in range(3):
            single = nde.solve(f, Kvaerno5(), 0.0, 1.0, y0[i], args=rates[i], controller=ctrl)
            # the batch iterates until every sample has converged: agreement to the Newton tolerance
            torch.testing.assert_close(batch.ys[-1][i], single.ys[-1], rtol=0, atol=1e-10)
            assert int(batch.stats["num_steps"][i]) == single.stats["num_steps"]
    assert int(batch.stats["num_steps"][2]) > int(batch.stats["num_steps"][0])


@pytest.mark.parametrize("cls", [RadauIIA5, SDIRK2], ids=lambda c: c.__name__)
def test_batch_jacobian_matches_full_in_joint_mode(cls):
    y0 = torch.rand(5, 4, dtype=torch.float64)
    with torch.no_grad():
        full = nde.solve(f_logistic, cls(jacobian="full"), 0.0, 1.0, y0, dt0=0.1)
        blocks = nde.solve(f_logistic, cls(jacobian="batch"), 0.0, 1.0, y0, dt0=0.1)
    torch.testing.assert_close(full.ys, blocks.ys, rtol=0, atol=1e-10)


@pytest.mark.parametrize("cls", [ImplicitEuler, RadauIIA5, GaussLegendre4, Kvaerno5, TRBDF2], ids=lambda c: c.__name__)
def test_gradcheck_through_newton(cls):
    def f(t, y, theta):
        return -theta[0] * y**3 + theta[1] * torch.sin(y) - 2.0 * y

    def run(y0, theta):
        return nde.solve(f, cls(), 0.0, 1.0, y0, args=theta, dt0=0.25).ys[-1]

    y0 = torch.tensor([0.7, -0.4], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([1.5, 0.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(run, (y0, theta), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_gradcheck_parameters_of_module_independent_mode():
    lin = torch.nn.Linear(2, 2).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[-3.0, 1.0], [0.5, -2.0]]))

    def run(w, y0):
        def f(t, y, args):
            return torch.tanh(y) @ w.T - y

        return nde.solve(f, Kvaerno3(), 0.0, 0.5, y0, dt0=0.1, batch_mode="independent").ys[-1]

    y0 = torch.tensor([[0.3, -0.2], [1.0, 0.5]], dtype=torch.float64, requires_grad=True)
    w = lin.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(run, (w, y0), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("cls,order", [(RadauIIA5, 3), (GaussLegendre4, 2), (Kvaerno5, 3)], ids=lambda c: getattr(c, "__name__", ""))
def test_dense_output(cls, order):
    errs, ns = [], [8, 16, 32]
    for n in ns:
        h = T1 / n
        ts = torch.arange(n, dtype=torch.float64) * h + 0.37 * h
        with torch.no_grad():
            sol = nde.solve(f_linear, cls(), 0.0, T1, Y0, dt0=h, saveat=nde.SaveAt(ts=ts, dense=True))
        ex = torch.stack([exact_linear(float(t)) for t in ts])
        errs.append((sol.ys - ex).abs().max().item())
        torch.testing.assert_close(sol.evaluate(ts), sol.ys, rtol=0, atol=1e-13)
        d = sol.derivative(1.0)
        assert (d - f_linear(1.0, exact_linear(1.0), None)).abs().max() < 0.05
    assert _order(ns, errs) >= order - 0.3, errs


def test_float32_and_bad_arguments():
    y0 = Y0.float()
    with torch.no_grad():
        sol = nde.solve(lambda t, y, a: y @ A.T.float(), RadauIIA5(), 0.0, T1, y0, dt0=0.1)
    assert sol.ys.dtype == torch.float32
    assert (sol.ys[-1] - exact_linear(T1).float()).abs().max() < 1e-5
    with pytest.raises(ValueError, match="jacobian"):
        Kvaerno5(jacobian="dense")
    with pytest.raises(ValueError, match="max_newton_iters"):
        RadauIIA5(max_newton_iters=0)
    with pytest.raises(ValueError, match="newton_rtol"):
        SDIRK2(newton_rtol=-1.0)
    with pytest.raises(ValueError, match="fixed steps"):
        nde.solve(f_linear, GaussLegendre4(), 0.0, 1.0, Y0)


def test_auto_refuses_huge_dense_newton_system():
    y0 = torch.rand(512, 3, dtype=torch.float64)  # 3 stages x 1536 unknowns
    with pytest.raises(ValueError, match="jacobian='batch'"):
        nde.solve(f_logistic, RadauIIA5(), 0.0, 0.1, y0, dt0=0.05)
    with torch.no_grad():
        sol = nde.solve(f_logistic, RadauIIA5(jacobian="batch"), 0.0, 0.1, y0, dt0=0.05)
    e = math.exp(K * 0.1)
    torch.testing.assert_close(sol.ys[-1], y0 * e / (1 - y0 + y0 * e), rtol=0, atol=1e-8)


def test_newton_failure_rejects_adaptive_steps_and_warns_fixed_steps():
    ctrl = nde.PIDController(rtol=1e-6, atol=1e-8)
    with torch.no_grad():
        sol = nde.solve(f_logistic, Kvaerno5(max_newton_iters=2), 0.0, T1, C, controller=ctrl)
        ref = nde.solve(f_logistic, Kvaerno5(), 0.0, T1, C, controller=ctrl)
    # too few iterations: steps are rejected (error estimate inf) until they are small enough to converge
    assert sol.stats["num_rejected_steps"] > 10 * max(ref.stats["num_rejected_steps"], 1)
    assert (sol.ys[-1] - exact_logistic(T1)).abs().max() < 1e-6
    with pytest.warns(RuntimeWarning, match="did not converge"):
        nde.solve(f_logistic, ImplicitEuler(max_newton_iters=1), 0.0, T1, C, dt0=0.5)


def test_jacobian_reuse_on_linear_problem_and_validation(monkeypatch):
    # on a linear problem the Newton iteration is exact, so one Jacobian serves the whole solve
    import nde.solvers._newton as newton

    calls = {"n": 0}
    original = newton.jacobian

    def counting(*a, **k):
        calls["n"] += 1
        return original(*a, **k)

    monkeypatch.setattr(newton, "jacobian", counting)
    ctrl = nde.PIDController(rtol=1e-8, atol=1e-10)
    with torch.no_grad():
        reused = nde.solve(f_linear, RadauIIA5(), 0.0, T1, Y0, controller=ctrl)
        n_reused, calls["n"] = calls["n"], 0
        fresh = nde.solve(f_linear, RadauIIA5(jacobian_reuse_rate=0.0), 0.0, T1, Y0, controller=ctrl)
    torch.testing.assert_close(reused.ys, fresh.ys, rtol=0, atol=1e-12)
    assert reused.stats["num_steps"] == fresh.stats["num_steps"]
    assert n_reused == 1 and calls["n"] == fresh.stats["num_steps"], (n_reused, calls["n"])
    with pytest.raises(ValueError, match="jacobian_reuse_rate"):
        Kvaerno5(jacobian_reuse_rate=1.5)


@pytest.mark.parametrize("cls,kw", [(Kvaerno5, {}), (RadauIIA5, {}), (GaussLegendre6, {"dt0": -0.1})],
                         ids=["Kvaerno5", "RadauIIA5", "GaussLegendre6"])
def test_backwards_in_time(cls, kw):
    # from t = 2 back to t = 0 on y' = cos(t) y: y(0) = y(2) exp(-sin 2)
    y2 = C * math.exp(math.sin(T1))
    ts = torch.tensor([T1, 1.0, 0.0], dtype=torch.float64)
    ctrl = None if kw else nde.PIDController(rtol=1e-9, atol=1e-11)
    with torch.no_grad():
        sol = nde.solve(f_nonautonomous, cls(), T1, 0.0, y2, saveat=nde.SaveAt(ts=ts), controller=ctrl, **kw)
    expected = torch.stack([C * math.exp(math.sin(float(t))) for t in ts])
    torch.testing.assert_close(sol.ys, expected, rtol=0, atol=1e-7)


def test_non_differentiable_vector_field_is_reported():
    def f(t, y, args):
        # computes its value through its own autograd call on a detached copy: no df/dy available
        with torch.enable_grad():
            y_ = y.detach().requires_grad_(True)
            (g,) = torch.autograd.grad((y_**2).sum() / 2, y_)
        return -g.detach()

    with pytest.raises(RuntimeError, match="Jacobian df/dy"):
        nde.solve(f, Kvaerno5(), 0.0, 1.0, Y0)


@pytest.mark.parametrize("cls", [RadauIIA5, GaussLegendre4, RadauIIA3], ids=lambda c: c.__name__)
def test_decoupled_newton_matches_coupled(cls):
    # 12 unknowns a stage: the Newton systems are decoupled through the eigenvalues of A^{-1}
    # (complex pairs included); the stage values must equal those of the coupled solve
    M = torch.randn(12, 12, dtype=torch.float64) * 0.3 - 2.0 * torch.eye(12, dtype=torch.float64)
    y0 = torch.randn(12, dtype=torch.float64)

    def f(t, y, args):
        return torch.tanh(y) @ M.T + torch.sin(t) * y

    coupled_solver = cls()
    coupled_solver._decouple_from = 10**9
    with torch.no_grad():
        dec = nde.solve(f, cls(), 0.0, 1.0, y0, dt0=0.1)
        coupled = nde.solve(f, coupled_solver, 0.0, 1.0, y0, dt0=0.1)
    torch.testing.assert_close(dec.ys, coupled.ys, rtol=0, atol=1e-10)


def test_decoupled_newton_independent_mode_with_finished_samples():
    # 8 unknowns a sample (decoupled path), samples ending at different times (dt = 0 once finished)
    M = torch.randn(8, 8, dtype=torch.float64) * 0.3 - 2.0 * torch.eye(8, dtype=torch.float64)
    y0 = torch.randn(3, 8, dtype=torch.float64)
    t1 = torch.tensor([0.3, 0.6, 1.0], dtype=torch.float64)

    def f(t, y, args):
        return torch.tanh(y) @ M.T

    ctrl = nde.PIDController(rtol=1e-8, atol=1e-10)
    with torch.no_grad():
        batch = nde.solve(f, RadauIIA5(), 0.0, t1, y0, controller=ctrl, batch_mode="independent")
        for i in range(3):
            single = nde.solve(f, RadauIIA5(), 0.0, float(t1[i]), y0[i], controller=ctrl)
            torch.testing.assert_close(batch.ys[-1][i], single.ys[-1], rtol=0, atol=1e-9)
