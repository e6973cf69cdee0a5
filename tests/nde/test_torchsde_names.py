"""torchsde's public names in nde: SDE base classes, Brownian classes, settings."""

import pytest
import torch
import torchsde
import torchsde.settings

import nde


def test_every_public_torchsde_name_is_in_nde():
    missing = [n for n in dir(torchsde) if not n.startswith("_") and n != "types" and not hasattr(nde, n)]
    assert missing == []


@pytest.mark.parametrize("name", ["METHODS", "NOISE_TYPES", "SDE_TYPES", "LEVY_AREA_APPROXIMATIONS", "METHOD_OPTIONS"])
def test_settings_hold_torchsde_values(name):
    ours, theirs = getattr(nde.settings, name), getattr(torchsde.settings, name)
    assert ours.all() == theirs.all()
    for key in dir(theirs):
        if not key.startswith("_") and isinstance(getattr(theirs, key), str):
            assert getattr(ours, key) == getattr(theirs, key)
    assert theirs.all()[0] in ours and "blah" not in ours


def test_sde_base_classes_check_and_hold_their_types():
    assert nde.SDEIto("diagonal").sde_type == "ito"
    s = nde.SDEStratonovich(noise_type="general")
    assert (s.sde_type, s.noise_type) == ("stratonovich", "general") and isinstance(s, torch.nn.Module)
    with pytest.raises(ValueError, match="noise type.*'blah'"):
        nde.BaseSDE(noise_type="blah", sde_type="ito")
    with pytest.raises(ValueError, match="sde type.*'blah'"):
        nde.BaseSDE(noise_type="scalar", sde_type="blah")


class _OU(nde.SDEIto):
    def __init__(self):
        super().__init__(noise_type=nde.settings.NOISE_TYPES.diagonal)
        self.theta = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

    def f(self, t, y):
        return -self.theta * y

    def g(self, t, y):
        return 0.3 * torch.ones_like(y)


def test_brownian_path_and_tree_follow_torchsde_conventions():
    w0 = torch.full((5, 3), 2.0, dtype=torch.float64)
    tree = nde.BrownianTree(0.0, w0, t1=2.0, entropy=4, tol=1e-5)
    assert tree.resolution <= 1e-5 / 4 and isinstance(tree, nde.BaseBrownian) and tree.size() == (5, 3)
    torch.testing.assert_close(tree(0.0), w0)  # point values include w0, increments do not
    torch.testing.assert_close(tree(0.3, 1.7), tree(1.7) - tree(0.3), rtol=0, atol=1e-12)
    again = nde.BrownianTree(0.0, w0, t1=2.0, entropy=4, tol=1e-5)
    torch.testing.assert_close(again(1.1, 1.3), tree(1.1, 1.3), rtol=0, atol=0)
    path = nde.BrownianPath(1.0, w0)
    assert (path.t0, path.t1) == (1.0, 2.0) and path.dtype == torch.float64
    torch.testing.assert_close(path(1.0), w0)
    rev = nde.ReverseBrownian(tree)
    torch.testing.assert_close(rev(-1.7, -0.3), tree(0.3, 1.7), rtol=0, atol=0)
    assert (rev.t0, rev.t1, rev.shape) == (-2.0, 0.0, (5, 3))
    like = nde.brownian_interval_like(w0, t1=3.0, entropy=1, levy_area_approximation="space-time")
    assert like.shape == (5, 3) and like.t1 == 3.0 and like.dtype == torch.float64 and like.levy_area == "space-time"


@pytest.mark.parametrize("make", [
    lambda y0: nde.BrownianTree(0.0, torch.zeros_like(y0), t1=1.0, entropy=2),
    lambda y0: nde.BrownianPath(0.0, torch.zeros_like(y0)),
    lambda y0: nde.ReverseBrownian(nde.BrownianInterval(-1.0, 0.0, y0.shape, seed=2, dtype=y0.dtype)),
])
def test_sdeint_takes_them_as_bm(make):
    # Euler--Maruyama through nde.sdeint on each Brownian class equals a hand loop over its increments
    sde = _OU()
    y0 = torch.full((6, 2), 0.5, dtype=torch.float64)
    bm = make(y0)
    ts = torch.linspace(0, 1, 3, dtype=torch.float64)
    ys = nde.sdeint(sde, y0, ts, bm=bm, method="euler", dt=0.125)
    y, out = y0, [y0]
    for i in range(8):
        s, u = i * 0.125, (i + 1) * 0.125
        y = y + sde.f(s, y) * 0.125 + sde.g(s, y) * bm(s, u)
        if i % 4 == 3:
            out.append(y)
    torch.testing.assert_close(ys, torch.stack(out), rtol=0, atol=1e-12)


def test_call_clamps_times_outside_the_interval_as_torchsde():
    bm = nde.BrownianInterval(0.0, 1.0, size=(3,), entropy=1, dtype=torch.float64)
    with pytest.warns(UserWarning, match="tb<=t1"):
        w = bm(0.5, 1.5)
    torch.testing.assert_close(w, bm(0.5, 1.0), rtol=0, atol=0)
    with pytest.warns(UserWarning, match="ta>=t0"):
        torch.testing.assert_close(bm(-1.0, 0.5), bm(0.0, 0.5), rtol=0, atol=0)
    with pytest.raises(ValueError, match="outside"):  # nde's own evaluate refuses instead
        bm.evaluate(0.5, 1.5)
