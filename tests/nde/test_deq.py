import gc
import warnings
import weakref

import pytest
import torch

from nde._deq import LiveTensorBytes, deq_fixed_point, implicit_vjp, jacobian_regularisation, spectral_radius
from nde.solvers.fixed_point import (
    Anderson,
    Broyden,
    FixedPointIteration,
    FixedPointWarning,
    NewtonKrylov,
    get_fixed_point_solver,
)

F64 = torch.float64
TIGHT = dict(rtol=0, atol=1e-13, max_steps=1000)


def make_cell(dim=6, inp=3, rho=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(dim, dim, generator=g, dtype=F64)
    W = (rho * W / torch.linalg.matrix_norm(W, ord=2)).requires_grad_(True)
    U = torch.randn(inp, dim, generator=g, dtype=F64).requires_grad_(True)

    def f(z, x):
        return torch.tanh(z @ W + x @ U)

    return f, W, U


def loss_fn(z):
    return (z ** 2).sum() + (z * torch.arange(z.shape[-1], dtype=z.dtype)).sum()


@pytest.mark.parametrize("bsolver", ["naive", "anderson", "broyden", "gmres"])
def test_implicit_gradient_gradcheck(bsolver):
    # every solver of the backward linear system; the full Jacobian (not only fast_mode's projection)
    f, W, U = make_cell()
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)

    def fn(x, W, U):
        return deq_fixed_point(lambda z, x: torch.tanh(z @ W + x @ U), torch.zeros(2, 6, dtype=F64), (x,),
                               solver=Anderson(**TIGHT), backward_solver=get_fixed_point_solver(bsolver, **TIGHT))

    # nondet_tol: GMRES's small least-squares solves differ by ~1e-19 between identical calls
    assert torch.autograd.gradcheck(fn, (x, W.detach().requires_grad_(), U.detach().requires_grad_()),
                                    eps=1e-6, atol=1e-7, rtol=1e-6, nondet_tol=1e-12)


@pytest.mark.parametrize("bsolver", [FixedPointIteration, Anderson, Broyden, NewtonKrylov])
def test_implicit_matches_unrolled_backprop(bsolver):
    f, W, U = make_cell()
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    z0 = torch.zeros(4, 6, dtype=F64)
    z_unr = deq_fixed_point(f, z0, (x,), solver=FixedPointIteration(**TIGHT), backward="unrolled")
    ref = torch.autograd.grad(loss_fn(z_unr), [W, U, x])
    z_imp = deq_fixed_point(f, z0, (x,), solver=Anderson(**TIGHT), backward="implicit",
                            backward_solver=bsolver(**TIGHT))
    got = torch.autograd.grad(loss_fn(z_imp), [W, U, x])
    torch.testing.assert_close(z_imp, z_unr, rtol=0, atol=1e-11)
    for a, b in zip(got, ref):
        assert (a - b).abs().max() <= 1e-6


def test_phantom_and_jfb_gradients():
    f, W, U = make_cell(rho=0.5)
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    z0 = torch.zeros(4, 6, dtype=F64)
    exact = torch.autograd.grad(loss_fn(deq_fixed_point(f, z0, (x,), solver=Anderson(**TIGHT))), x)[0]

    def grad_of(**kw):
        return torch.autograd.grad(loss_fn(deq_fixed_point(f, z0, (x,), solver=Anderson(**TIGHT), **kw)), x)[0]

    # many undamped phantom steps = truncated Neumann series of the implicit gradient
    long = grad_of(backward="phantom", phantom_steps=60, phantom_damping=1.0)
    assert (long - exact).abs().max() <= 1e-10
    cos = lambda a, b: float((a * b).sum() / (a.norm() * b.norm()))  # noqa: E731
    short = grad_of(backward="phantom", phantom_steps=5, phantom_damping=0.5)
    jfb = grad_of(backward="jfb")
    # approximate gradients: not exact, but descent directions close to the exact one
    assert (short - exact).abs().max() > 1e-4 and (jfb - exact).abs().max() > 1e-4
    assert cos(short, exact) > 0.9 and cos(jfb, exact) > 0.8
    # the phantom gradient improves on JFB
    assert (short - exact).norm() < (jfb - exact).norm()


