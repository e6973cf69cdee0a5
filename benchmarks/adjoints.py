"""Time and memory of nde's adjoints, side by side, and against torchdiffeq's adjoint.

Three tables:

1. The same neural ODE (batch 64, state 32, 2-hidden-layer tanh MLP of width 64, fixed steps on
   [0, 1]) at 100 and 1000 steps: forward+backward wall time and peak memory of every adjoint, as the
   peak of the tensor storage the solve and its backward pass hold at once (exact, LiveTensorBytes), and
   as the growth of the resident-set high-water mark over a warm process (each in a fresh subprocess).
   Times are CPU seconds of the single-threaded process (best of N): the wall time on an idle
   machine, and not inflated by other processes on a shared one.
2. BacksolveAdjoint with the seminorm against the RMS norm (and torchdiffeq's default, "mixed") on the
   foundation's batch-256 problem (state 16, width 64, t1 = 5, Dopri5, rtol = atol = 1e-6): backward
   NFE and steps (accepted + rejected), and forward+backward time against torchdiffeq's
   ``odeint_adjoint(..., adjoint_options=dict(norm="seminorm"))`` and its default norm.
3. ReversibleAdjoint against CheckpointAdjoint (default checkpoints) at 1000 fixed steps.
4. Reversible solvers on dissipative dynamics, f = net(y) - lam y on [0, 10] in float64: error of the
   forward solution, relative error of the reconstructed y0, and gradient error against DirectAdjoint on
   the same discrete solve.

Run: python benchmarks/adjoints.py [--repeats N] [--sections 1,2,3,4]
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import nde
from nde.solvers import RK4, AsynchronousLeapfrog, Dopri5, Reversible, ReversibleHeun, Tsit5


def mlp(dim, width, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, dim))


def best_time(fn, repeats):
    """Fastest of ``repeats`` runs after a warm-up, in CPU time of this (single-threaded) process.

    On an idle machine this is the wall time; on a shared one it is not inflated by other processes.
    """
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        ts.append(time.process_time() - t0)
    return min(ts)


ADJOINTS = {
    "DirectAdjoint (RK4)": (lambda: nde.DirectAdjoint(), RK4),
    "CheckpointAdjoint (RK4)": (lambda: nde.CheckpointAdjoint(), RK4),
    "BacksolveAdjoint (RK4)": (lambda: nde.BacksolveAdjoint(), RK4),
    "ReversibleAdjoint (ReversibleHeun)": (lambda: nde.ReversibleAdjoint(), ReversibleHeun),
    "CheckpointAdjoint (ReversibleHeun)": (lambda: nde.CheckpointAdjoint(), ReversibleHeun),
    "ReversibleAdjoint (Reversible(RK4))": (lambda: nde.ReversibleAdjoint(), lambda: Reversible(RK4())),
}


def fixed_step_case(name, n):
    make_adj, make_solver = ADJOINTS[name]
    net = mlp(32, 64)
    torch.manual_seed(1)
    y0 = torch.randn(64, 32, requires_grad=True)
    adj, solver = make_adj(), make_solver()

    def go():
        sol = nde.solve(lambda t, y: net(y), solver, 0.0, 1.0, y0, dt0=1.0 / n, adjoint=adj)
        (sol.ys**2).sum().backward()

    return go


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage created while the mode is active and still alive, and their peak.

    Every operation's outputs are intercepted; a storage is counted once, when it is first seen, and
    uncounted when it is freed (a finalizer on its Python object, which PyTorch keeps alive exactly as
    long as the storage itself, so tensors saved for backward stay counted). Tensors that existed before
    (parameters, ``y0``) and views of them are not counted: ``peak`` is the solve's own peak memory in
    tensors, exact and independent of the allocator.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = set()

    def _free(self, key, n):
        self.live -= n
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = None
        for t in _tensors(out):
            st = t.untyped_storage()
            key = id(st)
            if key in self._seen:
                continue
            if ins is None:  # a view or in-place result of a tensor from before is not new memory
                ins = {id(x.untyped_storage()) for x in _tensors(args)}
                if kwargs:
                    ins.update(id(x.untyped_storage()) for x in _tensors(tuple(kwargs.values())))
            if key in ins:
                continue
            self._seen.add(key)
            n = st.nbytes()
            self.live += n
            weakref.finalize(st, self._free, key, n)
        if self.live > self.peak:
            self.peak = self.live
        return out


def _tensors(x):
    """The tensors of an operation's arguments or outputs (a tensor, or lists/tuples of them)."""
    if isinstance(x, torch.Tensor):
        return (x,)
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return ()


