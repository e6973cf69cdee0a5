import warnings

import pytest
import torch

import nde
from nde._cdeint import cdeint

torchcde = pytest.importorskip("torchcde")


@pytest.fixture(autouse=True)
def _one_thread():
    # small tensors: threads only add synchronisation (and stall badly on a loaded machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

D = torch.float64


class Func(torch.nn.Module):
    def __init__(self, hidden=3, channels=3):
        super().__init__()
        self.hidden, self.channels = hidden, channels
        self.lin = torch.nn.Linear(hidden, hidden * channels)

    def forward(self, t, z):
        return torch.tanh(self.lin(z)).view(*z.shape[:-1], self.hidden, self.channels)


class ProdFunc(Func):
    def prod(self, t, z, dxdt):
        return (self(t, z) @ dxdt.unsqueeze(-1)).squeeze(-1)


def _setup(seed=0, batch=5):
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 4, 9, dtype=D)
    x = torch.randn(batch, 9, 2, dtype=D, generator=g).cumsum(1) * 0.4
    x = torch.cat([t.expand(batch, 9).unsqueeze(-1), x], -1)
    x[torch.rand(x.shape, generator=g, dtype=D) < 0.15] = float("nan")
    x[..., 0] = t
    return x, t


def _torchcde_script(lib, x, t, func, z0, **kw):
    """The same few lines a torchcde user writes, with the library swapped."""
    coeffs = lib.hermite_cubic_coefficients_with_backward_differences(x, t)
    X = lib.CubicSpline(coeffs, t)
    return lib.cdeint(X=X, func=func, z0=z0, t=X.interval, **kw), X


@pytest.mark.parametrize("kw", [
    dict(adjoint=False, method="dopri5", rtol=1e-9, atol=1e-9),
    dict(adjoint=False, method="rk4", options=dict(step_size=0.5)),
    dict(adjoint=False, method="euler", options=dict(step_size=0.25)),
])
def test_a_torchcde_script_runs_after_changing_its_import(kw):
    x, t = _setup()
    func = Func().to(D)
    z0 = torch.randn(5, 3, dtype=D)
    ours, X = _torchcde_script(nde, x, t, func, z0, **kw)
    theirs, _ = _torchcde_script(torchcde, x, t, func, z0, **kw)
    assert ours.shape == theirs.shape == (5, 2, 3)
    tol = 1e-6 if kw["method"] == "dopri5" else 1e-12
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    assert isinstance(X, nde.AbstractPath)


