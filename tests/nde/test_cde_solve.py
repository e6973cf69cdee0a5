import pytest
import torch

import nde
from nde.solvers.rk import RK4, RK38, Bosh3, Dopri5, Euler, Heun, Midpoint, Tsit5

torchcde = pytest.importorskip("torchcde")


@pytest.fixture(autouse=True)
def _one_thread():
    # small tensors: threads only add synchronisation (and stall badly on a loaded machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

D = torch.float64


class Field(torch.nn.Module):
    """A CDE vector field z -> (hidden x channels) matrix."""

    def __init__(self, hidden=3, channels=2, width=8):
        super().__init__()
        self.hidden, self.channels = hidden, channels
        self.net = torch.nn.Sequential(
            torch.nn.Linear(hidden, width), torch.nn.Tanh(), torch.nn.Linear(width, hidden * channels), torch.nn.Tanh()
        )

    def forward(self, t, z):
        return self.net(z).reshape(*z.shape[:-1], self.hidden, self.channels)


def _series(batch=4, length=12, channels=2, seed=0, dtype=D, missing=0.0):
    g = torch.Generator().manual_seed(seed)
    t = torch.sort(torch.rand(length, generator=g, dtype=dtype) * 6).values
    x = torch.cumsum(torch.randn(batch, length, channels - 1, generator=g, dtype=dtype) * 0.5, dim=1)
    if missing:
        x[torch.rand(x.shape, generator=g, dtype=dtype) < missing] = float("nan")
    x = torch.cat([t.expand(batch, length).unsqueeze(-1), x], dim=-1)  # time as a channel
    return x, t


def test_cde_agrees_with_torchcde_cdeint():
    x, t = _series(missing=0.2)
    f = Field().to(D)
    z0 = torch.randn(4, 3, dtype=D)
    for coeff_fn, cls in ((nde.natural_cubic_coeffs, nde.CubicSpline),
                          (nde.hermite_cubic_coefficients_with_backward_differences, nde.CubicSpline),
                          (nde.linear_interpolation_coeffs, nde.LinearInterpolation)):
        coeffs = coeff_fn(x, t)
        path = cls(coeffs, t)
        sol = nde.solve(nde.ControlTerm(f, path), Dopri5(), t[0], t[-1], z0, saveat=nde.SaveAt(ts=t),
                        controller=nde.PIDController(rtol=1e-10, atol=1e-10))
        theirs = torchcde.cdeint(getattr(torchcde, cls.__name__)(coeffs, t), f, z0, t, adjoint=False, method="dopri5",
                                 rtol=1e-10, atol=1e-10, options=dict(jump_t=t))
        torch.testing.assert_close(sol.ys.transpose(0, 1), theirs, rtol=1e-7, atol=1e-7)
        # every knot is the end of a step
        steps = nde.solve(nde.ControlTerm(f, path), Dopri5(), t[0], t[-1], z0, saveat=nde.SaveAt(steps=True),
                          controller=nde.PIDController(rtol=1e-6, atol=1e-6)).ts
        assert bool(torch.isin(t[1:], steps).all()), t[1:][~torch.isin(t[1:], steps)]


def test_fixed_steps_on_the_knots_match_torchcde_rk4():
    x, _ = _series(length=20)
    t = torch.arange(20, dtype=D)
    x[..., 0] = t
    coeffs = nde.hermite_cubic_coefficients_with_backward_differences(x, t)
    f = Field().to(D)
    z0 = torch.randn(4, 3, dtype=D)
    # torchdiffeq's "rk4" is Kutta's 3/8 rule
    sol = nde.solve(nde.ControlTerm(f, nde.CubicSpline(coeffs, t)), RK38(), 0.0, 19.0, z0, dt0=1.0)
    theirs = torchcde.cdeint(torchcde.CubicSpline(coeffs, t), f, z0, t[[0, -1]], adjoint=False, method="rk4",
                             options=dict(step_size=1.0))
    torch.testing.assert_close(sol.ys[-1], theirs[:, -1], rtol=1e-12, atol=1e-12)
    assert sol.stats["num_steps"] == 19