def _backward_peak_bytes(forward, inputs):
    """Peak live bytes of the tensors created by ``forward()`` and the gradient of its sum w.r.t. ``inputs``."""
    mode = LiveTensorBytes()
    with mode:
        loss = forward().sum()
        mode.measuring = True
        grads = torch.autograd.grad(loss, inputs)
    assert all(torch.isfinite(g).all() for g in grads)
    return mode.peak


@pytest.mark.parametrize("backward,bsolver", [("implicit", "anderson"), ("implicit", "gmres"),
                                              ("phantom", None), ("jfb", None)])
def test_backward_memory_independent_of_forward_iterations(backward, bsolver):
    # the whole backward pass (saved tensors, adjoint solver buffers, temporaries) at 10 and 100
    # forward iterations: the tolerance is unreachable, so the forward runs exactly max_steps
    # W = 0.999 x orthogonal and small inputs (tanh near its linear part): the residual decreases by
    # about 0.999 per iteration, so every iteration improves on the last and 100 do not converge
    g = torch.Generator().manual_seed(0)
    W = (0.999 * torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=F64))[0]).requires_grad_(True)
    U = torch.randn(8, 64, generator=g, dtype=F64).requires_grad_(True)
    f = lambda z, x: torch.tanh(z @ W + x @ U)  # noqa: E731
    x = (0.01 * torch.randn(16, 8, generator=g, dtype=F64)).requires_grad_(True)
    z0 = torch.zeros(16, 64, dtype=F64)
    kw = dict(backward=backward, backward_solver=bsolver and get_fixed_point_solver(
        bsolver, rtol=1e-8, atol=0, max_steps=40, throw=False))

    def solve(steps, **extra):
        solver = FixedPointIteration(rtol=0, atol=1e-300, max_steps=steps, throw=False)
        return deq_fixed_point(f, z0, (x,), solver=solver, **kw, **extra)

    mem = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FixedPointWarning)
        for steps in (10, 100):
            assert solve(steps, return_result=True)[1].num_steps == steps
            mem[steps] = _backward_peak_bytes(lambda: solve(steps), [W, U, x])
        unrolled = {steps: _backward_peak_bytes(lambda: deq_fixed_point(
            f, z0, (x,), solver=FixedPointIteration(rtol=0, atol=1e-300, max_steps=steps, throw=False),
            backward="unrolled"), [W, U, x]) for steps in (10, 100)}
    assert mem[10] > 64 * 64 * 8  # the weight gradient at least
    assert mem[100] <= 1.1 * mem[10], mem
    # the measurement does see iteration-proportional memory: unrolled backprop keeps (at least) one
    # state per iteration
    assert unrolled[100] - unrolled[10] >= 90 * z0.numel() * z0.element_size(), unrolled


def test_jacobian_regularisation_on_linear_map():
    g = torch.Generator().manual_seed(0)
    d = 8
    W = torch.randn(d, d, generator=g, dtype=F64, requires_grad=True)
    f = lambda z: z @ W.T  # noqa: E731
    z = torch.randn(5, d, dtype=F64)
    exact = (W.detach() ** 2).sum() / d
    est = jacobian_regularisation(f, z, num_samples=4000, create_graph=False)
    assert est.shape == (5,)
    assert abs(est.mean().item() / exact.item() - 1) < 0.05
    # differentiable: d/dW of E||eps^T W||^2 / d = 2 W / d
    est = jacobian_regularisation(f, z, num_samples=2000)
    (gW,) = torch.autograd.grad(est.mean(), W)
    torch.testing.assert_close(gW, 2 * W.detach() / d, rtol=0, atol=0.1 * W.detach().abs().max().item() / d * 2)
    unnorm = jacobian_regularisation(f, z, num_samples=4000, normalise=False, create_graph=False)
    assert abs(unnorm.mean().item() / (d * exact.item()) - 1) < 0.05


def test_spectral_radius_power_iteration():
    g = torch.Generator().manual_seed(1)
    d = 10
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0]
    lam = torch.linspace(-0.3, 0.8, d, dtype=F64)
    A = Q @ torch.diag(lam) @ Q.T
    rho = spectral_radius(lambda z: z @ A.T, torch.randn(3, d, dtype=F64), iters=200)
    torch.testing.assert_close(rho, torch.full((3,), 0.8, dtype=F64), rtol=0, atol=1e-3)
    # non-normal matrix with complex eigenvalues: radius, not the spectral norm
    B = torch.tensor([[0.0, -0.9, 5.0], [0.9, 0.0, 0.0], [0.0, 0.0, 0.1]], dtype=F64)
    rho = spectral_radius(lambda z: z @ B.T, torch.randn(2, 3, dtype=F64), iters=400)
    torch.testing.assert_close(rho, torch.full((2,), 0.9, dtype=F64), rtol=0, atol=2e-2)


