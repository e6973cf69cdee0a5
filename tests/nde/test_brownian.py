import math

import numpy as np
import pytest
import scipy.stats
import torch

import nde
from nde._brownian import BrownianInterval


@pytest.fixture(autouse=True)
def _one_thread():
    # small tensors: one thread avoids oversubscription when the suite runs in parallel
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _bm(**kw):
    base = dict(t0=0.0, t1=1.0, shape=(4000,), seed=11, dtype=torch.float64)
    base.update(kw)
    return BrownianInterval(**base)


@pytest.mark.parametrize("s,u", [(0.0, 1.0), (0.1, 0.2), (0.123, 0.4567), (0.3001, 0.30015), (0.9, 1.0)])
def test_increments_are_gaussian_with_variance_h(s, u):
    bm = _bm(dt=0.05)
    w = bm.evaluate(s, u).numpy()
    h = u - s
    stat = scipy.stats.kstest(w / math.sqrt(h), "norm")
    assert stat.pvalue > 1e-3
    assert abs(w.var() / h - 1) < 0.1


def test_increments_independent():
    bm = _bm(dt=0.1)
    a = bm.evaluate(0.05, 0.33).numpy() / math.sqrt(0.28)
    b = bm.evaluate(0.33, 0.71).numpy() / math.sqrt(0.38)
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.06
    # (a + b)/sqrt(2) and (a - b)/sqrt(2) are standard normal only if a, b are independent
    assert scipy.stats.kstest((a + b) / math.sqrt(2), "norm").pvalue > 1e-3
    assert scipy.stats.kstest((a - b) / math.sqrt(2), "norm").pvalue > 1e-3


def test_additivity_and_point_values():
    bm = _bm(shape=(3, 5), dt=0.07)
    pts = [0.0, 0.013, 0.07, 0.21, 0.2137, 0.5, 0.93, 1.0]
    for s, t, u in zip(pts, pts[1:], pts[2:]):
        whole = bm.evaluate(s, u)
        parts = bm.evaluate(s, t) + bm.evaluate(t, u)
        torch.testing.assert_close(whole, parts, rtol=0, atol=1e-12)
        torch.testing.assert_close(whole, bm.evaluate(u) - bm.evaluate(s), rtol=0, atol=1e-12)
    torch.testing.assert_close(bm.evaluate(0.4, 0.2), -bm.evaluate(0.2, 0.4), rtol=0, atol=0)


def test_query_order_and_cache_eviction_do_not_change_values():
    ts = np.linspace(0, 1, 41)
    ts = np.concatenate([ts, [0.0123, 0.456, 0.8001]])
    ts.sort()
    pairs = list(zip(ts[:-1], ts[1:]))
    kw = dict(shape=(2, 3), seed=5, levy_area="space-time", dt=0.03)
    a = _bm(**kw)
    fwd = [a.evaluate(s, u, use_levy=True) for s, u in pairs]
    b = _bm(cache_size=2, **kw)  # tiny cache: values are recomputed after eviction
    rev = [b.evaluate(s, u, use_levy=True) for s, u in reversed(pairs)][::-1]
    perm = np.random.default_rng(0).permutation(len(pairs))
    c = _bm(**kw)
    shuf = {int(i): c.evaluate(*pairs[i], use_levy=True) for i in perm}
    for i in range(len(pairs)):
        for x, y, z in zip(fwd[i], rev[i], shuf[i]):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-14)
            torch.testing.assert_close(x, z, rtol=0, atol=1e-14)
    # a different seed gives a different path
    d = _bm(**{**kw, "seed": 6})
    assert not torch.allclose(d.evaluate(*pairs[3]), fwd[3][0])