def test_control_by_time_reduces_to_the_ode():
    t = torch.linspace(0, 2, 7, dtype=D)
    path = nde.LinearInterpolation(t.unsqueeze(-1), t)  # X(t) = t
    g = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(D)
    z0 = torch.randn(5, 3, dtype=D)
    ts = torch.linspace(0, 2, 5, dtype=D)
    cde = nde.solve(nde.ControlTerm(lambda s, z: g(z).unsqueeze(-1), path), Tsit5(), 0.0, 2.0, z0,
                    saveat=nde.SaveAt(ts=ts), controller=nde.PIDController(rtol=1e-9, atol=1e-9))
    ode = nde.solve(nde.ODETerm(lambda s, z: g(z)), Tsit5(), 0.0, 2.0, z0, saveat=nde.SaveAt(ts=ts),
                    controller=nde.PIDController(rtol=1e-9, atol=1e-9))
    torch.testing.assert_close(cde.ys, ode.ys, rtol=1e-8, atol=1e-8)


def test_vf_prod_equals_the_matrix_form():
    x, t = _series()
    path = nde.CubicSpline(nde.natural_cubic_coeffs(x, t), t)
    f = Field().to(D)
    calls = []

    def prod(s, z, args, dxdt):
        calls.append(1)
        return (f(s, z) * dxdt.unsqueeze(-2)).sum(-1)

    z0 = torch.randn(4, 3, dtype=D)
    a = nde.solve(nde.ControlTerm(f, path), Tsit5(), t[0], t[-1], z0, controller=nde.PIDController(rtol=1e-8, atol=1e-8))
    b = nde.solve(nde.ControlTerm(f, path, vf_prod=prod), Tsit5(), t[0], t[-1], z0,
                  controller=nde.PIDController(rtol=1e-8, atol=1e-8))
    torch.testing.assert_close(a.ys, b.ys, rtol=1e-12, atol=1e-12)
    assert len(calls) == b.stats["nfe"]


@pytest.mark.parametrize("solver,order", [(Euler(), 1), (Heun(), 2), (Midpoint(), 2), (Bosh3(), 3), (RK4(), 4),
                                          (Dopri5(), 5), (Tsit5(), 5)])
def test_every_explicit_solver_converges_at_its_order_on_a_cde(solver, order):
    # a smooth control (one cubic piece) so that the order is not limited by the knots
    t = torch.tensor([0.0, 1.0], dtype=D)
    coeffs = torch.tensor([[[0.0, 0.0, 1.0, -0.5, 0.4, 0.8, 0.3, -0.6]]], dtype=D)  # a, b, 2c, 3d for 2 channels
    path = nde.CubicSpline(coeffs, t)
    A = torch.tensor([[[0.0, -1.0], [1.0, 0.0]], [[0.3, 0.0], [0.0, -0.2]]], dtype=D)

    def f(s, z):
        return torch.stack([torch.tanh(z) @ A[0].T, torch.sin(z) @ A[1].T], -1)

    z0 = torch.tensor([[0.4, -0.3]], dtype=D)
    term = nde.ControlTerm(f, path)
    ref = nde.solve(term, Dopri5(), 0.0, 1.0, z0, controller=nde.PIDController(rtol=1e-13, atol=1e-13)).ys[-1]
    errs = [float((nde.solve(term, solver, 0.0, 1.0, z0, dt0=1 / n).ys[-1] - ref).abs().max()) for n in (8, 16)]
    emp = torch.log2(torch.tensor(errs[0] / errs[1])).item()
    assert order - 0.3 < emp < order + 1.0, (errs, emp)


