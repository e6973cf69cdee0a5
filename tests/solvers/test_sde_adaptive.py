"""Adaptive SDE stepping (step doubling, ShARK's embedded estimate) and reversible Heun on SDEs."""

import math

import numpy as np
import pytest
import torch

import nde
from nde import BrownianInterval, ControlTerm, MultiTerm, ODETerm, PIDController, SaveAt
from nde.solvers import ReversibleHeun
from nde.solvers import sde as S


@pytest.fixture(autouse=True)
def _one_thread():
    # small tensors: one thread avoids oversubscription when the suite runs in parallel
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


DT = torch.float64
MU, SIG = 1.0, 0.5


def _gbm(n=32, seed=0, dt=None):
    bm = BrownianInterval(0.0, 1.0, (n, 2), seed=seed, dtype=DT, dt=dt)
    terms = MultiTerm(ODETerm(lambda t, y: MU * y), ControlTerm(lambda t, y: SIG * y, bm, noise="diagonal"))
    w = bm.evaluate(0.0, 1.0)
    return terms, torch.ones(n, 2, dtype=DT), torch.exp(MU + SIG * w), torch.exp(MU - SIG**2 / 2 + SIG * w)


@pytest.mark.parametrize("solver", [S.StepDoubling(S.Heun()), S.Heun(), S.StepDoubling(S.Milstein("stratonovich", True))],
                         ids=repr)
def test_adaptive_converges_as_tolerance_shrinks(solver):
    terms, y0, strat, _ = _gbm()
    errs, steps = [], []
    for tol in (1e-2, 1e-3):
        sol = nde.solve(terms, solver, 0.0, 1.0, y0, dt0=0.05, controller=PIDController(rtol=tol, atol=tol))
        errs.append((sol.ys[-1] - strat).abs().mean().item())
        steps.append(sol.stats["num_accepted_steps"])
    assert errs[1] < 0.5 * errs[0]
    assert steps[1] > steps[0]


def test_rejected_steps_see_the_same_brownian_path():
    # replaying the accepted steps with the same solver reproduces the adaptive solution exactly,
    # although the adaptive solve also queried (and rejected) other intervals
    terms, y0, strat, _ = _gbm()
    solver = S.StepDoubling(S.Heun())
    sol = nde.solve(terms, solver, 0.0, 1.0, y0, dt0=0.3, controller=PIDController(rtol=1e-3, atol=1e-3),
                    saveat=SaveAt(steps=True))
    assert sol.stats["num_rejected_steps"] > 0
    ts = [0.0] + sol.ts.tolist()
    y = y0
    for a, b in zip(ts[:-1], ts[1:]):
        y = solver.step(terms, a, b, y, None, None)[0]
    torch.testing.assert_close(y, sol.ys[-1], rtol=0, atol=1e-12)


def test_independent_batch_mode():
    terms, y0, strat, _ = _gbm(n=16)
    ctrl = PIDController(rtol=1e-3, atol=1e-3)
    sol = nde.solve(terms, S.StepDoubling(S.Heun()), 0.0, 1.0, y0, dt0=0.05, controller=ctrl, batch_mode="independent")
    steps = sol.stats["num_steps"]
    assert steps.shape == (16,) and int(steps.max()) > int(steps.min())
    assert (sol.ys[-1] - strat).abs().mean().item() < 0.05
    # with constant steps, independent and joint modes take the same steps on the same path
    terms, y0, _, _ = _gbm(n=8, dt=0.05)
    a = nde.solve(terms, S.EulerMaruyama(), 0.0, 1.0, y0, dt0=0.05).ys[-1]
    b = nde.solve(terms, S.EulerMaruyama(), 0.0, 1.0, y0, dt0=0.05, batch_mode="independent").ys[-1]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_shark_adaptive_additive_noise():
    n = 32
    bm = BrownianInterval(0.0, 1.0, (n, 2), seed=4, dtype=DT, levy_area="space-time", dt=2**-10)
    terms = MultiTerm(ODETerm(lambda t, y: torch.sin(3 * y) - y),
                      ControlTerm(lambda t, y: 0.3 * torch.diag_embed(torch.ones_like(y)), bm, noise="additive"))
    y0 = torch.full((n, 2), 0.5, dtype=DT)
    ref = nde.solve(terms, S.ShARK(), 0.0, 1.0, y0, dt0=2**-10).ys[-1]
    errs = []
    for tol in (1e-3, 1e-5):
        sol = nde.solve(terms, S.ShARK(), 0.0, 1.0, y0, dt0=0.1, controller=PIDController(rtol=tol, atol=tol))
        errs.append((sol.ys[-1] - ref).abs().max().item())
    assert errs[1] < 0.1 * errs[0] and errs[1] < 1e-4


