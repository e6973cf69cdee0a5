"""Forward-solve speed of nde against torchdiffeq and torchode on the same neural vector fields.

Problems (2-hidden-layer tanh MLP vector fields, random initial states, Dopri5):
  * batch 256, state dim 16, width 64, t1 = 5
  * batch 16,  state dim 4,  width 32, t1 = 10
at rtol = atol = 1e-6 and 1e-8. For every library: median forward wall time over repeats (interleaved), NFE,
steps, and the overhead factor = wall time / (NFE x time of one vector-field evaluation), whose
physical limit for an eager implementation is 1.0. A single-purpose eager Dopri5 loop (the same steps,
nothing else) is timed alongside as the reference for what eager PyTorch reaches on the machine.

Run: python benchmarks/foundation.py [--repeats N] [--quick]
"""

import argparse
import math
import statistics
import time

import torch
from torch import nn

import nde


def mlp(dim, width):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, dim))


def interleaved(fns, repeats, net, y0, evals=20):
    """Median wall time of each solve, and of one vector-field evaluation, measured round-robin (every
    round times each solve once and ``evals`` evaluations), so that load changes hit all alike."""
    outs = [fn() for fn in fns]  # warm up
    times = [[] for _ in fns]
    per_eval = []
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        with torch.no_grad():
            t0 = time.perf_counter()
            for _ in range(evals):
                net(y0)
            per_eval.append((time.perf_counter() - t0) / evals)
    return [statistics.median(ts) for ts in times], outs, statistics.median(per_eval)


def run_nde(net, y0, t1, tol, solver, batch_mode):
    term = nde.ODETerm(lambda t, y, args: net(y))
    ctrl = nde.PIDController(rtol=tol, atol=tol)

    def go():
        with torch.no_grad():
            sol = nde.solve(term, solver, 0.0, t1, y0, controller=ctrl, batch_mode=batch_mode)
        st = sol.stats
        nfe = st["nfe"] if batch_mode == "joint" else int(st["nfe"].max())
        steps = st["num_steps"] if batch_mode == "joint" else int(st["num_steps"].max())
        return nfe, steps

    return go


def run_lean(net, y0, t1, tol):
    """A single-purpose eager Dopri5 loop, as lean as eager PyTorch allows: the reference for the
    overhead factor on this machine. The same coefficients (nde's default Dopri5 tableau), first step
    (Hairer--Norsett--Wanner), integral controller and RMS norm as nde, so it takes the same steps;
    no dense output, no checks, no statistics, no time argument for the vector field."""
    tab = nde.solvers.Dopri5().tableau
    rows = [list(r) for r in tab.a]
    err_c = list(tab.b_err)
    n = math.sqrt(y0.numel())

    def rms(x):
        return float(torch.linalg.vector_norm(x)) / n

    def go():
        calls = 0
        with torch.no_grad():
            y, t = y0, 0.0
            k1 = net(y)
            scale = y.abs() * tol + tol
            d0, d1 = rms(y / scale), rms(k1 / scale)
            h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
            d2 = rms((net(torch.add(y, k1, alpha=h0)) - k1) / scale) / h0
            calls += 2
            dt = min(100 * h0, (0.01 / max(d1, d2)) ** (1 / 5))
            while t < t1:
                dt = min(dt, t1 - t)
                ks = [k1]
                for row in rows:
                    yi = y
                    for k, a in zip(ks, row):
                        if a != 0.0:
                            yi = torch.add(yi, k, alpha=a * dt)
                    ks.append(net(yi))
                calls += 6
                err = ks[0] * (err_c[0] * dt)
                for k, e in zip(ks[1:], err_c[1:]):
                    if e != 0.0:
                        err = torch.add(err, k, alpha=e * dt)
                m = torch.maximum(y.abs(), yi.abs()).add_(1.0)  # atol / rtol = 1
                e_n = rms(err / m) / tol
                if e_n <= 1.0:
                    t, y, k1 = t + dt, yi, ks[-1]
                dt *= min(max(0.9 * e_n ** -0.2 if e_n > 0 else 10.0, 1.0 if e_n <= 1.0 else 0.2), 10.0)
        return calls, None

    return go


def run_lean_independent(net, y0, t1, tol):
    """The per-sample counterpart of :func:`run_lean`: every sample its own step size, accept/reject
    and time (Hairer--Norsett--Wanner first step, integral controller and RMS norm per sample, as
    nde's independent mode), finished samples dropped from the batch when fewer than half still run.
    The per-sample scalars live in NumPy (a small NumPy operation costs a fraction of a small tensor
    operation), only the states and stages are tensors: the reference for what a per-sample eager
    loop costs against a joint one on the machine."""
    import numpy as np

    tab = nde.solvers.Dopri5().tableau
    rows = [list(r) for r in tab.a]
    err_c = list(tab.b_err)
    n = math.sqrt(y0[0].numel())

    def norms(x):  # RMS of every sample, as float64 NumPy
        return torch.linalg.vector_norm(x, dim=1).numpy().astype(np.float64) / n

    def col(x):  # a NumPy vector as a (batch, 1) tensor of the state's dtype
        return torch.from_numpy(x.astype(np.float32)).unsqueeze(1)

    def go():
        with torch.no_grad():
            y, calls = y0, 2
            k1 = net(y)
            scale = y.abs() * tol + tol
            d0, d1 = norms(y / scale), norms(k1 / scale)
            h0 = np.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
            d2 = norms((net(torch.addcmul(y, col(h0), k1)) - k1) / scale) / h0
            dt = np.minimum(100 * h0, (0.01 / np.maximum(d1, d2)) ** 0.2)
            t, tend = np.zeros(len(dt)), np.full(len(dt), t1)
            while True:
                dt = np.minimum(dt, tend - t)
                h = col(dt)
                ks = [k1]
                for row in rows:
                    yi = y
                    for k, a in zip(ks, row):
                        if a != 0.0:
                            yi = torch.addcmul(yi, h, k, value=a)
                    ks.append(net(yi))
                calls += 6
                err = None
                for k, e in zip(ks, err_c):
                    if e != 0.0:
                        err = k * e if err is None else torch.add(err, k, alpha=e)
                m = torch.maximum(y.abs(), yi.abs()).add_(1.0)  # atol / rtol = 1
                e_n = norms(err.mul_(h).div_(m)) / tol
                accept = e_n <= 1.0
                fac = np.minimum(np.maximum(0.9 * np.maximum(e_n, 1e-300) ** -0.2, np.where(accept, 1.0, 0.2)), 10.0)
                t, dt = np.where(accept, t + dt, t), dt * fac
                acc = torch.from_numpy(accept).unsqueeze(1)
                y, k1 = torch.where(acc, yi, y), torch.where(acc, ks[-1], k1)
                running = t < tend
                left = int(running.sum())
                if left == 0:
                    break
                if 2 * left < len(running):
                    keep = np.nonzero(running)[0]
                    kt = torch.from_numpy(keep)
                    t, dt, tend, y, k1 = t[keep], dt[keep], tend[keep], y[kt], k1[kt]
        return calls, None

    return go


