"""SDE benchmark: nde against a hand-written loop and torchsde on the same work.

Batch 256, 16-dimensional state, diagonal noise, drift and diffusion 2-hidden-layer width-64 MLPs,
100 steps on [0, 1], forward + backward of the final state's squared norm.

Run: ``python benchmarks/sde.py`` (prints a table of median wall times and ratios). Memory is the
peak of the tensor storage one forward + backward holds at once (``tensor_peak_mb`` of
``benchmarks/adjoints.py``), the Brownian motion's cached cells included.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torchsde

import nde
from nde import BrownianInterval, ControlTerm, MultiTerm, ODETerm
from nde.solvers import EulerMaruyama, ReversibleHeun

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adjoints import tensor_peak_mb  # noqa: E402

B, D, WIDTH = 256, 16, 64


def mlp(final=None):
    layers = [torch.nn.Linear(D, WIDTH), torch.nn.SiLU(), torch.nn.Linear(WIDTH, WIDTH), torch.nn.SiLU(),
              torch.nn.Linear(WIDTH, D)]
    if final is not None:
        layers.append(final)
    return torch.nn.Sequential(*layers)


class SDE(torch.nn.Module):
    def __init__(self, sde_type):
        super().__init__()
        self.noise_type, self.sde_type = "diagonal", sde_type
        self.drift = mlp()
        self.diffusion = mlp(torch.nn.Sigmoid())

    def f(self, t, y):
        return self.drift(y)

    def g(self, t, y):
        return self.diffusion(y)


def median_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


CPU = {}  # median CPU time of the last interleaved() calls, by function


def interleaved(fns, repeats):
    """Median wall time of each function, run round-robin so that load changes hit all alike (the
    median CPU time of the process, steadier on a shared machine, goes to ``CPU[fn]``)."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    cpu = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start, c0 = time.perf_counter(), time.process_time()
            fn()
            times[i].append(time.perf_counter() - start)
            cpu[i].append(time.process_time() - c0)
    for fn, c in zip(fns, cpu):
        CPU[fn] = statistics.median(c)
    return [statistics.median(t) for t in times]


def params_zero(sde):
    for p in sde.parameters():
        p.grad = None


