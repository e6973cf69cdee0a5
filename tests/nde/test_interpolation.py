import math

import pytest
import torch

import nde
from nde._interpolation import (
    CubicSpline, LinearInterpolation, hermite_cubic_coefficients_with_backward_differences, last_observation_times,
    linear_interpolation_coeffs, natural_cubic_coeffs, natural_cubic_spline_coeffs, rectilinear_interpolation_coeffs,
)

torchcde = pytest.importorskip("torchcde")


@pytest.fixture(autouse=True)
def _one_thread():
    # small tensors: threads only add synchronisation (and stall badly on a loaded machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

D = torch.float64


def _data(seed=0, batch=(3, 2), length=9, channels=4, missing=0.3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, length, channels, dtype=D, generator=g)
    t = torch.sort(torch.rand(length, dtype=D, generator=g) * 5).values
    xn = x.clone()
    xn[torch.rand(xn.shape, generator=g, dtype=D) < missing] = float("nan")
    if batch == (3, 2):
        xn[0, 0, :, 1] = float("nan")  # a channel never observed
        xn[1, 1, :-1, 2] = float("nan")  # observed only at the end
        xn[2, 0, 1:, 3] = float("nan")  # observed only at the start
    return x, xn, t


PAIRS = [
    (linear_interpolation_coeffs, "linear_interpolation_coeffs"),
    (natural_cubic_coeffs, "natural_cubic_coeffs"),
    (natural_cubic_spline_coeffs, "natural_cubic_spline_coeffs"),
    (hermite_cubic_coefficients_with_backward_differences, "hermite_cubic_coefficients_with_backward_differences"),
]


@pytest.mark.parametrize("fn,name", PAIRS)
@pytest.mark.parametrize("with_t", [False, True])
@pytest.mark.parametrize("with_nan", [False, True])
def test_coefficients_equal_torchcde(fn, name, with_t, with_nan):
    x, xn, t = _data()
    data = xn if with_nan else x
    tt = t if with_t else None
    ours = fn(data, tt)
    theirs = getattr(torchcde, name)(data, tt)
    assert ours.shape == theirs.shape
    assert not torch.isnan(ours).any()
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_rectilinear_equals_torchcde():
    _, xn, t = _data()
    xn[..., 0] = t
    xn[..., 0, :] = 0.5  # observed at the start: causal
    ours = rectilinear_interpolation_coeffs(xn, 0)
    theirs = torchcde.linear_interpolation_coeffs(xn, rectilinear=0)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(linear_interpolation_coeffs(xn, rectilinear=0), ours, rtol=0, atol=0)
    # causal: the path over the first 2k knots depends only on the first k+1 observations
    changed = xn.clone()
    changed[..., 5:, 1:] += 1.0
    path_a = LinearInterpolation(rectilinear_interpolation_coeffs(xn, 0))
    path_b = LinearInterpolation(rectilinear_interpolation_coeffs(changed, 0))
    s = torch.linspace(0, 8, 33, dtype=D)
    torch.testing.assert_close(path_a.evaluate(s), path_b.evaluate(s))


def _all_paths(x, t):
    return [
        LinearInterpolation(linear_interpolation_coeffs(x, t), t),
        CubicSpline(natural_cubic_coeffs(x, t), t),
        CubicSpline(hermite_cubic_coefficients_with_backward_differences(x, t), t),
    ]