def test_values_across_many_chunks_are_the_same_in_any_order():
    """Off-grid points far apart, across more than two 32-chunk super-blocks of chunk starts (chunks of
    one cell here), agree exactly whether queried forwards, backwards or shuffled."""
    kw = dict(shape=(2, 3), seed=9, levy_area="space-time", dt=0.01, chunk_elements=6)
    ts = np.sort(np.random.default_rng(1).uniform(0, 1, 60))
    pairs = list(zip(ts[:-1], ts[1:]))
    a, b, c = _bm(**kw), _bm(**kw), _bm(**kw)
    assert a._chunk == 1 and a.n_cells > 64
    fwd = [a.evaluate(s, u, use_levy=True) for s, u in pairs]
    rev = [b.evaluate(s, u, use_levy=True) for s, u in reversed(pairs)][::-1]
    perm = np.random.default_rng(2).permutation(len(pairs))
    shuf = {int(i): c.evaluate(*pairs[i], use_levy=True) for i in perm}
    for i in range(len(pairs)):
        for x, y, z in zip(fwd[i], rev[i], shuf[i]):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
            torch.testing.assert_close(x, z, rtol=0, atol=0)
    # and per-sample times (rows of the batch at their own times) see the same path
    d = _bm(**kw)
    t_rows = torch.tensor([[0.013], [0.871]], dtype=torch.float64)
    per = d.evaluate(t_rows)
    torch.testing.assert_close(per[0], a.evaluate(0.013)[0], rtol=0, atol=1e-15)
    torch.testing.assert_close(per[1], a.evaluate(0.871)[1], rtol=0, atol=1e-15)


def test_space_time_levy_area_moments():
    bm = _bm(shape=(20000,), levy_area="space-time", dt=0.1)
    for s, u in [(0.3, 0.4), (0.31, 0.37), (0.05, 0.77)]:
        w, hh = bm.evaluate(s, u, use_levy=True)
        h = u - s
        assert abs(hh.var().item() / (h / 12) - 1) < 0.05
        assert abs(hh.mean().item()) < 4 * math.sqrt(h / 12 / 20000)
        assert abs(torch.corrcoef(torch.stack([w, hh]))[0, 1].item()) < 0.03
        assert scipy.stats.kstest(hh.numpy() / math.sqrt(h / 12), "norm").pvalue > 1e-3
        # fourth moment of a Gaussian
        assert abs((hh**4).mean().item() / (3 * (h / 12) ** 2) - 1) < 0.15


def test_levy_area_is_consistent_with_time_integral():
    # I(s,u) = h (H + W/2) is additive: I(s,u) = I(s,t) + (u-t) W(s,t) + I(t,u)
    bm = _bm(shape=(7,), levy_area="space-time", dt=1 / 16, depth=10)
    s, t, u = 0.125, 0.3125, 0.5  # on the bridge grid, so no rounding of times
    w1, h1 = bm.evaluate(s, t, use_levy=True)
    w2, h2 = bm.evaluate(t, u, use_levy=True)
    w, hh = bm.evaluate(s, u, use_levy=True)
    i1, i2, i = (t - s) * (h1 + w1 / 2), (u - t) * (h2 + w2 / 2), (u - s) * (hh + w / 2)
    torch.testing.assert_close(i, i1 + (u - t) * w1 + i2, rtol=0, atol=1e-12)


def test_bridge_conditional_variance_inside_a_cell():
    # W(0.5) given W(0), W(1) with a single cell: variance 1/4 of the bridge, and total variance 1/2
    bm = _bm(shape=(20000,), dt=1.0)
    w1 = bm.evaluate(0.0, 1.0)
    wh = bm.evaluate(0.0, 0.5)
    resid = wh - 0.5 * w1
    assert abs(resid.var().item() / 0.25 - 1) < 0.05
    assert abs(torch.corrcoef(torch.stack([resid, w1]))[0, 1].item()) < 0.03