def run_torchdiffeq(net, y0, t1, tol):
    import torchdiffeq

    calls = [0]

    def f(t, y):
        calls[0] += 1
        return net(y)

    ts = torch.tensor([0.0, t1])

    def go():
        calls[0] = 0
        with torch.no_grad():
            torchdiffeq.odeint(f, y0, ts, rtol=tol, atol=tol, method="dopri5")
        return calls[0], None

    return go


def run_torchode(net, y0, t1, tol):
    import torchode as to

    term = to.ODETerm(lambda t, y: net(y))
    method = to.Dopri5(term=term)
    ctrl = to.IntegralController(atol=tol, rtol=tol, term=term)
    solver = to.AutoDiffAdjoint(method, ctrl)
    t_eval = torch.tensor([0.0, t1]).expand(y0.shape[0], 2)

    def go():
        with torch.no_grad():
            sol = solver.solve(to.InitialValueProblem(y0=y0, t_eval=t_eval))
        return int(sol.stats["n_f_evals"].max()), int(sol.stats["n_steps"].max())

    return go


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="only rtol=atol=1e-6")
    a = parser.parse_args()
    torch.set_num_threads(1)
    problems = [("batch256/dim16/w64", 256, 16, 64, 5.0), ("batch16/dim4/w32", 16, 4, 32, 10.0)]
    tols = [1e-6] if a.quick else [1e-6, 1e-8]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, median of {a.repeats}")
    summary = []
    print(f"{'problem':20s} {'tol':>6s} {'library':32s} {'time ms':>9s} {'NFE':>6s} {'steps':>6s} {'overhead':>9s} {'vs torchdiffeq':>15s}")
    for name, batch, dim, width, t1 in problems:
        net = mlp(dim, width)
        torch.manual_seed(1)
        y0 = torch.randn(batch, dim)
        for tol in tols:
            runs = [("torchdiffeq dopri5", run_torchdiffeq(net, y0, t1, tol))]
            try:
                import torchode  # noqa: F401

                runs.append(("torchode dopri5 (per-sample)", run_torchode(net, y0, t1, tol)))
            except ImportError:
                pass
            runs += [
                ("lean eager Dopri5 loop", run_lean(net, y0, t1, tol)),
                ("lean eager per-sample Dopri5 loop", run_lean_independent(net, y0, t1, tol)),
                ("nde Dopri5 joint", run_nde(net, y0, t1, tol, nde.solvers.Dopri5(), "joint")),
                ("nde Dopri5(dormand-prince) joint",
                 run_nde(net, y0, t1, tol, nde.solvers.Dopri5("dormand-prince"), "joint")),
                ("nde Tsit5 joint", run_nde(net, y0, t1, tol, nde.solvers.Tsit5(), "joint")),
                ("nde Dopri5 independent", run_nde(net, y0, t1, tol, nde.solvers.Dopri5(), "independent")),
            ]
            res = {}
            walls, outs, t_f = interleaved([go for _, go in runs], a.repeats, net, y0)
            for (lib, go), wall, (nfe, steps) in zip(runs, walls, outs):
                res[lib] = (wall, nfe)
                base = res["torchdiffeq dopri5"][0]
                over = wall / (nfe * t_f)
                print(f"{name:20s} {tol:6.0e} {lib:32s} {wall * 1e3:9.2f} {nfe:6d} {str(steps or '-'):>6s} "
                      f"{over:9.2f} {wall / base:14.2f}x")
            summary.append((name, tol, res, t_f))
    print("\nSummary (nde Dopri5 joint against torchdiffeq dopri5; independent against joint):")
    for name, tol, res, t_f in summary:
        (w, n), (wt, nt) = res["nde Dopri5 joint"], res["torchdiffeq dopri5"]
        wi = res["nde Dopri5 independent"][0]
        wl, nl = res["lean eager Dopri5 loop"]
        wli = res["lean eager per-sample Dopri5 loop"][0]
        print(f"  {name} tol {tol:.0e}: overhead {w / (n * t_f):.2f} (lean loop {wl / (nl * t_f):.2f}), "
              f"time {w / wt:.2f}x torchdiffeq, NFE {n} vs {nt} (lean {nl}), independent/joint {wi / w:.2f}x "
              f"(lean per-sample loop / nde joint {wli / w:.2f}x)")


if __name__ == "__main__":
    main()
