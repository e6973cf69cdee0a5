"""The solve loop: oracles (scipy, torchdiffeq), batch modes, saving, failures, dtypes."""

import math
import re

import numpy as np
import pytest
import torch

import nde
from nde.solvers import RK4, Bosh3, Dopri5, Dopri8, Tsit5


def vdp(t, y, args):
    mu = 1.0 if args is None else args
    x, v = y[..., 0], y[..., 1]
    return torch.stack([v, mu * (1 - x * x) * v - x], dim=-1)


# ---------------------------------------------------------------- oracles


@pytest.mark.parametrize("backwards", [False, True])
def test_adaptive_matches_scipy_dop853(backwards):
    scipy_integrate = pytest.importorskip("scipy.integrate")
    t0, t1 = (0.0, 6.0) if not backwards else (6.0, 0.0)
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    ts = torch.linspace(t0, t1, 13, dtype=torch.float64)
    ref = scipy_integrate.solve_ivp(lambda t, y: vdp(t, torch.from_numpy(y), None).numpy(), (t0, t1), y0.numpy(),
                                    method="DOP853", t_eval=ts.numpy(), rtol=1e-13, atol=1e-13).y.T
    for solver in [Dopri5(), Tsit5(), Dopri8(), Bosh3()]:
        for tol in (1e-5, 1e-7, 1e-9):
            sol = nde.solve(nde.ODETerm(vdp), solver, t0, t1, y0, saveat=nde.SaveAt(ts=ts),
                            controller=nde.PIDController(rtol=tol, atol=tol))
            assert sol.result.eq(0).all()
            # the global error of a tolerance-controlled solve: a modest multiple of the tolerance
            # (measured 2--42 over these solvers, forwards and backwards), at every tolerance
            err = (sol.ys - torch.from_numpy(ref)).abs().max().item()
            assert err < 60 * tol, (type(solver).__name__, tol, err)
            torch.testing.assert_close(sol.ts, ts)


def test_matches_torchdiffeq_dopri5_trajectory_and_nfe():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    torch.manual_seed(0)
    y0 = torch.randn(16, 2, dtype=torch.float64)
    ts = torch.linspace(0, 5, 11, dtype=torch.float64)
    calls = [0]

    def f(t, y):
        calls[0] += 1
        return vdp(t, y, None)

    ref = torchdiffeq.odeint(f, y0, ts, rtol=1e-6, atol=1e-8, method="dopri5")
    ref_nfe = calls[0]
    exact = torchdiffeq.odeint(f, y0, ts, rtol=1e-12, atol=1e-12, method="dopri5")
    ctrl = nde.PIDController(rtol=1e-6, atol=1e-8)
    # the default (Shampine) error estimate is torchdiffeq's: the same steps, NFE and trajectory
    sol = nde.solve(nde.ODETerm(vdp), Dopri5(), 0.0, 5.0, y0, saveat=nde.SaveAt(ts=ts), controller=ctrl)
    assert (sol.ys - ref).abs().max().item() < 2e-6
    assert sol.stats["nfe"] == ref_nfe, (sol.stats["nfe"], ref_nfe)
    # the original Dormand--Prince estimate: NFE within 10%, at least as accurate
    sol = nde.solve(nde.ODETerm(vdp), Dopri5(error_estimate="dormand-prince"), 0.0, 5.0, y0,
                    saveat=nde.SaveAt(ts=ts), controller=ctrl)
    assert abs(sol.stats["nfe"] - ref_nfe) <= 0.1 * ref_nfe, (sol.stats["nfe"], ref_nfe)
    assert (sol.ys - exact).abs().max() <= (ref - exact).abs().max()


def test_backwards_in_time_inverts_forwards():
    y0 = torch.tensor([1.0, -0.5], dtype=torch.float64)
    ctrl = nde.PIDController(rtol=1e-10, atol=1e-10)
    fwd = nde.solve(nde.ODETerm(vdp), Tsit5(), 0.0, 3.0, y0, controller=ctrl)
    back = nde.solve(nde.ODETerm(vdp), Tsit5(), 3.0, 0.0, fwd.ys[-1], controller=ctrl)
    assert (back.ys[-1] - y0).abs().max().item() < 1e-7
    assert float(back.ts[-1]) == 0.0


