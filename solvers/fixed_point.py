"""Fixed-point and root solvers: naive iteration, Anderson acceleration, Broyden, Newton--Krylov (GMRES).

Every solver finds ``z*`` with ``z* = f(z*, *args)`` for a map ``f`` over tensors of any shape.
The leading ``batch_dims`` dimensions are independent problems: each sample has its own
residual, its own stopping test and its own iteration count, and a converged sample is frozen
while the others keep iterating. The stopping test of a sample is

    ||f(z) - z||_2 <= atol + rtol * ||f(z)||_2       (norms over the non-batch dimensions)

and the solve stops when every sample passes it, or after ``max_steps`` evaluations of ``f``.
Samples that did not converge (or whose residual became non-finite) raise a
:class:`FixedPointError` (``throw=True``) or a :class:`FixedPointWarning` (``throw=False``);
the returned value is then the iterate with the smallest residual seen for that sample.

The same solvers solve the linear systems of implicit differentiation,
``g = A g + v`` with a linear operator ``A`` (see :meth:`AbstractFixedPointSolver.solve_linear`),
and :func:`gmres` solves ``M x = b`` directly.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Callable

import torch

__all__ = [
    "FixedPointResult",
    "FixedPointError",
    "FixedPointWarning",
    "AbstractFixedPointSolver",
    "FixedPointIteration",
    "Anderson",
    "Broyden",
    "NewtonKrylov",
    "gmres",
    "get_fixed_point_solver",
]


class FixedPointError(RuntimeError):
    """A fixed-point or root solve did not converge for some samples (``throw=True``).

    Attributes ``result`` (the :class:`FixedPointResult`) and ``samples`` (flat indices of the
    samples that did not converge).
    """

    def __init__(self, message, result=None, samples=None):
        super().__init__(message)
        self.result = result
        self.samples = samples


class FixedPointWarning(RuntimeWarning):
    """A fixed-point or root solve did not converge for some samples (``throw=False``)."""


@dataclasses.dataclass
class FixedPointResult:
    """Outcome of a fixed-point solve.

    Attributes
    ----------
    value:
        The solution, same shape as ``z0``. For a sample that did not converge, the iterate
        with the smallest residual.
    converged:
        Boolean tensor of shape ``batch_shape``: whether each sample met its tolerance.
    iterations:
        Integer tensor of shape ``batch_shape``: evaluations of ``f`` each sample needed
        (the evaluation that certified convergence included).
    residual:
        Tensor of shape ``batch_shape``: ``||f(value) - value||_2`` of each sample.
    residual_history:
        Tensor of shape ``(num_steps,) + batch_shape``: the residual of each sample at each
        iteration (a converged sample keeps its final residual).
    num_steps:
        Iterations of the solve loop (the slowest sample's iteration count).
    nfe:
        Evaluations of ``f`` (Jacobian-vector products of Newton--Krylov included), or of the
        linear operator for linear solves.
    backward:
        For the forward result of :func:`nde.deq_fixed_point` with ``backward="implicit"``: the
        result of the adjoint linear solve, filled in when the backward pass runs (else None).
    """

    value: torch.Tensor
    converged: torch.Tensor
    iterations: torch.Tensor
    residual: torch.Tensor
    residual_history: torch.Tensor
    num_steps: int
    nfe: int
    backward: "FixedPointResult | None" = None

    @property
    def all_converged(self) -> bool:
        """Whether every sample converged."""
        return bool(self.converged.all())

    def __repr__(self):
        n = self.converged.numel()
        return (
            f"FixedPointResult(converged={int(self.converged.sum())}/{n}, "
            f"max_iterations={int(self.iterations.max()) if n else 0}, "
            f"max_residual={float(self.residual.detach().max()) if n else 0.0:.3e}, nfe={self.nfe})"
        )


def _check_tolerances(rtol, atol, max_steps):
    if not (isinstance(rtol, (int, float)) and rtol >= 0):
        raise ValueError(f"rtol must be a non-negative float, got {rtol!r}.")
    if not (isinstance(atol, (int, float)) and atol >= 0):
        raise ValueError(f"atol must be a non-negative float, got {atol!r}.")
    if rtol == 0 and atol == 0:
        raise ValueError("rtol and atol are both 0: no iterate can converge; set atol>0 or rtol>0.")
    if not (isinstance(max_steps, int) and max_steps >= 1):
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}.")


def _resolve_batch_dims(z0, batch_dims):
    if batch_dims is None:
        batch_dims = 1 if z0.ndim >= 1 else 0
    if not isinstance(batch_dims, int) or batch_dims < 0 or batch_dims > z0.ndim:
        raise ValueError(
            f"batch_dims must be an int between 0 and z0.ndim={z0.ndim} (number of leading batch "
            f"dimensions), got {batch_dims!r}."
        )
    batch_shape = tuple(z0.shape[:batch_dims])
    n = math.prod(batch_shape)
    d = z0.numel() // n if n > 0 else 0
    return batch_shape, n, d


class AbstractFixedPointSolver:
    """Base class of the fixed-point solvers.

    Subclasses implement ``_step(F, z, fz, g, state, active) -> (z_next, state, nfe)`` on
    flattened ``(batch, dim)`` tensors (``active`` is a mask of the samples still iterating, or
    None when all are; ``nfe`` counts evaluations of ``f`` the step made itself, e.g. Jacobian-vector
    products); the loop here owns evaluation, residuals, per-sample stopping, bookkeeping of the best
    iterate and failure reporting.

    Parameters
    ----------
    rtol, atol:
        Relative and absolute tolerance of the stopping test
        ``||f(z) - z|| <= atol + rtol ||f(z)||`` (2-norms per sample).
    max_steps:
        Maximum evaluations of ``f`` in the loop.
    throw:
        If True, raise :class:`FixedPointError` when a sample does not converge; otherwise
        warn with :class:`FixedPointWarning` and return the best iterate.
    """

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-6, max_steps: int = 100, throw: bool = True):
        _check_tolerances(rtol, atol, max_steps)
        self.rtol = float(rtol)
        self.atol = float(atol)
        self.max_steps = max_steps
        self.throw = bool(throw)

    # ------------------------------------------------------------------ interface
    def _init_state(self, z):
        return None

    def _step(self, F, z, fz, g, state, active):
        raise NotImplementedError

    # ------------------------------------------------------------------ driver
    def solve(self, f: Callable, z0: torch.Tensor, args=(), batch_dims: int | None = None) -> FixedPointResult:
        """Find ``z*`` with ``z* = f(z*, *args)``.

        Parameters
        ----------
        f:
            The map, called as ``f(z, *args)``; must return a tensor of the shape of ``z``.
        z0:
            Initial guess; its dtype, device and shape define the problem.
        args:
            Extra positional arguments of ``f`` (a tuple).
        batch_dims:
            Number of leading dimensions of ``z0`` that index independent problems
            (default 1, or 0 for a scalar). Use 0 when ``f`` couples the samples.

        Returns
        -------
        FixedPointResult
        """
        if not callable(f):
            raise TypeError(f"f must be callable as f(z, *args), got {type(f).__name__}.")
        if not isinstance(z0, torch.Tensor):
            raise TypeError(f"z0 must be a torch.Tensor, got {type(z0).__name__}.")
        if not isinstance(args, tuple):
            args = (args,)
        shape = z0.shape
        batch_shape, n, d = _resolve_batch_dims(z0, batch_dims)
        checked = []

        def F(zf):
            out = f(zf.view(shape), *args)
            if not checked:
                if not isinstance(out, torch.Tensor) or out.shape != shape:
                    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise ValueError(
                        f"f(z, *args) must return a tensor of the shape of z: z has shape {tuple(shape)}, "
                        f"f returned {got}."
                    )
                checked.append(True)
            return out.reshape(n, d)

        return self._run(F, z0.reshape(n, d), shape, batch_shape)

    def _run(self, F, z, shape, batch_shape):
        n = z.shape[0]
        device = z.device
        real_dtype = z.real.dtype if z.is_complex() else z.dtype
        active = torch.ones(n, dtype=torch.bool, device=device)
        converged = torch.zeros(n, dtype=torch.bool, device=device)
        iterations = None
        best_r = torch.full((n,), float("inf"), dtype=real_dtype, device=device)
        best_z = z
        last_r = best_r
        history = []
        state = self._init_state(z)
        nfe = 0
        k = 0
        # While every sample iterates (the common case) the per-sample masks are skipped: they select
        # everything. A selection over a (batch, dim) tensor costs as much as several fused operations.
        all_active = True
        for k in range(self.max_steps):
            fz = F(z)
            nfe += 1
            g = fz - z
            r = torch.linalg.vector_norm(g, dim=1)
            tol = self.atol + self.rtol * torch.linalg.vector_norm(fz, dim=1) if self.rtol else self.atol
            conv = r <= tol
            # r < inf is False for inf and NaN: a non-finite residual stops that sample
            if all_active:
                last_r = r
                better = (r < best_r) | conv
                still = ~conv & (r < math.inf)
            else:
                last_r = torch.where(active, r, last_r)
                iterations = iterations + active
                conv = active & conv
                better = (active & (r < best_r)) | conv
                still = active & ~conv & (r < math.inf)
            history.append(last_r)
            best_r = torch.where(better, r, best_r)
            converged = converged | conv
            active = still
            n_better, n_active = torch.stack((better, active)).sum(dim=1).tolist()  # the one host sync
            if n_better == n:
                best_z = z
            elif n_better:
                best_z = torch.where(better[:, None], z, best_z)
            if all_active and n_active < n:
                # every sample was active for the k + 1 evaluations so far
                iterations = torch.full((n,), k + 1, dtype=torch.long, device=device)
                all_active = False
            if k == self.max_steps - 1 or not n_active:
                break
            z_next, state, extra = self._step(F, z, fz, g, state, None if all_active else active)
            nfe += extra
            z = z_next if all_active else torch.where(active[:, None], z_next, z)
        if iterations is None:
            iterations = torch.full((n,), k + 1, dtype=torch.long, device=device)
        result = FixedPointResult(
            value=best_z.reshape(shape),
            converged=converged.reshape(batch_shape),
            iterations=iterations.reshape(batch_shape),
            residual=best_r.reshape(batch_shape),
            residual_history=torch.stack(history).reshape((len(history),) + tuple(batch_shape)),
            num_steps=k + 1,
            nfe=nfe,
        )
        if not bool(converged.all()):
            self._report_failure(result, ~converged)
        return result

    def _report_failure(self, result, failed):
        idx = torch.nonzero(failed).flatten().tolist()
        worst = float(result.residual.detach().reshape(-1)[failed].max())
        shown = idx[:10] + (["..."] if len(idx) > 10 else [])
        msg = (
            f"{type(self).__name__}: {len(idx)} of {failed.numel()} samples did not converge within "
            f"max_steps={self.max_steps} (rtol={self.rtol:g}, atol={self.atol:g}); samples {shown}, "
            f"largest residual {worst:.3e}. Increase max_steps, loosen the tolerances, use an "
            f"accelerated solver, or make f contractive."
        )
        if self.throw:
            raise FixedPointError(msg, result=result, samples=idx)
        warnings.warn(msg, FixedPointWarning, stacklevel=4)

    def __call__(self, f, z0, args=(), batch_dims=None):
        return self.solve(f, z0, args, batch_dims)

    def root(self, g: Callable, z0: torch.Tensor, args=(), batch_dims: int | None = None) -> FixedPointResult:
        """Find a root ``g(z*, *args) = 0`` as the fixed point of ``z - g(z, *args)``.

        Newton-type solvers (:class:`Broyden`, :class:`NewtonKrylov`) are invariant to this
        reformulation; for :class:`FixedPointIteration` it is Richardson iteration and needs
        ``I - dg/dz`` to be a contraction.
        """
        return self.solve(lambda z, *a: z - g(z, *a), z0, args, batch_dims)

    def solve_linear(self, A: Callable, v: torch.Tensor, x0=None, batch_dims: int | None = None) -> FixedPointResult:
        """Solve ``x = A(x) + v`` for a linear operator ``A`` (e.g. ``u -> u^T df/dz``).

        This is the linear system ``(I - A) x = v`` of implicit differentiation. The default
        treats it as the fixed-point problem of the affine map ``x -> A(x) + v``.

        Parameters
        ----------
        A:
            Linear map on tensors of the shape of ``v``.
        v:
            Right-hand side.
        x0:
            Initial guess (default ``v``, the first term of the Neumann series).
        batch_dims:
            As in :meth:`solve`; ``A`` must not mix samples when ``batch_dims > 0``.
        """
        x0 = v if x0 is None else x0
        return self.solve(lambda x: A(x) + v, x0, (), batch_dims)

    def __repr__(self):
        return f"{type(self).__name__}(rtol={self.rtol:g}, atol={self.atol:g}, max_steps={self.max_steps})"


class FixedPointIteration(AbstractFixedPointSolver):
    """Naive (Picard / Krasnosel'skii--Mann) iteration ``z <- (1 - damping) z + damping f(z)``.

    Converges linearly for contractive ``f``; ``damping < 1`` extends convergence to
    nonexpansive (averaged) maps.

    Parameters
    ----------
    damping:
        Mixing weight in ``(0, 1]`` (default 1: plain iteration).
    rtol, atol, max_steps, throw:
        See :class:`AbstractFixedPointSolver`.
    """

    def __init__(self, rtol=1e-5, atol=1e-6, max_steps=100, throw=True, damping: float = 1.0):
        super().__init__(rtol, atol, max_steps, throw)
        if not (0 < damping <= 1):
            raise ValueError(f"damping must be in (0, 1], got {damping!r}.")
        self.damping = float(damping)

    def _step(self, F, z, fz, g, state, active):
        if self.damping == 1.0:
            return fz, state, 0
        return z + self.damping * g, state, 0


def _write(buf, index, value, dim):
    """Write ``value`` into ``buf`` at ``index`` along ``dim`` (out of place when autograd records)."""
    if torch.is_grad_enabled() and (buf.requires_grad or value.requires_grad):
        buf = buf.clone()
    buf.select(dim, index).copy_(value)
    return buf


class Anderson(AbstractFixedPointSolver):
    r"""Anderson acceleration (type II) with regularised, safeguarded mixing.

    Keeps the last ``m`` iterates ``x_i`` and images ``f(x_i)``; with ``G_i = f(x_i) - x_i``
    it solves per sample

    .. math:: \min_\alpha \|\textstyle\sum_i \alpha_i G_i\|^2 + \lambda \sum_i \|G_i\|^2 \alpha_i^2,\quad \sum_i \alpha_i = 1,

    and sets ``z <- sum_i alpha_i ((1 - damping) x_i + damping f(x_i))``. The penalty on each weight
    is relative to its own residual (``lambda = lam + 10 eps``, ``eps`` the machine epsilon of the
    dtype; the small system is solved in equilibrated form), so the method is invariant to the scale
    of ``z`` and the small residuals of recent iterates are not drowned by large early ones. If the
    small system is singular or its solution is not finite, that sample takes a plain damped step.
    Per iteration: one evaluation of ``f``, two buffer writes, one Gram row, one batched ``m x m``
    solve and one batched mixing product.

    Walker & Ni, "Anderson acceleration for fixed-point iterations", SIAM J. Numer. Anal. 2011.

    Parameters
    ----------
    m:
        Memory (number of stored iterates), at least 1.
    lam:
        Relative Tikhonov regularisation of the mixing problem (see above).
    damping:
        Mixing weight in ``(0, 1]``.
    rtol, atol, max_steps, throw:
        See :class:`AbstractFixedPointSolver`.
    """

    def __init__(self, rtol=1e-5, atol=1e-6, max_steps=100, throw=True, m: int = 5, lam: float = 1e-8,
                 damping: float = 1.0):
        super().__init__(rtol, atol, max_steps, throw)
        if not (isinstance(m, int) and m >= 1):
            raise ValueError(f"m (Anderson memory) must be a positive int, got {m!r}.")
        if not lam >= 0:
            raise ValueError(f"lam must be non-negative, got {lam!r}.")
        if not (0 < damping <= 1):
            raise ValueError(f"damping must be in (0, 1], got {damping!r}.")
        self.m = m
        self.lam = float(lam)
        self.damping = float(damping)

    def _init_state(self, z):
        n, d = z.shape
        # images f(x_i), residuals G_i = f(x_i) - x_i and their Gram matrix, in ring buffers
        Fx = z.new_zeros(n, self.m, d)
        G = z.new_zeros(n, self.m, d)
        Gram = z.new_zeros(n, self.m, self.m)
        # rows of the identity: the mixing weights of a plain step onto slot j
        return [Fx, G, Gram, 0, torch.eye(self.m, dtype=z.dtype, device=z.device)]

    def _step(self, F, z, fz, g, state, active):
        Fx, G, Gram, count, onehot = state
        m = self.m
        j = count % m
        Fx = _write(Fx, j, fz, 1)
        G = _write(G, j, g, 1)
        count += 1
        k = min(count, m)
        # new row of the Gram matrix (elementwise product and sum: faster than a batched gemv)
        row = (G[:, :k] * g[:, None, :]).sum(dim=-1)
        if torch.is_grad_enabled() and (Gram.requires_grad or row.requires_grad):
            Gram = Gram.clone()
        Gram[:, j, :k] = row
        Gram[:, :k, j] = row
        state = [Fx, G, Gram, count, onehot]
        if k == 1:
            return (fz if self.damping == 1.0 else z + self.damping * g), state, 0
        H = Gram[:, :k, :k]
        finfo = torch.finfo(z.dtype)
        eye = onehot[:k, :k]
        # Equilibrated ridge problem: with D = diag(H), solve (D^-1/2 H D^-1/2 + lam' I) beta = D^-1/2 1
        # and alpha ~ D^-1/2 beta, the minimiser of alpha^T H alpha + lam' sum_i H_ii alpha_i^2. The
        # penalty of each iterate is relative to its own residual, so the small residuals of the latest
        # iterates are not drowned by the large early ones (a regulariser relative to max_i H_ii stalls
        # the iteration until those leave the memory), and the method is invariant to the scale of z.
        scale = H.diagonal(dim1=1, dim2=2).clamp_min(finfo.tiny).rsqrt()
        A = scale[:, :, None] * H * scale[:, None, :] + (self.lam + 10 * finfo.eps) * eye
        if active is not None:
            # frozen samples (their buffers repeat one residual) get a harmless identity system, so
            # that nothing non-finite enters the graph when the iterations are differentiated
            A = torch.where(active[:, None, None], A, eye)
        sol, info = torch.linalg.solve_ex(A, scale[:, :, None])
        sol = scale * sol[:, :, 0]
        total = sol.sum(dim=1, keepdim=True)
        # a singular mixing problem (a failed factorisation, or weights summing to 0) gives non-finite
        # weights: then all weight on the newest iterate, a plain damped step
        if sol.requires_grad:
            # divide only where it is safe, so that no 0/0 reaches the graph of unrolled iterations
            ok = torch.isfinite(sol).all(dim=1) & (total[:, 0] != 0) & (info == 0)
            alpha = sol / torch.where(ok[:, None], total, 1.0)
        else:
            alpha = sol / total
            ok = torch.isfinite(alpha).all(dim=1) & (info == 0)
        alpha = torch.where(ok[:, None], alpha, onehot[j, :k])
        # sum_i alpha_i ((1 - damping) x_i + damping f(x_i)) = sum_i alpha_i (f(x_i) - (1 - damping) G_i)
        z_new = torch.bmm(alpha[:, None, :], Fx[:, :k])[:, 0]
        if self.damping != 1.0:
            z_new = z_new - (1 - self.damping) * torch.bmm(alpha[:, None, :], G[:, :k])[:, 0]
        return z_new, state, 0


class Broyden(AbstractFixedPointSolver):
    r"""Limited-memory ("good") Broyden method on the residual ``g(z) = f(z) - z``.

    Keeps an approximation of the inverse Jacobian ``H ~ (dg/dz)^{-1} = -I + sum_i u_i v_i^T``
    (the last ``m`` rank-one updates), steps ``z <- z - H g(z)`` and updates with
    ``s = z_{k+1} - z_k``, ``y = g_{k+1} - g_k``:

    .. math:: H \leftarrow H + \frac{(s - H y)\, s^\top H}{s^\top H y}.

    The first step is a plain fixed-point step. Updates with a vanishing denominator are skipped;
    when ``m`` updates are stored the memory is cleared (restarted limited-memory Broyden).

    Broyden, "A class of methods for solving nonlinear simultaneous equations", Math. Comp. 1965;
    Bai, Kolter & Koltun, "Deep equilibrium models", NeurIPS 2019.

    Parameters
    ----------
    m:
        Number of stored rank-one updates before a restart.
    rtol, atol, max_steps, throw:
        See :class:`AbstractFixedPointSolver`.
    """

    def __init__(self, rtol=1e-5, atol=1e-6, max_steps=100, throw=True, m: int = 20):
        super().__init__(rtol, atol, max_steps, throw)
        if not (isinstance(m, int) and m >= 1):
            raise ValueError(f"m (Broyden memory) must be a positive int, got {m!r}.")
        self.m = m

    def _init_state(self, z):
        n, d = z.shape
        return [z.new_zeros(n, self.m, d), z.new_zeros(n, self.m, d), 0, None, None]

    @staticmethod
    def _apply(U, V, x):
        # H x = -x + sum_i u_i (v_i . x)   (elementwise products: faster than batched gemv)
        return -x + ((V * x[:, None, :]).sum(-1)[:, :, None] * U).sum(1)

    @staticmethod
    def _apply_t(U, V, x):
        # H^T x = -x + sum_i v_i (u_i . x)
        return -x + ((U * x[:, None, :]).sum(-1)[:, :, None] * V).sum(1)

    def _step(self, F, z, fz, g, state, active):
        U, V, count, z_prev, g_prev = state
        if z_prev is not None:
            s = z - z_prev
            y = g - g_prev
            # only the stored updates take part (slots beyond count are stale after a restart)
            Hy = self._apply(U[:, :count], V[:, :count], y)
            denom = (s * Hy).sum(dim=1)
            tiny = torch.finfo(z.dtype).eps * torch.linalg.vector_norm(s, dim=1) * torch.linalg.vector_norm(Hy, dim=1)
            ok = denom.abs() > tiny
            safe = torch.where(ok, denom, torch.ones_like(denom))
            u = torch.where(ok[:, None], (s - Hy) / safe[:, None], torch.zeros_like(s))
            v = torch.where(ok[:, None], self._apply_t(U[:, :count], V[:, :count], s), torch.zeros_like(s))
            if count == self.m:
                # restarted limited-memory Broyden: dropping only the oldest pair can diverge
                count = 0
            U = _write(U, count, u, 1)
            V = _write(V, count, v, 1)
            count += 1
        dz = -self._apply(U[:, :count], V[:, :count], g)
        bad = ~torch.isfinite(dz).all(dim=1)
        dz = torch.where(bad[:, None], g, dz)
        return z + dz, [U, V, count, z, g], 0


def _batched_dot(a, b):
    return (a * b).sum(dim=1)


def gmres(matvec: Callable, b: torch.Tensor, x0: torch.Tensor | None = None, rtol: float = 1e-6,
          atol: float = 1e-10, restart: int = 20, max_restarts: int = 5):
    r"""Restarted GMRES for a batch of independent linear systems ``M x = b``.

    ``b`` has shape ``(batch, dim)`` and ``matvec`` maps ``(batch, dim) -> (batch, dim)``
    applying each sample's own matrix. Each sample minimises ``||b - M x||`` over its own Krylov
    space (modified Gram--Schmidt Arnoldi, small least-squares problem solved per sample) and
    stops at ``||b - M x|| <= atol + rtol ||b||``.

    Saad & Schultz, "GMRES: a generalized minimal residual algorithm", SIAM J. Sci. Stat. Comput. 1986.

    Parameters
    ----------
    matvec:
        The linear operator.
    b:
        Right-hand sides, shape ``(batch, dim)``.
    x0:
        Initial guess (default zeros).
    rtol, atol:
        Tolerances of the residual test.
    restart:
        Krylov dimension between restarts.
    max_restarts:
        Maximum number of restarts (at most ``restart * max_restarts`` products).

    Returns
    -------
    x, residual, converged, nmatvec
        Solution ``(batch, dim)``, final residual norms ``(batch,)``, boolean mask, and the
        number of operator applications.
    """
    if b.ndim != 2:
        raise ValueError(f"b must have shape (batch, dim), got {tuple(b.shape)}.")
    if not (isinstance(restart, int) and restart >= 1):
        raise ValueError(f"restart must be a positive int, got {restart!r}.")
    x = torch.zeros_like(b) if x0 is None else x0
    n, d = b.shape
    restart = min(restart, max(d, 1))
    tol = atol + rtol * torch.linalg.vector_norm(b, dim=1)
    tiny = torch.finfo(b.dtype).tiny
    nmv = 0
    r = b - matvec(x) if x0 is not None else b
    nmv += x0 is not None
    beta = torch.linalg.vector_norm(r, dim=1)
    for _ in range(max_restarts):
        active = beta > tol
        if not bool(active.any()):
            break
        r = torch.where(active[:, None], r, torch.zeros_like(r))
        Vs = [r / beta.clamp_min(tiny)[:, None]]
        H = b.new_zeros(n, restart + 1, restart)
        e1 = b.new_zeros(n, restart + 1, 1)
        e1[:, 0, 0] = torch.where(active, beta, torch.zeros_like(beta))
        y = None
        for j in range(restart):
            w = matvec(Vs[j])
            nmv += 1
            for i in range(j + 1):
                h = _batched_dot(w, Vs[i])
                H[:, i, j] = h
                w = w - h[:, None] * Vs[i]
            hn = torch.linalg.vector_norm(w, dim=1)
            H[:, j + 1, j] = hn
            Vs.append(w / hn.clamp_min(tiny)[:, None])
            Hj = H[:, : j + 2, : j + 1]
            y = torch.linalg.lstsq(Hj, e1[:, : j + 2]).solution
            res = torch.linalg.vector_norm(e1[:, : j + 2] - Hj @ y, dim=(1, 2))
            if not bool((active & (res > tol)).any()):
                break
        k = y.shape[1]
        dx = torch.einsum("kn,knd->nd", y[:, :, 0].T, torch.stack(Vs[:k]))
        x = x + torch.where(active[:, None], dx, torch.zeros_like(dx))
        r = b - matvec(x)
        nmv += 1
        beta = torch.linalg.vector_norm(r, dim=1)
    return x, beta, beta <= tol, nmv


class NewtonKrylov(AbstractFixedPointSolver):
    r"""Inexact Newton method on ``g(z) = f(z) - z`` with GMRES inner solves.

    Each step solves ``(df/dz - I) dz = -g(z)`` by :func:`gmres` using Jacobian-vector products
    (forward-mode AD through ``torch.func.jvp``, or two reverse passes when ``jvp="backward"``),
    then sets ``z <- z + damping * dz``. Converges quadratically near a regular solution.
    For linear systems (:meth:`solve_linear`) it is GMRES itself.

    Knoll & Keyes, "Jacobian-free Newton--Krylov methods", J. Comput. Phys. 2004.

    Parameters
    ----------
    gmres_rtol:
        Relative tolerance of the inner GMRES solve (forcing term).
    restart, max_restarts:
        GMRES Krylov dimension and number of restarts.
    damping:
        Step length in ``(0, 1]``.
    jvp:
        ``"forward"`` (``torch.func.jvp``) or ``"backward"`` (double reverse-mode, for maps
        whose operations have no forward-mode derivative).
    rtol, atol, max_steps, throw:
        See :class:`AbstractFixedPointSolver`.
    """

    def __init__(self, rtol=1e-5, atol=1e-6, max_steps=30, throw=True, gmres_rtol: float = 1e-4,
                 restart: int = 20, max_restarts: int = 3, damping: float = 1.0, jvp: str = "forward"):
        super().__init__(rtol, atol, max_steps, throw)
        if jvp not in ("forward", "backward"):
            raise ValueError(f"jvp must be 'forward' or 'backward', got {jvp!r}.")
        if not (0 < damping <= 1):
            raise ValueError(f"damping must be in (0, 1], got {damping!r}.")
        self.gmres_rtol = float(gmres_rtol)
        self.restart = restart
        self.max_restarts = max_restarts
        self.damping = float(damping)
        self.jvp = jvp

    def _jvp_operator(self, F, z):
        if self.jvp == "forward":
            def jvp(v):
                return torch.func.jvp(F, (z,), (v,))[1]
            return jvp
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            out = F(zz)
            u = torch.zeros_like(out, requires_grad=True)
            (vjp_u,) = torch.autograd.grad(out, zz, u, create_graph=True)

        def jvp(v):
            with torch.enable_grad():
                return torch.autograd.grad(vjp_u, u, v, retain_graph=True)[0]
        return jvp

    def _step(self, F, z, fz, g, state, active):
        jvp = self._jvp_operator(F, z)
        dz, _, _, nmv = gmres(lambda v: jvp(v) - v, -g, None, rtol=self.gmres_rtol, atol=0.0,
                              restart=self.restart, max_restarts=self.max_restarts)
        bad = ~torch.isfinite(dz).all(dim=1)
        dz = torch.where(bad[:, None], g, dz)
        return z + self.damping * dz, state, nmv

    def solve_linear(self, A, v, x0=None, batch_dims=None):
        """Solve ``x = A(x) + v`` by GMRES on ``(I - A) x = v`` (tolerances ``rtol``/``atol``)."""
        shape = v.shape
        batch_shape, n, d = _resolve_batch_dims(v, batch_dims)

        def M(xf):
            return xf - A(xf.view(shape)).reshape(n, d)

        bf = v.reshape(n, d)
        x0f = None if x0 is None else x0.reshape(n, d)
        x, res, conv, nmv = gmres(M, bf, x0f, rtol=self.rtol, atol=self.atol, restart=self.restart,
                                  max_restarts=max(self.max_restarts, self.max_steps // max(self.restart, 1)))
        result = FixedPointResult(
            value=x.reshape(shape), converged=conv.reshape(batch_shape),
            iterations=torch.full(batch_shape, nmv, dtype=torch.long, device=v.device),
            residual=res.reshape(batch_shape), residual_history=res.reshape((1,) + tuple(batch_shape)),
            num_steps=nmv, nfe=nmv,
        )
        if not bool(conv.all()):
            self._report_failure(result, ~conv.reshape(-1))
        return result


_SOLVERS = {
    "naive": FixedPointIteration,
    "fixed_point": FixedPointIteration,
    "picard": FixedPointIteration,
    "anderson": Anderson,
    "broyden": Broyden,
    "newton": NewtonKrylov,
    "newton_krylov": NewtonKrylov,
    "gmres": NewtonKrylov,
}


def get_fixed_point_solver(solver, **kwargs) -> AbstractFixedPointSolver:
    """Return a solver instance from an instance or a name.

    Names: ``"naive"``/``"fixed_point"``, ``"anderson"``, ``"broyden"``,
    ``"newton"``/``"newton_krylov"``/``"gmres"``; ``kwargs`` go to the constructor.
    """
    if isinstance(solver, AbstractFixedPointSolver):
        return solver
    if isinstance(solver, str):
        key = solver.lower()
        if key not in _SOLVERS:
            raise ValueError(f"Unknown fixed-point solver {solver!r}; choose one of {sorted(_SOLVERS)} "
                             f"or pass an AbstractFixedPointSolver instance.")
        return _SOLVERS[key](**kwargs)
    raise TypeError(f"solver must be a name or an AbstractFixedPointSolver instance, got {type(solver).__name__}.")
