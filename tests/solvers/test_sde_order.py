"""Strong orders of the SDE solvers (fitted over a batch of Brownian samples) and weak order of Euler--Maruyama."""

import math

import numpy as np
import pytest
import torch

import nde
from nde import BrownianInterval, ControlTerm, MultiTerm, ODETerm
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


def _slope(hs, errs):
    return float(np.polyfit(np.log(hs), np.log(errs), 1)[0])


def _final(terms, solver, y0, h):
    return nde.solve(terms, solver, 0.0, 1.0, y0, dt0=h).ys[-1]


def _gbm(noise, n=128, seed=0, levy="none", finest=2**-9):
    d = 2
    m = 1 if noise == "scalar" else d
    bm = BrownianInterval(0.0, 1.0, (n, m), seed=seed, dtype=DT, dt=finest, levy_area=levy)
    if noise == "scalar":
        g = ControlTerm(lambda t, y: SIG * y.unsqueeze(-1), bm, noise="scalar")
    else:
        g = ControlTerm(lambda t, y: SIG * y, bm, noise="diagonal")
    terms = MultiTerm(ODETerm(lambda t, y: MU * y), g)
    y0 = torch.ones(n, d, dtype=DT)
    w = bm.evaluate(0.0, 1.0)
    ito = torch.exp((MU - SIG**2 / 2) + SIG * w)
    strat = torch.exp(MU + SIG * w)
    return terms, y0, ito, strat


COMMUTATIVE = [
    (S.EulerMaruyama(), "ito", 0.5),
    (S.Milstein(), "ito", 1.0),
    (S.Milstein(derivative_free=True), "ito", 1.0),
    (S.Milstein("stratonovich"), "stratonovich", 1.0),
    (S.Milstein("stratonovich", derivative_free=True), "stratonovich", 1.0),
    (S.EulerHeun(), "stratonovich", 1.0),
    (S.Heun(), "stratonovich", 1.0),
    (S.Midpoint(), "stratonovich", 1.0),
    (S.SRID2(), "ito", 1.5),
]


@pytest.mark.parametrize("noise", ["diagonal", "scalar"])
@pytest.mark.parametrize("solver,kind,order", COMMUTATIVE, ids=lambda x: repr(x) if not isinstance(x, (str, float)) else None)
def test_strong_order_commutative_noise_against_exact_solution(solver, kind, order, noise):
    terms, y0, ito, strat = _gbm(noise, levy="space-time" if isinstance(solver, S.SRID2) else "none")
    exact = ito if kind == "ito" else strat
    assert solver.sde_type == kind
    assert solver.strong_order_for(noise) == order
    hs = [2.0**-k for k in range(3, 9)]
    errs = [(_final(terms, solver, y0, h) - exact).abs().mean().item() for h in hs]
    assert abs(_slope(hs, errs) - order) < 0.2, errs


@pytest.fixture(scope="module")
def additive_problem():
    n, d, m = 128, 2, 3
    G = torch.tensor([[0.5, 0.2, -0.3], [0.1, 0.4, 0.3]], dtype=DT)
    bm = BrownianInterval(0.0, 1.0, (n, m), seed=1, dtype=DT, dt=2**-10, levy_area="space-time")
    terms = MultiTerm(
        ODETerm(lambda t, y: torch.sin(y) - 0.5 * y**3 / (1 + y**2)),
        ControlTerm(lambda t, y: G.expand(y.shape[0], d, m), bm, noise="additive"),
    )
    y0 = torch.ones(n, d, dtype=DT)
    ref = _final(terms, S.SRA1(), y0, 2**-10)
    return terms, y0, ref


@pytest.mark.parametrize(
    "solver,order",
    [(S.EulerMaruyama(), 1.0), (S.Milstein(), 1.0), (S.Heun(), 1.0), (S.EulerHeun(), 1.0), (S.Midpoint(), 1.0),
     (S.SRA1(), 1.5), (S.ShARK(), 1.5), (S.SRID2(), 1.5)],
    ids=repr,
)
def test_strong_order_additive_noise(additive_problem, solver, order):
    terms, y0, ref = additive_problem
    assert solver.strong_order_for("additive") == order
    hs = [2.0**-k for k in range(2, 7)]
    errs = [(_final(terms, solver, y0, h) - ref).abs().mean().item() for h in hs]
    assert abs(_slope(hs, errs) - order) < 0.2, errs