def test_exponential_decay_exact_constant_steps():
    lam = -0.7
    y0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    ts = torch.linspace(0, 2, 5, dtype=torch.float64)
    sol = nde.solve(lambda t, y: lam * y, RK4(), 0.0, 2.0, y0, dt0=0.01, saveat=nde.SaveAt(ts=ts))
    exact = y0 * torch.exp(lam * ts)[:, None]
    assert (sol.ys - exact).abs().max().item() < 1e-9
    assert sol.stats["num_steps"] == 200
    assert sol.stats["nfe"] == 800


def test_empty_interval_returns_initial_state():
    y0 = torch.tensor([1.0, 2.0])
    sol = nde.solve(lambda t, y, a: -y, Tsit5(), 1.0, 1.0, y0, saveat=nde.SaveAt(t0=True, t1=True))
    torch.testing.assert_close(sol.ys, torch.stack([y0, y0]))
    assert sol.stats["num_steps"] == 0


def test_nn_module_two_argument_vector_field():
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, t, y):
            return self.net(y)

    y0 = torch.randn(4, 3)
    sol = nde.solve(F(), Tsit5(), 0.0, 1.0, y0)
    sol.ys[-1].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


# ---------------------------------------------------------------- saving and dense output


def test_saveat_combinations_and_dense():
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    ts = torch.tensor([0.5, 1.0, 2.5], dtype=torch.float64)
    sol = nde.solve(vdp, Dopri5(), 0.0, 3.0, y0, saveat=nde.SaveAt(t0=True, ts=ts, t1=True, dense=True),
                    controller=nde.PIDController(rtol=1e-8, atol=1e-8))
    torch.testing.assert_close(sol.ts, torch.tensor([0.0, 0.5, 1.0, 2.5, 3.0], dtype=torch.float64))
    torch.testing.assert_close(sol.ys[0], y0)
    torch.testing.assert_close(sol.evaluate(torch.tensor(1.0, dtype=torch.float64)), sol.ys[2], atol=1e-12, rtol=0)
    d = sol.derivative(torch.tensor(2.5, dtype=torch.float64))
    torch.testing.assert_close(d, vdp(2.5, sol.ys[3], None), atol=1e-5, rtol=0)
    steps = nde.solve(vdp, Dopri5(), 0.0, 3.0, y0, saveat=nde.SaveAt(steps=True))
    assert steps.ts.shape[0] == steps.stats["num_accepted_steps"]
    assert bool((steps.ts[1:] > steps.ts[:-1]).all())


def test_progress_bar_runs(capsys):
    pytest.importorskip("tqdm")
    y0 = torch.tensor([1.0, 0.0])
    sol = nde.solve(vdp, RK4(), 0.0, 1.0, y0, dt0=0.01, progress=True)
    assert sol.stats["num_steps"] == 100
    err = capsys.readouterr().err
    assert "nde.solve" in err and "100%" in err and "1/1" in err, err[-500:]
    nde.solve(vdp, RK4(), 0.0, 1.0, y0, dt0=0.01)
    assert "nde.solve" not in capsys.readouterr().err


# ---------------------------------------------------------------- batch modes


def test_independent_mode_step_counts_equal_solo_solves():
    # one stiff-ish sample (mu = 30) does not drag the easy ones: each sample takes the steps it takes alone
    mus = torch.tensor([0.5, 30.0, 1.0, 2.0], dtype=torch.float64)
    y0 = torch.tensor([[2.0, 0.0]] * 4, dtype=torch.float64)

    def f(t, y, args):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, args * (1 - x * x) * v - x], dim=-1)

    ctrl = nde.PIDController(rtol=1e-6, atol=1e-6)
    batch = nde.solve(f, Tsit5(), 0.0, 2.0, y0, args=mus, controller=ctrl, batch_mode="independent")
    joint = nde.solve(f, Tsit5(), 0.0, 2.0, y0, args=mus, controller=ctrl)
    for i in range(4):
        solo = nde.solve(f, Tsit5(), 0.0, 2.0, y0[i:i + 1], args=mus[i:i + 1], controller=ctrl)
        assert int(batch.stats["num_steps"][i]) == solo.stats["num_steps"]
        assert int(batch.stats["num_accepted_steps"][i]) == solo.stats["num_accepted_steps"]
        # the first-same-as-last stage is reused per sample: the same evaluations as alone
        assert abs(int(batch.stats["nfe"][i]) - solo.stats["nfe"]) <= 1
        assert (batch.ys[-1, i] - solo.ys[-1, 0]).abs().max().item() < 1e-12
    assert int(batch.stats["num_steps"][0]) < joint.stats["num_steps"]