def test_independent_batch_mode_with_unequal_lengths():
    x, t = _series(batch=3, length=10)
    lengths = [10, 7, 4]
    for i, n in enumerate(lengths):
        x[i, n:] = float("nan")
    coeffs = nde.hermite_cubic_coefficients_with_backward_differences(x, t)
    path = nde.CubicSpline(coeffs, t)
    f = Field().to(D)
    z0 = torch.randn(3, 3, dtype=D)
    t1 = nde.last_observation_times(x, t)
    pid = nde.PIDController(rtol=1e-9, atol=1e-9)
    ind = nde.solve(nde.ControlTerm(f, path), Tsit5(), t[0], t1, z0, dt0=0.05, controller=pid, batch_mode="independent")
    for i, n in enumerate(lengths):
        single = nde.CubicSpline(nde.hermite_cubic_coefficients_with_backward_differences(x[i:i + 1, :n], t[:n]), t[:n])
        ref = nde.solve(nde.ControlTerm(f, single), Tsit5(), t[0], t[n - 1], z0[i:i + 1], controller=pid)
        torch.testing.assert_close(ind.ys[-1, i], ref.ys[-1, 0], rtol=1e-7, atol=1e-7)
    steps = ind.stats["num_steps"]
    assert steps[0] > steps[1] > steps[2]  # the short series stop early
    # joint mode on the padded batch: the state is constant after each series' end (one more Hermite piece)
    joint = nde.solve(nde.ControlTerm(f, path), Tsit5(), t[0], t[-1], z0, controller=pid,
                      saveat=nde.SaveAt(ts=t))
    for i, n in enumerate(lengths[1:], 1):
        torch.testing.assert_close(joint.ys[-1, i], joint.ys[n, i], rtol=1e-9, atol=1e-9)


def test_gradcheck_wrt_initial_state_parameters_and_data():
    x, t = _series(batch=2, length=5, missing=0.2)
    mask = ~torch.isnan(x)
    vals = x[mask].clone().requires_grad_(True)
    f = Field(hidden=2, width=4).to(D)
    params = list(f.parameters())
    z0 = torch.randn(2, 2, dtype=D, requires_grad=True)

    def run(z0, v, *ps):
        with torch.no_grad():
            for p, q in zip(params, ps):
                p.copy_(q)
        data = torch.full_like(x, float("nan")).masked_scatter(mask, v)
        path = nde.CubicSpline(nde.natural_cubic_coeffs(data, t), t)
        fp = lambda s, z: torch.func.functional_call(f, dict(zip([n for n, _ in f.named_parameters()], ps)), (s, z))  # noqa: E731
        return nde.solve(nde.ControlTerm(fp, path), RK4(), t[0], t[-1], z0, dt0=float(t[-1] - t[0]) / 4).ys[-1]

    ps = [p.detach().clone().requires_grad_(True) for p in params]
    assert torch.autograd.gradcheck(run, (z0, vals, *ps))


def test_float32_solve_and_clear_errors():
    x, t = _series(dtype=torch.float32)
    path = nde.CubicSpline(nde.natural_cubic_coeffs(x, t), t)
    f = Field()
    sol = nde.solve(nde.ControlTerm(f, path), Tsit5(), t[0], t[-1], torch.zeros(4, 3))
    assert sol.ys.dtype == torch.float32 and torch.isfinite(sol.ys).all()
    with pytest.raises((ValueError, TypeError)):
        nde.solve(nde.ControlTerm(Field(hidden=3, channels=5), path), Tsit5(), t[0], t[-1], torch.zeros(4, 3))
    with pytest.raises(TypeError, match="control"):
        nde.ControlTerm(f, torchcde.CubicSpline(torchcde.natural_cubic_coeffs(x, t), t))


@pytest.mark.parametrize("which", ["checkpoint", "backsolve", "reversible"])
def test_every_adjoint_matches_direct_backpropagation_on_a_cde(which):
    from nde.solvers import ReversibleHeun

    x, t = _series(batch=3, length=8)
    x = x.clone().requires_grad_(True)
    f = Field().to(D)
    z0 = torch.randn(3, 3, dtype=D, requires_grad=True)
    inputs = [z0, x, *f.parameters()]

    def grads(adjoint):
        path = nde.CubicSpline(nde.hermite_cubic_coefficients_with_backward_differences(x, t), t)
        term = nde.ControlTerm(f, path)
        if which == "reversible":
            sol = nde.solve(term, ReversibleHeun(), t[0], t[-1], z0, dt0=float(t[-1] - t[0]) / 40, adjoint=adjoint)
        elif which == "backsolve":
            sol = nde.solve(term, Tsit5(), t[0], t[-1], z0, adjoint=adjoint,
                            controller=nde.PIDController(rtol=1e-9, atol=1e-9))
        else:
            sol = nde.solve(term, RK4(), t[0], t[-1], z0, dt0=float(t[-1] - t[0]) / 40, adjoint=adjoint)
        return torch.autograd.grad(sol.ys[-1].pow(2).sum(), inputs)

    adjoint = {"checkpoint": lambda: nde.CheckpointAdjoint(), "backsolve": lambda: nde.BacksolveAdjoint(),
               "reversible": lambda: nde.ReversibleAdjoint()}[which]()
    tol = 5e-5 if which == "backsolve" else 1e-9  # backsolve: to its (forward rtol=1e-9) tolerance
    for a, b in zip(grads(adjoint), grads(nde.DirectAdjoint())):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("name,tol", [("Dopri8", 1e-6), pytest.param("Kvaerno5", 1e-4, marks=pytest.mark.slow), ("AdaptiveAdams", 1e-6)])