def test_output_at_every_time_and_prod():
    x, t = _setup(1)
    coeffs = nde.natural_cubic_coeffs(x, t)
    func = ProdFunc().to(D)
    z0 = torch.randn(5, 3, dtype=D)
    ours = cdeint(nde.CubicSpline(coeffs, t), func, z0, t, adjoint=False, rtol=1e-9, atol=1e-9)
    theirs = torchcde.cdeint(torchcde.CubicSpline(coeffs, t), func, z0, t, adjoint=False, rtol=1e-9, atol=1e-9)
    assert ours.shape == (5, 9, 3)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    # a torchcde path is accepted as the control
    other = cdeint(torchcde.CubicSpline(coeffs, t), func, z0, t, adjoint=False, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(other, theirs, rtol=1e-6, atol=1e-6)


def test_adjoint_gradients_match_direct_backprop_and_torchcde():
    x, t = _setup(2, batch=2)
    x = torch.nan_to_num(x, nan=0.3).requires_grad_(True)  # gradients with respect to the data
    func = Func().to(D)
    z0 = torch.randn(2, 3, dtype=D, requires_grad=True)
    inputs = [z0, x, *func.parameters()]

    def grads(lib, adjoint):
        coeffs = lib.hermite_cubic_coefficients_with_backward_differences(x, t)
        kw = dict(adjoint_params=tuple(func.parameters()) + (coeffs,)) if (adjoint and lib is torchcde) else {}
        X = lib.CubicSpline(coeffs, t)
        out = lib.cdeint(X, func, z0, t[[0, -1]], adjoint=adjoint, rtol=1e-9, atol=1e-9, **kw)
        return torch.autograd.grad(out[:, -1].pow(2).sum(), inputs)

    direct = grads(nde, False)
    for g_ours, g_dir, g_theirs in zip(grads(nde, True), direct, grads(torchcde, True)):
        torch.testing.assert_close(g_ours, g_dir, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-5)


def test_cdeint_errors():
    x, t = _setup()
    X = nde.CubicSpline(nde.natural_cubic_coeffs(x, t), t)
    func = Func().to(D)
    z0 = torch.zeros(5, 3, dtype=D)
    with pytest.raises(ValueError, match="method"):
        cdeint(X, func, z0, t, method="nope")
    with pytest.raises(ValueError, match="backend"):
        cdeint(X, func, z0, t, backend="jax")
    with pytest.raises(TypeError, match="unexpected"):
        cdeint(X, func, z0, t, atoll=1e-3)
    with pytest.raises(ValueError, match="derivative"):
        cdeint(object(), func, z0, t)
    with pytest.raises(ValueError, match="strictly"):
        cdeint(X, func, z0, torch.tensor([0.0, 1.0, 1.0], dtype=D))
    with pytest.warns(UserWarning, match="Unknown option 'step_size'"):  # torchdiffeq warns and goes on
        cdeint(X, func, z0, t, method="dopri5", options=dict(step_size=0.1))
    with pytest.raises(ValueError, match="tuple"):
        cdeint(X, func, (z0, z0), t)  # a tuple state needs a tuple control


class _Shaped(torch.nn.Module):
    """A vector field returning a fixed, possibly wrong, shape."""

    def __init__(self, shape, prod=None):
        super().__init__()
        self.shape = shape
        if prod is not None:
            self.prod = lambda t, z, dxdt: torch.zeros(prod, dtype=D)

    def forward(self, t, z):
        return torch.zeros(self.shape, dtype=D)


@pytest.mark.parametrize("shape,words", [
    ((5, 4, 3), ["(5, 4, 3)", "4 hidden channels", "(5, 3)", "(5, 3, 3)"]),
    ((5, 3, 2), ["(5, 3, 2)", "2 input channels", "X.derivative", "(5, 3, 3)"]),
    ((4, 3, 3), ["(4, 3, 3)", "batch shape (4,)", "(5, 3, 3)"]),
    ((5, 3), ["(5, 3)", "(5, 3, 3)"]),
])
def test_shape_errors_name_the_argument_and_both_shapes(shape, words):
    x, t = _setup()
    X = nde.CubicSpline(nde.hermite_cubic_coefficients_with_backward_differences(x, t), t)
    z0 = torch.zeros(5, 3, dtype=D)
    for adjoint in (False, True):
        with pytest.raises(ValueError) as info:
            cdeint(X, _Shaped(shape), z0, t, adjoint=adjoint)
        msg = str(info.value)
        assert msg.startswith("func returned shape") and all(w in msg for w in words), msg


def test_shape_errors_of_the_path_and_of_prod():
    x, t = _setup()
    X = nde.CubicSpline(nde.hermite_cubic_coefficients_with_backward_differences(x[:4], t), t)
    with pytest.raises(ValueError, match=r"X.derivative returned shape \(4, 3\).*z0 has shape \(5, 3\)"):
        cdeint(X, Func().to(D), torch.zeros(5, 3, dtype=D), t)
    X = nde.CubicSpline(nde.hermite_cubic_coefficients_with_backward_differences(x, t), t)
    with pytest.raises(ValueError, match=r"func.prod returned shape \(5, 2\), but z0 has shape \(5, 3\)"):
        cdeint(X, _Shaped((5, 3, 3), prod=(5, 2)), torch.zeros(5, 3, dtype=D), t)


def test_the_shape_check_costs_no_evaluation():
    x, t = _setup()
    X = nde.CubicSpline(nde.hermite_cubic_coefficients_with_backward_differences(x, t), t)
    func = Func().to(D)
    calls = [0]
    func.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    sol = cdeint(X, func, torch.zeros(5, 3, dtype=D), t[[0, -1]], adjoint=False, method="rk4",
                 options=dict(step_size=0.5))
    assert sol.shape == (5, 2, 3) and calls[0] == 8 * 4  # 8 RK4 steps, nothing more


class _Failing(torch.nn.Module):
    """A torchcde-style path whose derivative fails (as a path built from freed graphs does)."""

    interval = torch.tensor([0.0, 1.0], dtype=D)

    def derivative(self, t):
        raise RuntimeError("Trying to backward through the graph a second time")


def test_a_failing_path_is_not_blamed_on_the_vector_field():
    with pytest.raises(ValueError, match="control path _Failing failed to evaluate its derivative at t=0.0: Trying") as info:
        cdeint(_Failing(), Func().to(D), torch.zeros(2, 3, dtype=D), torch.tensor([0.0, 1.0], dtype=D))
    assert "vector field" not in str(info.value)
    path = nde.LinearInterpolation(torch.zeros(4, 2, dtype=D))
    path.derivative = _Failing().derivative
    with pytest.raises(ValueError, match="control path LinearInterpolation failed"):
        nde.solve(nde.ControlTerm(lambda t, z: torch.zeros(3, 2, dtype=D), path), nde.solvers.RK4(), 0.0, 1.0,
                  torch.zeros(3, dtype=D), dt0=0.5)


@pytest.mark.parametrize("method,kw", [("rk4", dict(options=dict(step_size=0.1))), ("tsit5", {}), ("dopri5", {})])
def test_the_default_adjoint_differentiates_a_linear_path_of_data_requiring_grad(method, kw):
    # the slopes of a linear path are built once from the data; the continuous adjoint used to backpropagate
    # through that graph on every evaluation, and failed on the second
    x, t = _setup(3, batch=2)
    x = torch.nan_to_num(x, nan=0.3)
    func = Func().to(D)
    z0 = torch.randn(2, 3, dtype=D)

    def grads(adjoint):
        xx, zz = x.clone().requires_grad_(True), z0.clone().requires_grad_(True)
        X = nde.LinearInterpolation(nde.linear_interpolation_coeffs(xx, t), t)
        out = cdeint(X, func, zz, t, adjoint=adjoint, method=method, rtol=1e-8, atol=1e-8, **kw)
        return torch.autograd.grad(out.pow(2).sum(), [xx, zz, *func.parameters()])

    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5)