def test_independent_mode_per_sample_ts_and_intervals():
    y0 = torch.ones(3, 1, dtype=torch.float64)
    ts = torch.tensor([[0.1, 0.5], [0.2, 1.0], [0.3, 2.0]], dtype=torch.float64)
    sol = nde.solve(lambda t, y, a: -y, Dopri5(), 0.0, ts[:, -1], y0, saveat=nde.SaveAt(ts=ts),
                    controller=nde.PIDController(rtol=1e-9, atol=1e-9), batch_mode="independent")
    expected = torch.exp(-ts).T[..., None]
    assert (sol.ys - expected).abs().max().item() < 1e-7


# ---------------------------------------------------------------- failures and errors


def test_max_steps_and_nonfinite_result_codes():
    y0 = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    with pytest.raises(nde.SolveError, match="max_steps"):
        nde.solve(lambda t, y, a: -y, Tsit5(), 0.0, 100.0, y0, max_steps=3,
                  controller=nde.PIDController(rtol=1e-10, atol=1e-10))
    sol = nde.solve(lambda t, y, a: -y, Tsit5(), 0.0, 100.0, y0, max_steps=3, throw=False,
                    controller=nde.PIDController(rtol=1e-10, atol=1e-10))
    assert int(sol.result.max()) == int(nde.RESULTS.max_steps_reached)

    # blow-up in finite time y' = y^2 from y0 = 1 at t = 1: sample 1 blows up, sample 0 does not
    y0 = torch.tensor([[1.0], [0.1]], dtype=torch.float64)
    sol = nde.solve(lambda t, y, a: y * y, Tsit5(), 0.0, 2.0, y0, throw=False, batch_mode="independent")
    assert int(sol.result[1]) == int(nde.RESULTS.successful)
    assert int(sol.result[0]) in (int(nde.RESULTS.dt_underflow), int(nde.RESULTS.max_steps_reached),
                                  int(nde.RESULTS.nonfinite))
    with pytest.raises(nde.SolveError) as info:
        nde.solve(lambda t, y, a: y * y, Tsit5(), 0.0, 2.0, y0, batch_mode="independent")
    msg = str(info.value)
    assert re.search(r"at t=(0\.9|1\.0)\d* \(step \d+\) for samples \[0\]", msg), msg  # blow-up at t=1
    assert info.value.samples == [0] and 0.9 < info.value.t < 1.01
    # the same failure with throw=False: the partial solution's state of the failed sample is where it stopped
    sol = nde.solve(lambda t, y, a: y * y, Tsit5(), 0.0, 2.0, y0, batch_mode="independent", throw=False,
                    max_steps=None)
    assert int(sol.result[0]) == int(nde.RESULTS.dt_underflow)
    assert float(sol.ys[-1, 0]) > 10.0 and abs(float(sol.ys[-1, 1]) - 0.1 / (1 - 0.2)) < 1e-4


def test_joint_failures_name_time_and_step():
    with pytest.raises(nde.SolveError, match=r"t=1\.5 \(step 6\) for samples \[0\].*NaN or inf") as info:
        nde.solve(lambda t, y, a: y * y, RK4(), 0.0, 2.0, torch.tensor([[1.0], [0.1]]), dt0=0.25)
    assert info.value.samples == [0]
    with pytest.raises(nde.SolveError, match=r"t=.* \(step 3\).*max_steps=3"):
        nde.solve(lambda t, y, a: -y, Tsit5(), 0.0, 100.0, torch.ones(1), max_steps=3,
                  controller=nde.PIDController(rtol=1e-10, atol=1e-10))
    # backwards in time the message gives the user's time, not the internal one
    with pytest.raises(nde.SolveError, match=r"t=-1\.5 \(step 6\)"):
        nde.solve(lambda t, y, a: y * y, RK4(), 0.0, -2.0, torch.tensor([-1.0]), dt0=-0.25)