# ---- reversible Heun on SDEs ------------------------------------------------------------------
def _nn_sde(n=32, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(2, 2).double()
    bm = BrownianInterval(0.0, 1.0, (n, 2), seed=seed, dtype=DT, dt=2**-6)
    terms = MultiTerm(ODETerm(lambda t, y: torch.tanh(lin(y))),
                      ControlTerm(lambda t, y: 0.3 * torch.sin(y), bm, noise="diagonal"))
    return terms, lin


def test_reversible_heun_reconstructs_states_backwards():
    terms, _ = _nn_sde()
    solver = ReversibleHeun()
    y = torch.randn(32, 2, dtype=DT)
    ts = [i * 2**-6 for i in range(65)]
    state = solver.init(terms, ts[0], ts[1], y, None)[0]
    ys, states = [y], [state]
    for a, b in zip(ts[:-1], ts[1:]):
        y, _, _, state, _ = solver.step(terms, a, b, y, None, state)
        ys.append(y)
        states.append(state)
    for i in range(64, 0, -1):
        y, state, _ = solver.reverse_step(terms, ts[i - 1], ts[i], y, None, state)
        assert (y - ys[i - 1]).abs().max().item() <= 1e-10
    assert (state[0] - states[0][0]).abs().max().item() <= 1e-10


def test_reversible_adjoint_gradients_equal_direct_on_sde():
    terms, lin = _nn_sde()
    y0 = torch.randn(32, 2, dtype=DT, requires_grad=True)
    grads = []
    for adj in (nde.DirectAdjoint(), nde.ReversibleAdjoint()):
        sol = nde.solve(terms, ReversibleHeun(), 0.0, 1.0, y0, dt0=2**-6, adjoint=adj)
        grads.append(torch.autograd.grad((sol.ys[-1] ** 2).sum(), [y0, *lin.parameters()]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_reversible_heun_strong_order():
    terms, y0, strat, _ = _gbm(n=128, dt=2**-9)
    hs = [2.0**-k for k in range(3, 9)]
    errs = [(nde.solve(terms, ReversibleHeun(), 0.0, 1.0, y0, dt0=h).ys[-1] - strat).abs().mean().item() for h in hs]
    slope = float(np.polyfit(np.log(hs), np.log(errs), 1)[0])
    # commutative (diagonal) noise: order 1, like the other Stratonovich Heun-type methods
    assert abs(slope - 1.0) < 0.2, (slope, errs)


def test_reversible_heun_strong_order_additive_and_general_noise():
    import sys
    import pathlib

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from test_sde_order import _final, _general_terms, _slope

    n = 128
    G = torch.tensor([[0.5, 0.2, -0.3], [0.1, 0.4, 0.3]], dtype=DT)
    bm = BrownianInterval(0.0, 1.0, (n, 3), seed=1, dtype=DT, dt=2**-10, levy_area="space-time")
    add = MultiTerm(ODETerm(lambda t, y: torch.sin(y) - 0.5 * y**3 / (1 + y**2)),
                    ControlTerm(lambda t, y: G.expand(y.shape[0], 2, 3), bm, noise="additive"))
    y0 = torch.ones(n, 2, dtype=DT)
    ref = _final(add, S.SRA1(), y0, 2**-10)
    hs = [2.0**-k for k in range(2, 7)]
    errs = [(_final(add, ReversibleHeun(), y0, h) - ref).abs().mean().item() for h in hs]
    assert abs(_slope(hs, errs) - 1.0) < 0.2, errs
    gen, gy0 = _general_terms()
    ref = _final(gen, S.Heun(), gy0, 2**-10)
    errs = [(_final(gen, ReversibleHeun(), gy0, h) - ref).abs().mean().item() for h in hs]
    assert abs(_slope(hs, errs) - 0.5) < 0.2, errs


def test_reversible_heun_declares_stratonovich_and_refuses_ito_terms():
    solver = ReversibleHeun()
    assert solver.sde_type == "stratonovich" and solver.strong_order == 0.5
    assert {n: solver.strong_order_for(n) for n in ("general", "diagonal", "scalar", "additive")} == {
        "general": 0.5, "diagonal": 1.0, "scalar": 1.0, "additive": 1.0}
    bm = BrownianInterval(0.0, 1.0, (4, 2), seed=0, dtype=DT, dt=0.1)
    ito = MultiTerm(ODETerm(lambda t, y: -y), ControlTerm(lambda t, y: 0.5 * y, bm, noise="diagonal", sde_type="ito"))
    with pytest.raises(ValueError, match="declared 'ito'.*ReversibleHeun"):
        nde.solve(ito, ReversibleHeun(), 0.0, 1.0, torch.ones(4, 2, dtype=DT), dt0=0.1)
    strat = MultiTerm(ODETerm(lambda t, y: -y),
                      ControlTerm(lambda t, y: 0.5 * y, bm, noise="diagonal", sde_type="stratonovich"))
    nde.solve(strat, ReversibleHeun(), 0.0, 1.0, torch.ones(4, 2, dtype=DT), dt0=0.1)
    # ODEs are unaffected
    nde.solve(ODETerm(lambda t, y: -y), ReversibleHeun(), 0.0, 1.0, torch.ones(2, dtype=DT), dt0=0.1)


def test_reversible_heun_strong_order_scalar_noise():
    # Stratonovich GBM driven by one Brownian channel: y = exp(mu t + sig W) in both components
    n = 128
    bm = BrownianInterval(0.0, 1.0, (n, 1), seed=5, dtype=DT, dt=2**-8)
    terms = MultiTerm(ODETerm(lambda t, y: MU * y),
                      ControlTerm(lambda t, y: SIG * y.unsqueeze(-1), bm, noise="scalar"))
    exact = torch.exp(MU + SIG * bm.evaluate(0.0, 1.0)).expand(n, 2)
    hs = [2.0**-k for k in range(3, 8)]
    errs = [(nde.solve(terms, ReversibleHeun(), 0.0, 1.0, torch.ones(n, 2, dtype=DT), dt0=h).ys[-1] - exact)
            .abs().mean().item() for h in hs]
    slope = float(np.polyfit(np.log(hs), np.log(errs), 1)[0])
    assert abs(slope - ReversibleHeun().strong_order_for("scalar")) < 0.2, (slope, errs)


@pytest.mark.parametrize("base,order", [(S.Heun(), 1.0), (S.EulerMaruyama(), 0.5)], ids=repr)
def test_step_doubling_orders(base, order):
    # with constant steps h, StepDoubling takes two steps of h/2: the base method's strong order; its error
    # estimate over one step is O(h^(order + 1/2)), the local error of a method of that strong order
    terms, y0, strat, ito = _gbm(n=128, dt=2**-9)
    exact = strat if base.sde_type == "stratonovich" else ito
    solver = S.StepDoubling(base)
    hs = [2.0**-k for k in range(2, 8)]
    errs = [(nde.solve(terms, solver, 0.0, 1.0, y0, dt0=h).ys[-1] - exact).abs().mean().item() for h in hs]
    ests = [solver.step(terms, 0.0, h, y0, None, None)[1].abs().mean().item() for h in hs]
    assert abs(float(np.polyfit(np.log(hs), np.log(errs), 1)[0]) - order) < 0.2, errs
    est_slope = float(np.polyfit(np.log(hs), np.log(ests), 1)[0])
    # at least the declared error order; Heun on this linear SDE does better than h^1.5 (measured 1.8)
    assert est_slope > solver.error_order - 0.2 and est_slope > order + 0.5 - 0.2, ests
    if isinstance(base, S.EulerMaruyama):
        assert abs(est_slope - (order + 0.5)) < 0.2, ests
    half = nde.solve(terms, base, 0.0, 1.0, y0, dt0=hs[2] / 2).ys[-1]
    torch.testing.assert_close(nde.solve(terms, solver, 0.0, 1.0, y0, dt0=hs[2]).ys[-1], half, rtol=0, atol=1e-12)
