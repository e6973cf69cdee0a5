"""Wrong diffusion or Brownian shapes are reported once, at the first evaluation, with both shapes."""

import pytest
import torch

import nde
from nde import BrownianInterval, ControlTerm, MultiTerm, ODETerm
from nde.solvers import sde as S

DT = torch.float64
B, D = 4, 3


def _solve(g, noise, m, solver=None):
    bm = BrownianInterval(0.0, 1.0, (B, m), seed=0, dtype=DT, dt=0.1)
    terms = MultiTerm(ODETerm(lambda t, y: -y), ControlTerm(g, bm, noise=noise))
    return nde.solve(terms, solver or S.EulerMaruyama(), 0.0, 1.0, torch.ones(B, D, dtype=DT), dt0=0.1).ys[-1]


def test_scalar_noise_with_several_channels_is_refused():
    # used to run, silently using the first column
    with pytest.raises(ValueError, match=r"only one channel.*\(4, 3, 1\).*\(4, 3, 2\)"):
        _solve(lambda t, y: torch.ones(B, D, 2, dtype=DT), "scalar", 1)
    with pytest.raises(ValueError, match=r"only one channel"):
        _solve(lambda t, y: torch.ones(B, D, 2, dtype=DT), "scalar", 1, S.Milstein())


def test_diffusion_shapes_name_both_shapes():
    with pytest.raises(ValueError, match=r"noise='diagonal' must return the shape of y, \(4, 3\); got \(4, 4\)"):
        _solve(lambda t, y: torch.ones(B, D + 1, dtype=DT), "diagonal", D + 1)
    with pytest.raises(ValueError, match=r"noise='general' must return shape .* \(4, 3, 2\).*got \(4, 3, 5\)"):
        _solve(lambda t, y: torch.ones(B, D, 5, dtype=DT), "general", 2)
    with pytest.raises(ValueError, match=r"noise='additive' must return shape .*got \(4, 2, 2\)"):
        _solve(lambda t, y: torch.ones(B, 2, 2, dtype=DT), "additive", 2)


def test_brownian_shape_mismatch_is_reported():
    # a diagonal diffusion of 3 channels driven by a 2-channel Brownian motion
    with pytest.raises(ValueError, match=r"control increments .* shape \(4, 2\).*\(\.\.\., 3\)"):
        _solve(lambda t, y: torch.ones_like(y), "diagonal", 2, S.Heun())


def test_checked_once():
    bm = BrownianInterval(0.0, 1.0, (B, D), seed=0, dtype=DT, dt=0.1)
    calls = []

    def g(t, y):
        calls.append(1)
        return 0.1 * torch.ones_like(y)

    term = ControlTerm(g, bm, noise="diagonal")
    nde.solve(MultiTerm(ODETerm(lambda t, y: -y), term), S.EulerMaruyama(), 0.0, 1.0, torch.ones(B, D, dtype=DT),
              dt0=0.1)
    assert term._vf_checked and term._prod_checked and len(calls) == 10


def test_diagonal_noise_with_one_brownian_channel_is_not_broadcast():
    # g * dW would broadcast a single channel over the three states
    for solver in (S.EulerMaruyama(), S.Heun(), S.Milstein()):
        with pytest.raises(ValueError, match=r"control increments .* shape \(4, 1\)"):
            _solve(lambda t, y: 0.1 * torch.ones_like(y), "diagonal", 1, solver)