def test_nonfinite_constant_steps():
    sol = nde.solve(lambda t, y, a: y * y, RK4(), 0.0, 2.0, torch.tensor([1.0]), dt0=0.25, throw=False)
    assert int(sol.result.max()) == int(nde.RESULTS.nonfinite)
    with pytest.raises(nde.SolveError, match="(?i)nan|finite"):
        nde.solve(lambda t, y, a: y * y, RK4(), 0.0, 2.0, torch.tensor([1.0]), dt0=0.25)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(y0=[1.0, 2.0]), TypeError, "y0"),
    (dict(y0=torch.tensor([1, 2])), TypeError, "y0"),
    (dict(t1=float("nan")), ValueError, "t1"),
    (dict(t1="1"), TypeError, "t1"),
    (dict(dt0=-0.1), ValueError, "dt0"),
    (dict(batch_mode="sample"), ValueError, "batch_mode"),
    (dict(solver="tsit5"), TypeError, "solver"),
    (dict(saveat=nde.SaveAt(ts=torch.tensor([0.5, 0.2]))), ValueError, "ts"),
    (dict(saveat=nde.SaveAt(ts=torch.tensor([0.5, 2.0]))), ValueError, "ts"),
    (dict(controller=nde.ConstantStepSize()), ValueError, "dt0"),
    (dict(adjoint="direct"), TypeError, "adjoint"),
    (dict(max_steps=0), ValueError, "max_steps"),
    (dict(max_steps=2.5), ValueError, "max_steps"),
    (dict(y0=torch.tensor([float("nan")])), ValueError, "y0"),
    (dict(y0=torch.tensor([1j])), TypeError, "y0"),
    (dict(saveat=nde.SaveAt(ts=torch.tensor([[0.5], [0.6]]))), ValueError, "ts"),
    (dict(saveat=nde.SaveAt(ts=torch.tensor([0.5, float("inf")]))), ValueError, "ts"),
    (dict(t0=1.0, t1=0.0, saveat=nde.SaveAt(ts=torch.tensor([0.5, 0.7]))), ValueError, "ts"),
    (dict(dt0=float("nan")), ValueError, "dt0"),
    (dict(batch_mode="independent", batch_ndim=3), ValueError, "batch_ndim"),
    (dict(terms=None), TypeError, "terms"),
    (dict(y0=torch.ones(2, device="meta")), ValueError, "meta"),
    (dict(batch_mode="independent", y0=torch.ones(2, 1), t1=torch.ones(2, device="meta")), ValueError, "t1 is on device"),
    (dict(t0=1.0, t1=0.0, dt0=0.1), ValueError, r"dt0=0\.1 points away from t1.*negative"),
    (dict(dt0=-0.1), ValueError, r"dt0=-0\.1 points away from t1.*positive"),
    (dict(terms=lambda t, y, a: None), TypeError, "returned None"),
    (dict(terms=lambda t, y, a: (y, y)), TypeError, "must return a tensor; got tuple"),
    (dict(terms=lambda t, y, a: y.double()), TypeError, "dtype torch.float64 but y has dtype torch.float32"),
    (dict(terms=lambda t, y, a: y.to("meta")), ValueError, "on meta but y is on cpu"),
])
def test_bad_arguments_are_named(kwargs, exc, match):
    call = dict(terms=nde.ODETerm(lambda t, y, a: -y), solver=Tsit5(), t0=0.0, t1=1.0, y0=torch.tensor([1.0]))
    call.update(kwargs)
    with pytest.raises(exc, match=match):
        nde.solve(**call)


def test_wrong_vector_field_shape_reports_both_shapes():
    with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)|\(2,\).*\(3,\)"):
        nde.solve(lambda t, y, a: torch.zeros(3), Tsit5(), 0.0, 1.0, torch.zeros(2))


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solver", [Tsit5(), RK4()], ids=["Tsit5", "RK4"])
def test_dtype_follows_y0_without_promotion(dtype, solver):
    seen = []

    def f(t, y, args):
        seen.append((y.dtype, t.dtype if isinstance(t, torch.Tensor) else None))
        return -y

    ts = torch.linspace(0, 1, 4)
    dt0 = 0.1 if isinstance(solver, RK4) else None
    sol = nde.solve(f, solver, 0.0, 1.0, torch.ones(2, dtype=dtype), dt0=dt0, saveat=nde.SaveAt(ts=ts, dense=True))
    assert sol.ys.dtype == dtype
    assert sol.evaluate(0.5).dtype == dtype
    assert all(d == dtype for d, _ in seen)
    assert all(td in (None, dtype) for _, td in seen)
    tol = 1e-3 if dt0 is None else 1e-5 if dtype == torch.float32 else 1e-6
    assert (sol.ys[-1] - math.exp(-1)).abs().max().item() < tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["joint", "independent"])