def _uneven(seed=4, batch=3):
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([0.0, 0.3, 0.5, 1.1, 1.6, 2.0], dtype=D)
    x = torch.cat([t.expand(batch, 6).unsqueeze(-1), torch.randn(batch, 6, 2, dtype=D, generator=g).cumsum(1)], -1)
    return x, t


def _both(build, x, t, ts, **kw):
    """The same call through nde and torchcde (paths built by each library from the same data)."""
    torch.manual_seed(6)
    func = Func().to(D)
    z0 = torch.randn(x.shape[0], 3, dtype=D, generator=torch.Generator().manual_seed(5))
    out = []
    for lib in (nde, torchcde):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchsde's warnings about its own Brownian motion
            out.append(lib.cdeint(build(lib, x, t), func, z0, ts, **kw))
    return out


def _hermite(lib, x, t):
    return lib.CubicSpline(lib.hermite_cubic_coefficients_with_backward_differences(x, t), t)


def _linear(lib, x, t):
    return lib.LinearInterpolation(lib.linear_interpolation_coeffs(x, t), t)


@pytest.mark.parametrize("build,ts,kw", [
    # fixed steps without step_size: torchdiffeq steps on the grid of the output times
    (_hermite, None, dict(method="rk4")),
    (_linear, None, dict(method="midpoint", options=dict(perturb=True))),
    (_linear, None, dict(method="rk4", options=dict(perturb=False))),  # exactly at the step ends, as torchdiffeq
    # outputs between the steps: linear interpolation (torchdiffeq's default) or cubic Hermite
    (_hermite, None, dict(method="rk4", options=dict(step_size=0.25))),
    (_hermite, None, dict(method="euler", options=dict(step_size=0.25, interp="cubic"))),
    (_hermite, "grid", dict(method="heun3", options=dict(grid_constructor=lambda f, y0, t: torch.linspace(0, 2, 9, dtype=D)))),
    # backwards in time
    (_hermite, "reversed", dict(method="rk4")),
    (_hermite, "reversed", dict(method="dopri5", rtol=1e-10, atol=1e-10)),
    (_hermite, "reversed", dict(method="rk4", options=dict(step_size=0.1))),
    (_hermite, None, dict(method="scipy_solver", rtol=1e-10, atol=1e-10, options=dict(solver="RK45"))),
])
def test_torchdiffeq_backend_matches_torchcde(build, ts, kw):
    x, t = _uneven()
    ts = {None: t, "grid": t[[0, -1]], "reversed": t.flip(0)}[ts]
    ours, theirs = _both(build, x, t, ts, adjoint=False, **kw)
    tol = 1e-6 if kw["method"] in ("dopri5", "scipy_solver") else 1e-12
    assert ours.shape == theirs.shape == (3, len(ts), 3)
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)


