"""SDE benchmark: nde against a hand-written loop and torchsde on the same work.

Batch 256, 16-dimensional state, diagonal noise, drift and diffusion 2-hidden-layer width-64 MLPs,
100 steps on [0, 1], forward + backward of the final state's squared norm.

Run: ``python benchmarks/sde.py`` (prints a table of median wall times and ratios). Memory is the
peak resident-memory growth of a fresh subprocess over one forward + backward (``ru_maxrss``), next to
the peak bytes held by autograd's saved tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torchsde

import nde
from nde import BrownianInterval, ControlTerm, MultiTerm, ODETerm
from nde.solvers import EulerMaruyama, ReversibleHeun

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


def interleaved(fns, repeats):
    """Median wall time of each function, run round-robin so that load changes hit all alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
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
    times = interleaved([hand, nde_em, nde_sdeint, ts_tuned], repeats)
    rows = list(zip(names, times))
    t_hand, t_ts = times[0], times[3]
    rows.append(("nde.solve EulerMaruyama, BrownianInterval() (no dt)", median_time(lambda: nde_em(True), 3)))
    rows.append(("torchsde.sdeint euler, bm=None", median_time(ts_default, 2)))
    print(f"Euler--Maruyama, batch {B}, state {D}, {steps} steps, forward+backward")
    print(f"{'':55s} {'time [ms]':>10s} {'/hand':>7s} {'/torchsde':>10s}")
    for name, t in rows:
        print(f"{name:55s} {t * 1e3:10.1f} {t / t_hand:7.2f} {t / t_ts:10.2f}")

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

    def peak(fn):
        # peak bytes held by autograd's saved tensors during forward + backward
        meter = {"cur": 0, "peak": 0}

        class Held:
            def __init__(self, t):
                self.t, self.n = t, t.numel() * t.element_size()
                meter["cur"] += self.n
                meter["peak"] = max(meter["peak"], meter["cur"])

            def __del__(self):
                meter["cur"] -= self.n

        with torch.autograd.graph.saved_tensors_hooks(Held, lambda h: h.t):
            fn()
        return meter["peak"]

    t_nde, t_tsr = interleaved([nde_rev(steps), ts_rev(steps)], repeats)
    print()
    print(f"Reversible Heun + reversible adjoint, {steps} steps")
    print(f"{'nde (ReversibleAdjoint)':55s} {t_nde * 1e3:10.1f}   ratio to torchsde {t_nde / t_tsr:.2f}")
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
    m100, m1000 = peak(nde_rev(100)), peak(nde_rev(1000))
    print(f"nde peak autograd saved tensors: 100 steps {m100 / 2**20:.2f} MiB, 1000 steps {m1000 / 2**20:.2f} MiB, "
          f"ratio {m1000 / m100:.2f}")
    d100 = peak(nde_direct(100))
    d1000 = peak(nde_direct(1000))
    print(f"(DirectAdjoint for comparison: 100 steps {d100 / 2**20:.2f} MiB, 1000 steps {d1000 / 2**20:.2f} MiB)")
    print("peak process memory growth over one forward + backward (fresh subprocess, ru_maxrss):")
    for kind in ("nde_reversible", "torchsde_reversible", "nde_direct"):
        r100, r1000 = rss_growth(kind, 100), rss_growth(kind, 1000)
        print(f"  {kind:22s} 100 steps {r100:7.1f} MiB, 1000 steps {r1000:7.1f} MiB, ratio {r1000 / r100:.2f}")


def rss_growth(kind, steps):
    """Peak resident-memory growth (MiB) of one forward + backward, measured in a fresh subprocess."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", kind, str(steps)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["growth_mib"]


def memory_child(kind, steps):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    sde = SDE("stratonovich")
    y0 = torch.randn(B, D)
    ts = torch.tensor([0.0, 1.0])
    dt = 1.0 / steps
    if kind.startswith("nde"):
        bm = BrownianInterval(0.0, 1.0, (B, D), seed=0, dt=dt)
        terms = MultiTerm(ODETerm(sde.f), ControlTerm(sde.g, bm, noise="diagonal"))
        adjoint = nde.ReversibleAdjoint() if kind == "nde_reversible" else nde.DirectAdjoint()

        def run():
            sol = nde.solve(terms, ReversibleHeun(), 0.0, 1.0, y0, dt0=dt, adjoint=adjoint)
            sol.ys[-1].pow(2).sum().backward()
    else:
        bm = torchsde.BrownianInterval(0.0, 1.0, (B, D), dt=dt)

        def run():
            ys = torchsde.sdeint_adjoint(sde, y0, ts, bm=bm, method="reversible_heun",
                                         adjoint_method="adjoint_reversible_heun", dt=dt)
            ys[-1].pow(2).sum().backward()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_mib": (after - before) / 1024}))  # ru_maxrss is in KiB on Linux


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--memory-child", nargs=2, metavar=("KIND", "STEPS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.memory_child:
        memory_child(a.memory_child[0], int(a.memory_child[1]))
    else:
        main(a.repeats, a.steps)