def _general_terms(n=128):
    bm = BrownianInterval(0.0, 1.0, (n, 2), seed=2, dtype=DT, dt=2**-10)

    def g(t, y):
        # strongly non-commutative noise, so that the Lévy-area error (order 0.5) dominates
        row0 = torch.stack([0.8 * torch.cos(y[:, 1]), 0.48 * y[:, 0]], -1)
        row1 = torch.stack([0.32 * torch.sin(y[:, 0]), 0.64 + 0 * y[:, 0]], -1)
        return torch.stack([row0, row1], -2)

    terms = MultiTerm(ODETerm(lambda t, y: -0.2 * y), ControlTerm(g, bm))
    return terms, torch.ones(n, 2, dtype=DT)


@pytest.fixture(scope="module")
def general_problem():
    terms, y0 = _general_terms()
    refs = {"ito": _final(terms, S.EulerMaruyama(), y0, 2**-10), "stratonovich": _final(terms, S.Heun(), y0, 2**-10)}
    return terms, y0, refs


@pytest.mark.parametrize("solver", [S.EulerMaruyama(), S.Heun(), S.EulerHeun(), S.Midpoint()], ids=repr)
def test_strong_order_general_noise(general_problem, solver):
    terms, y0, refs = general_problem
    ref = refs[solver.sde_type]
    hs = [2.0**-k for k in range(2, 7)]
    errs = [(_final(terms, solver, y0, h) - ref).abs().mean().item() for h in hs]
    assert solver.strong_order == 0.5
    assert abs(_slope(hs, errs) - 0.5) < 0.2, errs


def test_weak_order_euler_maruyama_on_gbm():
    # E[y_h] - E[y] estimated with the exact solution on the same paths as a control variate
    terms, y0, ito, _ = _gbm("diagonal", n=4000, seed=3, finest=2**-6)
    hs = [2.0**-k for k in range(2, 7)]
    e1, e2 = [], []
    for h in hs:
        y = _final(terms, S.EulerMaruyama(), y0, h)
        e1.append(abs((y - ito).mean().item()))
        e2.append(abs((y**2 - ito**2).mean().item()))
        # the exact moments of the scheme: E[y_h] = (1 + mu h)^n, E[y_h^2] = ((1 + mu h)^2 + sig^2 h)^n
        n = round(1 / h)
        assert abs(y.mean().item() - (1 + MU * h) ** n) < 4 * y.std().item() / math.sqrt(y.numel())
    assert abs(_slope(hs, e1) - 1.0) < 0.2, e1
    assert abs(_slope(hs, e2) - 1.0) < 0.2, e2
    # and the moments converge to the exact ones
    assert abs(math.exp(MU) - (1 + MU * hs[-1]) ** round(1 / hs[-1])) < 0.05


def test_wrong_noise_structures_are_reported():
    terms, y0, _, _ = _gbm("diagonal", n=4)
    with pytest.raises(ValueError, match="additive"):
        _final(terms, S.SRA1(), y0, 0.1)
    gterms, gy0 = _general_terms(4)
    with pytest.raises(ValueError, match="diagonal, scalar or additive"):
        _final(gterms, S.Milstein(), gy0, 0.1)
    bm = BrownianInterval(0.0, 1.0, (4, 2), seed=0, dtype=DT)
    add = MultiTerm(ODETerm(lambda t, y: -y), ControlTerm(lambda t, y: torch.ones_like(y), bm, noise="additive"))
    with pytest.raises(ValueError, match="space-time"):
        _final(add, S.ShARK(), torch.ones(4, 2, dtype=DT), 0.1)
    with pytest.raises(ValueError, match="sde_type"):
        S.Milstein("backward")
    bm = BrownianInterval(0.0, 1.0, (4, 2), seed=0, dtype=DT)
    ito_term = MultiTerm(ODETerm(lambda t, y: -y), ControlTerm(lambda t, y: y, bm, noise="diagonal", sde_type="ito"))
    y4 = torch.ones(4, 2, dtype=DT)
    for strat in (S.Heun(), S.Midpoint(), S.EulerHeun(), S.Milstein("stratonovich"), S.StepDoubling(S.Heun())):
        with pytest.raises(ValueError, match="declared 'ito'"):
            _final(ito_term, strat, y4, 0.1)
    _final(ito_term, S.EulerMaruyama(), y4, 0.1)  # matching interpretation is fine
    with pytest.raises(ValueError, match="sde_type"):
        ControlTerm(lambda t, y: y, bm, sde_type="backward")
    with pytest.raises(ValueError, match="one diffusion term"):
        _final(MultiTerm(ODETerm(lambda t, y: -y)), S.Milstein(), gy0, 0.1)


