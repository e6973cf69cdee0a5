import warnings

import pytest
import torch

from nde.solvers.fixed_point import (
    Anderson,
    Broyden,
    FixedPointError,
    FixedPointIteration,
    FixedPointWarning,
    NewtonKrylov,
    get_fixed_point_solver,
    gmres,
)

ALL = [FixedPointIteration, Anderson, Broyden, NewtonKrylov]
F64 = torch.float64


def contractive_problem(batch=4, dim=20, rho=0.9):
    # Lipschitz constant <= rho: a symmetric linear part with spectrum spread over
    # [-(rho - 0.05), rho - 0.05] plus 0.05 tanh
    g = torch.Generator().manual_seed(1)
    Q = torch.linalg.qr(torch.randn(batch, dim, dim, generator=g, dtype=F64))[0]
    lam = (rho - 0.05) * torch.linspace(-1, 1, dim, dtype=F64)
    W = Q @ torch.diag_embed(lam.expand(batch, dim)) @ Q.transpose(1, 2)
    b = torch.randn(batch, dim, generator=g, dtype=F64)

    def f(z, b):
        return torch.bmm(W, z[:, :, None])[:, :, 0] + 0.05 * torch.tanh(z) + b

    return f, b


@pytest.mark.parametrize("cls", ALL)
def test_converges_on_contractive_map(cls):
    f, b = contractive_problem()
    res = cls(rtol=0, atol=1e-10, max_steps=1000).solve(f, torch.zeros_like(b), (b,))
    assert res.all_converged
    assert res.residual.max() <= 1e-10
    true_res = (f(res.value, b) - res.value).norm(dim=1)
    torch.testing.assert_close(true_res, res.residual, rtol=0, atol=1e-14)
    # contraction factor 0.9 => distance to the fixed point <= residual / (1 - 0.9)
    ref = NewtonKrylov(rtol=0, atol=1e-13).solve(f, torch.zeros_like(b), (b,)).value
    assert (res.value - ref).norm(dim=1).max() <= 1e-9


@pytest.mark.parametrize("cls", ALL)
def test_linear_fixed_point_known_solution(cls):
    g = torch.Generator().manual_seed(2)
    n, d = 3, 15
    A = torch.randn(n, d, d, generator=g, dtype=F64) / d ** 0.5 * 0.6
    c = torch.randn(n, d, generator=g, dtype=F64)
    exact = torch.linalg.solve(torch.eye(d, dtype=F64) - A, c[:, :, None])[:, :, 0]
    f = lambda z: torch.bmm(A, z[:, :, None])[:, :, 0] + c  # noqa: E731
    res = cls(rtol=0, atol=1e-11, max_steps=500).solve(f, torch.zeros_like(c))
    assert (res.value - exact).abs().max() <= 1e-9
    lin = cls(rtol=0, atol=1e-11, max_steps=500).solve_linear(lambda z: torch.bmm(A, z[:, :, None])[:, :, 0], c)
    assert (lin.value - exact).abs().max() <= 1e-9


def test_accelerated_solvers_need_fewer_iterations():
    f, b = contractive_problem(rho=0.95)
    its = {}
    for cls in ALL:
        res = cls(rtol=0, atol=1e-9, max_steps=1000).solve(f, torch.zeros_like(b), (b,))
        assert res.all_converged
        its[cls.__name__] = res.iterations.double().mean().item()
    naive = its["FixedPointIteration"]
    assert its["Anderson"] <= 0.6 * naive, its
    assert its["Broyden"] <= 0.6 * naive, its
    assert its["NewtonKrylov"] <= 10, its  # outer Newton steps: quadratic convergence


def test_per_sample_convergence_and_iteration_counts():
    # f(z) = r z + 1 with per-sample rate r: naive iteration needs about log(tol)/log(r) steps
    r = torch.tensor([0.1, 0.5, 0.8, 0.95], dtype=F64)[:, None]
    f = lambda z: r * z + 1.0  # noqa: E731
    res = FixedPointIteration(rtol=0, atol=1e-8, max_steps=1000).solve(f, torch.zeros(4, 3, dtype=F64))
    its = res.iterations.tolist()
    assert its == sorted(its) and len(set(its)) == 4
    torch.testing.assert_close(res.value, (1 / (1 - r)).expand(4, 3), rtol=0, atol=1e-6)
    assert res.residual_history.shape == (res.num_steps, 4)
    # converged samples are frozen: their recorded residual stops changing
    k0 = its[0]
    assert torch.all(res.residual_history[k0 - 1:, 0] == res.residual_history[-1, 0])