def test_per_sample_times():
    # grid and off-grid times, a backwards interval, several chunks: each row equals the scalar query
    bm = _bm(shape=(6, 2), dt=0.1, levy_area="space-time", chunk_elements=4)
    t0 = torch.tensor([0.0, 0.1, 0.25, 0.0, 0.7, 0.33], dtype=torch.float64).reshape(6, 1)
    t1 = torch.tensor([0.1, 0.3, 0.5, 1.0, 0.2, 0.9], dtype=torch.float64).reshape(6, 1)
    w, hh = bm.evaluate(t0, t1, use_levy=True)
    points = bm.evaluate(t1)
    for b in range(6):
        ws, hs = bm.evaluate(float(t0[b]), float(t1[b]), use_levy=True)
        torch.testing.assert_close(w[b], ws[b], rtol=0, atol=1e-13)
        torch.testing.assert_close(hh[b], hs[b], rtol=0, atol=1e-13)
        torch.testing.assert_close(points[b], bm.evaluate(float(t1[b]))[b], rtol=0, atol=1e-13)


def test_dtype_device_and_errors():
    bm = BrownianInterval(0.0, 2.0, (3,), seed=0)
    assert bm.evaluate(0.0, 1.0).dtype == torch.float32
    assert bm.evaluate(0.5, 1.0).shape == (3,)
    with pytest.raises(ValueError, match="outside"):
        bm.evaluate(0.0, 3.0)
    with pytest.raises(ValueError, match="levy_area"):
        bm.evaluate(0.0, 1.0, use_levy=True)
    with pytest.raises(ValueError, match="t0 < t1"):
        BrownianInterval(1.0, 0.0, (3,))
    with pytest.raises(ValueError, match="levy_area"):
        BrownianInterval(0.0, 1.0, (3,), levy_area="levy")
    with pytest.raises(TypeError, match="seed"):
        BrownianInterval(0.0, 1.0, (3,), seed=1.5)
    assert isinstance(bm, nde.AbstractPath)


def test_fixed_grid_queries_are_cheap():
    import time

    bm = BrownianInterval(0.0, 1.0, (256, 16), seed=0, dt=0.01)
    bm.evaluate(0.0, 0.01)
    start = time.perf_counter()
    for i in range(1, 100):
        bm.evaluate(i * 0.01, (i + 1) * 0.01)
    per_query = (time.perf_counter() - start) / 99
    assert per_query < 5e-4  # typically ~1e-5 s: a slice of pre-drawn cells


@pytest.mark.parametrize("levy_area", ["none", "space-time"])
def test_path_is_continuous_below_the_leaves(levy_area):
    # a solve run backwards meets 1.7999999999999998 where the forward one met 1.8: the same noise
    from nde._brownian import _SUB_LEVELS

    bm = BrownianInterval(0.0, 2.0, (2000, 3), seed=5, dtype=torch.float64, levy_area=levy_area)
    finest = bm.resolution / 2**_SUB_LEVELS  # the path is a polynomial on nodes of this width
    t = 1.8
    assert bm._locate(t)[2] > 0  # strictly inside a leaf
    for near in (math.nextafter(t, 0.0), math.nextafter(t, 3.0), t - 1e-13):
        for a in (0.3, 1.1):
            gap = (bm.evaluate(a, near) - bm.evaluate(a, t)).abs().max().item()
            # Lipschitz on the finest nodes: |dW| <~ a few sqrt(finest) per node width (it used to jump by
            # sqrt(resolution), 1e-3 here)
            assert gap < 10 * abs(t - near) / math.sqrt(finest)
            if levy_area != "none":
                h1, h2 = bm.evaluate(a, near, use_levy=True)[1], bm.evaluate(a, t, use_levy=True)[1]
                assert (h1 - h2).abs().max().item() < 1e-6
    # per-sample queries (independent batch mode) see the same continuous path
    rows = torch.full((2000, 1), t, dtype=torch.float64)
    rows[::2] = math.nextafter(t, 0.0)
    w = bm.evaluate(torch.full((2000, 1), 0.3, dtype=torch.float64), rows)
    torch.testing.assert_close(w, bm.evaluate(0.3, t), rtol=0, atol=1e-9)
    # increments between sub-leaf points of consecutive leaves: additive, variance their length
    r = bm.resolution
    pts = [1.3 + (i + 0.37) * r for i in range(33)]
    steps = [bm.evaluate(x, y) for x, y in zip(pts[:-1], pts[1:])]
    torch.testing.assert_close(sum(steps), bm.evaluate(pts[0], pts[-1]), rtol=0, atol=1e-12)
    assert abs(torch.stack(steps).var().item() / r - 1) < 0.05