def test_paths_reproduce_data_at_knots_and_match_torchcde():
    x, _, t = _data()
    ref = [torchcde.LinearInterpolation(torchcde.linear_interpolation_coeffs(x, t), t),
           torchcde.CubicSpline(torchcde.natural_cubic_coeffs(x, t), t),
           torchcde.CubicSpline(torchcde.hermite_cubic_coefficients_with_backward_differences(x, t), t)]
    q = torch.linspace(-1.0, 6.0, 41, dtype=D)
    for path, other in zip(_all_paths(x, t), ref):
        assert isinstance(path, nde.AbstractPath)
        for i in range(len(t)):
            torch.testing.assert_close(path.evaluate(t[i]), x[..., i, :], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(path.evaluate(float(t[i])), x[..., i, :], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(path.evaluate(q), other.evaluate(q), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(path.derivative(q), other.derivative(q), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(path.grid_points, t)
        torch.testing.assert_close(path.interval, torch.stack([t[0], t[-1]]))
        assert path.t0 == float(t[0]) and path.t1 == float(t[-1])
        torch.testing.assert_close(path.evaluate(t[1], t[4]), x[..., 4, :] - x[..., 1, :])


def test_derivatives_match_finite_differences():
    x, _, t = _data(length=12)
    eps = 1e-6
    # avoid the knots, where linear/Hermite derivatives are one-sided
    q = (t[:-1] + t[1:]) / 2
    for path in _all_paths(x, t):
        for s in q.tolist():
            fd = (path.evaluate(s + eps) - path.evaluate(s - eps)) / (2 * eps)
            torch.testing.assert_close(path.derivative(s), fd, rtol=1e-6, atol=1e-6)


def test_cubic_spline_evaluates_given_cubic_coefficients_exactly():
    # coefficients of p(t) = 1 - 2t + 0.5 t^2 + 0.3 t^3 re-expanded around every knot
    t = torch.tensor([0.0, 0.3, 1.1, 1.5, 2.9, 4.0], dtype=D)
    p = lambda s: 1 - 2 * s + 0.5 * s**2 + 0.3 * s**3  # noqa: E731
    dp = lambda s: -2 + s + 0.9 * s**2  # noqa: E731
    ti = t[:-1]
    coeffs = torch.stack([p(ti), dp(ti), 1 + 1.8 * ti, torch.full_like(ti, 0.9)], -1)  # a, b, 2c, 3d
    path = CubicSpline(coeffs, t)
    q = torch.linspace(0, 4, 57, dtype=D)
    torch.testing.assert_close(path.evaluate(q)[..., 0], p(q), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(path.derivative(q)[..., 0], dp(q), rtol=1e-13, atol=1e-13)


def test_natural_splines_reproduce_natural_cubic_splines_and_hermite_splines_lines():
    # A natural cubic spline is the one C^2 piecewise cubic with S'' = 0 at both ends through its data, so
    # sampling such a function at its knots and interpolating gives it back exactly. (A single cubic
    # polynomial with p'' = 0 at both ends is a line: no spline reproduces every cubic.) Build one
    # independently: S(t) = a + b t + sum_k c_k (t - t_k)_+^3, with sum_k c_k (t_N - t_k) = 0.
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0.0, 0.4, 0.9, 1.7, 2.2, 3.1, 4.0], dtype=D)
    c = torch.randn(len(t) - 1, 2, dtype=D, generator=g)
    c[-1] = -(c[:-1] * (t[-1] - t[:-2]).unsqueeze(-1)).sum(0) / (t[-1] - t[-2])
    a, b = torch.randn(2, dtype=D, generator=g), torch.randn(2, dtype=D, generator=g)

    def S(s):
        return a + b * s.unsqueeze(-1) + (c * (s.unsqueeze(-1) - t[:-1]).clamp(min=0).unsqueeze(-1) ** 3).sum(-2)

    def dS(s):
        return b + (3 * c * (s.unsqueeze(-1) - t[:-1]).clamp(min=0).unsqueeze(-1) ** 2).sum(-2)

    q = torch.linspace(0, 4, 81, dtype=D)
    for fn in (natural_cubic_coeffs, natural_cubic_spline_coeffs):
        sp = CubicSpline(fn(S(t), t), t)
        torch.testing.assert_close(sp.evaluate(q), S(q), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sp.derivative(q), dS(q), rtol=1e-11, atol=1e-11)
    # ... but not a cubic whose second derivative does not vanish at the ends
    cubic = (t**3).unsqueeze(-1)
    off = CubicSpline(natural_cubic_coeffs(cubic, t), t).evaluate(q)[..., 0] - q**3
    assert off.abs().max() > 1e-2
    # Hermite splines with backward differences and linear interpolation reproduce lines (and only lines:
    # the backward differences lag behind a curve)
    line = (3 - 2 * t).unsqueeze(-1)
    for sp in (CubicSpline(hermite_cubic_coefficients_with_backward_differences(line, t), t),
               CubicSpline(natural_cubic_coeffs(line, t), t), LinearInterpolation(linear_interpolation_coeffs(line, t), t)):
        torch.testing.assert_close(sp.evaluate(q)[..., 0], 3 - 2 * q, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(sp.derivative(q)[..., 0], torch.full_like(q, -2.0), rtol=1e-12, atol=1e-12)
    square = (t**2).unsqueeze(-1)
    herm = CubicSpline(hermite_cubic_coefficients_with_backward_differences(square, t), t).evaluate(q)[..., 0]
    assert (herm - q**2).abs().max() > 1e-2


def test_natural_spline_converges_at_fourth_order_inside():
    errs = []
    for n in (20, 40, 80):
        t = torch.linspace(0, 2 * math.pi, n + 1, dtype=D)
        sp = CubicSpline(natural_cubic_coeffs(torch.sin(t).unsqueeze(-1), t), t)
        q = torch.linspace(2.0, 4.0, 301, dtype=D)
        errs.append(float((sp.evaluate(q)[..., 0] - torch.sin(q)).abs().max()))
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(3.7 < o < 4.3 for o in orders), (errs, orders)


def test_missing_values_interpolate_the_observed_points_only():
    _, xn, t = _data(seed=3, length=11)
    lin = LinearInterpolation(linear_interpolation_coeffs(xn, t), t)
    nat = CubicSpline(natural_cubic_coeffs(xn, t), t)
    q = torch.linspace(float(t[0]), float(t[-1]), 50, dtype=D)
    for b0 in range(3):
        for b1 in range(2):
            for c in range(4):
                obs = ~torch.isnan(xn[b0, b1, :, c])
                k = int(obs.sum())
                vals_lin = lin.evaluate(q)[b0, b1, :, c]
                vals_nat = nat.evaluate(q)[b0, b1, :, c]
                if k == 0:
                    assert float(vals_lin.abs().max()) == 0.0 and float(vals_nat.abs().max()) == 0.0
                    continue
                # the same channel interpolated on its observations alone, held constant towards the ends
                idx = torch.nonzero(obs).flatten()
                first, last = int(idx[0]), int(idx[-1])
                ar = torch.arange(len(t))
                keep = obs | (ar < first) | (ar > last)
                xs_full = xn[b0, b1, :, c].clone()
                xs_full[ar < first] = xn[b0, b1, first, c]
                xs_full[ar > last] = xn[b0, b1, last, c]
                ts_full, xs_full = t[keep], xs_full[keep]
                ref_lin = LinearInterpolation(xs_full.unsqueeze(-1), ts_full).evaluate(q)[:, 0]
                torch.testing.assert_close(vals_lin, ref_lin, rtol=1e-12, atol=1e-12)
                ref_nat = CubicSpline(natural_cubic_coeffs(xs_full.unsqueeze(-1), ts_full), ts_full).evaluate(q)[:, 0]
                torch.testing.assert_close(vals_nat, ref_nat, rtol=1e-10, atol=1e-10)
                for i in torch.nonzero(obs).flatten().tolist():
                    torch.testing.assert_close(nat.evaluate(t[i])[b0, b1, c], xn[b0, b1, i, c])


def test_unequal_lengths_are_constant_after_their_end():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 10, 2, dtype=D, generator=g)
    lengths = [10, 6, 3]
    for i, n in enumerate(lengths):
        x[i, n:] = float("nan")
    t = torch.arange(10, dtype=D)
    torch.testing.assert_close(last_observation_times(x, t), torch.tensor([9.0, 5.0, 2.0], dtype=D))
    # the Hermite spline carries the last slope one piece further (backward differences), then stops
    for path, lag in ((LinearInterpolation(linear_interpolation_coeffs(x, t), t), 0),
                      (CubicSpline(hermite_cubic_coefficients_with_backward_differences(x, t), t), 1)):
        for i, n in enumerate(lengths):
            for s in torch.linspace(min(n - 1 + lag, 9), 9, 7).tolist():
                torch.testing.assert_close(path.evaluate(s)[i], x[i, n - 1])
                if s > n - 1 + lag:
                    assert float(path.derivative(s)[i].abs().max()) == 0.0


def test_per_sample_times_and_per_series_grids():
    x, _, t = _data(batch=(5,), length=8, channels=3)
    path = CubicSpline(natural_cubic_coeffs(x, t), t)
    s = torch.rand(5, 1, dtype=D) * 5
    out = path.evaluate(s)
    ref = torch.stack([path.evaluate(s[i, 0])[i] for i in range(5)])
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(path.derivative(s), torch.stack([path.derivative(s[i, 0])[i] for i in range(5)]))
    # every series its own observation times
    g = torch.Generator().manual_seed(5)
    tb = torch.sort(torch.rand(5, 8, dtype=D, generator=g) * 5, dim=-1).values
    for fn, cls in ((natural_cubic_coeffs, CubicSpline), (hermite_cubic_coefficients_with_backward_differences, CubicSpline),
                    (linear_interpolation_coeffs, LinearInterpolation)):
        p = cls(fn(x, tb), tb)
        for i in range(5):
            single = cls(fn(x[i], tb[i]), tb[i])
            si = s[i, 0]
            torch.testing.assert_close(p.evaluate(s)[i], single.evaluate(si), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(p.derivative(s)[i], single.derivative(si), rtol=1e-12, atol=1e-12)


def test_left_and_right_limits_at_knots():
    x, _, t = _data(batch=(), length=6, channels=2)
    lin = LinearInterpolation(linear_interpolation_coeffs(x, t), t)
    slopes = (x[1:] - x[:-1]) / (t[1:] - t[:-1]).unsqueeze(-1)
    torch.testing.assert_close(lin.derivative(t[2]), slopes[1])
    torch.testing.assert_close(lin.derivative(t[2], left=False), slopes[2])
    torch.testing.assert_close(lin.jump_ts, t)
    assert CubicSpline(natural_cubic_coeffs(x, t), t, smooth=True).jump_ts is None


def test_gradients_with_respect_to_the_data():
    _, xn, t = _data(batch=(2,), length=6, channels=2, missing=0.25)
    mask = ~torch.isnan(xn)
    vals = xn[mask].clone().requires_grad_(True)
    q = torch.tensor([[0.7], [3.1]], dtype=D)

    def f(v, fn, cls):
        z = torch.full_like(xn, float("nan")).masked_scatter(mask, v)
        p = cls(fn(z, t), t)
        return p.evaluate(q), p.derivative(q)

    for fn, cls in ((natural_cubic_coeffs, CubicSpline), (hermite_cubic_coefficients_with_backward_differences, CubicSpline),
                    (linear_interpolation_coeffs, LinearInterpolation)):
        assert torch.autograd.gradcheck(lambda v: f(v, fn, cls), (vals,))


def test_errors_name_the_argument():
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="strictly increasing"):
        natural_cubic_coeffs(x, torch.tensor([0.0, 1.0, 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="t must have shape"):
        linear_interpolation_coeffs(x, torch.arange(4.0))
    with pytest.raises(ValueError, match="at least two"):
        natural_cubic_coeffs(torch.randn(2, 1, 3))
    with pytest.raises(TypeError, match="floating-point"):
        linear_interpolation_coeffs(torch.ones(2, 5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="4 \\* channels"):
        CubicSpline(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="NaN"):
        LinearInterpolation(torch.full((2, 4, 3), float("nan")))
    with pytest.raises(ValueError, match="time channel"):
        x2 = x.clone()
        x2[0, 1, 0] = float("nan")
        rectilinear_interpolation_coeffs(x2, 0)
    knots = torch.linspace(0, 1, x.shape[-2]).expand(x.shape[:-1])  # one grid a series
    path = CubicSpline(natural_cubic_coeffs(x, knots), knots)
    with pytest.raises(ValueError, match=r"per-series knots.*= \(2, 1\)\); got shape \(3, 1\)"):
        path.evaluate(torch.zeros(3, 1))


def test_times_of_any_shape_as_in_torchcde():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 3, dtype=torch.float64, generator=g)
    t = torch.linspace(0, 3, 7, dtype=torch.float64)
    for path, ref in ((LinearInterpolation(linear_interpolation_coeffs(x, t), t),
                       torchcde.LinearInterpolation(torchcde.linear_interpolation_coeffs(x, t), t)),
                      (CubicSpline(natural_cubic_coeffs(x, t), t),
                       torchcde.CubicSpline(torchcde.natural_cubic_coeffs(x, t), t))):
        for shape in ((), (4,), (3, 1), (2, 3), (1, 2, 2)):
            s = torch.rand(shape, dtype=torch.float64, generator=g) * 4 - 0.5
            assert path.evaluate(s).shape == (2, *shape, 3)
            torch.testing.assert_close(path.evaluate(s), ref.evaluate(s))
            torch.testing.assert_close(path.derivative(s), ref.derivative(s))
        # one time a series (independent batch mode): batch shape followed by ones
        s = torch.tensor([[0.5], [2.0]], dtype=torch.float64)
        torch.testing.assert_close(path.evaluate(s), torch.stack([ref.evaluate(s[0, 0])[0], ref.evaluate(s[1, 0])[1]]))


def test_missing_time_in_a_rectilinear_path_raises_as_torchcde_does():
    x = torch.rand(2, 4, 2)
    x[0, 1, 0] = float("nan")
    for error in (ValueError, AssertionError):
        with pytest.raises(error, match="time channel"):
            linear_interpolation_coeffs(x, rectilinear=0)