def test_half_precision_adaptive_solve(dtype, mode):
    # error norms of low-precision states are scaled on the host in float64
    y0 = torch.tensor([[1.0], [2.0], [0.5]], dtype=dtype)
    sol = nde.solve(lambda t, y, a: -y, Dopri5(), 0.0, 1.0, y0, controller=nde.PIDController(rtol=1e-2, atol=1e-3),
                    batch_mode=mode)
    assert sol.ys.dtype == dtype
    assert bool((sol.result == 0).all())
    exact = y0.double() * math.exp(-1)
    assert (sol.ys[-1].double() - exact).abs().max().item() < 2e-2


def test_float32_long_solve_time_does_not_drift():
    # 20000 constant steps of 5e-5: float64 time accumulation lands on t1 exactly
    sol = nde.solve(lambda t, y, a: torch.ones_like(y), nde.solvers.Euler(), 0.0, 1.0, torch.zeros(1),
                    dt0=5e-5, saveat=nde.SaveAt(t1=True))
    assert sol.stats["num_steps"] == 20000
    assert abs(float(sol.ts[-1]) - 1.0) == 0.0
    assert abs(float(sol.ys[-1]) - 1.0) < 1e-3


# ---------------------------------------------------------------- control paths with kinks


def _kinked_cde(n_knots):
    # piecewise-linear control through random knots; dz = A z dX with scalar channel has the exact
    # solution z(t) = exp(A (X(t) - X(0))) z0 whatever the kinks
    g = torch.Generator().manual_seed(0)
    t = torch.linspace(0, 1, n_knots, dtype=torch.float64)
    x = torch.randn(n_knots, 1, generator=g, dtype=torch.float64).cumsum(0) * 0.3
    path = nde.LinearInterpolation(nde.linear_interpolation_coeffs(x, t), t)
    A = torch.tensor([[0.0, 1.0], [-1.0, -0.2]], dtype=torch.float64)
    exact = torch.linalg.matrix_exp(A * float(x[-1, 0] - x[0, 0])) @ torch.tensor([1.0, 0.5], dtype=torch.float64)
    return t, path, A, exact


def test_fixed_steps_on_knots_of_a_kinked_path_keep_their_order():
    # each step's end stages see the path's derivative from inside the step
    t, path, A, exact = _kinked_cde(11)
    term = nde.ControlTerm(lambda s, z, a: (z @ A.T).unsqueeze(-1), path)
    z0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    errs = []
    for m in (1, 2, 4):
        sol = nde.solve(term, RK4(), 0.0, 1.0, z0, dt0=0.1 / m)
        errs.append((sol.ys[-1] - exact).abs().max().item())
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert min(orders) > 3.7, (errs, orders)


def test_independent_mode_first_step_with_time_dependent_field():
    # the automatic first step hands the vector field per-sample times shaped like everywhere else
    y0 = torch.ones(3, 2, dtype=torch.float64)
    seen = []

    def f(t, y, args):
        seen.append(tuple(t.shape))
        return torch.cos(t) * y

    sol = nde.solve(f, Tsit5(), 0.0, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), y0,
                    controller=nde.PIDController(rtol=1e-8, atol=1e-8), batch_mode="independent")
    assert all(len(s) == 2 and s[1] == 1 for s in seen) and (3, 1) in seen, set(seen)
    expected = torch.exp(torch.sin(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)))[:, None].expand(3, 2)
    assert (sol.ys[-1] - expected).abs().max().item() < 1e-6


# ---------------------------------------------------------------- gradients with respect to t0 and t1


@pytest.mark.parametrize("backwards", [False, True])
def test_direct_adjoint_time_gradients_gradcheck(backwards):
    A = torch.tensor([[-0.3, 1.0], [-1.0, -0.2]], dtype=torch.float64)

    def f(t, y, args):
        return y @ A.T + torch.sin(t)

    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
    a, b = (0.2, 1.5) if not backwards else (1.5, 0.2)
    t0 = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    t1 = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    ts = torch.tensor([0.7, 1.2] if not backwards else [1.2, 0.7], dtype=torch.float64)

    def run(t0, t1, y0):
        return nde.solve(f, Dopri5(), t0, t1, y0, controller=nde.PIDController(rtol=1e-12, atol=1e-12),
                         saveat=nde.SaveAt(t0=True, ts=ts, t1=True)).ys

    assert torch.autograd.gradcheck(run, (t0, t1, y0), atol=1e-6)