def test_any_shape_and_batch_dims():
    g = torch.Generator().manual_seed(2)
    A = 0.3 * torch.randn(4, 4, generator=g, dtype=F64)
    p = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
    f = lambda z, p: torch.tanh(z @ A + p)  # noqa: E731
    for bd in (0, 1, 2):
        z, res = deq_fixed_point(f, torch.zeros(2, 3, 4, dtype=F64), (p,), solver=Anderson(**TIGHT),
                                 batch_dims=bd, return_result=True)
        assert z.shape == (2, 3, 4) and res.converged.shape == (2, 3)[:bd]
        (gp,) = torch.autograd.grad(z.sum(), p)
        z_unr = deq_fixed_point(f, torch.zeros(2, 3, 4, dtype=F64), (p,), solver=FixedPointIteration(**TIGHT),
                                backward="unrolled")
        (gu,) = torch.autograd.grad(z_unr.sum(), p)
        torch.testing.assert_close(gp, gu, rtol=0, atol=1e-9)


def test_closure_parameters_receive_gradients_and_retain_graph():
    lin = torch.nn.Linear(5, 5).double()
    with torch.no_grad():
        lin.weight.mul_(0.5 / torch.linalg.matrix_norm(lin.weight, ord=2))
    x = torch.randn(3, 5, dtype=F64)
    z = deq_fixed_point(lambda z, x: torch.tanh(lin(z) + x), torch.zeros_like(x), x, solver=Anderson(**TIGHT))
    loss = loss_fn(z)
    g1 = torch.autograd.grad(loss, lin.weight, retain_graph=True)[0]
    g2 = torch.autograd.grad(loss, lin.weight)[0]
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-14)
    assert g1.abs().sum() > 0
    with torch.no_grad():
        z = deq_fixed_point(lambda z, x: torch.tanh(lin(z) + x), torch.zeros_like(x), x)
    assert not z.requires_grad


def test_implicit_vjp_solves_adjoint_system():
    g = torch.Generator().manual_seed(3)
    d = 7
    A = 0.5 * torch.randn(2, d, d, generator=g, dtype=F64) / d ** 0.5
    v = torch.randn(2, d, dtype=F64)
    vjp = lambda u: torch.bmm(u[:, None, :], A)[:, 0]  # noqa: E731  u^T A
    exact = torch.linalg.solve((torch.eye(d, dtype=F64) - A).transpose(1, 2), v[:, :, None])[:, :, 0]
    for s in ("naive", "anderson", "broyden", "gmres"):
        from nde.solvers.fixed_point import get_fixed_point_solver
        res = implicit_vjp(vjp, v, get_fixed_point_solver(s, **TIGHT))
        assert (res.value - exact).abs().max() <= 1e-10, s


def test_errors():
    f = lambda z: 0.5 * z  # noqa: E731
    with pytest.raises(ValueError, match="backward"):
        deq_fixed_point(f, torch.zeros(2), backward="adjoint")
    with pytest.raises(ValueError, match="phantom_steps"):
        deq_fixed_point(f, torch.zeros(2), backward="phantom", phantom_steps=0)
    with pytest.raises(ValueError, match="Unknown fixed-point solver"):
        deq_fixed_point(f, torch.zeros(2), solver="bisection")
    with pytest.raises(ValueError, match="num_samples"):
        jacobian_regularisation(f, torch.zeros(2, 2), num_samples=0)


def test_backward_solve_statistics_are_recorded():
    f, W, U = make_cell()
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    z, res = deq_fixed_point(f, torch.zeros(4, 6, dtype=F64), (x,), solver=Anderson(**TIGHT), return_result=True)
    assert res.backward is None
    z.sum().backward()
    assert res.backward is not None and res.backward.all_converged
    assert res.backward.residual.max() <= 1e-13 and res.backward.iterations.min() >= 2