@pytest.mark.parametrize("cls", ALL)
def test_non_convergence_reported_per_sample(cls):
    # sample 1 has no fixed point (z -> z + 1); the others converge
    shift = torch.tensor([0.0, 1.0, 0.0], dtype=F64)[:, None]
    scale = torch.tensor([0.5, 1.0, 0.3], dtype=F64)[:, None]
    f = lambda z: scale * z + shift + (1 - scale) * 2.0  # noqa: E731
    z0 = torch.zeros(3, 2, dtype=F64)
    with pytest.raises(FixedPointError) as err:
        cls(rtol=0, atol=1e-8, max_steps=40, throw=True).solve(f, z0)
    assert err.value.samples == [1]
    with pytest.warns(FixedPointWarning, match="1 of 3 samples"):
        res = cls(rtol=0, atol=1e-8, max_steps=40, throw=False).solve(f, z0)
    assert res.converged.tolist() == [True, False, True]
    torch.testing.assert_close(res.value[[0, 2]], torch.full((2, 2), 2.0, dtype=F64), rtol=0, atol=1e-7)


def test_nan_sample_stops_and_is_reported():
    def f(z):
        out = 0.5 * z + 1
        return torch.cat([out[:1], out[1:2] * float("nan")])

    with pytest.warns(FixedPointWarning):
        res = Anderson(rtol=0, atol=1e-10, max_steps=50, throw=False).solve(f, torch.zeros(2, 3, dtype=F64))
    assert res.converged.tolist() == [True, False]


def test_root_finding_newton_and_broyden():
    a = torch.tensor([2.0, 27.0, 0.5, 10.0], dtype=F64)[:, None]
    g = lambda z, a: z ** 3 - a  # noqa: E731
    z0 = torch.ones(4, 1, dtype=F64) * 2.0
    for solver in (NewtonKrylov(rtol=0, atol=1e-12, max_steps=30), Broyden(rtol=0, atol=1e-12, max_steps=100)):
        res = solver.root(g, z0, (a,))
        assert res.all_converged
        torch.testing.assert_close(res.value, a ** (1 / 3), rtol=0, atol=1e-10)
    res = NewtonKrylov(rtol=0, atol=1e-12, max_steps=30).root(g, z0, (a,))
    assert res.iterations.max() <= 8  # quadratic convergence


def test_newton_krylov_double_backward_jvp_matches_forward_mode():
    f, b = contractive_problem(batch=3, dim=10)
    r1 = NewtonKrylov(rtol=0, atol=1e-11, jvp="forward").solve(f, torch.zeros_like(b), (b,))
    r2 = NewtonKrylov(rtol=0, atol=1e-11, jvp="backward").solve(f, torch.zeros_like(b), (b,))
    torch.testing.assert_close(r1.value, r2.value, rtol=0, atol=1e-10)
    assert r1.iterations.tolist() == r2.iterations.tolist()


def test_gmres_matches_dense_solve():
    g = torch.Generator().manual_seed(3)
    n, d = 5, 40
    M = torch.eye(d, dtype=F64) + 0.3 * torch.randn(n, d, d, generator=g, dtype=F64) / d ** 0.5
    bb = torch.randn(n, d, generator=g, dtype=F64)
    x, res, conv, nmv = gmres(lambda v: torch.bmm(M, v[:, :, None])[:, :, 0], bb, rtol=1e-12, atol=0,
                              restart=40, max_restarts=2)
    exact = torch.linalg.solve(M, bb[:, :, None])[:, :, 0]
    assert conv.all()
    assert (x - exact).abs().max() <= 1e-9
    assert nmv <= 42


def test_shapes_batch_dims_and_dtype():
    f = lambda z: 0.5 * z + 1  # noqa: E731
    z0 = torch.zeros(2, 3, 4, 5, dtype=torch.float32)
    r1 = Anderson().solve(f, z0)
    assert r1.value.shape == z0.shape and r1.value.dtype == torch.float32
    assert r1.converged.shape == (2,) and r1.iterations.shape == (2,)
    r2 = Anderson().solve(f, z0, batch_dims=2)
    assert r2.converged.shape == (2, 3) and r2.residual_history.shape[1:] == (2, 3)
    r0 = Anderson().solve(f, z0, batch_dims=0)
    assert r0.converged.shape == () and bool(r0.converged)
    torch.testing.assert_close(r0.value, torch.full_like(z0, 2.0), rtol=0, atol=1e-4)
    rs = Broyden().solve(lambda z: torch.cos(z), torch.tensor(1.0, dtype=F64))
    assert abs(rs.value.item() - 0.7390851332151607) < 1e-5


def test_errors():
    with pytest.raises(ValueError, match="rtol"):
        Anderson(rtol=-1.0)
    with pytest.raises(ValueError, match="max_steps"):
        Anderson(max_steps=0)
    with pytest.raises(ValueError, match="both 0"):
        FixedPointIteration(rtol=0, atol=0)
    with pytest.raises(ValueError, match="m"):
        Anderson(m=0)
    with pytest.raises(ValueError, match="damping"):
        FixedPointIteration(damping=1.5)
    with pytest.raises(ValueError, match=r"shape \(2, 3\).*\(2, 4\)"):
        Anderson().solve(lambda z: torch.zeros(2, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="batch_dims"):
        Anderson().solve(lambda z: z, torch.zeros(2, 3), batch_dims=3)
    with pytest.raises(TypeError, match="z0"):
        Anderson().solve(lambda z: z, [1.0, 2.0])
    with pytest.raises(ValueError, match="Unknown fixed-point solver"):
        get_fixed_point_solver("newtonn")
    assert isinstance(get_fixed_point_solver("gmres"), NewtonKrylov)


def test_damped_iteration_converges_on_nonexpansive_map():
    # a rotation by 90 degrees is nonexpansive but not contractive: plain iteration cycles,
    # Krasnosel'skii-Mann averaging converges to the fixed point 0
    R = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=F64)
    f = lambda z: z @ R.T  # noqa: E731
    z0 = torch.ones(1, 2, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FixedPointWarning)
        plain = FixedPointIteration(rtol=0, atol=1e-8, max_steps=200, throw=False).solve(f, z0)
    assert not plain.all_converged
    damped = FixedPointIteration(rtol=0, atol=1e-8, max_steps=200, damping=0.5).solve(f, z0)
    assert damped.all_converged and damped.value.abs().max() < 1e-7


