"""Peak memory of every adjoint at 100 and 1000 steps.

Measured as the peak of the tensor storage a solve and its backward pass hold at once
(``LiveTensorBytes`` of ``benchmarks/adjoints.py``: every operation's outputs are counted until their
storage is freed; parameters and ``y0``, which exist beforehand, are not). This is exact and
independent of the allocator, so the solve's own working set is measured, not the resident set of
the process (about 275 MB of PyTorch, against which a few hundred kB of working set are invisible).
DirectAdjoint stores every step's graph and must grow about linearly: that it does proves the
measurement tells the adjoints apart.
"""

import importlib.util
import pathlib

import pytest
import torch

import nde
from nde.solvers import Euler, ReversibleHeun

_BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "adjoints.py"


def _tensor_peak_mb():
    spec = importlib.util.spec_from_file_location("_nde_adjoint_benchmark", _BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.tensor_peak_mb


CASES = {
    "direct": (nde.DirectAdjoint, Euler, False),
    "checkpoint": (nde.CheckpointAdjoint, Euler, False),
    "backsolve": (nde.BacksolveAdjoint, Euler, False),
    "reversible_heun_adaptive": (nde.ReversibleAdjoint, ReversibleHeun, True),
}


def _peaks():
    peak = _tensor_peak_mb()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
    y0 = torch.randn(16, 8, requires_grad=True)
    out = {}
    for name, (adjoint, solver, adaptive) in CASES.items():
        res = []
        for n in (100, 1000):
            # adaptive: the PID controller's accept/reject machinery, with steps of at most 1/n
            kw = dict(controller=nde.PIDController(rtol=1e-2, atol=1e-2, dtmax=1.0 / n)) if adaptive else dict(dt0=1.0 / n)
            steps = []

            def go():
                sol = nde.solve(lambda t, y: net(y), solver(), 0.0, 1.0, y0, adjoint=adjoint(), **kw)
                (sol.ys**2).sum().backward()
                steps.append(sol.stats["num_steps"])

            res.append(peak(go))
            assert 0.9 * n <= steps[0] <= 1.1 * n, (name, steps)
        out[name] = res
    return out


def test_peak_memory_scaling():
    m = _peaks()
    ratio = {k: v[1] / v[0] for k, v in m.items()}
    # measured: direct 9.7x, checkpoint 1.75x, backsolve and reversible 1.00x
    assert ratio["direct"] >= 7, m  # linear: every step's graph is kept
    for k in ("backsolve", "reversible_heun_adaptive"):
        assert ratio[k] <= 1.15, (k, m)  # O(1) in the number of steps
        assert m[k][1] < 0.05 * m["direct"][1], (k, m)
    assert ratio["checkpoint"] <= 4, m  # sublinear: about sqrt(2 n) stored states
    assert m["checkpoint"][1] < 0.05 * m["direct"][1], m


def test_the_measurement_counts_saved_tensors_and_frees():
    peak = _tensor_peak_mb()
    x = torch.randn(1000, requires_grad=True)

    def saved():
        y = torch.tanh(x)  # 4000 bytes, saved for backward
        z = torch.tanh(y)  # another 4000
        del y
        z.sum().backward()  # then the gradients of z and y, and x.grad: 16 kB at the peak

    def transient():
        for _ in range(5):
            torch.tanh(x.detach())  # freed at once

    assert 16000 / 2**20 <= peak(saved) <= 16100 / 2**20
    assert 4000 / 2**20 <= peak(transient) <= 4100 / 2**20
    with pytest.raises(ZeroDivisionError):
        peak(lambda: 1 / 0)


def test_sde_reversible_adjoint_memory_is_flat_including_the_brownian_motion():
    """Reversible Heun on an SDE with ReversibleAdjoint: the solve's peak, Brownian motion's cached
    cells included (the BrownianInterval is created inside the measured call), is the same at 100 and
    1000 steps; DirectAdjoint's grows linearly. (The path caches a few chunks of about 2**16 numbers
    each, a constant; with this state of 4096 numbers, less than 100 steps' worth.)"""
    peak = _tensor_peak_mb()
    torch.manual_seed(0)
    drift = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16))
    diffusion = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16), torch.nn.Sigmoid())
    y0 = torch.randn(256, 16)

    def run(n, adjoint):
        def go():
            bm = nde.BrownianInterval(0.0, 1.0, (256, 16), seed=3, dt=1.0 / n)
            terms = nde.MultiTerm(nde.ODETerm(lambda t, y: drift(y)),
                                  nde.ControlTerm(lambda t, y: diffusion(y), bm, noise="diagonal"))
            sol = nde.solve(terms, ReversibleHeun(), 0.0, 1.0, y0, dt0=1.0 / n, adjoint=adjoint)
            sol.ys[-1].pow(2).sum().backward()
        return peak(go)

    rev = [run(n, nde.ReversibleAdjoint()) for n in (100, 1000)]
    direct = [run(n, nde.DirectAdjoint()) for n in (100, 1000)]
    # measured: reversible 1.00x (2.93 MB), direct 9.2x
    assert rev[1] <= 1.15 * rev[0], (rev, direct)
    assert direct[1] >= 7 * direct[0], (rev, direct)
