"""Deep equilibrium benchmarks.

1. Backward methods on the same DEQ and data: implicit differentiation (Anderson and GMRES
   adjoint solves), phantom gradients and Jacobian-free backpropagation. Reports the time of
   ``loss.backward()``, of a whole training step, the bytes saved for backward, and the cosine
   similarity of each gradient with the exact implicit gradient.
2. Forward solvers: nde's Anderson against torchdeq's Anderson (if installed) on the same cell,
   tolerance and memory; wall time and function evaluations. Also nde's naive iteration,
   Broyden and Newton--Krylov for reference.

Run: ``python benchmarks/deq.py`` (about a minute on one CPU core).
"""

from __future__ import annotations

import time
import warnings

import torch
from torch import nn

from nde import deq_fixed_point
from nde.solvers import Anderson, Broyden, FixedPointIteration, FixedPointWarning, NewtonKrylov

torch.set_num_threads(1)
warnings.simplefilter("ignore", FixedPointWarning)


def make_cell(hidden=128, inp=64, rho=0.9, seed=0, dtype=torch.float32, symmetric=False):
    """``f(z, u) = tanh(W z + u)``; ``||W||_2 = rho``. ``symmetric``: eigenvalues spread over
    ``[-rho, rho]`` (spectral radius = rho: a slowly converging map for naive iteration)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(hidden, hidden).to(dtype)
    with torch.no_grad():
        if symmetric:
            q = torch.linalg.qr(torch.randn(hidden, hidden, generator=g, dtype=dtype))[0]
            w = q @ torch.diag(torch.linspace(-1, 1, hidden, dtype=dtype)) @ q.T
        else:
            w = torch.randn(hidden, hidden, generator=g, dtype=dtype)
        lin.weight.copy_(rho * w / torch.linalg.matrix_norm(w, ord=2))
        lin.bias.zero_()
    emb = nn.Linear(inp, hidden).to(dtype)

    def f(z, u):
        return torch.tanh(lin(z) + u)

    return f, lin, emb


def timeit(fn, repeat=20, warmup=3):
    """Best of ``repeat`` runs: robust to other processes competing for the CPU."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def backward_methods(batch=128, hidden=128, tol=1e-4):
    f, lin, emb = make_cell(hidden=hidden)
    x = torch.randn(batch, 64)
    target = torch.randn(batch, hidden)
    fwd = Anderson(rtol=tol, atol=0.0, max_steps=60, m=6, throw=False)
    params = list(lin.parameters()) + list(emb.parameters())
    configs = {
        "implicit (Anderson)": dict(backward="implicit", backward_solver=Anderson(rtol=tol, atol=0.0, max_steps=60,
                                                                                  m=6, throw=False)),
        "implicit (GMRES)": dict(backward="implicit", backward_solver=NewtonKrylov(rtol=tol, atol=0.0, restart=30,
                                                                                   throw=False)),
        "phantom (k=5, lam=0.5)": dict(backward="phantom", phantom_steps=5, phantom_damping=0.5),
        "jfb": dict(backward="jfb"),
    }

    def exact_grad():
        z = deq_fixed_point(f, torch.zeros(batch, hidden), (emb(x),),
                            solver=Anderson(rtol=1e-7, atol=0.0, max_steps=300, throw=False),
                            backward_solver=Anderson(rtol=1e-7, atol=0.0, max_steps=300, throw=False))
        return torch.cat([g.flatten() for g in torch.autograd.grad(((z - target) ** 2).mean(), params)])

    ref = exact_grad()

    def solve_only():
        with torch.no_grad():
            fwd.solve(f, torch.zeros(batch, hidden), (emb(x),))

    t_solve = timeit(solve_only)
    rows = []
    for name, kw in configs.items():
        def forward():
            z = deq_fixed_point(f, torch.zeros(batch, hidden), (emb(x),), solver=fwd, **kw)
            return ((z - target) ** 2).mean()

        def step():
            loss = forward()
            torch.autograd.grad(loss, params)

        def backward_only():
            loss = forward()
            t = time.perf_counter()
            torch.autograd.grad(loss, params)
            return time.perf_counter() - t

        for _ in range(3):
            backward_only()
        t_bwd = min(backward_only() for _ in range(20))
        t_step = timeit(step)
        mem, loss = saved_bytes(forward)
        g = torch.cat([gg.flatten() for gg in torch.autograd.grad(loss, params)])
        cos = float((g * ref).sum() / (g.norm() * ref.norm()))
        rows.append((name, t_bwd, t_step, mem, cos))
    print(f"\nBackward methods: tanh cell, hidden={hidden}, batch={batch}, rtol={tol:g} (best of 20)")
    print(f"forward solve alone (no graph): {t_solve * 1e3:.2f} ms")
    print("gradient ms = training step - forward solve: the whole cost of the gradient method "
          "(phantom/JFB do their unrolled steps in the forward pass)")
    print(f"{'method':<24}{'backward() ms':>14}{'step ms':>10}{'gradient ms':>13}{'saved KiB':>11}"
          f"{'cos(exact)':>12}{'speed-up':>10}")
    g_imp = rows[0][2] - t_solve
    for name, tb, ts, mem, cos in rows:
        g = ts - t_solve
        print(f"{name:<24}{tb * 1e3:>14.2f}{ts * 1e3:>10.2f}{g * 1e3:>13.2f}{mem / 1024:>11.1f}{cos:>12.5f}"
              f"{g_imp / g:>9.2f}x")
    return rows, t_solve


