import copy
import importlib.util
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import nde
from nde import symbolic
from nde.models import NeuralODE

sympy = pytest.importorskip("sympy")

F64 = torch.float64


def lotka_volterra(t, y):
    x, v = y[..., 0], y[..., 1]
    return torch.stack([1.5 * x - x * v, -3.0 * v + x * v], -1)


def thesis_field(t, y):
    x, v = y[..., 0], y[..., 1]
    return torch.stack([v / (1 + v), -x / (1 + x)], -1)


def trajectories(f, y0, t1, n):
    ts = torch.linspace(0, t1, n, dtype=F64)
    sol = nde.solve(nde.ODETerm(f), nde.solvers.Tsit5(), 0.0, t1, y0, saveat=nde.SaveAt(ts=ts),
                    controller=nde.PIDController(1e-10, 1e-10))
    return ts, sol.ys


class MLPField(nn.Module):
    def __init__(self, mean, std, width=16):
        super().__init__()
        self.mean, self.std = mean, std
        self.net = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                 nn.Linear(width, 2)).to(F64)

    def forward(self, t, y):
        return self.net((y - self.mean) / self.std) * self.std


def train_neural_ode(ts, ys, adam_steps=50, lbfgs_steps=150):
    """Fit a NeuralODE to consecutive pairs of observations (RK4, two steps per interval)."""
    torch.manual_seed(0)
    flat = ys.reshape(-1, 2)
    model = NeuralODE(MLPField(flat.mean(0), flat.std(0)), solver=nde.solvers.RK4(), dt0=float(ts[1] - ts[0]) / 2)
    start, end = ys[:-1].reshape(-1, 2), ys[1:].reshape(-1, 2)

    def loss_fn():
        return torch.mean((model(start, ts[:2])[-1] - end) ** 2)

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(adam_steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=lbfgs_steps, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-14, tolerance_change=1e-16, history_size=50)

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
    return model, float(loss_fn().detach())


def coefficient_table(model):
    """{monomial: coefficient} of each expression of a polynomial model."""
    x, y = model.variables
    out = []
    for e in model.to_sympy():
        poly = sympy.Poly(sympy.expand(e), x, y)
        out.append({m: float(c) for m, c in zip(poly.monoms(), poly.coeffs())})
    return out


LV_TRUE = [{(1, 0): 1.5, (1, 1): -1.0}, {(0, 1): -3.0, (1, 1): 1.0}]


def assert_coefficients(model, truth, rtol):
    table = coefficient_table(model)
    for got, want in zip(table, truth):
        assert set(got) == set(want), (got, want)
        for k in want:
            assert abs(got[k] - want[k]) <= rtol * abs(want[k]), (k, got[k], want[k])


# --- recovery ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["stlsq", "pysindy"])
def test_exact_lotka_volterra_recovered(optimizer):
    if optimizer == "pysindy":
        pytest.importorskip("pysindy")
    ys = torch.rand(400, 2, dtype=F64) * 3 + 0.2
    model = symbolic.distill(lotka_volterra, ys, optimizer=optimizer)
    assert_coefficients(model, LV_TRUE, 1e-9)
    assert model.info["fit_error"] < 1e-10
    assert model.info["optimizer"] == optimizer


def test_sindy_falls_back_to_own_stlsq_without_pysindy(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "pysindy" else real_find_spec(n, *a))
    ys = torch.rand(200, 2, dtype=F64) * 3 + 0.2
    model = symbolic.distill(lotka_volterra, ys)
    assert model.info["optimizer"] == "stlsq"
    assert_coefficients(model, LV_TRUE, 1e-9)
    with pytest.raises(ImportError, match="optimizer='stlsq'"):
        symbolic.distill(lotka_volterra, ys, optimizer="pysindy")


