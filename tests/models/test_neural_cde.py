import math

import pytest
import torch

import nde
from nde.models import NeuralCDE


@pytest.fixture(autouse=True)
def _one_thread():
    # small tensors: threads only add synchronisation (and stall badly on a loaded machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def spirals(n, length=40, missing=0.3, seed=0, irregular=0.0):
    """Clockwise (label 0) and anticlockwise (label 1) spirals of random radius, partially observed.

    ``irregular``: the fraction of the grid times at which a series is not observed at all (NaN in every
    channel; the first time is always observed); ``missing``: the fraction of the remaining values lost
    channel by channel. As in the tutorial ``tutorials/neural_cde_spirals.py``.
    """
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 4 * math.pi, length)
    start = torch.rand(n, 1, generator=g) * 2 * math.pi
    label = torch.randint(0, 2, (n,), generator=g)
    sign = (2 * label - 1).unsqueeze(-1).float()
    r = (1 - t / (5 * math.pi)) * (0.8 + 0.4 * torch.rand(n, 1, generator=g))
    x = torch.stack([r * torch.cos(start + t), sign * r * torch.sin(start + t)], -1)
    x = x + 0.05 * torch.randn(x.shape, generator=g)
    unobserved = torch.rand(n, length, generator=g) < irregular
    unobserved[:, 0] = False
    x[unobserved] = float("nan")
    x[torch.rand(x.shape, generator=g) < missing] = float("nan")
    return x, t * (length - 1) / (4 * math.pi), label


def test_neural_cde_learns_irregular_partially_missing_spirals():
    # the tutorial's data: every series observed at a random half of the times, then 30% of the values lost
    x, t, y = spirals(384, irregular=0.5)
    torch.manual_seed(0)
    model = NeuralCDE(2, 16, 1, width=64, dt0=1.0)
    coeffs = model.coeffs(x, t)
    assert not torch.isnan(coeffs).any()
    tr, te = slice(0, 256), slice(256, 384)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(1)
    for step in range(60):  # mini-batches of 64, as the tutorial
        idx = torch.randint(0, 256, (64,), generator=g)
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(coeffs=coeffs[tr][idx], t=t).squeeze(-1),
                                                                    y[tr][idx].float())
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = ((model(coeffs=coeffs[te], t=t).squeeze(-1) > 0).long() == y[te]).float().mean().item()
    assert acc >= 0.95, acc
    assert model.stats["num_steps"] == len(t) - 1


def test_sequence_to_sequence_and_raw_input():
    x, t, _ = spirals(6, length=12)
    model = NeuralCDE(2, 4, 3, width=16, interpolation="cubic")
    ts = torch.tensor([0.0, 2.5, 11.0])
    out = model(x, t, ts=ts)
    assert out.shape == (6, 3, 3)
    final = model(x, t)
    torch.testing.assert_close(out[:, -1], final, rtol=1e-4, atol=1e-5)
    # the initial state comes from the first observation: at ts[0] the output is readout(initial(X(t0)))
    X = model.path(model.coeffs(x, t), t)
    torch.testing.assert_close(out[:, 0], model.readout(model.initial(X.evaluate(t[0]))))
    for interp in ("linear", "rectilinear", "hermite"):
        m = NeuralCDE(2, 4, 3, width=16, interpolation=interp, dt0=0.5)
        assert m(x, t).shape == (6, 3)


def test_unequal_lengths_read_out_at_every_series_end():
    x, t, _ = spirals(3, length=12, missing=0.0)
    lengths = [12, 8, 5]
    for i, n in enumerate(lengths):
        x[i, n:] = float("nan")
    model = NeuralCDE(2, 4, 2, width=16, dt0=0.5).double()
    x, t = x.double(), t.double()
    out = model(x, t, t_end=nde.last_observation_times(x, t))
    steps = model.stats["num_steps"]
    for i, n in enumerate(lengths):
        alone = model(x[i:i + 1, :n], t[:n])
        torch.testing.assert_close(out[i:i + 1], alone, rtol=1e-10, atol=1e-10)
    assert steps[0] > steps[1] > steps[2]


def test_neural_cde_errors():
    with pytest.raises(ValueError, match="interpolation"):
        NeuralCDE(2, 4, 1, interpolation="quintic")
    with pytest.raises(ValueError, match="include_time"):
        NeuralCDE(2, 4, 1, interpolation="rectilinear", include_time=False)
    model = NeuralCDE(2, 4, 1)
    with pytest.raises(ValueError, match="input_channels=2"):
        model(torch.randn(3, 10, 5))
    with pytest.raises(ValueError, match="exactly one"):
        model()