def test_below_leaf_coefficients_meet_the_leaf_at_its_ends():
    # the sub-leaf interpolant starts at zero and ends on the leaf's own (W, I)
    from nde._brownian import _SUB_LEVELS

    for levy_area in ("none", "space-time"):
        bm = _bm(levy_area=levy_area)
        r = 0.01
        cW, cI, idxs = bm._below_leaf(np.array([1e-15, 1 - 1e-15, 0.3]), np.array([r, r, r]))
        nb = (2 if bm._levy else 1) + _SUB_LEVELS * (2 if bm._levy else 1)
        assert cW.shape == (3, nb) and len(idxs) == _SUB_LEVELS
        np.testing.assert_allclose(cW[0], 0.0, atol=1e-6)
        np.testing.assert_allclose(cW[1], np.eye(nb)[0], atol=1e-6)
        if bm._levy:
            np.testing.assert_allclose(cI[0], 0.0, atol=1e-9)
            np.testing.assert_allclose(cI[1], np.eye(nb)[1], atol=1e-9)
        assert [int(i[2]) for i in idxs] == [int(0.3 * (1 << e)) for e in range(_SUB_LEVELS)]
        # one time at a time (the kept descent) gives the same coefficients as the vectorised rows
        for th in (0.3, 1e-15, 1 - 1e-15, 0.5):
            sW, sI, sidx = bm._below_leaf(th, r)
            vW, vI, vidx = bm._below_leaf(np.array([th]), np.array([r]))
            np.testing.assert_allclose(sW, vW[0], rtol=0, atol=1e-12)
            if bm._levy:
                np.testing.assert_allclose(sI, vI[0], rtol=0, atol=1e-14)
            assert [int(i) for i in sidx] == [int(i[0]) for i in vidx]


def test_increments_exact_below_the_bridge_grid():
    # a long interval with coarse cells: W(0.0001, 0.0002) used to round to an exactly zero increment
    bm = BrownianInterval(0.0, 1000.0, (20000,), seed=3, dtype=torch.float64, dt_min=1e-5)
    w = bm.evaluate(0.0001, 0.0002).numpy()
    assert scipy.stats.kstest(w / math.sqrt(1e-4), "norm").pvalue > 1e-3
    assert abs(w.var() / 1e-4 - 1) < 0.05
    # without dt_min such an increment lies inside one leaf of the bridge: refused, with the fix named
    coarse = BrownianInterval(0.0, 1000.0, (20000,), seed=3, dtype=torch.float64)
    with pytest.raises(ValueError, match="dt_min"):
        coarse.evaluate(0.0001, 0.0002)
    # increments shorter than a leaf but crossing a leaf boundary are exact too, with their Lévy area
    bm = _bm(shape=(20000,), dt=0.1, levy_area="space-time")
    r = bm.resolution
    s = 0.3 + 0.7 * r
    for h in (0.6 * r, 1.3 * r, 7.77 * r):
        w, hh = bm.evaluate(s, s + h, use_levy=True)
        assert scipy.stats.kstest(w.numpy() / math.sqrt(h), "norm").pvalue > 1e-3
        assert scipy.stats.kstest(hh.numpy() / math.sqrt(h / 12), "norm").pvalue > 1e-3
        assert abs(torch.corrcoef(torch.stack([w, hh]))[0, 1].item()) < 0.03