def test_trained_neural_ode_lotka_volterra_within_one_percent():
    torch.manual_seed(0)
    y0 = torch.stack([torch.rand(16, dtype=F64) * 4 + 1, torch.rand(16, dtype=F64) * 2.5 + 0.5], -1)
    ts, ys = trajectories(lotka_volterra, y0, 1.0, 6)
    model, loss = train_neural_ode(ts, ys)
    assert loss < 1e-4
    data = symbolic.sample_vector_field(model, ys, ts)
    assert data.states.shape == (6 * 16, 2) and data.times.shape == (96,)
    distilled = symbolic.distill(None, data)
    assert_coefficients(distilled, LV_TRUE, 0.01)
    # the learned field itself is not exact: the regression is what removes the small spurious terms
    assert distilled.info["fit_error"] > 1e-6


def test_thesis_example_structure_after_fine_tune_and_round():
    torch.manual_seed(0)
    y0 = torch.rand(12, 2, dtype=F64) * 1.5 - 0.5
    ts, ys = trajectories(thesis_field, y0, 2.0, 9)
    model, loss = train_neural_ode(ts, ys)
    assert loss < 1e-4
    lib = symbolic.polynomial_library(2) + symbolic.rational_library()
    distilled = symbolic.distill(model, ys, library=lib)
    x, y = distilled.variables
    # the structure is right and the constants approximate
    assert [sympy.simplify(e - t) for e, t in zip(distilled.round(1).to_sympy(), [y / (1 + y), -x / (1 + x)])] == [0, 0]
    before = distilled.constants.detach().clone()
    history = distilled.fine_tune(ts, ys, steps=6, optimizer="lbfgs", lr=1.0, rtol=1e-8, atol=1e-10)
    assert history[-1] < 0.2 * history[0]
    assert not torch.equal(before, distilled.constants.detach())
    assert torch.allclose(distilled.constants.detach().abs(), torch.ones(4, dtype=F64), atol=2e-3)
    rounded = distilled.round(2)
    exprs = rounded.to_sympy()
    assert sympy.simplify(exprs[0] - y / (1 + y)) == 0
    assert sympy.simplify(exprs[1] + x / (1 + x)) == 0
    assert rounded.equations() == ["dx/dt = y/(y + 1)", "dy/dt = -x/(x + 1)"]
    assert rounded.num_constants == 4  # still trainable after rounding