def test_heun_and_midpoint_still_solve_odes():
    y0 = torch.tensor([1.0], dtype=DT)
    for solver in (S.Heun(), S.Midpoint()):
        errs = [abs(nde.solve(ODETerm(lambda t, y: -y), solver, 0.0, 1.0, y0, dt0=h).ys[-1].item() - math.exp(-1))
                for h in (0.1, 0.05, 0.025)]
        assert abs(_slope([0.1, 0.05, 0.025], errs) - 2.0) < 0.2


@pytest.mark.parametrize("solver", [S.SRA1(), S.ShARK(), S.SRID2(), S.Milstein(), S.EulerMaruyama(), S.Heun(),
                                    S.EulerHeun(), S.Midpoint()], ids=repr)
def test_pure_diffusion_sums_the_increments(solver):
    # dy = dW (no drift term): every method returns W(1) - W(0), forwards and backwards in time
    bm = BrownianInterval(0.0, 1.0, (4, 2), seed=0, dtype=DT, levy_area="space-time", dt=0.1)
    additive = isinstance(solver, (S.SRA1, S.ShARK))
    g = (lambda t, y: torch.diag_embed(torch.ones_like(y))) if additive else (lambda t, y: torch.ones_like(y))
    term = ControlTerm(g, bm, noise="additive" if additive else "diagonal")
    y = nde.solve(term, solver, 0.0, 1.0, torch.zeros(4, 2, dtype=DT), dt0=0.1).ys[-1]
    torch.testing.assert_close(y, bm.evaluate(0.0, 1.0), rtol=0, atol=1e-12)
    y = nde.solve(term, solver, 1.0, 0.0, torch.zeros(4, 2, dtype=DT), dt0=-0.1).ys[-1]
    torch.testing.assert_close(y, bm.evaluate(1.0, 0.0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("levy", ["davie", "foster"])
def test_log_ode_midpoint_general_noise(levy):
    # the Lévy-area term: strong order 1/2 (the area is approximated) with a smaller error than midpoint's
    n = 128
    bm = BrownianInterval(0.0, 1.0, (n, 2), seed=2, dtype=DT, dt=2**-10, levy_area=levy)
    terms, y0 = _general_terms(n)
    terms = MultiTerm(terms.terms[0], ControlTerm(terms.terms[1].vector_field, bm))
    ref = _final(terms, S.Heun(), y0, 2**-10)
    hs = [2.0**-k for k in range(2, 7)]
    errs = [(_final(terms, S.LogODEMidpoint(), y0, h) - ref).abs().mean().item() for h in hs]
    mid = (_final(terms, S.Midpoint(), y0, hs[-1]) - ref).abs().mean().item()
    solver = S.LogODEMidpoint()
    assert solver.sde_type == "stratonovich" and solver.strong_order_for("general") == 0.5
    assert abs(_slope(hs, errs) - 0.5) < 0.2, errs  # measured 0.58
    assert errs[-1] < 0.9 * mid, (errs[-1], mid)  # measured 0.0121 against 0.0156


def test_log_ode_midpoint_is_midpoint_for_commutative_noise():
    terms, y0, _, _ = _gbm("diagonal", n=8)
    a = _final(terms, S.LogODEMidpoint(), y0, 0.1)
    b = _final(terms, S.Midpoint(), y0, 0.1)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    gterms, gy0 = _general_terms(4)  # a Brownian motion without space-space area is refused
    with pytest.raises(ValueError, match="davie"):
        _final(gterms, S.LogODEMidpoint(), gy0, 0.1)


@pytest.mark.parametrize("adjoint", [nde.CheckpointAdjoint(), nde.BacksolveAdjoint()], ids=repr)
def test_milstein_keeps_its_derivative_term_inside_adjoints(adjoint):
    # adjoints run the forward solve inside an autograd Function, where forward-mode AD is off: the
    # Milstein term (dg/dy) g computed by forward-mode AD silently vanished there
    bm = BrownianInterval(0.0, 1.0, (8, 1), seed=0, dtype=DT, dt=0.1)
    lin = torch.nn.Linear(2, 2).double()
    terms = MultiTerm(ODETerm(lambda t, y: -y),
                      ControlTerm(lambda t, y: torch.sin(lin(y)).unsqueeze(-1), bm, noise="scalar"))
    y0 = torch.ones(8, 2, dtype=DT, requires_grad=True)
    solver = S.Milstein("stratonovich") if isinstance(adjoint, nde.BacksolveAdjoint) else S.Milstein()
    try:
        a = nde.solve(terms, solver, 0.0, 1.0, y0, dt0=0.1, adjoint=adjoint).ys[-1]
    except ValueError:
        pytest.skip("this adjoint does not take Milstein")
    b = nde.solve(terms, solver, 0.0, 1.0, y0, dt0=0.1).ys[-1]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
