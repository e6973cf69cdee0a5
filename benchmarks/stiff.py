"""Stiff problems: nde's implicit solvers against explicit Tsit5 (and scipy's Radau as a reference).

Runs two classic stiff problems, Robertson's chemical kinetics (t in [0, 10]) and the Van der Pol
oscillator with mu = 100 (t in [0, 200]), at rtol=1e-6, atol=1e-8 and prints steps, vector-field
evaluations, wall time and the error against a tight scipy Radau solution; then a batch of 64
Robertson systems, comparing a Newton iteration over the whole state with block-diagonal
(per-sample) Jacobians and independent batch mode.

    python benchmarks/stiff.py
"""

from __future__ import annotations

import time

import numpy as np
import torch
from scipy.integrate import solve_ivp

import nde
from nde.solvers import TRBDF2, Kvaerno3, Kvaerno5, RadauIIA5, Tsit5

torch.set_num_threads(1)
RTOL, ATOL = 1e-6, 1e-8
TSIT5_MAX_STEPS = 100_000
REPEATS = 3


def robertson(t, y, args=None):
    y1, y2, y3 = y.unbind(-1)
    return torch.stack([-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2**2, 3e7 * y2**2], -1)


MU = 100.0


def van_der_pol(t, y, args=None):
    x, v = y.unbind(-1)
    return torch.stack([v, MU * (1 - x**2) * v - x], -1)


PROBLEMS = {
    "Robertson, t in [0, 10]": (robertson, [1.0, 0.0, 0.0], 10.0),
    "Van der Pol mu=100, t in [0, 200]": (van_der_pol, [2.0, 0.0], 200.0),
}


def reference(f, y0, t1):
    def rhs(t, y):
        return f(t, torch.as_tensor(y)).numpy()

    return solve_ivp(rhs, (0.0, t1), y0, method="Radau", rtol=1e-11, atol=1e-13).y[:, -1]


def run_nde(f, y0, t1, solver):
    y = torch.tensor(y0, dtype=torch.float64)
    ctrl = nde.PIDController(rtol=RTOL, atol=ATOL)
    max_steps = TSIT5_MAX_STEPS if isinstance(solver, Tsit5) else 16384
    with torch.no_grad():
        nde.solve(f, solver, 0.0, min(t1, 1.0), y, controller=ctrl)  # warm-up
        wall = float("inf")
        for _ in range(1 if isinstance(solver, Tsit5) else REPEATS):  # best of REPEATS: the machine may be shared
            start = time.perf_counter()
            sol = nde.solve(f, solver, 0.0, t1, y, controller=ctrl, max_steps=max_steps, throw=False)
            wall = min(wall, time.perf_counter() - start)
    done = bool(sol.result == 0)
    return sol.stats["num_steps"], sol.stats["nfe"], wall, sol.ys[-1].numpy(), done


def run_scipy(f, y0, t1):
    def rhs(t, y):
        return f(t, torch.as_tensor(y)).numpy()

    start = time.perf_counter()
    r = solve_ivp(rhs, (0.0, t1), y0, method="Radau", rtol=RTOL, atol=ATOL)
    wall = time.perf_counter() - start
    for _ in range(REPEATS - 1):
        start = time.perf_counter()
        solve_ivp(rhs, (0.0, t1), y0, method="Radau", rtol=RTOL, atol=ATOL)
        wall = min(wall, time.perf_counter() - start)
    return len(r.t) - 1, r.nfev, wall, r.y[:, -1], r.success


B = 64
RATES = torch.logspace(0, 2, B, dtype=torch.float64).unsqueeze(-1)


def robertson_batch(t, y, scale):
    y1, y2, y3 = y.unbind(-1)
    a = 0.04 * scale[..., 0]
    return torch.stack([-a * y1 + 1e4 * y2 * y3, a * y1 - 1e4 * y2 * y3 - 3e7 * y2**2, 3e7 * y2**2], -1)


def batch_rows():
    """64 Robertson systems with different first rates: whole-state vs block-diagonal Newton."""
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64).expand(B, 3).contiguous()
    ctrl = nde.PIDController(rtol=RTOL, atol=ATOL)
    rows = []
    for label, solver, mode in [
        ("Kvaerno5 joint, full J", Kvaerno5(), "joint"),
        ("Kvaerno5 joint, batch J", Kvaerno5(jacobian="batch"), "joint"),
        ("Kvaerno5 independent", Kvaerno5(), "independent"),
        ("RadauIIA5 joint, full J", RadauIIA5(), "joint"),
        ("RadauIIA5 joint, batch J", RadauIIA5(jacobian="batch"), "joint"),
        ("RadauIIA5 independent", RadauIIA5(), "independent"),
        ("Tsit5 joint", Tsit5(), "joint"),
    ]:
        with torch.no_grad():
            nde.solve(robertson_batch, solver, 0.0, 0.01, y0, args=RATES, controller=ctrl, batch_mode=mode)
            wall = float("inf")
            for _ in range(1 if isinstance(solver, Tsit5) else REPEATS):
                start = time.perf_counter()
                sol = nde.solve(robertson_batch, solver, 0.0, 10.0, y0, args=RATES, controller=ctrl,
                                batch_mode=mode, max_steps=100_000)
                wall = min(wall, time.perf_counter() - start)
        steps = sol.stats["num_steps"]
        steps = f"{int(steps.max())} max" if isinstance(steps, torch.Tensor) else str(steps)
        rows.append((label, steps, wall))
    return rows


def main():
    rows = []
    for name, (f, y0, t1) in PROBLEMS.items():
        ref = reference(f, y0, t1)
        runs = [(f"nde {type(s).__name__}", lambda s=s: run_nde(f, y0, t1, s))
                for s in (Kvaerno5(), RadauIIA5(), Kvaerno3(), TRBDF2(), Tsit5())]
        runs.append(("scipy Radau (numpy RHS)", lambda: run_scipy(f, y0, t1)))
        for label, fn in runs:
            steps, nfe, wall, y1, done = fn()
            err = float(np.max(np.abs(y1 - ref) / (np.abs(ref) + 1e-6)))
            rows.append((name, label, steps, nfe, wall, err, done))
    print(f"rtol={RTOL}, atol={ATOL}; error = max relative error at t1 against scipy Radau(rtol=1e-11); "
          f"time = best of {REPEATS} (Tsit5: one run)")
    print(f"{'problem':36s} {'solver':26s} {'steps':>8s} {'nfe':>9s} {'time [s]':>9s} {'rel. error':>11s}")
    for name, label, steps, nfe, wall, err, done in rows:
        note = "" if done else f"  (stopped at max_steps={TSIT5_MAX_STEPS})"
        print(f"{name:36s} {label:26s} {steps:8d} {nfe:9d} {wall:9.3f} {err:11.2e}{note}")
    print()
    print(f"Batch of {B} Robertson systems (first rate scaled by 1..100), t in [0, 10]")
    print(f"{'solver':28s} {'steps':>10s} {'time [s]':>9s}")
    for label, steps, wall in batch_rows():
        print(f"{label:28s} {steps:>10s} {wall:9.3f}")


if __name__ == "__main__":
    main()