def test_other_adaptive_solvers_solve_cdes(name, tol):
    import nde.solvers as solvers

    cls = getattr(solvers, name, None)
    if cls is None:
        pytest.skip(f"nde.solvers.{name} is not available")
    x, t = _series(batch=3, length=8)
    path = nde.CubicSpline(nde.natural_cubic_coeffs(x, t), t, smooth=True)
    f = Field().to(D)
    z0 = torch.zeros(3, 3, dtype=D)
    ref = nde.solve(nde.ControlTerm(f, path), Tsit5(), t[0], t[-1], z0,
                    controller=nde.PIDController(rtol=1e-11, atol=1e-11)).ys[-1]
    sol = nde.solve(nde.ControlTerm(f, path), cls(), t[0], t[-1], z0, dt0=0.01,
                    controller=nde.PIDController(rtol=1e-8, atol=1e-8))
    torch.testing.assert_close(sol.ys[-1], ref, rtol=tol, atol=tol)


def _kinked(n=4, batch=2, seed=0):
    """A linear path with knots at 0.1 k: times that reversed time cannot reach exactly (-0.3 + 0.1 != -0.2)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([0.1 * k for k in range(n + 1)], dtype=D)
    x = torch.randn(batch, n + 1, 2, generator=g, dtype=D).cumsum(1)
    A = torch.randn(2, 3, 3, generator=g, dtype=D) * 0.4

    def f(s, z):
        return torch.stack([torch.tanh(z @ A[0]), torch.sin(z @ A[1])], -1)

    return t, x, f, torch.randn(batch, 3, generator=g, dtype=D)


def _order(errs):
    return torch.log2(torch.tensor(errs[:-1]) / torch.tensor(errs[1:])).mean().item()


def test_fixed_steps_keep_their_order_backwards_in_time_on_a_linear_path():
    t, x, f, z0 = _kinked()
    term = nde.ControlTerm(f, nde.LinearInterpolation(x, t))
    pid = nde.PIDController(rtol=1e-12, atol=1e-12)
    z1 = nde.solve(term, Tsit5(), 0.0, float(t[-1]), z0, controller=pid).ys[-1]
    back = nde.solve(term, Tsit5(), float(t[-1]), 0.0, z1, controller=pid).ys[-1]
    errs_f, errs_b = [], []
    for k in (2, 4, 8):
        fw = nde.solve(term, RK4(), 0.0, float(t[-1]), z0, dt0=0.1 / k).ys[-1]
        bw = nde.solve(term, RK4(), float(t[-1]), 0.0, z1, dt0=-0.1 / k).ys[-1]
        errs_f.append(float((fw - z1).abs().max()))
        errs_b.append(float((bw - back).abs().max()))
    assert 3.7 < _order(errs_f) < 4.5 and 3.7 < _order(errs_b) < 4.5, (errs_f, errs_b)


def test_fixed_steps_stop_on_the_knots_unless_told_otherwise():
    t, x, f, z0 = _kinked()
    term = nde.ControlTerm(f, nde.LinearInterpolation(x, t))
    for t0, t1, dt in ((0.0, float(t[-1]), 0.15), (float(t[-1]), 0.0, -0.15)):
        sol = nde.solve(term, RK4(), t0, t1, z0, dt0=dt, saveat=nde.SaveAt(steps=True))
        knots = t[1:] if t1 > t0 else t[:-1]
        assert bool(torch.isin(knots, sol.ts).all()), sol.ts  # the knots 0.1 and 0.2 ... are step ends
        grid = nde.solve(term, RK4(), t0, t1, z0, dt0=dt, saveat=nde.SaveAt(steps=True),
                         controller=nde.ConstantStepSize(land_on_jumps=False))
        assert grid.ts.numel() == 3  # 0.15, 0.3, 0.4 (or backwards): straight across the knots
        ind = nde.solve(term, RK4(), t0, t1, z0, dt0=dt, saveat=nde.SaveAt(ts=[t1]), batch_mode="independent")
        torch.testing.assert_close(ind.ys[-1], sol.ys[-1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "rectilinear"])
def test_backsolve_gradients_on_kinked_paths_converge_to_direct_backpropagation(kind):
    t, x, f, z0 = _kinked()
    if kind == "rectilinear":
        data = torch.cat([t.expand(2, -1).unsqueeze(-1), x[..., :1]], -1)
        coeffs = nde.rectilinear_interpolation_coeffs(data, 0)
        knots, end = None, float(coeffs.shape[-2] - 1)
    else:
        coeffs, knots, end = x, t, float(t[-1])
    coeffs = coeffs.clone().requires_grad_(True)

    def grads(adjoint, dt):
        zz = z0.clone().requires_grad_(True)
        term = nde.ControlTerm(f, nde.LinearInterpolation(coeffs, knots))
        y = nde.solve(term, RK4(), 0.0, end, zz, dt0=dt, adjoint=adjoint).ys[-1]
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(y.pow(2).sum(), [zz, coeffs])])

    piece = 0.1 if kind == "linear" else 1.0
    errs = []
    for k in (1, 2, 4):
        direct = grads(nde.DirectAdjoint(), piece / k)
        errs.append(float((grads(nde.BacksolveAdjoint(), piece / k) - direct).norm() / direct.norm()))
    # the continuous adjoint's discretisation error only: fourth order in the step (first order before the
    # backward solve saw the path from inside its steps)
    assert errs[-1] < 1e-3 and _order(errs) > 3.0, errs


@pytest.mark.parametrize("solver", ["ReversibleHeun", "Reversible(RK4)", "Reversible(Tsit5)"])
@pytest.mark.parametrize("kind", ["linear", "rectilinear"])
def test_reversible_adjoints_are_exact_on_kinked_paths_in_both_directions(solver, kind):
    from nde.solvers import Reversible, ReversibleHeun

    t, x, f, z0 = _kinked()
    if kind == "rectilinear":
        coeffs = nde.rectilinear_interpolation_coeffs(torch.cat([t.expand(2, -1).unsqueeze(-1), x[..., :1]], -1), 0)
        knots = None
    else:
        coeffs, knots = x, t
    make = {"ReversibleHeun": ReversibleHeun, "Reversible(RK4)": lambda: Reversible(RK4()),
            "Reversible(Tsit5)": lambda: Reversible(Tsit5())}[solver]
    path0 = nde.LinearInterpolation(coeffs, knots)
    end = path0.t1
    for t0, t1 in ((0.0, end), (end, 0.0)):
        out = []
        for adjoint in (nde.DirectAdjoint(), nde.ReversibleAdjoint()):
            cc, zz = coeffs.clone().requires_grad_(True), z0.clone().requires_grad_(True)
            term = nde.ControlTerm(f, nde.LinearInterpolation(cc, knots))
            y = nde.solve(term, make(), t0, t1, zz, dt0=(t1 - t0) / 16, adjoint=adjoint).ys[-1]
            out.append(torch.autograd.grad(y.pow(2).sum(), [zz, cc]))
        for a, b in zip(*out):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name,order", [("ImplicitEuler", 1), ("Trapezoid", 2), ("SDIRK2", 2), ("Kvaerno3", 3)])
def test_implicit_solvers_converge_on_a_cde(name, order):
    import nde.solvers as solvers

    x, t = _series(batch=2, length=6)
    path = nde.CubicSpline(nde.hermite_cubic_coefficients_with_backward_differences(x * 0.3, t), t)
    f = Field(width=4).to(D)
    z0 = torch.zeros(2, 3, dtype=D)
    T = float(t[-1] - t[0])
    term = nde.ControlTerm(f, path)
    ref = nde.solve(term, Tsit5(), t[0], t[-1], z0, controller=nde.PIDController(rtol=1e-12, atol=1e-12)).ys[-1]
    errs = [float((nde.solve(term, getattr(solvers, name)(), t[0], t[-1], z0, dt0=T / n).ys[-1] - ref).abs().max())
            for n in (40, 80)]
    emp = _order(errs)
    assert order - 0.3 < emp < order + 1.0, (errs, emp)


def test_the_control_product_is_the_matrix_product_to_second_order():
    from nde._terms import matrix_vector

    g = torch.randn(3, 4, 2, dtype=D, requires_grad=True)
    x = torch.randn(3, 2, dtype=D, requires_grad=True)
    torch.testing.assert_close(matrix_vector(g, x), (g @ x.unsqueeze(-1)).squeeze(-1))
    assert torch.autograd.gradcheck(matrix_vector, (g, x))
    assert torch.autograd.gradgradcheck(matrix_vector, (g, x))
    with torch.no_grad():
        torch.testing.assert_close(matrix_vector(g, x), (g @ x.unsqueeze(-1)).squeeze(-1))
    # a path shared by the batch: the vector broadcasts against the matrices
    torch.testing.assert_close(matrix_vector(g, x[0]), (g @ x[0].unsqueeze(-1)).squeeze(-1))


def test_matrix_vector_vjp_equals_autograd_through_the_product():
    """The adjoint's fused route for g(t, y) dX/dt gives the product and the VJP of the general route."""
    from nde._terms import matrix_vector, matrix_vector_vjp

    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 3 * 2).double()
    y = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    a = torch.randn(5, 3, dtype=torch.float64)
    for x in (torch.randn(5, 2, dtype=torch.float64), torch.randn(2, dtype=torch.float64)):
        inputs = [y] + list(lin.parameters())
        f, grads = matrix_vector_vjp(lambda: torch.tanh(lin(y)).view(5, 3, 2), x, a, inputs)
        ref = matrix_vector(torch.tanh(lin(y)).view(5, 3, 2), x)
        ref_grads = torch.autograd.grad(ref, inputs, -a)
        assert torch.allclose(f, ref, rtol=1e-13, atol=1e-14) and not f.requires_grad
        for g, r in zip(grads, ref_grads):
            assert torch.allclose(g, r, rtol=1e-13, atol=1e-14)
    # a matrix shared by the batch goes through the product; a constant one has no gradients
    shared = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 2, dtype=torch.float64)
    f, (g,) = matrix_vector_vjp(lambda: shared, x, a, [shared])
    assert torch.allclose(g, -(a.unsqueeze(-1) * x.unsqueeze(-2)).sum(0))
    f, grads = matrix_vector_vjp(lambda: shared.detach(), x, a, [y])
    assert grads == [None] and f.shape == (5, 3)
    # a control derivative that needs gradients itself: the general route
    assert matrix_vector_vjp(lambda: shared, x.requires_grad_(), a, [shared]) is None


