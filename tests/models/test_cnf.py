"""CNF: exact log-densities of a linear flow, unbiased Hutchinson traces, sampling, and learning a density."""

import math

import pytest
import torch

import nde
from nde.models import CNF


class _Linear(torch.nn.Module):
    def __init__(self, A):
        super().__init__()
        self.A = torch.nn.Parameter(A)

    def forward(self, t, z):
        return z @ self.A.T


def _linear_cnf(trace, dim=3):
    torch.manual_seed(0)
    A = 0.5 * torch.randn(dim, dim, dtype=torch.float64)
    cnf = CNF(dim, vector_field=_Linear(A), rtol=1e-10, atol=1e-12, trace=trace).double()
    return cnf, A


def _linear_logp(x, A, t1=1.0):
    # x = exp(A t1) z  =>  log p(x) = log N(exp(-A t1) x) - t1 tr(A)
    z = x @ torch.linalg.matrix_exp(-A * t1).T
    d = x.shape[-1]
    return -0.5 * (z**2).sum(-1) - 0.5 * d * math.log(2 * math.pi) - t1 * torch.trace(A)


def test_exact_log_prob_of_linear_flow_and_sampling():
    cnf, A = _linear_cnf("exact")
    x = torch.randn(7, 3, dtype=torch.float64)
    with torch.no_grad():
        lp = cnf.log_prob(x)
    assert torch.allclose(lp, _linear_logp(x, A), atol=1e-8)
    with torch.no_grad():
        s = cnf.transform(x)
    assert torch.allclose(s, x @ torch.linalg.matrix_exp(A).T, atol=1e-8)
    assert cnf.sample(5).shape == (5, 3)


def test_hutchinson_is_unbiased():
    cnf, A = _linear_cnf("hutchinson")
    x = torch.randn(1, 3, dtype=torch.float64).expand(4000, 3).contiguous()
    with torch.no_grad():
        lp = cnf.log_prob(x)
    exact = _linear_logp(x[:1], A)
    assert lp.std() > 1e-3  # it is an estimate
    assert abs(float(lp.mean() - exact)) < 4 * float(lp.std()) / math.sqrt(4000) + 1e-6


def test_gradients_through_log_prob_match_finite_differences():
    cnf, A = _linear_cnf("exact", dim=2)
    x = torch.randn(3, 2, dtype=torch.float64)
    loss = -cnf.log_prob(x).mean()
    (g,) = torch.autograd.grad(loss, [cnf.vector_field.A])
    fd = torch.zeros_like(A)
    eps = 1e-6
    for i in range(2):
        for j in range(2):
            E = torch.zeros_like(A)
            E[i, j] = eps
            fd[i, j] = (-_linear_logp(x, A + E).mean() + _linear_logp(x, A - E).mean()) / (2 * eps)
    assert torch.allclose(g, fd, atol=1e-6)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_cnf_learns_a_gaussian(trace):
    # measured test NLL: 2.172 (Hutchinson-trained, evaluated with the exact trace); true 2.145
    torch.manual_seed(0)
    L = torch.tensor([[1.0, 0.0], [0.8, 0.5]])
    mu = torch.tensor([1.0, -0.5])
    data = torch.randn(2048, 2) @ L.T + mu
    test = torch.randn(2048, 2) @ L.T + mu
    true_nll = 0.5 * 2 * (1 + math.log(2 * math.pi)) + float(torch.log(torch.diagonal(L)).sum())
    cnf = CNF(2, width=32, depth=1, rtol=1e-4, atol=1e-6, solver=nde.solvers.Tsit5(), trace=trace)
    opt = torch.optim.Adam(cnf.parameters(), lr=2e-2)
    for step in range(120):
        batch = data[torch.randint(0, 2048, (256,))]
        loss = -cnf.log_prob(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    cnf.trace = "exact"
    with torch.no_grad():
        nll = float(-cnf.log_prob(test).mean())
    with torch.no_grad():
        nll0 = float(-CNF(2, width=32, depth=1).log_prob(test).mean())
    print(f"CNF ({trace} trace in training) test NLL {nll:.3f} (true {true_nll:.3f}, untrained {nll0:.3f})")
    assert nll < true_nll + 0.15, (nll, true_nll, nll0)
    assert nll0 > true_nll + 0.5


def moons(n, generator):
    """Two interleaved half circles (noise 0.05), centred and scaled by 1.5 as in the CNF tutorial."""
    k = n // 2
    a = torch.rand(n, generator=generator) * math.pi
    upper = torch.stack([torch.cos(a[:k]), torch.sin(a[:k])], -1)
    lower = torch.stack([1 - torch.cos(a[k:]), 0.5 - torch.sin(a[k:])], -1)
    x = torch.cat([upper, lower]) + 0.05 * torch.randn(n, 2, generator=generator)
    return (x - torch.tensor([0.5, 0.25])) * 1.5


def test_cnf_learns_two_moons():
    # a multimodal density: the best single Gaussian reaches a test log-likelihood of -2.71; this CNF,
    # trained with two fixed RK4 steps and evaluated with an accurate adaptive solve, -1.90 (measured)
    g = torch.Generator().manual_seed(0)
    train, test = moons(4096, g), moons(2048, g)
    gauss_ll = float(torch.distributions.MultivariateNormal(train.mean(0), torch.cov(train.T)).log_prob(test).mean())
    torch.manual_seed(0)
    cnf = CNF(2, width=64, depth=2, solver=nde.solvers.RK4(), dt0=0.5)
    opt = torch.optim.Adam(cnf.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=300)
    for step in range(300):
        loss = -cnf.log_prob(train[torch.randint(0, len(train), (256,))]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    accurate = CNF(2, vector_field=cnf.vector_field, solver=nde.solvers.Dopri5(), rtol=1e-6, atol=1e-8)
    with torch.no_grad():
        ll = float(accurate.log_prob(test).mean())
    print(f"two moons: CNF test log-likelihood {ll:.3f}, best Gaussian {gauss_ll:.3f}")
    assert gauss_ll < -2.6
    assert ll > -2.2 and ll > gauss_ll + 0.5, (ll, gauss_ll)


def test_errors():
    with pytest.raises(ValueError, match="trace"):
        CNF(2, trace="approx")
    with pytest.raises(ValueError, match="dim"):
        CNF(0)
    with pytest.raises(ValueError, match="last dimension"):
        CNF(2).log_prob(torch.randn(3, 4))
    with pytest.raises(ValueError, match="dt0"):
        CNF(2, dt0=2.0)


def test_cnf_gradients_agree_across_adjoints():
    x = torch.randn(16, 2, dtype=torch.float64)
    res = []
    for adj in (nde.DirectAdjoint(), nde.CheckpointAdjoint(), nde.BacksolveAdjoint()):
        torch.manual_seed(1)
        cnf = CNF(2, width=16, rtol=1e-8, atol=1e-10, adjoint=adj).double()
        g = torch.autograd.grad(cnf.log_prob(x).mean(), list(cnf.parameters()))
        res.append(torch.cat([a.flatten() for a in g]))
    assert float((res[1] - res[0]).abs().max() / res[0].abs().max()) < 1e-10
    assert float((res[2] - res[0]).abs().max() / res[0].abs().max()) < 1e-6