@pytest.mark.parametrize("cls", [Anderson, Broyden])
def test_differentiating_through_iterations_with_frozen_samples_is_finite(cls):
    # sample 0 saturates and freezes after a few iterations while the others keep going: the
    # frozen sample's history is degenerate, which must not put NaNs into the unrolled gradient
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16)
    with torch.no_grad():
        lin.weight.mul_(0.999 / torch.linalg.matrix_norm(lin.weight, ord=2))
    x = torch.randn(6, 16)
    x[0] *= 100.0
    x[1] *= 0.01
    res = cls(rtol=0, atol=1e-6, max_steps=100, throw=False).solve(lambda z, x: torch.tanh(lin(z) + x),
                                                                    torch.zeros(6, 16), (x,))
    assert res.iterations[0] < res.iterations[1:].min()
    (g,) = torch.autograd.grad(res.value.pow(2).sum(), lin.weight)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("cls", ALL)
def test_solver_instance_holds_no_per_call_state(cls):
    # one instance may serve nested solves (a map that itself solves with the same solver) and
    # several threads: nothing about a call is stored on it, and nfe counts that call's evaluations
    s = cls(rtol=0, atol=1e-10, max_steps=200)
    f, b = contractive_problem(batch=2, dim=6)
    before = dict(vars(s))
    calls = [0]

    def counted(z, b):
        calls[0] += 1
        return f(z, b)

    res = s.solve(counted, torch.zeros_like(b), (b,))
    assert vars(s) == before
    if cls is not NewtonKrylov:
        assert res.nfe == calls[0]
    else:
        # forward-mode JVPs evaluate f once each: every evaluation is counted
        assert res.nfe == calls[0] and res.nfe > res.num_steps

    def nested(z, b):
        inner = s.solve(lambda y: 0.5 * y + 1.0, torch.zeros(2, 3, dtype=F64))
        return f(z, b) + 0 * inner.value.sum()

    assert s.solve(nested, torch.zeros_like(b), (b,)).nfe == res.nfe


@pytest.mark.parametrize("cls", [FixedPointIteration, Anderson, Broyden])
def test_per_sample_iteration_counts_match_solving_each_sample_alone(cls):
    # sample i: f(z) = A_i z + c with A_i symmetric of 2^i distinct eigenvalues in [-0.9, 0.9].
    # Anderson and Broyden need more iterations the more eigenvalues there are, naive iteration
    # the larger the spectral radius; each sample must stop on its own as if solved alone.
    g = torch.Generator().manual_seed(5)
    n, d = 4, 16
    A = torch.empty(n, d, d, dtype=F64)
    for i in range(n):
        q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0]
        eig = torch.linspace(-0.3 - 0.2 * i, 0.3 + 0.2 * i, 2 ** i, dtype=F64).repeat_interleave(d // 2 ** i)
        A[i] = q @ torch.diag(eig) @ q.T
    c = torch.randn(n, d, generator=g, dtype=F64)
    f = lambda z, A, c: torch.bmm(A, z[:, :, None])[:, :, 0] + c  # noqa: E731
    solver = cls(rtol=0, atol=1e-10, max_steps=500, **({"m": 20} if cls is Anderson else {}))
    res = solver.solve(f, torch.zeros(n, d, dtype=F64), (A, c))
    alone = [solver.solve(f, torch.zeros(1, d, dtype=F64), (A[i:i + 1], c[i:i + 1])) for i in range(n)]
    assert res.iterations.tolist() == [int(r.iterations) for r in alone]
    assert len(set(res.iterations.tolist())) >= 3, res.iterations  # the samples really differ
    assert res.iterations.tolist() == sorted(res.iterations.tolist())
    for i in range(n):
        torch.testing.assert_close(res.value[i], alone[i].value[0], rtol=0, atol=1e-12)
        # a converged sample is frozen: its residual stops changing
        k = int(res.iterations[i])
        assert torch.all(res.residual_history[k - 1:, i] == res.residual_history[-1, i])
    exact = torch.linalg.solve(torch.eye(d, dtype=F64) - A, c[:, :, None])[:, :, 0]
    assert (res.value - exact).abs().max() <= 1e-9