def test_backsolve_of_a_cde_through_the_fused_route_matches_direct():
    torch.manual_seed(1)
    D = torch.float64
    x = torch.randn(3, 9, 2, dtype=D).cumsum(1) * 0.3
    t = torch.linspace(0, 1, 9, dtype=D)
    X = nde.CubicSpline(nde.hermite_cubic_coefficients_with_backward_differences(x, t), t)
    lin = torch.nn.Linear(4, 4 * 2).double()
    term = nde.ControlTerm(lambda t, z, args: torch.tanh(lin(z)).view(*z.shape[:-1], 4, 2), X)
    z0 = torch.randn(3, 4, dtype=D, requires_grad=True)
    grads = {}
    for adj in (nde.DirectAdjoint(), nde.BacksolveAdjoint(rtol=1e-10, atol=1e-10)):
        sol = nde.solve(term, nde.solvers.Dopri5(), 0.0, 1.0, z0, adjoint=adj,
                        controller=nde.PIDController(rtol=1e-10, atol=1e-10))
        grads[type(adj).__name__] = torch.autograd.grad(sol.ys[-1].pow(2).sum(), [z0] + list(lin.parameters()))
    for g, r in zip(grads["BacksolveAdjoint"], grads["DirectAdjoint"]):
        assert torch.allclose(g, r, rtol=1e-6, atol=1e-8)
