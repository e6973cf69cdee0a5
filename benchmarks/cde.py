"""CDE speed: nde against torchcde and a hand-written RK4 loop, side by side in one run.

Batch 256, 4 input channels, hidden 32, 100 knots, Hermite cubic path, RK4 stepping on the knots,
vector field 32 -> 64 -> (32 x 4); timed: forward + backward of the final state's squared norm.

    python benchmarks/cde.py [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
        start = time.perf_counter()
        fn().pow(2).sum().backward()
        return time.perf_counter() - start

    for fn in cases.values():  # warm up
        timed(fn)
    times = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved, so that load changes hit every case alike
        for name, fn in cases.items():
            times[name].append(timed(fn))
    med = {name: statistics.median(v) for name, v in times.items()}
    with torch.no_grad():
        ref = run_hand()
        agree = float((run_nde() - ref).abs().max())
    print(f"CDE forward+backward, batch {B}, channels {C}, hidden {H}, {L} knots, RK4 on the knots, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print(f"{'case':28s} {'time [ms]':>10s}")
    for name, v in med.items():
        print(f"{name:28s} {1e3 * v:10.1f}")
    print()
    print(f"nde direct / hand loop       {med['nde direct (RK4)'] / med['hand-written RK4 loop']:.2f}  (target <= 1.1)")
    print(f"nde direct / torchcde        {med['nde direct (RK4)'] / med['torchcde direct (rk4)']:.2f}  (target <= 0.85)")
    print(f"nde adjoint / torchcde adj.  {med['nde cdeint adjoint'] / med['torchcde adjoint']:.2f}  (target <= 0.7)")
    print(f"max |nde - hand loop| final state: {agree:.2e}")


if __name__ == "__main__":
    main()