def test_sub_leaf_points_are_consistent_and_independent():
    bm = _bm(shape=(20000,), dt=0.1, levy_area="space-time")
    r = bm.resolution
    s, t, u = 0.5 + 0.2 * r, 0.5 + 1.45 * r, 0.5 + 2.9 * r   # three different leaves
    a, b = bm.evaluate(s, t), bm.evaluate(t, u)
    torch.testing.assert_close(a + b, bm.evaluate(s, u), rtol=0, atol=1e-15)
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.03
    assert abs(a.var().item() / (t - s) - 1) < 0.05 and abs(b.var().item() / (u - t) - 1) < 0.05
    # the space-time Lévy area stays additive through the time integral (as on the grid)
    (w1, h1), (w2, h2), (w, hh) = (bm.evaluate(x, y, use_levy=True) for x, y in ((s, t), (t, u), (s, u)))
    i1, i2, i = (t - s) * (h1 + w1 / 2), (u - t) * (h2 + w2 / 2), (u - s) * (hh + w / 2)
    torch.testing.assert_close(i, i1 + (u - t) * w1 + i2, rtol=0, atol=1e-14)
    # a fresh instance queried in the opposite order gives the same values
    fresh = _bm(shape=(20000,), dt=0.1, levy_area="space-time")
    torch.testing.assert_close(fresh.evaluate(t, u), b, rtol=0, atol=0)
    torch.testing.assert_close(fresh.evaluate(s, t), a, rtol=0, atol=0)


def test_dt_min_sets_the_depth():
    bm = BrownianInterval(0.0, 1.0, (2,), dt=0.1, dt_min=1e-6)
    assert bm.resolution <= 1e-6 / 4 and bm.resolution > 1e-6 / 16
    assert BrownianInterval(0.0, 1.0, (2,), dt=0.1).depth == 12
    with pytest.raises(ValueError, match="dt_min"):
        BrownianInterval(0.0, 1.0, (2,), dt_min=-1.0)


def test_torchsde_call_convention():
    # bm(ta, tb, return_U=..., return_A=...) as torchsde's BrownianInterval; a (batch,) path is a batch
    # of one-dimensional motions there, whose space-space area is zero
    for shape, a_shape in (((16, 3), (16, 3, 3)), ((16,), (16,)), ((), ())):
        bm = BrownianInterval(t0=0.0, t1=1.0, size=shape, levy_area_approximation="davie", entropy=3)
        w, u, a = bm(0.2, 0.7, return_U=True, return_A=True)
        assert w.shape == shape and u.shape == shape and a.shape == a_shape
        torch.testing.assert_close(w, bm(0.2, 0.7))
        h = bm.evaluate(0.2, 0.7, use_levy=True)[1]
        torch.testing.assert_close(u, 0.5 * (h + 0.5 * w))
        if len(shape) < 2:
            assert (a == 0).all()
        w0, a0 = bm(0.7, return_A=True)  # one time: the interval from t0
        torch.testing.assert_close(w0, bm(0.0, 0.7))
    with pytest.raises(ValueError, match="levy_area"):
        BrownianInterval(0.0, 1.0, (16,))(0.2, 0.7, return_A=True)


def test_conditioned_on_its_increment_is_a_brownian_bridge():
    n, L = 40000, 2.0
    wg = torch.randn(n, dtype=torch.float64) * 0.8
    bm = BrownianInterval(0.0, L, W=wg, seed=9)  # shape and dtype from W, as in torchsde
    assert bm.shape == (n,) and bm.dtype == torch.float64
    torch.testing.assert_close(bm.evaluate(0.0, L), wg, rtol=0, atol=1e-13)
    for t in (0.3, 1.234567891):  # a grid-free time too
        w = bm.evaluate(0.0, t)
        z = (w - wg * t / L) / math.sqrt(t * (L - t) / L)
        assert scipy.stats.kstest(z.numpy(), "norm").pvalue > 1e-3
        torch.testing.assert_close(bm.evaluate(0.0, t) + bm.evaluate(t, L), wg, rtol=0, atol=1e-13)
        torch.testing.assert_close(bm.evaluate(t), w, rtol=0, atol=1e-13)
    # differentiable with respect to the value conditioned on: dW(0, t)/dW = t / L
    wr = wg[:3].clone().requires_grad_(True)
    BrownianInterval(0.0, L, W=wr, seed=9).evaluate(0.0, 0.5).sum().backward()
    torch.testing.assert_close(wr.grad, torch.full((3,), 0.5 / L, dtype=torch.float64))