def test_higher_order_gradients_through_implicit_backward_raise():
    f, W, U = make_cell()
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    z = deq_fixed_point(f, torch.zeros(2, 6, dtype=F64), (x,), solver=Anderson(**TIGHT))
    with pytest.raises(RuntimeError, match="higher-order"):
        torch.autograd.grad(z.sum(), x, create_graph=True)
    # phantom steps are ordinary operations: second derivatives work
    z = deq_fixed_point(f, torch.zeros(2, 6, dtype=F64), (x,), solver=Anderson(**TIGHT), backward="phantom")
    (g,) = torch.autograd.grad(z.sum(), x, create_graph=True)
    assert g.requires_grad


_RSS_SCRIPT = r"""
import sys, warnings
import torch
warnings.simplefilter("ignore")
torch.set_num_threads(1)
from nde import deq_fixed_point
from nde.solvers import Anderson, FixedPointIteration
steps, backward = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
n, d = 64, 2048
lin = torch.nn.Linear(d, d)
with torch.no_grad():
    lin.weight.mul_(0.999 / torch.linalg.matrix_norm(lin.weight, ord=2))
x = torch.randn(n, d, requires_grad=True)
f = lambda z, x: torch.tanh(lin(z) + x)

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

def run(k):
    solver = FixedPointIteration(rtol=0, atol=1e-30, max_steps=k, throw=False)
    z = deq_fixed_point(f, torch.zeros(n, d), (x,), solver=solver, backward=backward,
                        backward_solver=Anderson(rtol=1e-6, atol=0, max_steps=20, throw=False))
    z.sum().backward()

run(3)  # warm up kernels and the allocator
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the peak-RSS counter
base = status("VmRSS")
run(steps)
print((status("VmHWM") - base) / 1024)
"""


@pytest.mark.slow
def test_backward_peak_rss_independent_of_forward_iterations(tmp_path):
    import os
    import statistics
    import subprocess
    import sys

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("peak-RSS reset (/proc/self/clear_refs) unavailable")
    script = tmp_path / "rss.py"
    script.write_text(_RSS_SCRIPT)
    # a fixed mmap threshold: every large buffer is mapped and unmapped on its own, so peak RSS follows
    # the live tensors instead of the allocator's heap history (glibc's adaptive threshold made a freed
    # 16 MiB weight-gradient temporary stay resident in some runs and not in others)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}

    def peak_mib(steps, backward, repeats=3):
        runs = [float(subprocess.run([sys.executable, str(script), str(steps), backward], capture_output=True,
                                     text=True, check=True, env=env).stdout.strip().splitlines()[-1])
                for _ in range(repeats)]
        return statistics.median(runs)

    implicit = {k: peak_mib(k, "implicit") for k in (10, 100)}
    unrolled = {k: peak_mib(k, "unrolled", repeats=1) for k in (10, 100)}
    assert implicit[100] <= 1.1 * implicit[10], implicit
    # the measurement sees iteration-proportional memory: unrolled backprop keeps one 0.5 MiB state per iteration
    assert unrolled[100] - unrolled[10] > 0.9 * 90 * 0.5, unrolled


@pytest.mark.parametrize("backward", ["implicit", "phantom", "jfb"])
@pytest.mark.parametrize("call_backward", [True, False])
def test_outputs_and_graphs_are_freed(backward, call_backward):
    # the output, its graph and its saved tensors die with the last reference to the output
    f, W, U = make_cell()
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    refs = []
    for _ in range(5):
        z = deq_fixed_point(f, torch.zeros(4, 6, dtype=F64), (x,), solver=Anderson(**TIGHT), backward=backward)
        if call_backward:
            loss_fn(z).backward()
        refs.append(weakref.ref(z))
        del z
    gc.collect()
    assert [r() for r in refs] == [None] * 5


def test_graph_does_not_keep_the_forward_result_alive():
    # the forward result holds one residual per iteration: the graph must not keep it
    f, W, U = make_cell()
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    z, res = deq_fixed_point(f, torch.zeros(4, 6, dtype=F64), (x,), solver=Anderson(**TIGHT), return_result=True)
    ref = weakref.ref(res)
    del res
    gc.collect()
    assert ref() is None
    (g,) = torch.autograd.grad(loss_fn(z), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
