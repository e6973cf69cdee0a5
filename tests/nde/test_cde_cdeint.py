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
    with pytest.raises(ValueError, match="step_size"):
        cdeint(X, func, z0, torch.tensor([0.0, 1.0, 3.0], dtype=D), method="rk4")
    with pytest.raises(TypeError, match="tuple"):
        cdeint(X, func, (z0, z0), t)
    with pytest.raises(TypeError, match="derivative"):
        cdeint(object(), func, z0, t)