def test_one_sided_stages_by_default_on_a_linear_path():
    # torchdiffeq without perturb evaluates at a knot the piece before it, also for the first stage of the
    # step after it; nde takes the piece inside the step (torchdiffeq's perturb=True)
    x, t = _uneven()
    ours, theirs = _both(_linear, x, t, t, adjoint=False, method="rk4", options=dict(perturb=True))
    default, plain = _both(_linear, x, t, t, adjoint=False, method="rk4")
    torch.testing.assert_close(default, theirs, rtol=1e-12, atol=1e-12)
    assert (plain - theirs).abs().max() > 1e-3


def test_tuple_states_with_a_tuple_control_match_torchcde():
    x, t = _uneven()

    class TupleFunc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Func(3, 3).to(D), Func(2, 2).to(D)

        def forward(self, t, z):
            return self.a(t, z[0]), self.b(t, z[1])

    func = TupleFunc()
    z0 = (torch.randn(3, 3, dtype=D), torch.randn(3, 2, dtype=D))
    out = []
    for lib in (nde, torchcde):
        X = lib.TupleControl(_hermite(lib, x, t), _linear(lib, x[..., :2], t))
        out.append(lib.cdeint(X, func, z0, t, adjoint=False, rtol=1e-10, atol=1e-10, options=dict(jump_t=t)))
    for a, b in zip(*out):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)
    # gradients through the tuple state, with the adjoint
    z0g = tuple(z.clone().requires_grad_(True) for z in z0)
    X = nde.TupleControl(_hermite(nde, x, t), _linear(nde, x[..., :2], t))
    grads = []
    for adjoint in (False, True):
        o = nde.cdeint(X, func, z0g, t, adjoint=adjoint, rtol=1e-9, atol=1e-9)
        grads.append(torch.autograd.grad(sum(p.pow(2).sum() for p in o), z0g + tuple(func.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [
    {},  # torchsde's defaults: midpoint (the field is Stratonovich), dt = 1e-3
    dict(method="heun", dt=0.05),
    dict(method="euler_heun", dt=0.05),
    dict(method="reversible_heun", dt=0.05),
    dict(method="midpoint", dt=0.3),  # output times between the steps: interpolated linearly
])
def test_torchsde_backend_matches_torchcde(kw):
    x, t = _uneven()
    ours, theirs = _both(_hermite, x, t, t, adjoint=False, backend="torchsde", **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_torchsde_backend_ito_fields_default_to_srk():
    x, t = _uneven()
    func = Func().to(D)
    func.sde_type = "ito"
    z0 = torch.randn(3, 3, dtype=D)
    out = [lib.cdeint(_hermite(lib, x, t), func, z0, t, adjoint=False, backend="torchsde", dt=0.05) for lib in (nde, torchcde)]
    torch.testing.assert_close(out[0], out[1], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="'midpoint' solves stratonovich SDEs, but func.sde_type is 'ito'"):
        nde.cdeint(_hermite(nde, x, t), func, z0, t, backend="torchsde", method="midpoint")


def test_torchsde_reversible_heun_recipe_gives_the_exact_gradient():
    # torchcde's documented recipe: reversible Heun with its own adjoint, i.e. nde.ReversibleAdjoint
    x, t = _uneven()
    x = x.clone().requires_grad_(True)
    func = Func().to(D)
    z0 = torch.randn(3, 3, dtype=D, requires_grad=True)

    def grads(lib, adjoint):
        coeffs = lib.hermite_cubic_coefficients_with_backward_differences(x, t)
        kw = dict(adjoint_method="adjoint_reversible_heun") if adjoint else {}
        if lib is torchcde and adjoint:
            kw["adjoint_params"] = tuple(func.parameters()) + (coeffs,)
        out = lib.cdeint(lib.CubicSpline(coeffs, t), func, z0, ts, backend="torchsde", method="reversible_heun", dt=0.05,
                         adjoint=adjoint, **kw)
        return torch.autograd.grad(out.pow(2).sum(), [z0, x, *func.parameters()])

    for ts in (t, t[[0, -1]]):
        exact = grads(nde, False)
        for a, b in zip(grads(nde, True), exact):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # torchsde's adjoint agrees when the only output is at the end
    for a, b in zip(grads(nde, True), grads(torchcde, True)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_torchsde_backend_options():
    x, t = _uneven()
    X = _hermite(nde, x, t)
    func = Func().to(D)
    z0 = torch.randn(3, 3, dtype=D)
    ref = nde.cdeint(X, func, z0, t, adjoint=False, rtol=1e-11, atol=1e-11)
    # adaptive steps from the method's embedded estimate, to the tolerances; dt is the first step
    coarse = nde.cdeint(X, func, z0, t, adjoint=False, backend="torchsde", dt=0.5)
    fine = nde.cdeint(X, func, z0, t, adjoint=False, backend="torchsde", dt=0.5, adaptive=True, rtol=1e-7, atol=1e-7)
    assert (fine - ref).abs().max() < 1e-4 < (coarse - ref).abs().max()
    # dt_min bounds the adaptive steps from below (taken whatever their error)
    floor = nde.cdeint(X, func, z0, t, adjoint=False, backend="torchsde", dt=0.5, adaptive=True, rtol=1e-12,
                       atol=1e-12, dt_min=0.25)
    assert (floor - ref).abs().max() > 10 * (fine - ref).abs().max()
    # the Brownian part is zero: a Brownian motion changes nothing
    bm = nde.BrownianInterval(0.0, 2.0, shape=(3, 1), dtype=D, seed=0)
    torch.testing.assert_close(nde.cdeint(X, func, z0, t, adjoint=False, backend="torchsde", dt=0.5, bm=bm), coarse)
    torch.testing.assert_close(nde.cdeint(X, func, z0, t, adjoint=False, backend="torchsde", dt=0.5,
                                          names={"drift": "f"}), coarse)
    with pytest.raises(ValueError, match="names"):
        nde.cdeint(X, func, z0, t, backend="torchsde", names={"drift": "h2"})
    with pytest.raises(ValueError, match="logqp"):
        nde.cdeint(X, func, z0, t, backend="torchsde", logqp=True)
    with pytest.raises(ValueError, match="adaptive=True with method='euler_heun'"):
        nde.cdeint(X, func, z0, t, backend="torchsde", method="euler_heun", adaptive=True)
    with pytest.raises(ValueError, match=r"shape \(batch, hidden\)"):
        nde.cdeint(X, func, z0[0], t, backend="torchsde")
    with pytest.raises(ValueError, match="method must be one of"):
        nde.cdeint(X, func, z0, t, backend="torchsde", method="dopri5")
    with pytest.raises(TypeError, match="unexpected"):
        nde.cdeint(X, func, z0, t, backend="torchsde", step_size=0.1)


def test_torchcde_names_are_exported_and_a_subclassed_path_drives_cdeint():
    for name in ("InterpolationBase", "TupleControl", "logsignature_windows", "logsig_windows",
                 "natural_cubic_spline_coeffs", "natural_cubic_coeffs", "linear_interpolation_coeffs",
                 "hermite_cubic_coefficients_with_backward_differences", "CubicSpline", "LinearInterpolation", "cdeint"):
        assert hasattr(nde, name), name
    assert isinstance(nde.LinearInterpolation(torch.zeros(3, 2)), nde.InterpolationBase)
    with pytest.raises(TypeError):
        nde.InterpolationBase()  # abstract, as in torchcde

    class Kinked(nde.InterpolationBase):
        """|t - 0.7| in one channel: a kink off the step grid."""

        def __init__(self):
            super().__init__()
            self.register_buffer("_knots", torch.tensor([0.0, 0.7, 2.0], dtype=D))

        @property
        def grid_points(self):
            return self._knots

        @property
        def interval(self):
            return self._knots[[0, -1]]

        def evaluate(self, t):
            return (t - 0.7).abs().reshape(1, 1).expand(3, 1)

        def derivative(self, t):
            return torch.sign(t - 0.7).reshape(1, 1).expand(3, 1).to(D)

    func = Func(3, 1).to(D)
    z0 = torch.randn(3, 3, dtype=D)
    ts = torch.tensor([0.0, 2.0], dtype=D)
    ours = nde.cdeint(Kinked(), func, z0, ts, adjoint=False, rtol=1e-10, atol=1e-10)
    theirs = torchcde.cdeint(Kinked(), func, z0, ts, adjoint=False, rtol=1e-10, atol=1e-10,
                             options=dict(jump_t=torch.tensor([0.7], dtype=D)))
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-7)  # the grid points are where steps restart


@pytest.mark.parametrize("kind", ["linear", "natural"])
def test_adjoint_with_torchcdes_adjoint_params_and_times_requiring_grad(kind):
    # torchcde's recipe passes the coefficients (and the knots) as adjoint_params: tensors that the path's own
    # tensors are computed from. The adjoint's products must stop at every input: no second backward through
    # the coefficients' graph, and no gradient counted twice
    g = torch.Generator().manual_seed(7)
    data = torch.randn(2, 6, 2, dtype=D, generator=g).cumsum(1)
    knots = torch.linspace(0, 2.5, 6, dtype=D)
    func = Func(3, 2).to(D)
    z0 = torch.randn(2, 3, dtype=D)

    def grads(adjoint):
        x, t = data.clone().requires_grad_(True), knots.clone().requires_grad_(True)
        if kind == "linear":
            coeffs = nde.linear_interpolation_coeffs(x * 1.0, t)
            X = nde.LinearInterpolation(coeffs, t)
        else:
            coeffs = nde.natural_cubic_coeffs(x, t)
            X = nde.CubicSpline(coeffs, t)
        kw = dict(adjoint_params=tuple(func.parameters()) + (coeffs, t)) if adjoint else {}
        out = nde.cdeint(X, func, z0, t[[0, -1]].detach(), adjoint=adjoint, method="rk4",
                         options=dict(step_size=1 / 32), **kw)
        return torch.autograd.grad(out[:, -1].pow(2).sum(), [x, t, *func.parameters()])

    # the continuous adjoint's discretisation error only (5e-3 at steps of 1/8, fourth order)
    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5)


def test_func_with_only_prod_and_times_as_in_torchcde():
    x = torch.rand(2, 5, 1, dtype=D)
    X = nde.CubicSpline(nde.natural_cubic_coeffs(x))

    class F:
        def prod(self, t, z, dxdt):
            assert t.shape == () and z.shape == (2, 3) and dxdt.shape == (2, 1)
            return -z * dxdt

    z0 = torch.rand(2, 3, dtype=D, requires_grad=True)
    out = nde.cdeint(X=X, func=F(), z0=z0, t=X.interval, adjoint_params=())
    out.sum().backward()
    assert z0.grad.shape == (2, 3)
    with pytest.raises(TypeError, match="prod"):
        nde.cdeint(X, object(), z0, X.interval)