def forward_solvers(batch=64, hidden=256, tol=1e-4, m=6, symmetric=False):
    f, lin, emb = make_cell(hidden=hidden, rho=0.95, seed=1, symmetric=symmetric)
    with torch.no_grad():
        u = emb(torch.randn(batch, 64)) * (0.2 if symmetric else 1.0)
    z0 = torch.zeros(batch, hidden)
    rows = []
    with torch.no_grad():
        solvers = {
            "nde Anderson": Anderson(rtol=0.0, atol=tol, max_steps=200, m=m, throw=False),
            "nde naive": FixedPointIteration(rtol=0.0, atol=tol, max_steps=1000, throw=False),
            "nde Broyden": Broyden(rtol=0.0, atol=tol, max_steps=200, throw=False),
            "nde Newton-Krylov": NewtonKrylov(rtol=0.0, atol=tol, max_steps=30, throw=False),
        }
        for name, s in solvers.items():
            res = s.solve(f, z0, (u,))
            t = timeit(lambda: s.solve(f, z0, (u,)))
            rows.append((name, t, res.nfe, float(res.residual.max()), int(res.iterations.max())))
        try:
            from torchdeq.solver import get_solver

            td_anderson = get_solver("anderson")

            def run_td():
                return td_anderson(lambda z: f(z, u), z0, max_iter=200, tol=tol, stop_mode="abs", m=m)

            z, _, info = run_td()
            t = timeit(run_td)
            resid = float((f(z, u) - z).flatten(1).norm(dim=1).max())
            # torchdeq's loop evaluates f twice before its first mixing step: evaluations = nstep + 1
            nfe = int(info["nstep"].max()) + 1
            rows.append(("torchdeq Anderson", t, nfe, resid, nfe))
        except ImportError:
            print("torchdeq not installed: skipping the peer comparison (pip install --no-deps torchdeq)")
    kind = "symmetric W, spectral radius 0.95" if symmetric else "random W, ||W||_2 = 0.95"
    print(f"\nForward solvers: tanh cell ({kind}), hidden={hidden}, batch={batch}, abs tol {tol:g}, m={m}")
    print(f"{'solver':<20}{'time ms':>10}{'f evals':>9}{'ms / eval':>11}{'max residual':>14}")
    for name, t, nfe, r, _ in rows:
        print(f"{name:<20}{t * 1e3:>10.2f}{nfe:>9d}{t * 1e3 / nfe:>11.3f}{r:>14.2e}")
    by = {r[0]: r for r in rows}
    if "torchdeq Anderson" in by:
        ratio = by["nde Anderson"][1] / by["torchdeq Anderson"][1]
        print(f"nde Anderson / torchdeq Anderson wall time: {ratio:.2f}  "
              f"(f evals {by['nde Anderson'][2]} vs {by['torchdeq Anderson'][2]})")
    return rows


def fixed_iteration_overhead(iters=50, m=6):
    """Per-iteration cost at an equal, fixed number of iterations (tolerance 0)."""
    try:
        from torchdeq.solver import get_solver
    except ImportError:
        return
    td_anderson = get_solver("anderson")
    print(f"\nAnderson at exactly {iters} iterations (tolerance 0): solver overhead at equal work")
    print(f"{'hidden x batch':<16}{'nde ms':>9}{'torchdeq ms':>13}{'f alone ms':>12}{'ratio':>8}")
    for hidden, batch in [(256, 64), (64, 32)]:
        f, lin, emb = make_cell(hidden=hidden, rho=0.95, seed=1, symmetric=True)
        with torch.no_grad():
            u = 0.2 * emb(torch.randn(batch, 64))
            z0 = torch.zeros(batch, hidden)
            s = Anderson(rtol=0.0, atol=1e-30, max_steps=iters, m=m, throw=False)
            t_nde = timeit(lambda: s.solve(f, z0, (u,)))
            t_td = timeit(lambda: td_anderson(lambda z: f(z, u), z0, max_iter=iters, tol=0.0, stop_mode="abs", m=m))
            t_f = timeit(lambda: [f(z0, u) for _ in range(iters)])
        print(f"{f'{hidden} x {batch}':<16}{t_nde * 1e3:>9.2f}{t_td * 1e3:>13.2f}{t_f * 1e3:>12.2f}{t_nde / t_td:>8.2f}")


if __name__ == "__main__":
    torch.manual_seed(0)
    rows, t_solve = backward_methods()
    print(f"phantom speed-up over implicit (Anderson): gradient {(rows[0][2] - t_solve) / (rows[2][2] - t_solve):.2f}x,"
          f" training step {rows[0][2] / rows[2][2]:.2f}x, backward() call {rows[0][1] / rows[2][1]:.1f}x")
    forward_solvers(symmetric=False)
    forward_solvers(symmetric=True)
    fixed_iteration_overhead()
