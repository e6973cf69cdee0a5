"""The torchdiffeq drop-in against torchdiffeq itself: the same calls, only the import differs.

Problems as the foundation benchmark (2-hidden-layer tanh MLP vector fields, random initial states):
  * batch 256, state dim 16, width 64, t1 = 5
  * batch 16,  state dim 4,  width 32, t1 = 10
Methods dopri5, bosh3, tsit5 (against torchdiffeq's dopri5 when the installed torchdiffeq has no tsit5)
at rtol = atol = 1e-6, and rk4 with step_size 0.05. For each: median wall time of the forward solve
(``odeint(func, y0, t)`` with 11 output times), NFE, and the ratio of times nde / torchdiffeq (the
targets are <= 0.55 on the batch-256 problem and <= 0.4 on the batch-16 problem), plus the
gradient (forward + backward of ``odeint``) ratio.

A second table counts evaluations for the low-order adaptive methods on ``dy/dt = A y`` (exact
solution known): torchdiffeq's ``adaptive_heun`` and ``fehlberg2`` reuse their last stage as the next
step's first, although for these tableaux it is not ``f(t1, y1)`` (it is ``f`` at the Euler predictor,
resp. at the first-order solution), so they take one evaluation a step fewer than the methods they
name; the drop-in runs the same variants. A third table gives the error of the Adams methods on a
non-uniform grid: torchdiffeq's apply the uniform-step coefficients whatever the spacing, nde's are
computed on the actual nodes.

Run: python benchmarks/torchdiffeq_dropin.py [--repeats N] [--backward] [--nfe-only]
"""

import argparse
import statistics
import time

import torch
from torch import nn

import nde


def mlp(dim, width):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, dim))


class Field(nn.Module):
    """``func(t, y)`` as a torchdiffeq user writes it, counting its evaluations."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return self.net(y)


def median_times(fns, repeats):
    """Median wall time of each function, the calls interleaved so that load changes hit all alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def low_order_nfe():
    """Evaluations, steps and error of the low-order adaptive methods (and two FSAL ones) in both libraries."""
    import torchdiffeq

    A = torch.tensor([[-0.5, 1.0, 0.0], [-1.0, -0.5, 0.2], [0.0, -0.2, -0.3]], dtype=torch.float64)
    y0 = torch.tensor([1.0, 0.5, -1.0], dtype=torch.float64)
    t = torch.linspace(0.0, 5.0, 6, dtype=torch.float64)
    exact = torch.stack([torch.linalg.matrix_exp(A * float(ti)) @ y0 for ti in t])
    print(f"\ndy/dt = A y on [0, 5], rtol = atol = 1e-6, float64: evaluations, accepted steps, max error")
    print(f"{'method':14s} {'tdq NFE':>8s} {'nde NFE':>8s} {'tdq steps':>9s} {'nde steps':>9s} {'tdq error':>10s} {'nde error':>10s}")
    for method in ("adaptive_heun", "fehlberg2", "bosh3", "dopri5"):
        row = []
        for lib in (torchdiffeq, nde):
            calls, steps = [0], [0]

            class Counted:
                def __call__(self, t, y):
                    calls[0] += 1
                    return A @ y

                def callback_accept_step(self, t0, y, dt):
                    steps[0] += 1

            with torch.no_grad():
                out = lib.odeint(Counted(), y0, t, rtol=1e-6, atol=1e-6, method=method)
            row.append((calls[0], steps[0], float((out - exact).abs().max())))
        (nt, st, et), (nn, sn, en) = row
        print(f"{method:14s} {nt:8d} {nn:8d} {st:9d} {sn:9d} {et:10.2e} {en:10.2e}")