def test_trigonometric_and_rational_libraries():
    def field(t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([0.7 * torch.sin(x) - 0.2 * v, 2.0 * x / (1 + x) + 0.5 * torch.cos(v)], -1)

    ys = torch.rand(300, 2, dtype=F64) * 2
    lib = symbolic.polynomial_library(1) + symbolic.trigonometric_library() + symbolic.rational_library()
    model = symbolic.distill(field, ys, library=lib, optimizer="stlsq")
    x, y = model.variables
    target = [0.7 * sympy.sin(x) - 0.2 * y, 2.0 * x / (1.0 + x) + 0.5 * sympy.cos(y)]
    for e, t in zip(model.to_sympy(), target):
        assert abs(float(sympy.simplify(e - t).subs({x: 0.3, y: 1.1}))) < 1e-8
    assert model.round(2).equations() == ["dx/dt = -0.2*y + 0.7*sin(x)", "dy/dt = 2*x/(x + 1) + 0.5*cos(y)"]


def test_time_dependent_field_with_include_time():
    def field(t, y):
        t = t[..., 0]
        return torch.stack([-0.5 * y[..., 0] + 0.8 * t, 1.0 * y[..., 0] * t - y[..., 1]], -1)

    ys = torch.rand(200, 2, dtype=F64) * 2 - 1
    ts = torch.rand(200, dtype=F64) * 3
    model = symbolic.distill(field, ys, ts=ts, include_time=True, optimizer="stlsq")
    assert model.round(6).equations() == ["dx/dt = 0.8*t - 0.5*x", "dy/dt = t*x - y"]
    y0 = torch.tensor([[0.3, -0.2]], dtype=F64)
    sol = nde.solve(model, nde.solvers.Tsit5(), 0.0, 2.0, y0, controller=nde.PIDController(1e-9, 1e-9),
                    batch_mode="independent")
    ref = nde.solve(field, nde.solvers.Tsit5(), 0.0, 2.0, y0, controller=nde.PIDController(1e-9, 1e-9),
                    batch_mode="independent")
    torch.testing.assert_close(sol.ys, ref.ys, atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="include_time=True needs the times"):
        symbolic.distill(None, (ys, ys), include_time=True)
    x, y, names, _ = symbolic.pysr_inputs(symbolic.sample_vector_field(field, ys, ts), include_time=True)
    assert x.shape == (200, 3) and names == ["x0", "x1", "x2"]
    np.testing.assert_array_equal(np.sort(x[:, 2]), np.sort(ts.numpy()))
    t_sym = sympy.Symbol("t")
    exprs = symbolic.pysr_expressions(_FakeRegressor([sympy.Symbol("x2") * 0.8, sympy.Symbol("x1")]),
                                      [sympy.Symbol("x"), sympy.Symbol("y"), t_sym], n_outputs=2)
    assert exprs[0] == 0.8 * t_sym


def test_nde_stlsq_agrees_with_pysindy():
    pytest.importorskip("pysindy")
    rng = np.random.default_rng(1)
    theta = rng.normal(size=(200, 8))
    xi = np.zeros((3, 8))
    xi[0, [1, 4]] = [2.0, -0.5]
    xi[1, [0, 7]] = [1.0, 3.0]
    xi[2, 3] = -1.2
    targets = theta @ xi.T + 1e-3 * rng.normal(size=(200, 3))
    ours = symbolic.stlsq(theta, targets, threshold=0.1)
    from nde._symbolic_library import pysindy_stlsq
    theirs = pysindy_stlsq(theta, targets, threshold=0.1)
    assert np.array_equal(ours != 0, xi != 0)
    np.testing.assert_allclose(ours, theirs, atol=1e-10)
    np.testing.assert_allclose(ours, xi, atol=1e-3)


def test_library_drops_functions_with_poles():
    ys = torch.linspace(-2, 2, 41, dtype=F64)[:, None]  # contains y = -1
    with pytest.warns(UserWarning, match="not finite"):
        model = symbolic.distill(lambda t, y: 2 * y, ys, library=symbolic.polynomial_library(1)
                                 + symbolic.rational_library(kind="both"), variable_names=["u"])
    assert model.round(6).equations() == ["du/dt = 2*u"]


# --- the symbolic module ----------------------------------------------------------------------------------------------

def test_symbolic_model_matches_torch_and_solves():
    m = symbolic.SymbolicModel(["1.5*x - 1.0*x*y + 0.1*sin(t)", "exp(-0.5*y) + sqrt(y)*x**1.5 - 2/(1 + x**2)"],
                               ["x", "y"], dtype=F64)
    assert m.num_constants == 5  # 1.5, -1.0, 0.1, -0.5 and the exponent 1.5; the integers are structure
    y = torch.rand(5, 2, dtype=F64) + 0.1
    t = torch.rand(5, 1, dtype=F64)
    x_, v = y[:, 0], y[:, 1]
    want = torch.stack([1.5 * x_ - x_ * v + 0.1 * torch.sin(t[:, 0]),
                        torch.exp(-0.5 * v) + torch.sqrt(v) * x_ ** 1.5 - 2 / (1 + x_ ** 2)], -1)
    torch.testing.assert_close(m(t, y), want)
    # as a vector field in nde.solve and NeuralODE (which passes a scalar time)
    lv = symbolic.SymbolicModel(["1.5*x - 1.0*x*y", "-3.0*y + 1.0*x*y"], dtype=F64)
    y0 = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=F64)
    ts = torch.linspace(0, 1, 5, dtype=F64)
    ref = trajectories(lotka_volterra, y0, 1.0, 5)[1]
    node = NeuralODE(lv, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(node(y0, ts), ref, atol=1e-7, rtol=1e-7)
    sol = nde.solve(lv, nde.solvers.Tsit5(), 0.0, 1.0, y0, saveat=nde.SaveAt(ts=ts),
                    controller=nde.PIDController(1e-9, 1e-9), batch_mode="independent")
    torch.testing.assert_close(sol.ys, ref, atol=1e-7, rtol=1e-7)


def test_gradients_flow_to_constants():
    m = symbolic.SymbolicModel(["1.5*x - 1.0*x*y", "-3.0*y/(1.0 + y) + 0.5*x*y"], dtype=F64)
    y = torch.rand(4, 2, dtype=F64) + 0.5
    c0 = m.constants.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: torch.func.functional_call(m, {"constants": c}, (0.0, y)), (c0,))
    # through a solve: the gradient of the end state w.r.t. every constant matches finite differences
    y0 = torch.tensor([1.0, 0.5], dtype=F64)

    def end_state(c):
        term = nde.ODETerm(lambda t, yy: torch.func.functional_call(m, {"constants": c}, (t, yy)))
        sol = nde.solve(term, nde.solvers.Tsit5(), 0.0, 0.5, y0, controller=nde.PIDController(1e-10, 1e-10))
        return sol.ys[-1].sum()

    loss = end_state(m.constants)
    loss.backward()
    grad = m.constants.grad.clone()
    assert torch.all(grad != 0)
    eps = 1e-6
    fd = torch.stack([(end_state(c0.detach() + eps * e) - end_state(c0.detach() - eps * e)) / (2 * eps)
                      for e in torch.eye(len(c0), dtype=F64)])
    torch.testing.assert_close(grad, fd, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_fine_tune_lowers_trajectory_loss(optimizer):
    y0 = torch.tensor([[2.0, 1.0], [4.0, 2.0]], dtype=F64)
    ts, ys = trajectories(lotka_volterra, y0, 1.0, 6)
    m = symbolic.SymbolicModel(["1.4*x - 1.1*x*y", "-2.8*y + 0.9*x*y"], dtype=F64)
    steps, lr = (30, 2e-2) if optimizer == "adam" else (40, 1.0)
    history = m.fine_tune(ts, ys, steps=steps, lr=lr, optimizer=optimizer, rtol=1e-8, atol=1e-10)
    if optimizer == "adam":
        assert len(history) == steps + 1
    assert history[-1] < 0.1 * history[0]
    if optimizer == "lbfgs":
        torch.testing.assert_close(m.constants.detach(), torch.tensor([1.5, -1.0, -3.0, 1.0], dtype=F64),
                                   atol=1e-4, rtol=0)


def test_views_round_and_latex():
    m = symbolic.SymbolicModel(["1.4999*x - 1.00002*x*y + 0.001", "-3.004*y + 0.99999*x*y"], dtype=F64)
    r = m.round(2)
    assert r.equations() == ["dx/dt = -x*y + 1.5*x", "dy/dt = x*y - 3*y"]
    assert r.num_constants == 4  # the 0.001 disappeared
    assert m.num_constants == 5  # round returns a new model
    tex = r.latex()
    assert tex.startswith("\\begin{aligned}") and "\\frac{dx}{dt}" in tex and "1.5 x" in tex
    assert "dx/dt" in str(r) and "dx/dt" in repr(r)
    s = m.simplify()
    torch.testing.assert_close(s(0.0, torch.ones(1, 2, dtype=F64)), m(0.0, torch.ones(1, 2, dtype=F64)))
    # saved and copied like any module
    buf = io.BytesIO()
    torch.save(r, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    copied = copy.deepcopy(r)
    with torch.no_grad():
        r.constants.mul_(2)
    pts = torch.rand(3, 2, dtype=F64)
    torch.testing.assert_close(loaded(0.0, pts), copied(0.0, pts))
    torch.testing.assert_close(2 * loaded(0.0, pts), r(0.0, pts))


# --- PySR backend (no Julia needed) ------------------------------------------------------------------------------------

class _FakeRegressor:
    def __init__(self, exprs):
        self._exprs = exprs

    def sympy(self, index=None):
        return self._exprs if index is None else self._exprs[index]


def test_pysr_inputs_and_expression_conversion():
    data = symbolic.sample_vector_field(lotka_volterra, torch.rand(50, 20, 2, dtype=F64) + 0.5,
                                        variable_names=["prey", "predator"])
    x, y, names, opts = symbolic.pysr_inputs(data, max_samples=300, niterations=5, unary_operators=["exp"])
    assert x.shape == (300, 2) and y.shape == (300, 2) and x.dtype == np.float64
    assert names == ["x0", "x1"]
    np.testing.assert_allclose(y, lotka_volterra(0.0, torch.from_numpy(x)).numpy())
    assert opts["niterations"] == 5 and opts["unary_operators"] == ["exp"]
    assert opts["deterministic"] and opts["parallelism"] == "serial" and opts["random_state"] == 0
    x2, *_ = symbolic.pysr_inputs(data, max_samples=300)
    np.testing.assert_array_equal(x, x2)  # deterministic subsample
    one = symbolic.VectorFieldData(torch.ones(4, 1), torch.ones(4, 1))
    assert symbolic.pysr_inputs(one)[1].shape == (4,)

    x0, x1 = sympy.symbols("x0 x1", real=True)
    fake = _FakeRegressor([x0 * (1.4999 - 0.99991 * x1), x1 * (x0 - 2.99993)])
    exprs = symbolic.pysr_expressions(fake, [sympy.Symbol("prey"), sympy.Symbol("predator")])
    model = symbolic.SymbolicModel(exprs, ["prey", "predator"], dtype=F64)
    assert model.num_constants == 3
    pts = torch.rand(10, 2, dtype=F64)
    torch.testing.assert_close(model(0.0, pts), lotka_volterra(0.0, pts), atol=5e-4, rtol=0)
    assert model.round(2).equations() == ["dprey/dt = prey*(1.5 - predator)", "dpredator/dt = predator*(prey - 3)"]

    # a backend callable plugs into distill the same way
    model2 = symbolic.distill(None, data, backend=lambda s, d, syms: symbolic.pysr_expressions(fake, syms))
    assert model2.variable_names == ["prey", "predator"] and model2.info["fit_error"] < 1e-3


def test_pysr_without_julia_or_pysr_raises_clear_import_error(monkeypatch):
    data = symbolic.VectorFieldData(torch.rand(10, 2), torch.rand(10, 2))
    had_pysr = "pysr" in sys.modules
    real_find_spec = importlib.util.find_spec
    # pysr importable, no Julia
    monkeypatch.setattr(symbolic, "_find_julia", lambda: None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "pysr" else real_find_spec(n, *a))
    with pytest.raises(ImportError, match="needs Julia") as info:
        symbolic.distill(None, data, backend="pysr")
    msg = str(info.value)
    assert "pip install nde[pysr]" in msg and 'backend="sindy"' in msg and "install_julia=True" in msg
    assert ("pysr" in sys.modules) == had_pysr  # nothing was imported
    # pysr missing
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "pysr" else real_find_spec(n, *a))
    with pytest.raises(ImportError, match=r"needs the `pysr` package.*pip install nde\[pysr\]") as info:
        symbolic.distill(None, data, backend="pysr")
    assert 'backend="sindy"' in str(info.value)
    # a Julia is found but PySR cannot start it: RuntimeError with the underlying message
    monkeypatch.setattr(symbolic, "_find_julia", lambda: "/opt/julia/bin/julia")
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "pysr" else real_find_spec(n, *a))
    monkeypatch.setitem(sys.modules, "pysr", None)  # makes `import pysr` fail
    with pytest.raises(RuntimeError, match="could not start Julia"):
        symbolic.distill(None, data, backend="pysr")