def test_direct_adjoint_per_sample_time_gradients_independent():
    y0 = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    t1 = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    sol = nde.solve(lambda t, y, a: -y, Tsit5(), 0.0, t1, y0, controller=nde.PIDController(rtol=1e-10, atol=1e-10),
                    batch_mode="independent")
    (g,) = torch.autograd.grad(sol.ys[-1].sum(), t1)
    torch.testing.assert_close(g, -(y0[:, 0] * torch.exp(-t1.detach())), rtol=1e-7, atol=1e-9)


def test_independent_mode_dense_output():
    y0 = torch.tensor([[1.0], [2.0], [0.5]], dtype=torch.float64)
    t1 = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    sol = nde.solve(lambda t, y, a: -y * torch.cos(t), Tsit5(), 0.0, t1, y0, batch_mode="independent",
                    controller=nde.PIDController(rtol=1e-9, atol=1e-9), saveat=nde.SaveAt(dense=True))
    t = torch.tensor([0.5, 1.7, 2.9], dtype=torch.float64)
    exact = y0 * torch.exp(-torch.sin(t))[:, None]
    assert (sol.evaluate(t) - exact).abs().max().item() < 1e-7
    d = sol.derivative(t)
    assert (d - (-exact * torch.cos(t)[:, None])).abs().max().item() < 1e-5


def test_force_dtmin_accepts_steps_at_the_minimum():
    # y' = -1000 (y - cos t) is stiff for an explicit solver; a large forced dtmin makes every step accepted
    f = lambda t, y, a: -1000.0 * (y - torch.cos(t))  # noqa: E731
    ctrl = nde.PIDController(rtol=1e-10, atol=1e-10, dtmin=1e-3, force_dtmin=True)
    sol = nde.solve(f, Bosh3(), 0.0, 0.1, torch.tensor([0.0], dtype=torch.float64), controller=ctrl, max_steps=1000)
    assert int(sol.result) == 0 and sol.stats["num_steps"] <= 200
    with pytest.raises(nde.SolveError, match="(?i)underflow|dtmin|step"):
        nde.solve(f, Bosh3(), 0.0, 0.1, torch.tensor([0.0], dtype=torch.float64),
                  controller=nde.PIDController(rtol=1e-10, atol=1e-10, dtmin=1e-3), max_steps=1000)


def test_saveat_ts_as_python_list_is_float64():
    sol = nde.solve(lambda t, y, a: -y, Tsit5(), 0.0, 0.6, torch.ones(1, dtype=torch.float64),
                    saveat=nde.SaveAt(ts=[0.3, 0.6]))
    assert sol.ts.dtype == torch.float64 and float(sol.ts[-1]) == 0.6
    # float32 times a rounding error past t1 are accepted
    sol = nde.solve(lambda t, y, a: -y, Tsit5(), 0.0, 0.6, torch.ones(1), saveat=nde.SaveAt(ts=torch.tensor([0.3, 0.6])))
    assert sol.ys.shape == (2, 1)


# ---------------------------------------------------------------- controller options