def test_conditioned_on_increment_and_levy_area():
    n, L = 40000, 1.0
    wg = torch.randn(n, dtype=torch.float64)
    hg = torch.randn(n, dtype=torch.float64) / math.sqrt(12)
    bm = BrownianInterval(0.0, L, W=wg, H=hg, levy_area="space-time", seed=4)
    w, h = bm.evaluate(0.0, L, use_levy=True)
    torch.testing.assert_close(w, wg, rtol=0, atol=1e-13)
    torch.testing.assert_close(h, hg, rtol=0, atol=1e-12)
    # the halves: given (W, H) of the whole, W of the first half has mean W/2 + 3H/2 and variance 1/16
    # (Gaussian conditioning on (W, H); the same law the bridge levels use)
    w1 = bm.evaluate(0.0, 0.5)
    z = (w1 - (wg / 2 + 1.5 * hg)) / math.sqrt(1 / 16)
    assert scipy.stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    # additivity of W and of the time integral, and per-sample queries agree
    (wa, ha), (wb, hb) = bm.evaluate(0.0, 0.37, use_levy=True), bm.evaluate(0.37, L, use_levy=True)
    torch.testing.assert_close(wa + wb, wg, rtol=0, atol=1e-13)
    torch.testing.assert_close(L * (hg + wg / 2), 0.37 * (ha + wa / 2) + 0.63 * (hb + wb / 2) + 0.63 * wa,
                               rtol=0, atol=1e-12)
    rows = torch.full((n, 1), 0.37, dtype=torch.float64).reshape(n)
    wr, hr = bm.evaluate(torch.zeros(n, dtype=torch.float64), rows, use_levy=True)
    torch.testing.assert_close(wr, wa, rtol=0, atol=1e-13)
    torch.testing.assert_close(hr, ha, rtol=0, atol=1e-13)
    # H alone: the free W over [t0, t1], the given H
    only = BrownianInterval(0.0, L, H=hg, levy_area="space-time", seed=4)
    w, h = only.evaluate(0.0, L, use_levy=True)
    torch.testing.assert_close(h, hg, rtol=0, atol=1e-12)
    assert abs(w.var().item() - L) < 0.05
    with pytest.raises(ValueError, match="levy_area"):
        BrownianInterval(0.0, L, H=hg)
    with pytest.raises(ValueError, match="shape"):
        BrownianInterval(0.0, L, shape=(3,), W=wg)
    with pytest.raises(TypeError, match="W"):
        BrownianInterval(0.0, L, shape=(3,), W=[1.0, 2.0, 3.0])


def test_brownian_tree_conditioned_on_its_end():
    from nde import BrownianTree

    w0, w1 = torch.zeros(4, 2, dtype=torch.float64), torch.full((4, 2), 1.5, dtype=torch.float64)
    tree = BrownianTree(0.0, w0, t1=2.0, w1=w1, entropy=3)
    torch.testing.assert_close(tree(2.0), w1, rtol=0, atol=1e-13)
    torch.testing.assert_close(tree(0.0), w0, rtol=0, atol=0)


def test_conditioned_per_sample_queries_with_two_batch_dimensions():
    wg = torch.randn(3, 5, 2, dtype=torch.float64)
    bm = BrownianInterval(0.0, 1.0, W=wg, seed=2)
    ta = torch.rand(3, 5, 1, dtype=torch.float64) * 0.5
    tb = 0.5 + torch.rand(3, 5, 1, dtype=torch.float64) * 0.5
    w, pts = bm.evaluate(ta, tb), bm.evaluate(tb)
    for i in range(3):
        for j in range(5):
            torch.testing.assert_close(w[i, j], bm.evaluate(float(ta[i, j]), float(tb[i, j]))[i, j], rtol=0, atol=1e-13)
            torch.testing.assert_close(pts[i, j], bm.evaluate(float(tb[i, j]))[i, j], rtol=0, atol=1e-13)
    torch.testing.assert_close(bm.evaluate(torch.zeros(3, 5, 1), torch.ones(3, 5, 1)), wg, rtol=0, atol=1e-13)