@pytest.mark.slow
@pytest.mark.skipif(not symbolic.julia_available() or importlib.util.find_spec("pysr") is None,
                    reason="PySR and Julia are needed")
def test_pysr_recovers_lotka_volterra():
    ys = torch.rand(200, 2, dtype=F64) * 3 + 0.2
    model = symbolic.distill(lotka_volterra, ys, backend="pysr", niterations=30, maxsize=10)
    assert model.info["fit_error"] < 1e-3
    fine = model.round(2)
    pts = torch.rand(20, 2, dtype=F64) * 3
    torch.testing.assert_close(fine(0.0, pts), lotka_volterra(0.0, pts), atol=1e-8, rtol=0)


def test_import_nde_imports_no_optional_dependency():
    code = ("import sys, nde, nde.symbolic; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'pysr', 'juliacall', 'juliapkg', 'sympy', 'pysindy'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert nde.symbolic is symbolic and nde.distill is symbolic.distill


# --- data and errors ---------------------------------------------------------------------------------------------------

def test_sample_vector_field_inputs():
    def field(t, y):
        return y * t
    ys = torch.rand(3, 4, 2, dtype=F64)
    ts = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    data = symbolic.sample_vector_field(field, ys, ts)
    torch.testing.assert_close(data.derivatives.reshape(3, 4, 2), ys * ts[:, None, None])
    sol = nde.solve(nde.ODETerm(lotka_volterra), nde.solvers.Tsit5(), 0.0, 1.0, torch.ones(2, dtype=F64),
                    saveat=nde.SaveAt(ts=ts / 2))
    d2 = symbolic.sample_vector_field(nde.ODETerm(lotka_volterra), sol)
    assert d2.states.shape == (3, 2) and d2.times is not None
    torch.testing.assert_close(d2.derivatives, lotka_volterra(0.0, sol.ys))
    # time-dependent expressions are fitted with the times of the data
    m = symbolic.distill(None, (data.states, data.derivatives), backend=lambda s, d, syms: [
        sympy.Float(1.0) * syms[0] * sympy.Symbol("t"), sympy.Float(1.0) * syms[1] * sympy.Symbol("t")])
    assert m.info["fit_error"] > 0.1  # no times given: evaluated at t = 0
    m = symbolic.distill(None, data, backend=lambda s, d, syms: [
        sympy.Float(1.0) * syms[0] * sympy.Symbol("t"), sympy.Float(1.0) * syms[1] * sympy.Symbol("t")])
    assert m.info["fit_error"] < 1e-12


def test_errors_are_clear():
    ys = torch.rand(10, 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        symbolic.distill(lotka_volterra, ys, backend="nope")
    with pytest.raises(ValueError, match="shape of y"):
        symbolic.sample_vector_field(lambda t, y: y[..., :1], ys)
    with pytest.raises(ValueError, match="variable_names"):
        symbolic.distill(lotka_volterra, ys, variable_names=["a"])
    with pytest.raises(ValueError, match="time symbol"):
        symbolic.SymbolicModel(["t", "x"], ["t", "x"])
    with pytest.raises(ValueError, match="neither a state variable"):
        symbolic.SymbolicModel(["x*k"], ["x"])
    with pytest.raises(ValueError, match="Cannot evaluate"):
        symbolic.SymbolicModel(["gamma(x)"], ["x"])
    with pytest.raises(TypeError, match="library"):
        symbolic.distill(lotka_volterra, ys, library=["x"])
    with pytest.raises(ValueError, match="last dimension"):
        symbolic.SymbolicModel(["x", "y"])(0.0, torch.ones(3))
    with pytest.raises(ValueError, match="ys must be a tensor of shape"):
        symbolic.SymbolicModel(["1.0*x"]).fine_tune(torch.linspace(0, 1, 3), torch.ones(4, 1))
    with pytest.raises(ValueError, match="model_or_f is None"):
        symbolic.distill(None, ys)