def tensor_peak_mb(go):
    """Peak of live tensor memory (MB) created by ``go()`` (see :class:`LiveTensorBytes`)."""
    gc.collect()
    with LiveTensorBytes() as m:
        go()
    return m.peak / 2**20


def peak_mb():
    """High-water mark of this process's resident set (VmHWM; unlike ru_maxrss, not inherited at fork)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_child(name):
    torch.set_num_threads(1)
    peak = peak_mb
    fixed_step_case(name, 10)()
    base = peak()
    fixed_step_case(name, 100)()
    p100 = peak()
    fixed_step_case(name, 1000)()
    print(json.dumps({"p100": p100 - base, "p1000": peak() - base}))


def memory(name):
    out = subprocess.run([sys.executable, __file__, "--memory-child", name], capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table1(repeats):
    print("\n1. Same neural ODE, fixed steps: forward+backward time, peak tensor memory of the solve (MB)")
    print("   and peak resident-set growth over a warm process (MB)")
    print(f"{'adjoint (solver)':38s} {'ms @100':>9s} {'ms @1000':>9s} {'MB @100':>8s} {'MB @1000':>9s} "
          f"{'RSS @100':>9s} {'RSS @1000':>10s}")
    rows = {}
    for name in ADJOINTS:
        t100 = best_time(fixed_step_case(name, 100), repeats)
        t1000 = best_time(fixed_step_case(name, 1000), max(1, repeats // 2))
        k100, k1000 = tensor_peak_mb(fixed_step_case(name, 100)), tensor_peak_mb(fixed_step_case(name, 1000))
        m = memory(name)
        rows[name] = (t100, t1000, k100, k1000, m["p100"], m["p1000"])
        print(f"{name:38s} {t100 * 1e3:9.1f} {t1000 * 1e3:9.1f} {k100:8.2f} {k1000:9.2f} {m['p100']:9.1f} "
              f"{m['p1000']:10.1f}")
    return rows


def table2(repeats):
    import torchdiffeq

    print("\n2. batch 256, state 16, width 64, t1 = 5, Dopri5, rtol = atol = 1e-6")
    net = mlp(16, 64)
    torch.manual_seed(1)
    y0 = torch.randn(256, 16, requires_grad=True)
    ctrl = nde.PIDController(rtol=1e-6, atol=1e-6)
    res = {}
    for norm in ("seminorm", "rms", "mixed"):
        adj = nde.BacksolveAdjoint(norm=norm)

        def go(adj=adj):
            sol = nde.solve(lambda t, y: net(y), Dopri5(), 0.0, 5.0, y0, controller=ctrl, adjoint=adj)
            (sol.ys**2).sum().backward()
            return sol.stats["nfe"]

        fwd = go()
        res[f"nde BacksolveAdjoint({norm})"] = (best_time(go, repeats), fwd, adj.backward_stats["nfe"],
                                                adj.backward_stats["num_steps"])

    class F(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.n = net, 0

        def forward(self, t, y):
            self.n += 1
            return self.net(y)

    for norm in ("seminorm", None):
        f = F()
        ts = torch.tensor([0.0, 5.0])

        def go(f=f, norm=norm):
            f.n = 0
            ys = torchdiffeq.odeint_adjoint(f, y0, ts, rtol=1e-6, atol=1e-6, method="dopri5",
                                            adjoint_options=dict(norm=norm) if norm else None)
            n1 = f.n
            (ys[-1] ** 2).sum().backward()
            return n1, f.n - n1

        fwd, bwd = go()
        res[f"torchdiffeq odeint_adjoint({norm or 'default'})"] = (best_time(go, repeats), fwd, bwd, None)
    print(f"{'method':42s} {'fwd+bwd ms':>11s} {'fwd NFE':>8s} {'bwd NFE':>8s} {'bwd steps':>10s}")
    for k, (t, fwd, bwd, steps) in res.items():
        print(f"{k:42s} {t * 1e3:11.1f} {fwd:8d} {bwd:8d} {'' if steps is None else steps:>10}")
    s, r = res["nde BacksolveAdjoint(seminorm)"], res["nde BacksolveAdjoint(rms)"]
    td = res["torchdiffeq odeint_adjoint(seminorm)"]
    print(f"seminorm saves {100 * (1 - s[2] / r[2]):.0f}% of the backward NFE; "
          f"nde seminorm time / torchdiffeq seminorm time = {s[0] / td[0]:.2f}")
    return res


def table3(rows):
    print("\n3. ReversibleAdjoint against CheckpointAdjoint (default checkpoints) at 1000 fixed steps")
    rev = rows["ReversibleAdjoint (ReversibleHeun)"][1]
    for other in ("CheckpointAdjoint (ReversibleHeun)", "CheckpointAdjoint (RK4)"):
        print(f"ReversibleAdjoint (ReversibleHeun) / {other}: {rev / rows[other][1]:.2f}")
    rev2 = rows["ReversibleAdjoint (Reversible(RK4))"][1]
    print(f"ReversibleAdjoint (Reversible(RK4)) / CheckpointAdjoint (RK4): {rev2 / rows['CheckpointAdjoint (RK4)'][1]:.2f}")


def table4():
    import warnings

    print("\n4. f = net(y) - lam y on [0, 10], float64: reversible solvers on dissipative dynamics")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    cases = {
        "Reversible(Tsit5()), rtol 1e-6": (lambda: Reversible(Tsit5()), dict(controller=nde.PIDController(rtol=1e-6, atol=1e-8))),
        "Reversible(RK4()), dt 0.05": (lambda: Reversible(RK4()), dict(dt0=0.05)),
        "ReversibleHeun(), dt 0.05": (ReversibleHeun, dict(dt0=0.05)),
        "AsynchronousLeapfrog(), dt 0.05": (AsynchronousLeapfrog, dict(dt0=0.05)),
    }
    print(f"{'lam':>4s} {'solver':34s} {'steps':>6s} {'fwd error':>10s} {'recon rel':>10s} {'grad rel err':>12s}  backward")
    for lam in (1.0, 2.0, 5.0):
        def f(t, y):
            return net(y) - lam * y

        with torch.no_grad():
            exact = nde.solve(f, Tsit5(), 0.0, 10.0, y0, controller=nde.PIDController(rtol=1e-12, atol=1e-14)).ys[-1]
        for name, (make, kw) in cases.items():
            grads = []
            for adj in (nde.DirectAdjoint(), nde.ReversibleAdjoint()):
                sol = nde.solve(f, make(), 0.0, 10.0, y0, adjoint=adj, **kw)
                ys = sol.ys.detach()
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    try:
                        g = torch.autograd.grad((sol.ys**2).sum(), [y0, *net.parameters()])
                        grads.append(torch.cat([x.flatten() for x in g]))
                        what = "warned" if w else "ok"
                    except RuntimeError:
                        what = "raised"
            st = adj.backward_stats
            gerr = float((grads[1] - grads[0]).abs().max() / grads[0].abs().max()) if len(grads) == 2 else float("nan")
            fwd = float((ys[-1] - exact).abs().max())
            print(f"{lam:4.0f} {name:34s} {st['num_steps']:6d} {fwd:10.1e} {st['reconstruction_rel_error']:10.1e} "
                  f"{gerr:12.1e}  {what}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sections", default="1,2,3,4", help="comma-separated subset of 1,2,3,4 (3 needs 1)")
    parser.add_argument("--memory-child")
    a = parser.parse_args()
    if a.memory_child:
        memory_child(a.memory_child)
        return
    torch.set_num_threads(1)
    sections = {int(x) for x in a.sections.split(",")}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, best of {a.repeats}")
    if 1 in sections:
        rows = table1(a.repeats)
        if 3 in sections:
            table3(rows)
    if 2 in sections:
        table2(a.repeats)
    if 4 in sections:
        table4()


if __name__ == "__main__":
    main()