def main(repeats=5, steps=100):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    sde = SDE("ito")
    y0 = torch.randn(B, D)
    dt = 1.0 / steps
    ts = torch.tensor([0.0, 1.0])

    def hand():
        dws = torch.randn(steps, B, D) * dt**0.5
        y = y0
        for i in range(steps):
            y = y + sde.f(None, y) * dt + sde.g(None, y) * dws[i]
        y.pow(2).sum().backward()
        params_zero(sde)

    seed = [0]

    def nde_em(default=False):
        seed[0] += 1
        bm = BrownianInterval(0.0, 1.0, (B, D), seed=seed[0], dt=None if default else dt)
        terms = MultiTerm(ODETerm(sde.f), ControlTerm(sde.g, bm, noise="diagonal"))
        sol = nde.solve(terms, EulerMaruyama(), 0.0, 1.0, y0, dt0=dt)
        sol.ys[-1].pow(2).sum().backward()
        params_zero(sde)

    def nde_sdeint():
        ys = nde.sdeint(sde, y0, ts, method="euler", dt=dt)
        ys[-1].pow(2).sum().backward()
        params_zero(sde)

    def ts_tuned():
        bm = torchsde.BrownianInterval(0.0, 1.0, (B, D), dt=dt)
        ys = torchsde.sdeint(sde, y0, ts, bm=bm, method="euler", dt=dt)
        ys[-1].pow(2).sum().backward()
        params_zero(sde)

    def ts_default():
        ys = torchsde.sdeint(sde, y0, ts, method="euler", dt=dt)
        ys[-1].pow(2).sum().backward()
        params_zero(sde)

    names = ["hand-written loop (pre-drawn increments)", "nde.solve EulerMaruyama, BrownianInterval(dt=dt)",
             "nde.sdeint(method='euler'), bm=None", "torchsde.sdeint euler, BrownianInterval(dt=dt)"]
    fns = [hand, nde_em, nde_sdeint, ts_tuned]
    times = interleaved(fns, repeats)
    rows = list(zip(names, times))
    t_hand, t_ts = times[0], times[3]
    rows.append(("nde.solve EulerMaruyama, BrownianInterval() (no dt)", median_time(lambda: nde_em(True), 3)))
    rows.append(("torchsde.sdeint euler, bm=None", median_time(ts_default, 2)))
    print(f"Euler--Maruyama, batch {B}, state {D}, {steps} steps, forward+backward")
    print(f"{'':55s} {'time [ms]':>10s} {'/hand':>7s} {'/torchsde':>10s}")
    for name, t in rows:
        print(f"{name:55s} {t * 1e3:10.1f} {t / t_hand:7.2f} {t / t_ts:10.2f}")
    print(f"CPU-time ratios: nde.solve / hand {CPU[nde_em] / CPU[hand]:.2f}, nde.solve / torchsde "
          f"{CPU[nde_em] / CPU[ts_tuned]:.2f}, nde.sdeint (bm=None) / nde.solve {CPU[nde_sdeint] / CPU[nde_em]:.2f}")

    # ---- reversible Heun with O(1)-memory adjoints ----------------------------------------------
    ssde = SDE("stratonovich")

    def nde_rev(n):
        def run():
            seed[0] += 1
            bm = BrownianInterval(0.0, 1.0, (B, D), seed=seed[0], dt=1.0 / n)
            terms = MultiTerm(ODETerm(ssde.f), ControlTerm(ssde.g, bm, noise="diagonal"))
            sol = nde.solve(terms, ReversibleHeun(), 0.0, 1.0, y0, dt0=1.0 / n, adjoint=nde.ReversibleAdjoint())
            sol.ys[-1].pow(2).sum().backward()
            params_zero(ssde)
        return run

    def nde_direct(n):
        def run():
            seed[0] += 1
            bm = BrownianInterval(0.0, 1.0, (B, D), seed=seed[0], dt=1.0 / n)
            terms = MultiTerm(ODETerm(ssde.f), ControlTerm(ssde.g, bm, noise="diagonal"))
            sol = nde.solve(terms, ReversibleHeun(), 0.0, 1.0, y0, dt0=1.0 / n)
            sol.ys[-1].pow(2).sum().backward()
            params_zero(ssde)
        return run

    def ts_rev(n):
        def run():
            bm = torchsde.BrownianInterval(0.0, 1.0, (B, D), dt=1.0 / n)
            ys = torchsde.sdeint_adjoint(ssde, y0, ts, bm=bm, method="reversible_heun",
                                         adjoint_method="adjoint_reversible_heun", dt=1.0 / n)
            ys[-1].pow(2).sum().backward()
            params_zero(ssde)
        return run

    fr, ft = nde_rev(steps), ts_rev(steps)
    t_nde, t_tsr = interleaved([fr, ft], repeats)
    print()
    print(f"Reversible Heun + reversible adjoint, {steps} steps")
    print(f"{'nde (ReversibleAdjoint)':55s} {t_nde * 1e3:10.1f}   ratio to torchsde {t_nde / t_tsr:.2f} "
          f"(CPU time {CPU[fr] / CPU[ft]:.2f})")
    print(f"{'torchsde (sdeint_adjoint, adjoint_reversible_heun)':55s} {t_tsr * 1e3:10.1f}")
    def adj(lib, n):
        def run():
            ys = lib.sdeint_adjoint(ssde, y0, ts, method="midpoint", dt=1.0 / n)
            ys[-1].pow(2).sum().backward()
            params_zero(ssde)
        return run

    t_na, t_ta = interleaved([adj(nde, steps), adj(torchsde, steps)], max(3, repeats // 3))
    print(f"{'nde.sdeint_adjoint midpoint (stochastic adjoint)':55s} {t_na * 1e3:10.1f}   ratio to torchsde {t_na / t_ta:.2f}")
    print(f"{'torchsde.sdeint_adjoint midpoint':55s} {t_ta * 1e3:10.1f}")
    print()
    print("peak tensor memory of one forward + backward (live tensor storage, Brownian motion included):")
    for name, make in (("nde ReversibleHeun + ReversibleAdjoint", nde_rev), ("torchsde reversible_heun adjoint", ts_rev),
                       ("nde ReversibleHeun + DirectAdjoint", nde_direct)):
        p100, p1000 = tensor_peak_mb(make(100)), tensor_peak_mb(make(1000))
        print(f"  {name:40s} 100 steps {p100:7.2f} MB, 1000 steps {p1000:7.2f} MB, ratio {p1000 / p100:.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--steps", type=int, default=100)
    a = ap.parse_args()
    main(a.repeats, a.steps)
