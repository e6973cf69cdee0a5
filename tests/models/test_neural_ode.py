"""NeuralODE learns a spiral; its interface is checked."""

import pytest
import torch
from torch import nn

import nde
from nde.models import NeuralODE

TRUE_A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])


def spiral_data(n=120, t1=6.0):
    t = torch.linspace(0.0, t1, n)
    y0 = torch.tensor([[2.0, 0.0]])
    with torch.no_grad():
        ys = nde.solve(lambda t, y: (y ** 3) @ TRUE_A, nde.solvers.Dopri5(), 0.0, t1, y0,
                       saveat=nde.SaveAt(ts=t), controller=nde.PIDController(rtol=1e-7, atol=1e-9)).ys
    return t, ys[:, 0]


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 50), nn.Tanh(), nn.Linear(50, 2))

    def forward(self, t, y):
        return self.net(y ** 3)


def test_neural_ode_learns_spiral():
    torch.manual_seed(0)
    t, ys = spiral_data()
    model = NeuralODE(Field(), rtol=1e-5, atol=1e-6)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    window = 10
    all_starts = torch.arange(0, len(t) - window)
    all_targets = torch.stack([ys[all_starts + i] for i in range(window)])

    def window_loss():
        # prediction error over every window of the trajectory
        with torch.no_grad():
            return (model(ys[all_starts], t[:window]) - all_targets).abs().mean().item()

    initial = window_loss()
    for it in range(400):
        starts = torch.randint(0, len(t) - window, (16,))
        target = torch.stack([ys[starts + i] for i in range(window)])
        loss = (model(ys[starts], t[:window]) - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = window_loss()
    assert final < 0.15 * initial, (initial, final)
    assert final < 0.05, final
    assert model.stats["nfe"] > 0


def test_neural_ode_interface_errors_and_modes():
    model = NeuralODE(Field(), dt0=0.05, solver=nde.solvers.RK4())
    y0 = torch.randn(5, 2)
    out = model(y0, torch.linspace(0, 1, 3))
    assert out.shape == (3, 5, 2)
    assert model.stats["num_steps"] == 20
    with pytest.raises(ValueError, match="t must be"):
        model(y0, torch.tensor(1.0))
    indep = NeuralODE(Field(), batch_mode="independent")
    out = indep(y0, torch.linspace(0, 1, 3))
    assert out.shape == (3, 5, 2)
    assert indep.stats["num_steps"].shape == (5,)


def test_neural_ode_saveat_and_solution():
    torch.manual_seed(0)
    field = Field()
    y0 = torch.randn(5, 2)
    t = torch.linspace(0, 1, 4)
    full = NeuralODE(field, rtol=1e-7, atol=1e-9)(y0, t)
    last = NeuralODE(field, rtol=1e-7, atol=1e-9, saveat=nde.SaveAt(t1=True))
    out = last(y0, t)
    assert out.shape == (1, 5, 2)
    torch.testing.assert_close(out[0], full[-1], rtol=1e-5, atol=1e-6)
    dense = NeuralODE(field, rtol=1e-7, atol=1e-9, saveat=nde.SaveAt(t1=True, dense=True))
    dense(y0, t)
    torch.testing.assert_close(dense.solution.evaluate(t[1]), full[1], rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="saveat"):
        NeuralODE(field, saveat=t)


def test_saveat_defaults():
    assert nde.SaveAt().t1 and not nde.SaveAt().t0
    both = nde.SaveAt(t0=True)
    assert both.t0 and both.t1
    assert not nde.SaveAt(ts=[0.0, 1.0]).t1 and nde.SaveAt(ts=[0.0, 1.0], t1=True).t1
    assert not nde.SaveAt(steps=True).t1 and not nde.SaveAt(dense=True).t1
    with pytest.raises(TypeError, match="ts="):
        nde.SaveAt(torch.linspace(0, 1, 3))