def adams_nonuniform():
    """Error of the Adams methods on non-uniform grids (``grid_constructor``) in both libraries."""
    import warnings

    import torchdiffeq

    A = torch.tensor([[-0.5, 1.0], [-1.0, -0.3]], dtype=torch.float64)

    def f(t, y):
        return y @ A.T + 0.1 * torch.sin(t)

    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    t = torch.tensor([0.0, 0.63], dtype=torch.float64)
    with torch.no_grad():
        exact = nde.odeint(f, y0, t, method="dopri8", rtol=1e-13, atol=1e-13)
    print("\ndy/dt = A y + 0.1 sin t, Adams methods on a non-uniform grid, float64: max error at t = 0.63")
    print(f"{'method':15s} {'grid':42s} {'tdq error':>10s} {'nde error':>10s}")
    for method in ("explicit_adams", "implicit_adams"):
        for grid in ([0, .1, .2, .3, .4, .5, .6, .63], [0, .1, .2, .3, .33, .43, .53, .63], [0, .05, .1, .2, .35, .5, .63]):
            opts = dict(grid_constructor=lambda func, y, tt, g=grid: torch.tensor(g, dtype=torch.float64))
            errs = []
            for lib in (torchdiffeq, nde):
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    errs.append(float((lib.odeint(f, y0, t, method=method, options=opts) - exact).abs().max()))
            print(f"{method:15s} {str(grid):42s} {errs[0]:10.2e} {errs[1]:10.2e}")


def main():
    import torchdiffeq

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--backward", action="store_true", help="also time forward + backward")
    parser.add_argument("--nfe-only", action="store_true", help="only the tables of evaluation counts and Adams errors")
    a = parser.parse_args()
    torch.set_num_threads(1)
    if a.nfe_only:
        low_order_nfe()
        adams_nonuniform()
        return
    has_tsit5 = "tsit5" in getattr(torchdiffeq._impl.odeint, "SOLVERS", {})
    cases = [("dopri5", "dopri5", None), ("bosh3", "bosh3", None),
             ("tsit5", "tsit5" if has_tsit5 else "dopri5", None), ("rk4", "rk4", dict(step_size=0.05))]
    problems = [("batch256/dim16/w64", 256, 16, 64, 5.0), ("batch16/dim4/w32", 16, 4, 32, 10.0)]
    print(f"torch {torch.__version__}, torchdiffeq {torchdiffeq.__version__}, threads 1, median of {a.repeats}")
    head = f"{'problem':20s} {'method (peer)':20s} {'tdq ms':>8s} {'nde ms':>8s} {'ratio':>6s} {'tdq NFE':>8s} {'nde NFE':>8s}"
    if a.backward:
        head += f" {'grad ratio':>10s}"
    print(head)
    for name, batch, dim, width, t1 in problems:
        net = mlp(dim, width)
        torch.manual_seed(1)
        y0 = torch.randn(batch, dim)
        t = torch.linspace(0.0, t1, 11)
        for ours, theirs, options in cases:
            f_n, f_t = Field(net), Field(net)

            def run(lib, f, method):
                def go():
                    with torch.no_grad():
                        return lib.odeint(f, y0, t, rtol=1e-6, atol=1e-6, method=method, options=options)
                return go

            wall_t, wall_n = median_times([run(torchdiffeq, f_t, theirs), run(nde, f_n, ours)], a.repeats)
            f_n.calls = f_t.calls = 0
            run(torchdiffeq, f_t, theirs)()
            run(nde, f_n, ours)()
            label = ours if ours == theirs else f"{ours} ({theirs})"
            line = (f"{name:20s} {label:20s} {wall_t * 1e3:8.2f} {wall_n * 1e3:8.2f} {wall_n / wall_t:6.2f} "
                    f"{f_t.calls:8d} {f_n.calls:8d}")
            if a.backward:
                def grad(lib, f, method):
                    def go():
                        net.zero_grad()
                        lib.odeint(f, y0, t, rtol=1e-6, atol=1e-6, method=method, options=options).pow(2).mean().backward()
                    return go

                g_t, g_n = median_times([grad(torchdiffeq, f_t, theirs), grad(nde, f_n, ours)], max(3, a.repeats // 2))
                line += f" {g_n / g_t:10.2f}"
            print(line)
    low_order_nfe()
    adams_nonuniform()


if __name__ == "__main__":
    main()
