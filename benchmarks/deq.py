"""Deep equilibrium benchmarks.

1. Backward methods on the same DEQ and data: implicit differentiation (Anderson and GMRES
   adjoint solves), phantom gradients and Jacobian-free backpropagation. Reports the time of
   ``loss.backward()``, of a whole training step, the bytes saved for backward, and the cosine
   similarity of each gradient with the exact implicit gradient.
   ``backward peak KiB`` is the peak of live tensor bytes during ``loss.backward()`` of the
   tensors the step created (saved tensors, adjoint-solver buffers, temporaries), tracked exactly
   per storage by ``nde._deq.LiveTensorBytes`` (a ``TorchDispatchMode``).
2. Forward solvers: nde's Anderson and Broyden against torchdeq's (``pip install --no-deps
   torchdeq``) on the same cell, memory ``m`` and stopping rule. torchdeq's ``stop_mode="abs"``
   stops when the largest per-sample residual ``||f(z) - z||_2`` is below ``tol``, its
   ``stop_mode="rel"`` when the largest ``||f(z) - z|| / (||f(z)|| + 1e-9)`` is: nde's
   ``atol=tol, rtol=0`` and ``rtol=tol, atol=0`` stop at the same point (every sample below
   ``tol``). Evaluations of ``f`` are counted by a wrapper around the cell, for both libraries.
   torchdeq's Anderson regulariser ``lam`` is absolute (default 1e-4); it is also run with
   ``lam=1e-8``, nde's default, although nde's regulariser is relative to each residual.
3. Anderson at an equal, fixed number of iterations (tolerance 0): per-iteration overhead.

Run: ``python benchmarks/deq.py`` (about 20 seconds on one CPU core).
"""

from __future__ import annotations

import time
import warnings

import torch
from torch import nn

from nde import deq_fixed_point
from nde._deq import LiveTensorBytes
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


def backward_peak_bytes(forward, params):
    """Peak live bytes while ``forward()`` (a loss) is differentiated with respect to ``params``."""
    mode = LiveTensorBytes()
    with mode:
        loss = forward()
        mode.measuring = True
        torch.autograd.grad(loss, params)
    return mode.peak


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

        # the training step and the solve alone, interleaved: their difference is the whole cost of
        # the gradient method and must not be drowned by load changing between two measurements
        t_step, t_solve = (min(ts) for ts in zip(*[(timeit(step, 1, 0), timeit(solve_only, 1, 0))
                                                   for _ in range(3 + 30)][3:]))
        for _ in range(3):
            backward_only()
        t_bwd = min(backward_only() for _ in range(30))
        mem = backward_peak_bytes(forward, params)
        g = torch.cat([gg.flatten() for gg in torch.autograd.grad(forward(), params)])
        cos = float((g * ref).sum() / (g.norm() * ref.norm()))
        rows.append((name, t_bwd, t_step, t_step - t_solve, mem, cos))
    print(f"\nBackward methods: tanh cell, hidden={hidden}, batch={batch}, rtol={tol:g} (best of 30)")
    print(f"forward solve alone (no graph): {t_solve * 1e3:.2f} ms")
    print("gradient ms = training step - forward solve alone: the whole cost of the gradient method "
          "(phantom/JFB do their unrolled steps in the forward pass)")
    print(f"{'method':<24}{'backward() ms':>14}{'step ms':>10}{'gradient ms':>13}{'backward peak KiB':>19}"
          f"{'cos(exact)':>12}{'speed-up':>10}")
    for name, tb, ts, tg, mem, cos in rows:
        print(f"{name:<24}{tb * 1e3:>14.2f}{ts * 1e3:>10.2f}{tg * 1e3:>13.2f}{mem / 1024:>19.1f}{cos:>12.5f}"
              f"{rows[0][3] / tg:>9.2f}x")
    return rows


