"""Adams--Bashforth--Moulton solvers: convergence orders, agreement with torchdiffeq's methods of the same
name, non-uniform last steps, dense output and gradients."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import nde
from nde.solvers.adams import AdamsBashforthMoulton, ExplicitAdams, FixedAdams, ImplicitAdams, _uniform_coefficients

A = torch.tensor([[-0.4, 1.0, 0.0], [-1.0, -0.4, 0.3], [0.0, -0.3, -0.2]], dtype=torch.float64)
Y0 = torch.tensor([1.0, 0.5, -0.7], dtype=torch.float64)
T1 = 2.0
K = 2.0
C = torch.tensor([0.2, 0.5, 0.7, 0.9], dtype=torch.float64)


def f_linear(t, y, args=None):
    return y @ A.T


def f_logistic(t, y, args=None):
    return K * y * (1 - y)


def exact_linear(t):
    return torch.linalg.matrix_exp(A * t) @ Y0


def exact_logistic(t):
    e = math.exp(K * t)
    return C * e / (1 - C + C * e)


def _order(ns, errs):
    return -np.polyfit(np.log(ns), np.log(errs), 1)[0]


def test_coefficients_are_the_classical_ones():
    # AB4: (55, -59, 37, -9)/24; AM4 (three-step, order 4): (9, 19, -5, 1)/24; every set sums to 1
    np.testing.assert_allclose(_uniform_coefficients(4, False), np.array([55, -59, 37, -9]) / 24, rtol=1e-15)
    np.testing.assert_allclose(_uniform_coefficients(4, True), np.array([9, 19, -5, 1]) / 24, rtol=1e-15)
    for k in range(1, 13):
        assert abs(sum(_uniform_coefficients(k, False)) - 1) < 1e-12
        assert abs(sum(_uniform_coefficients(k, True)) - 1) < 1e-12
    assert Fraction(_uniform_coefficients(2, True)[0]).limit_denominator(10) == Fraction(1, 2)


# explicit: the AB3 start-up step limits the order to 4; implicit with a converged corrector: 5
ORDER_CASES = [
    ("explicit", lambda: ExplicitAdams(max_order=5), 4, [32, 64, 128, 256]),
    ("implicit", lambda: ImplicitAdams(max_order=5, rtol=1e-13, atol=1e-15, max_iters=30), 5, [64, 96, 128, 192]),
]


@pytest.mark.parametrize("name,make,order,ns", ORDER_CASES, ids=[c[0] for c in ORDER_CASES])
def test_convergence_order(name, make, order, ns):
    for f, y0, exact in ((f_linear, Y0, exact_linear(T1)), (f_logistic, C, exact_logistic(T1))):
        errs = []
        for n in ns:
            sol = nde.solve(f, make(), 0.0, T1, y0, dt0=T1 / n)
            assert sol.stats["num_steps"] == n
            errs.append((sol.ys[-1] - exact).abs().max().item())
        assert min(errs) > 1e-14, errs
        p = _order(ns, errs)
        assert abs(p - order) <= 0.3, (f.__name__, p, errs)
    assert make().order == order


@pytest.mark.parametrize("name,cls", [("explicit_adams", ExplicitAdams), ("implicit_adams", ImplicitAdams),
                                      ("fixed_adams", FixedAdams)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_agrees_with_torchdiffeq(name, cls, dtype):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    y0 = Y0.to(dtype)
    Ad = A.to(dtype)
    # with a history of 11 values explicit Adams is unstable for these steps (|h lambda| = 0.05): rounding
    # differences grow, so in float32 it is compared only over the first steps
    t_end = 0.5 if (dtype == torch.float32 and cls is ExplicitAdams) else T1
    ts = torch.linspace(0, t_end, 6 if t_end < 1 else 11, dtype=dtype)  # on the grid of steps
    ref = torchdiffeq.odeint(lambda t, y: y @ Ad.T, y0, ts, method=name, options=dict(step_size=0.05))
    sol = nde.solve(lambda t, y: y @ Ad.T, cls(), 0.0, t_end, y0, dt0=0.05, saveat=nde.SaveAt(ts=ts))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(sol.ys, ref, rtol=tol, atol=tol)
    # nfe: one evaluation a step plus the start-up and corrector iterations, like torchdiffeq
    assert sol.stats["nfe"] <= 40 * (5 if cls is not ExplicitAdams else 1) + 10


def test_non_uniform_last_step_keeps_the_order():
    # t1 = 2 is not a multiple of dt: the shortened last step gets coefficients for its own nodes
    errs, ns = [], [40, 80, 160]
    for n in ns:
        dt = T1 / (n + 0.5)
        sol = nde.solve(f_linear, ExplicitAdams(max_order=5), 0.0, T1, Y0, dt0=dt)
        errs.append((sol.ys[-1] - exact_linear(T1)).abs().max().item())
    assert abs(_order(ns, errs) - 4) <= 0.3, errs


def test_dense_output_and_reuse_of_f1():
    ts = torch.linspace(0.03, T1, 17, dtype=torch.float64)
    sol = nde.solve(f_linear, ImplicitAdams(), 0.0, T1, Y0, dt0=T1 / 64, saveat=nde.SaveAt(ts=ts))
    ex = torch.stack([exact_linear(float(t)) for t in ts])
    assert (sol.ys - ex).abs().max() < 1e-7
    plain = nde.solve(f_linear, ImplicitAdams(), 0.0, T1, Y0, dt0=T1 / 64)
    # f(t1, y1) evaluated for the interpolation is handed to the next step: no extra evaluations
    assert sol.stats["nfe"] <= plain.stats["nfe"] + 1


def test_gradcheck():
    def run(y0, theta):
        return nde.solve(lambda t, y, a: -a * y**3 + torch.sin(y), ImplicitAdams(max_iters=10), 0.0, 1.0, y0, args=theta,
                         dt0=0.1).ys[-1]

    y0 = torch.tensor([0.7, -0.4], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(run, (y0, theta), atol=1e-7, rtol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="max_order"):
        AdamsBashforthMoulton(max_order=20)
    with pytest.raises(ValueError, match="max_iters"):
        ImplicitAdams(max_iters=0)
    with pytest.raises(ValueError, match="fixed steps"):
        nde.solve(f_linear, ImplicitAdams(), 0.0, 1.0, Y0)


def test_adaptive_adams_accuracy_and_cost():
    from nde.solvers import Dopri5
    from nde.solvers.adams import AdaptiveAdams

    ctrl = nde.PIDController(rtol=1e-9, atol=1e-11)
    t1 = 10.0
    sol = nde.solve(f_linear, AdaptiveAdams(), 0.0, t1, Y0, controller=ctrl)
    ref = nde.solve(f_linear, Dopri5(), 0.0, t1, Y0, controller=ctrl)
    err = (sol.ys[-1] - exact_linear(t1)).abs().max().item()
    assert err < 1e-9, err
    # two evaluations a step: a third of Dopri5's evaluations at this tolerance (measured 362 vs 1089)
    assert sol.stats["nfe"] < 0.5 * ref.stats["nfe"], (sol.stats, ref.stats)
    # the embedded estimate shrinks like dt^order once the history is full
    s, term = AdaptiveAdams(order=5), nde.ODETerm(f_logistic)
    errs = []
    for h in (0.02, 0.01):
        st, _ = s.init(term, 0.0, h, C, None)
        t = 0.0
        for _ in range(6):  # fill the history with steps of size h
            y1, e, _, st, _ = s.step(term, t, t + h, C if t == 0.0 else y, None, st)
            y, t = y1, t + h
        errs.append(e.abs().max().item())
    q = math.log(errs[0] / errs[1]) / math.log(2)
    assert abs(q - 5) <= 0.35, q


def test_adaptive_adams_gradcheck():
    from nde.solvers.adams import AdaptiveAdams

    def run(y0, theta):
        return nde.solve(lambda t, y, a: -a * y**3 + torch.sin(y), AdaptiveAdams(order=4), 0.0, 1.0, y0, args=theta,
                         dt0=0.05, controller=nde.ConstantStepSize()).ys[-1]

    y0 = torch.tensor([0.7, -0.4], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(run, (y0, theta), atol=1e-7, rtol=1e-6)


def test_adaptive_adams_independent_batch_matches_per_sample_solves():
    from nde.solvers.adams import AdaptiveAdams

    rates = torch.tensor([[1.0], [3.0], [10.0], [0.5]], dtype=torch.float64)
    y0 = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7, 0.8]], dtype=torch.float64)
    t1 = torch.tensor([0.5, 0.7, 0.9, 2.0], dtype=torch.float64)  # samples finish early: the batch is compacted

    def f(t, y, a):
        return a * y * (1 - y) + 0.1 * torch.cos(3 * t)

    ctrl = nde.PIDController(rtol=1e-8, atol=1e-10)
    batch = nde.solve(f, AdaptiveAdams(), 0.0, t1, y0, args=rates, controller=ctrl, dt0=0.01,
                      batch_mode="independent")
    for i in range(4):
        single = nde.solve(f, AdaptiveAdams(), 0.0, float(t1[i]), y0[i], args=rates[i], controller=ctrl, dt0=0.01)
        # coefficients come from a batched solve of the moment equations instead of exact Lagrange integrals
        torch.testing.assert_close(batch.ys[-1][i], single.ys[-1], rtol=0, atol=1e-9)
        assert int(batch.stats["num_steps"][i]) == single.stats["num_steps"]


@pytest.mark.parametrize("cls", [ImplicitAdams, ExplicitAdams], ids=lambda c: c.__name__)
def test_fixed_adams_independent_batch_matches_per_sample_solves(cls):
    # per-sample histories; samples end at different times (shortened last steps, then dt = 0)
    y0 = torch.randn(4, 3, dtype=torch.float64)
    t1 = torch.tensor([1.0, 1.33, 2.0, 2.0], dtype=torch.float64)

    def f(t, y, args):
        return y @ A.T + 0.1 * torch.cos(t)

    make = (lambda: cls(max_order=6)) if cls is ExplicitAdams else cls
    batch = nde.solve(f, make(), 0.0, t1, y0, dt0=0.05, batch_mode="independent")
    for i in range(4):
        single = nde.solve(f, make(), 0.0, float(t1[i]), y0[i], dt0=0.05)
        # uniform steps use the same tabulated coefficients; the shortened last step's coefficients come
        # from a batched moment solve (11 nodes) instead of exact Lagrange integrals
        torch.testing.assert_close(batch.ys[-1][i], single.ys[-1], rtol=0, atol=1e-10)
        assert int(batch.stats["num_steps"][i]) == single.stats["num_steps"]
