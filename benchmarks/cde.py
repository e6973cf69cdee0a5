"""CDE speed: nde against torchcde and a hand-written RK4 loop, side by side in one run.

Batch 256, 4 input channels, hidden 32, 100 knots, Hermite cubic path, RK4 stepping on the knots,
vector field 32 -> 64 -> (32 x 4); timed: forward + backward of the final state's squared norm, as
wall time and as the process's CPU time (steadier on a machine shared with other work).

With ``--log-ode``: a series of 10,240 observations solved as a plain CDE (RK4 on every knot, and
coarser steps across the knots) and by the log-ODE method (depth 1 and 2, windows of 32
observations, one RK4 step a window): steps, time, the memory the backward pass keeps, and the
error against a fine reference, for a smooth and a rough (random-walk) series.

    python benchmarks/cde.py [--repeats 7] [--threads 1] [--log-ode]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import nde

B, C, H, W, L = 256, 4, 32, 64, 100


class Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(H, W), torch.nn.Softplus(), torch.nn.Linear(W, H * C),
                                       torch.nn.Tanh())

    def forward(self, t, z):
        return self.net(z).view(*z.shape[:-1], H, C)


def hand_rk4(f, spline, z0, n_steps):
    """Classical RK4 over control derivatives precomputed in one vectorised call."""
    times = torch.arange(n_steps, dtype=z0.dtype)
    stage_t = torch.stack([times, times + 0.5, times + 1.0], -1).reshape(-1)
    d = spline.derivative(stage_t).unflatten(-2, (n_steps, 3))  # (B, n, 3, C)
    z = z0
    for k in range(n_steps):
        d0, dm, d1 = d[:, k, 0].unsqueeze(-1), d[:, k, 1].unsqueeze(-1), d[:, k, 2].unsqueeze(-1)
        k1 = (f(None, z) @ d0).squeeze(-1)
        k2 = (f(None, z + 0.5 * k1) @ dm).squeeze(-1)
        k3 = (f(None, z + 0.5 * k2) @ dm).squeeze(-1)
        k4 = (f(None, z + k3) @ d1).squeeze(-1)
        z = z + (k1 + 2 * (k2 + k3) + k4) / 6
    return z


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-ode", action="store_true", help="the long-series comparison instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.log_ode:
        return log_ode()
    torch.manual_seed(0)
    import torchcde

    x = torch.randn(B, L, C).cumsum(1) * 0.1
    t = torch.arange(L, dtype=torch.float32)
    coeffs = nde.hermite_cubic_coefficients_with_backward_differences(x, t)
    f = Field()
    z0 = torch.randn(B, H)
    X = nde.CubicSpline(coeffs, t)
    Xc = torchcde.CubicSpline(coeffs, t)
    term = nde.ControlTerm(f, X)
    rk4 = nde.solvers.RK4()
    span = t[[0, -1]]

    def run_nde():
        return nde.solve(term, rk4, 0.0, float(L - 1), z0, dt0=1.0).ys[-1]

    def run_hand():
        return hand_rk4(f, X, z0, L - 1)

    def run_torchcde():
        return torchcde.cdeint(Xc, f, z0, span, adjoint=False, method="rk4", options=dict(step_size=1.0))[:, -1]

    def run_nde_adjoint():
        return nde.cdeint(X, f, z0, span, adjoint=True, method="rk4", options=dict(step_size=1.0))[:, -1]

    def run_torchcde_adjoint():
        return torchcde.cdeint(Xc, f, z0, span, adjoint=True, method="rk4", options=dict(step_size=1.0))[:, -1]

    cases = {
        "nde direct (RK4)": run_nde,
        "hand-written RK4 loop": run_hand,
        "torchcde direct (rk4)": run_torchcde,
        "nde cdeint adjoint": run_nde_adjoint,
        "torchcde adjoint": run_torchcde_adjoint,
    }

    def timed(fn):
        f.zero_grad(set_to_none=True)
        start, cpu = time.perf_counter(), time.process_time()
        fn().pow(2).sum().backward()
        return time.perf_counter() - start, time.process_time() - cpu

    for fn in cases.values():  # warm up
        timed(fn)
    times = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved, so that load changes hit every case alike
        for name, fn in cases.items():
            times[name].append(timed(fn))
    wall = {name: statistics.median(w for w, _ in v) for name, v in times.items()}
    cpu = {name: statistics.median(c for _, c in v) for name, v in times.items()}
    with torch.no_grad():
        ref = run_hand()
        agree = float((run_nde() - ref).abs().max())
    print(f"CDE forward+backward, batch {B}, channels {C}, hidden {H}, {L} knots, RK4 on the knots, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print(f"{'case':28s} {'wall [ms]':>10s} {'CPU [ms]':>10s}")
    for name in cases:
        print(f"{name:28s} {1e3 * wall[name]:10.1f} {1e3 * cpu[name]:10.1f}")
    print()
    print(f"{'ratio':28s} {'wall':>10s} {'CPU':>10s}")
    for label, a, b, target in (("nde direct / hand loop", "nde direct (RK4)", "hand-written RK4 loop", 1.1),
                                ("nde direct / torchcde", "nde direct (RK4)", "torchcde direct (rk4)", 0.85),
                                ("nde adjoint / torchcde adj.", "nde cdeint adjoint", "torchcde adjoint", 0.7)):
        print(f"{label:28s} {wall[a] / wall[b]:10.2f} {cpu[a] / cpu[b]:10.2f}  (target <= {target})")
    print(f"max |nde - hand loop| final state: {agree:.2e}")


def log_ode():
    """The log-ODE method against the plain CDE on a long series (see the module docstring)."""
    from nde.solvers import RK4

    D = torch.float64
    n, batch, hidden, channels = 10_240, 8, 8, 3
    t = torch.linspace(0, 1, n + 1, dtype=D)
    s = t.unsqueeze(-1)
    amp = torch.linspace(0.5, 2.0, batch, dtype=D).reshape(batch, 1, 1)
    g = torch.Generator().manual_seed(1)
    series = {
        "smooth": torch.cat([s.expand(batch, -1, -1), amp * (torch.sin(2 * math.pi * 3 * s)
                             + 0.3 * torch.cos(2 * math.pi * 11 * s)), amp * torch.cos(2 * math.pi * 5 * s)], -1),
        "rough": torch.cat([s.expand(batch, -1, -1),
                            amp * torch.randn(batch, n + 1, 2, generator=g, dtype=D).cumsum(1) / math.sqrt(n)], -1),
    }
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(hidden, 32), torch.nn.Tanh(), torch.nn.Linear(32, hidden * channels)).to(D)

    def f(t, z):
        return torch.tanh(net(z)).view(*z.shape[:-1], hidden, channels)

    z0 = torch.full((batch, hidden), 0.2, dtype=D)
    h = 1.0 / n

    def saved(fn):
        total = [0]

        def pack(v):
            total[0] += v.numel() * v.element_size()
            return v

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
            out = fn()
        return out, total[0]

    print(f"log-ODE against the plain CDE: {n} observations, batch {batch}, hidden {hidden}, RK4, float64")
    for kind, x in series.items():
        X = nde.LinearInterpolation(x, t)
        with torch.no_grad():
            ref = nde.solve(nde.ControlTerm(f, X), RK4(), 0.0, 1.0, z0, dt0=h / 4).ys[-1]
        runs = {"plain CDE, a step on every knot": lambda: nde.solve(nde.ControlTerm(f, X), RK4(), 0.0, 1.0, z0, dt0=h)}
        for k in (2, 8, 32):
            runs[f"plain CDE, steps over {k} pieces"] = lambda k=k: nde.solve(
                nde.ControlTerm(f, X), RK4(), 0.0, 1.0, z0, dt0=k * h, controller=nde.ConstantStepSize(land_on_jumps=False))
        for depth in (1, 2):
            runs[f"log-ODE depth {depth}, windows of 32"] = lambda depth=depth: nde.solve(
                nde.LogODETerm(f, x, depth=depth, window_length=32 * h, t=t), RK4(), 0.0, 1.0, z0, dt0=32 * h)
        print(f"\n{kind} series")
        print(f"{'method':36s} {'steps':>6s} {'time [s]':>9s} {'saved [MiB]':>12s} {'max error':>10s}")
        for name, fn in runs.items():
            start = time.process_time()
            sol, mem = saved(fn)
            sol.ys[-1].pow(2).sum().backward()
            elapsed = time.process_time() - start
            err = float((sol.ys[-1].detach() - ref).abs().max())
            print(f"{name:36s} {sol.stats['num_steps']:6d} {elapsed:9.2f} {mem / 2**20:12.1f} {err:10.2e}")


if __name__ == "__main__":
    main()