class Counted:
    """``f`` with a count of its evaluations."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def __call__(self, *a):
        self.n += 1
        return self.f(*a)


def forward_solvers(batch=64, hidden=256, tol=1e-4, m=6, symmetric=False, mode="abs"):
    f, lin, emb = make_cell(hidden=hidden, rho=0.95, seed=1, symmetric=symmetric)
    with torch.no_grad():
        u = emb(torch.randn(batch, 64, generator=torch.Generator().manual_seed(2))) * (0.2 if symmetric else 1.0)
    z0 = torch.zeros(batch, hidden)
    tols = dict(rtol=0.0, atol=tol) if mode == "abs" else dict(rtol=tol, atol=0.0)
    runs = {
        "nde Anderson": lambda g: Anderson(**tols, max_steps=300, m=m, throw=False).solve(g, z0, (u,)).value,
        "nde Broyden": lambda g: Broyden(**tols, max_steps=300, throw=False).solve(g, z0, (u,)).value,
        "nde naive": lambda g: FixedPointIteration(**tols, max_steps=1000, throw=False).solve(g, z0, (u,)).value,
        "nde Newton-Krylov": lambda g: NewtonKrylov(**tols, max_steps=30, throw=False).solve(g, z0, (u,)).value,
    }
    try:
        from torchdeq.solver import get_solver

        td_anderson, td_broyden = get_solver("anderson"), get_solver("broyden")
        common = dict(max_iter=300, tol=tol, stop_mode=mode)
        runs["torchdeq Anderson"] = lambda g: td_anderson(lambda z: g(z, u), z0, m=m, **common)[0]
        runs["torchdeq Anderson lam=1e-8"] = lambda g: td_anderson(lambda z: g(z, u), z0, m=m, lam=1e-8, **common)[0]
        runs["torchdeq Broyden"] = lambda g: td_broyden(lambda z: g(z, u), z0, **common)[0]
    except ImportError:
        print("torchdeq not installed: skipping the peer comparison (pip install --no-deps torchdeq)")
    rows = {}
    with torch.no_grad():
        for name, run in runs.items():
            counted = Counted(f)
            z = run(counted)
            t = timeit(lambda: run(f))
            res = (f(z, u) - z).norm(dim=1)
            if mode == "rel":
                res = res / (f(z, u).norm(dim=1) + 1e-9)
            rows[name] = (t, counted.n, float(res.max()))
    kind = "symmetric W, spectral radius 0.95" if symmetric else "random W, ||W||_2 = 0.95"
    print(f"\nForward solvers: tanh cell ({kind}), hidden={hidden}, batch={batch}, {mode} tol {tol:g}, m={m}")
    print(f"{'solver':<28}{'time ms':>10}{'f evals':>9}{'ms / eval':>11}{f'max {mode} residual':>18}")
    for name, (t, nfe, r) in rows.items():
        print(f"{name:<28}{t * 1e3:>10.2f}{nfe:>9d}{t * 1e3 / nfe:>11.3f}{r:>18.2e}")
    for ours, peer in (("nde Anderson", "torchdeq Anderson"), ("nde Broyden", "torchdeq Broyden")):
        if peer in rows:
            print(f"{ours} / {peer}: wall time {rows[ours][0] / rows[peer][0]:.2f}x, "
                  f"f evals {rows[ours][1]} vs {rows[peer][1]}")
    return rows


def fixed_iteration_overhead(iters=50, m=6):
    """Per-iteration cost at an equal, fixed number of iterations (tolerance 0)."""
    try:
        from torchdeq.solver import get_solver
    except ImportError:
        return
    td_anderson = get_solver("anderson")
    print(f"\nAnderson at exactly {iters} evaluations of f (tolerance 0): solver overhead at equal work")
    print(f"{'hidden x batch':<16}{'nde ms':>9}{'torchdeq ms':>13}{'f alone ms':>12}{'ratio':>8}")
    for hidden, batch in [(256, 64), (64, 32)]:
        f, lin, emb = make_cell(hidden=hidden, rho=0.95, seed=1, symmetric=True)
        with torch.no_grad():
            u = 0.2 * emb(torch.randn(batch, 64))
            z0 = torch.zeros(batch, hidden)
            s = Anderson(rtol=0.0, atol=1e-30, max_steps=iters, m=m, throw=False)
            t_nde = timeit(lambda: s.solve(f, z0, (u,)))
            # torchdeq evaluates f max_iter times (two before its first mixing step)
            t_td = timeit(lambda: td_anderson(lambda z: f(z, u), z0, max_iter=iters, tol=0.0, stop_mode="abs", m=m))
            t_f = timeit(lambda: [f(z0, u) for _ in range(iters)])
        print(f"{f'{hidden} x {batch}':<16}{t_nde * 1e3:>9.2f}{t_td * 1e3:>13.2f}{t_f * 1e3:>12.2f}{t_nde / t_td:>8.2f}")


if __name__ == "__main__":
    torch.manual_seed(0)
    rows = backward_methods()
    print(f"phantom speed-up over implicit (Anderson): gradient {rows[0][3] / rows[2][3]:.2f}x,"
          f" training step {rows[0][2] / rows[2][2]:.2f}x, backward() call {rows[0][1] / rows[2][1]:.1f}x")
    forward_solvers(symmetric=False)
    forward_solvers(symmetric=True)
    forward_solvers(symmetric=True, mode="rel")
    fixed_iteration_overhead()
