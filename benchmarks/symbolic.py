"""Cost and accuracy of the symbolic-regression bridge.

Three tables:

1. ``distill`` with the SINDy backend on the exact Lotka-Volterra field (polynomial library of
   degree 3, 10 candidate functions) and on noisy derivatives: wall time and largest relative
   coefficient error, nde's own STLSQ against pysindy's STLSQ optimiser.
2. ``SymbolicModel`` as a vector field: time of one evaluation (batch 256) and of one Tsit5 solve
   against the same equations written by hand in torch.
3. ``fine_tune`` with Adam and L-BFGS from coefficients 10% off: time and final coefficient error.

Run: python benchmarks/symbolic.py [--repeats N]
"""

import argparse
import statistics
import time

import numpy as np
import sympy
import torch

import nde
from nde import symbolic

TRUE = {("x", "x"): 1.5, ("x", "x*y"): -1.0, ("y", "y"): -3.0, ("y", "x*y"): 1.0}


def lotka_volterra(t, y):
    x, v = y[..., 0], y[..., 1]
    return torch.stack([1.5 * x - x * v, -3.0 * v + x * v], -1)


def median_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def max_rel_error(model):
    """Largest relative error over the true coefficients; a spurious term counts its absolute size."""
    found = {}
    for name, expr in zip(model.variable_names, model.to_sympy()):
        for term, coef in sympy.expand(expr).as_coefficients_dict().items():
            found[(name, str(term))] = float(coef)
    keys = set(found) | set(TRUE)
    return max(abs(found.get(k, 0.0) - TRUE.get(k, 0.0)) / (abs(TRUE[k]) if k in TRUE else 1.0) for k in keys)


def table_distill(repeats):
    print("1. distill (SINDy, polynomial library of degree 3)")
    print(f"{'samples':>8} {'noise':>7} {'optimizer':>9} {'time [ms]':>10} {'max rel. coef. error':>21}")
    torch.manual_seed(0)
    for n in (1000, 10000):
        ys = torch.rand(n, 2, dtype=torch.float64) * 3 + 0.2
        derivs = lotka_volterra(0.0, ys)
        for noise in (0.0, 0.01):
            noisy = derivs + noise * derivs.std(0) * torch.randn_like(derivs)
            for opt in ("stlsq", "pysindy"):
                def run():
                    return symbolic.distill(None, (ys, noisy), library=symbolic.polynomial_library(3), optimizer=opt)
                t = median_time(run, repeats)
                print(f"{n:>8} {noise:>7.2f} {opt:>9} {1e3 * t:>10.1f} {max_rel_error(run()):>21.2e}")


def table_forward(repeats):
    print("\n2. SymbolicModel as a vector field (Lotka-Volterra, batch 256, float64)")
    model = symbolic.SymbolicModel(["1.5*x - 1.0*x*y", "-3.0*y + 1.0*x*y"], dtype=torch.float64)
    y = torch.rand(256, 2, dtype=torch.float64) + 0.5
    rows = []
    for name, f in (("hand-written torch", lotka_volterra), ("SymbolicModel", model)):
        with torch.no_grad():
            t_eval = median_time(lambda: f(0.0, y), repeats * 50)
            t_solve = median_time(lambda: nde.solve(f, nde.solvers.Tsit5(), 0.0, 5.0, y,
                                                    controller=nde.PIDController(1e-6, 1e-8)), repeats)
        rows.append((name, t_eval, t_solve))
    print(f"{'vector field':>20} {'one call [us]':>14} {'solve to t=5 [ms]':>18}")
    for name, a, b in rows:
        print(f"{name:>20} {1e6 * a:>14.1f} {1e3 * b:>18.1f}")
    print(f"overhead of SymbolicModel per call: {rows[1][1] / rows[0][1]:.2f}x, per solve: {rows[1][2] / rows[0][2]:.2f}x")


def table_fine_tune():
    print("\n3. fine_tune from coefficients 10% off (2 trajectories, 11 observations on [0, 2])")
    y0 = torch.tensor([[2.0, 1.0], [4.0, 2.0]], dtype=torch.float64)
    ts = torch.linspace(0, 2, 11, dtype=torch.float64)
    ys = nde.solve(lotka_volterra, nde.solvers.Tsit5(), 0.0, 2.0, y0, saveat=nde.SaveAt(ts=ts),
                   controller=nde.PIDController(1e-10, 1e-10)).ys
    print(f"{'optimizer':>9} {'steps':>6} {'evaluations':>12} {'time [s]':>9} {'loss before':>12} {'loss after':>11} "
          f"{'max rel. coef. error':>21}")
    for opt, steps, lr in (("adam", 200, 2e-2), ("lbfgs", 50, 1.0)):
        model = symbolic.SymbolicModel(["1.35*x - 1.1*x*y", "-2.7*y + 1.1*x*y"], dtype=torch.float64)
        t0 = time.perf_counter()
        hist = model.fine_tune(ts, ys, steps=steps, lr=lr, optimizer=opt, rtol=1e-8, atol=1e-10)
        t = time.perf_counter() - t0
        print(f"{opt:>9} {steps:>6} {len(hist) - 1:>12} {t:>9.2f} {hist[0]:>12.2e} {hist[-1]:>11.2e} "
              f"{max_rel_error(model):>21.2e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    np.random.seed(0)
    table_distill(args.repeats)
    table_forward(args.repeats)
    table_fine_tune()