@pytest.mark.parametrize("mode", ["joint", "independent"])
def test_pid_options_step_ts_dtmax_and_pid_coefficients(mode):
    y0 = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    exact = nde.solve(vdp, Dopri8(), 0.0, 4.0, y0, controller=nde.PIDController(rtol=1e-12, atol=1e-12)).ys[-1]

    def run(**kw):
        rtol = kw.pop("rtol", 1e-6)
        return nde.solve(vdp, Tsit5(), 0.0, 4.0, y0, controller=nde.PIDController(rtol=rtol, atol=rtol, **kw),
                         saveat=nde.SaveAt(t1=True, dense=True), batch_mode=mode)

    base = run()
    # dtmax: every step at most 0.05 long, so at least 80 steps
    capped = run(dtmax=0.05)
    n_capped = int(torch.as_tensor(capped.stats["num_accepted_steps"]).max())
    assert n_capped >= 80 > int(torch.as_tensor(base.stats["num_accepted_steps"]).max())
    # step_ts: the accepted steps land exactly on the given times
    marks = [0.3, 1.7, 3.1]
    landed = nde.solve(vdp, Tsit5(), 0.0, 4.0, y0, controller=nde.PIDController(rtol=1e-6, atol=1e-6, step_ts=marks),
                       saveat=nde.SaveAt(steps=True)) if mode == "joint" else None
    if landed is not None:
        for m in marks:
            assert bool((landed.ts == m).any()), (m, landed.ts)
    # a PI and a PID controller: accurate, with step sequences of their own
    for kw in (dict(pcoeff=0.3, icoeff=0.4), dict(pcoeff=0.2, icoeff=0.5, dcoeff=0.1)):
        sol = run(**kw)
        assert (sol.ys[-1] - exact).abs().max().item() < 1e-4
        assert not torch.equal(sol.ys, base.ys)  # the coefficients change the steps taken
    # dtmin: a step that would have to be smaller ends the solve with dt_underflow
    sol = nde.solve(lambda t, y, a: y * y, Tsit5(), 0.0, 2.0, torch.ones(1, 1, dtype=torch.float64),
                    controller=nde.PIDController(rtol=1e-6, atol=1e-6, dtmin=1e-3), batch_mode=mode, throw=False)
    assert int(sol.result.max()) == int(nde.RESULTS.dt_underflow)


def test_independent_mode_finished_samples_stop_costing_work():
    # three samples finish at t=0.1, one goes on to t=10: the vector field then sees a batch of one
    seen = []

    def f(t, y, args):
        seen.append(y.shape[0])
        return -y

    t1 = torch.tensor([0.1, 0.1, 0.1, 10.0], dtype=torch.float64)
    sol = nde.solve(f, Tsit5(), 0.0, t1, torch.ones(4, 2, dtype=torch.float64), batch_mode="independent",
                    controller=nde.PIDController(rtol=1e-8, atol=1e-8))
    assert seen[0] == 4 and seen[-1] == 1
    assert seen.count(1) > 0.8 * len(seen)
    torch.testing.assert_close(sol.ys[-1], torch.exp(-t1)[:, None].expand(4, 2), rtol=1e-6, atol=1e-9)


def test_shared_ts_with_per_sample_intervals():
    y0 = torch.ones(3, 1, dtype=torch.float64)
    t1 = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    ts = torch.tensor([0.5, 1.0], dtype=torch.float64)
    sol = nde.solve(lambda t, y, a: -y, Tsit5(), 0.0, t1, y0, saveat=nde.SaveAt(ts=ts, t1=True),
                    batch_mode="independent", controller=nde.PIDController(rtol=1e-9, atol=1e-9))
    assert sol.ys.shape == (3, 3, 1) and sol.ts.shape == (3, 3)
    torch.testing.assert_close(sol.ys[:2, :, 0], torch.exp(-ts)[:, None].expand(2, 3), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(sol.ys[2, :, 0], torch.exp(-t1), rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="inside"):
        nde.solve(lambda t, y, a: -y, Tsit5(), 0.0, t1, y0, saveat=nde.SaveAt(ts=torch.tensor([0.5, 2.5])),
                  batch_mode="independent")


def test_vector_field_arity_read_as_inspect_reads_it():
    # the code-object fast path and inspect.signature agree on every kind of callable
    import functools
    import inspect

    from nde._terms import _positional_arity

    def by_inspect(fn):
        target = fn.forward if isinstance(fn, torch.nn.Module) else fn
        ps = inspect.signature(target).parameters.values()
        if any(p.kind == p.VAR_POSITIONAL for p in ps):
            return None
        return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in ps)

    class Two(torch.nn.Module):
        def forward(self, t, y):
            return y

    class Star(torch.nn.Module):
        def forward(self, *xs):
            return xs[-1]

    class Call:
        def __call__(self, t, y, args):
            return y

    def three(t, y, args=None, *, scale=1.0):
        return y

    def pos_only(t, y, /):
        return y

    @functools.wraps(three)
    def wrapped(*a, **k):
        return three(*a, **k)

    for fn in (Two(), Star(), Call(), Call().__call__, three, pos_only, wrapped, lambda t, y: y,
               functools.partial(three, 0.0), Two().forward):
        assert _positional_arity(fn) == by_inspect(fn), fn
