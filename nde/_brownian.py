"""Brownian motion as a path: exact, seed-determined samples of increments and space-time Lévy areas.

Construction
------------
``[t0, t1]`` is cut into cells of width ``dt`` (the last one may be shorter). The cells' increments
``W_k`` and time integrals ``I_k = int_cell (W(r) - W(a_k)) dr`` are independent Gaussians, drawn
in chunks of cells from a generator seeded by ``(seed, chunk)``; their prefix sums give ``W`` and
``J(t) = int_{t0}^t W(r) dr`` on the cell grid. Inside a cell, ``W`` is refined by a canonical
dyadic Brownian bridge: the two halves of a dyadic interval are drawn conditionally on the
interval's ``(W, I)`` with noise from a counter-based generator (SplitMix64) keyed by
``(seed, cell, depth, index)`` and the element's position, down to ``depth`` levels. Any subset of
that noise can be drawn alone, so samples with their own times (independent batch mode) descend
their own bridge paths in one vectorised pass and still see the same path as a joint query.

Below the finest dyadic level (the *leaves*, of width ``r = dt / 2**depth``), the bridge goes on
for ``_SUB_LEVELS`` more dyadic levels inside the leaf holding ``t`` (noise keyed the same way, by
position, never by ``t``), and inside the last of those nodes ``(W, J)`` is the polynomial that
matches the node's ``(W, I)``: ``W`` quadratic, ``J`` cubic. So the path is a continuous function of
``t`` everywhere (two times an ulp apart, as a solve run backwards produces, see the same noise to
rounding), and its law is exact down to nodes of width ``r / 2**_SUB_LEVELS``: an increment whose
end points do not lie strictly inside one and the same leaf has ``Var W(s, u) = (u - s)`` up to a
relative ``2**-_SUB_LEVELS r / (u - s)``. An increment shorter than ``r`` with both ends inside one
leaf is refused with an error that says how to refine (``dt_min``). Every value is a fixed function
of the seed: the same whatever the order of the queries, after cache evictions and in the backward
pass.

The space-time Lévy area over ``[s, u]`` (``h = u - s``) is
``H = (1/h) int_s^u (W(s, r) - (r - s)/h W(s, u)) dr``, ``H ~ N(0, h/12)`` independent of ``W(s, u)``.
The space-space Lévy area ``A_ij = 1/2 int (W_i dW_j - W_j dW_i)`` (needed by log-ODE schemes for
general noise) is approximated from ``(W, H)`` as Davie (2014) and Foster (2020) do.
"""

from __future__ import annotations

import math
import struct
import warnings
from collections import OrderedDict

import numpy as np
import torch

from ._path import AbstractPath

_MASK64 = (1 << 64) - 1


def _mix(*xs, bits=63) -> int:
    """A ``bits``-bit hash of integers (splitmix64 finaliser chained over the inputs)."""
    z = 0x9E3779B97F4A7C15
    for x in xs:
        z = (z ^ (int(x) & _MASK64)) & _MASK64
        z = (z + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z = z ^ (z >> 31)
    return z & ((1 << bits) - 1)


def _s64(c):
    return c - (1 << 64) if c >= (1 << 63) else c


_GAMMA, _C1, _C2 = _s64(0x9E3779B97F4A7C15), _s64(0xBF58476D1CE4E5B9), _s64(0x94D049BB133111EB)


def _srl(x, s):
    """Logical right shift of int64 tensors."""
    return torch.bitwise_and(torch.bitwise_right_shift(x, s), (1 << (64 - s)) - 1)


def _fmix(z):
    z = torch.bitwise_xor(z, _srl(z, 30)) * _C1
    z = torch.bitwise_xor(z, _srl(z, 27)) * _C2
    return torch.bitwise_xor(z, _srl(z, 31))


def _tmix(*xs):
    """:func:`_mix` on int64 tensors (elementwise; wrapping arithmetic), as a signed int64."""
    z = None
    for x in xs:
        if z is None:
            z = torch.as_tensor(_GAMMA, dtype=torch.int64)
        z = _fmix(torch.bitwise_xor(z, torch.as_tensor(x, dtype=torch.int64)) + _GAMMA)
    return z


def _uniform_pair(key, pair):
    """Two uniforms per pair index: ``u1`` in (0, 1] and ``u2`` in [0, 1) (53 bits each)."""
    p2 = pair * 2
    u1 = (_srl(_fmix(key + p2 * _GAMMA), 11).to(torch.float64) + 0.5) * 2.0**-53
    u2 = _srl(_fmix(key + (p2 + 1) * _GAMMA), 11).to(torch.float64) * 2.0**-53
    return u1, u2


def _hash_normal(key, counter):
    """Standard normals indexed by ``(key, counter)`` (int64 tensors, broadcast).

    SplitMix64 streams ``key + i * gamma`` give two uniforms per pair of counters ``(2p, 2p + 1)``;
    Box--Muller turns them into the pair's two independent normals (cosine for the even counter,
    sine for the odd one). Any subset of the numbers can be drawn on its own and gets the same values.
    """
    u1, u2 = _uniform_pair(key, torch.bitwise_right_shift(counter, 1))
    rad = torch.sqrt(-2.0 * torch.log(u1))
    ang = (2 * math.pi) * u2
    odd = torch.bitwise_and(counter, 1).bool()
    return rad * torch.where(odd, torch.sin(ang), torch.cos(ang))


def _hash_normal_range(key, n, device):
    """``_hash_normal(key, arange(n))``, computing each Box--Muller pair once.

    ``key`` is a 0-d int64 tensor (returns ``(n,)``) or a 1-d one of ``L`` keys (returns ``(L, n)``)."""
    pairs = (n + 1) // 2
    keys = key.reshape(-1, 1)
    u1, u2 = _uniform_pair(keys, torch.arange(pairs, dtype=torch.int64, device=device))
    rad = torch.sqrt(-2.0 * torch.log(u1))
    ang = (2 * math.pi) * u2
    out = torch.stack([rad * torch.cos(ang), rad * torch.sin(ang)], -1).reshape(keys.shape[0], -1)[:, :n]
    return out.reshape(n) if key.dim() == 0 else out


def _float_bits(x):
    """The IEEE-754 bit pattern of a float64 (Python float or float64 tensor) as a signed int64."""
    if isinstance(x, torch.Tensor):
        return x.to(torch.float64).contiguous().view(torch.int64)
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _bridge_matrices():
    """Conditional law of the two halves of an interval given its ``(W, I)``, in units of the parent.

    Unknowns ``X = (W1, I1, W2, I2)`` (increments and time integrals of both halves, lengths 1/2),
    observed ``O = (W, I) = (W1 + W2, I1 + W1 / 2 + I2)``. Returns ``M`` (4x2) and ``L`` (4x2)
    with ``X | O ~ M O + L Z``, ``Z ~ N(0, I_2)``.
    """
    c = np.array([[1 / 2, 1 / 8], [1 / 8, 1 / 24]])
    sxx = np.zeros((4, 4))
    sxx[:2, :2] = c
    sxx[2:, 2:] = c
    a = np.array([[1.0, 0.0, 1.0, 0.0], [0.5, 1.0, 0.0, 1.0]])
    sxo = sxx @ a.T
    soo = a @ sxx @ a.T
    m = sxo @ np.linalg.inv(soo)
    cov = sxx - m @ sxo.T
    vals, vecs = np.linalg.eigh((cov + cov.T) / 2)
    keep = np.argsort(vals)[-2:]
    lmat = vecs[:, keep] * np.sqrt(np.clip(vals[keep], 0, None))
    return m, lmat


_M, _L = _bridge_matrices()


class _LRU(OrderedDict):
    def __init__(self, size):
        super().__init__()
        self.size = size

    def get(self, key):
        v = OrderedDict.get(self, key)
        if v is not None:
            self.move_to_end(key)
        return v

    def put(self, key, value):
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.size:
            self.popitem(last=False)


_LEVY_AREAS = ("none", "space-time", "davie", "foster")
_SUPER = 32  # chunk starts kept for good at every _SUPER-th chunk
_SNAP = 1e-9  # positions within this fraction of a leaf of its ends are taken on them
_SUB_LEVELS = 4  # dyadic levels below a leaf before the polynomial interpolant


class BrownianInterval(AbstractPath):
    """A Brownian motion on ``[t0, t1]``, sampled exactly and lazily, determined by its seed.

    ``W(s, u) ~ N(0, (u - s) I)`` with independent increments, for any real ``s < u``; optionally the
    space-time Lévy area ``H(s, u) ~ N(0, (u - s)/12 I)`` (independent of ``W(s, u)``) that high-order
    additive-noise solvers (SRA1, ShARK, SRID2) use, and the space-space Lévy area (Davie's or Foster's
    approximation) of log-ODE schemes for general noise. Values do not depend on the order of the
    queries: the path is a fixed function of ``seed`` (a canonical dyadic bridge below a grid of cells
    of width ``dt``, continued a few levels below its finest one and closed by the polynomial that
    matches the last node), so forward pass, backward pass and rejected adaptive steps all see the same
    path, and it is continuous: times an ulp apart (as a solve run backwards meets) get values that
    agree to rounding.

    Queries on the cell grid ``t0 + k dt`` cost one slice (fixed-step solves: pass the solver's step
    as ``dt``); other times descend ``depth`` cached bridge levels and 4 more. The finest
    level has leaves of width ``resolution = dt / 2**depth``: an increment shorter than that with both
    end points strictly inside one leaf cannot be sampled consistently and raises; pass the shortest
    step of the solve as ``dt_min`` and the depth is chosen so that this never happens.

    Kidger, Foster, Li, Lyons (2021), "Efficient and accurate gradients for neural SDEs", NeurIPS;
    Foster (2020), "Numerical approximations for stochastic differential equations", thesis;
    Davie (2014), "KMT theory applied to approximations of SDE", Springer Proc. Math. Stat. 100.

    Parameters
    ----------
    t0, t1:
        The interval (``t0 < t1``).
    shape:
        Shape of ``W(t)``, e.g. ``(batch, m)``. In ``batch_mode="independent"`` solves the leading
        dimensions must be the batch dimensions.
    seed:
        Integer seed; None draws one from torch's global generator.
    levy_area:
        ``"none"``, ``"space-time"`` (``H``), or ``"davie"`` / ``"foster"`` (``H`` and the
        space-space area ``A`` from :meth:`evaluate_area`).
    dtype, device:
        Of the returned tensors (sampling is done in float64); dtype None is torch's default dtype.
    dt:
        Width of the cells; None uses ``(t1 - t0) / 256``. Pass the step size of fixed-step solves.
    depth:
        Bridge levels below a cell; None uses 12, or what ``dt_min`` needs.
    dt_min:
        The shortest increment that will be queried (e.g. the ``dtmin`` of an adaptive solve): the depth
        is raised until leaves are at most ``dt_min / 4`` wide (step doubling queries half steps).
    cache_size:
        Number of bridge nodes and point values kept (LRU); None keeps 256, or more for small shapes.
    chunk_elements:
        Cells are drawn in chunks of about this many numbers; a few chunks are cached (more while one
        query spans more, as per-sample queries do), so the memory a solve holds for the path does not
        grow with its number of steps.
    W, H:
        Condition the motion on its increment ``W(t0, t1) = W`` and / or its space-time Lévy area
        ``H(t0, t1) = H`` over the whole interval (tensors of ``shape``, which they give by default, as
        do their dtype and device): a Brownian bridge, exactly (the free path plus its Gaussian
        conditional correction, linear in ``W`` and ``H`` and differentiable with respect to them). ``H``
        needs a Lévy area.
    size, entropy, levy_area_approximation:
        torchsde's names of ``shape``, ``seed`` and ``levy_area`` (so ``import nde as torchsde`` scripts
        construct it unchanged, and ``bm(ta, tb, return_U=..., return_A=...)`` works as in torchsde);
        torchsde's ``tol``, ``pool_size``, ``halfway_tree`` are accepted and have no effect.
    """

    def __init__(self, t0, t1, shape=None, seed=None, levy_area="none", dtype=None, device=None, dt=None,
                 depth=None, dt_min=None, cache_size=None, chunk_elements=1 << 16, *, size=None, entropy=None,
                 levy_area_approximation=None, tol=None, pool_size=None, halfway_tree=None, W=None, H=None):
        # torchsde's keywords (size, entropy, levy_area_approximation; tol, pool_size and halfway_tree
        # tune torchsde's own tree and have no counterpart: this path is exact and order-independent)
        if size is not None:
            if shape is not None:
                raise TypeError("Pass either shape or size (its torchsde name), not both.")
            shape = size
        if entropy is not None:
            if seed is not None:
                raise TypeError("Pass either seed or entropy (its torchsde name), not both.")
            seed = entropy
        if levy_area_approximation is not None:
            levy_area = levy_area_approximation
        given = {}
        for name, v in (("W", W), ("H", H)):
            if v is None:
                continue
            if not isinstance(v, torch.Tensor) or not v.dtype.is_floating_point:
                raise TypeError(f"{name} (the value to condition on) must be a floating-point tensor; got "
                                f"{type(v).__name__ if not isinstance(v, torch.Tensor) else v.dtype}.")
            given[name] = v
        for v in given.values():  # shape, dtype and device default to those of W / H, as in torchsde
            shape = tuple(v.shape) if shape is None else shape
            dtype = v.dtype if dtype is None else dtype
            device = v.device if device is None else device
        if shape is None:
            raise TypeError("BrownianInterval needs the shape of W(t): shape=(batch, m) (or torchsde's size=).")
        if dtype is None:
            dtype = torch.get_default_dtype()
        t0, t1 = float(t0), float(t1)
        if not (math.isfinite(t0) and math.isfinite(t1)) or not t0 < t1:
            raise ValueError(f"BrownianInterval needs finite t0 < t1; got t0={t0}, t1={t1}.")
        if isinstance(shape, int):
            shape = (shape,)
        try:
            shape = tuple(int(s) for s in shape)
        except TypeError:
            raise TypeError(f"shape must be an int or a tuple of ints; got {shape!r}.") from None
        if any(s < 0 for s in shape):
            raise ValueError(f"shape must have nonnegative entries; got {shape}.")
        if levy_area in ("space_time", "spacetime"):
            levy_area = "space-time"
        if levy_area not in _LEVY_AREAS:
            raise ValueError(f"levy_area must be one of {_LEVY_AREAS}; got {levy_area!r}.")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype; got {dtype!r}.")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None; got {type(seed).__name__}.")
        L = t1 - t0
        if dt is None:
            dt = L / 256
        dt = float(abs(dt))
        if not math.isfinite(dt) or dt <= 0:
            raise ValueError(f"dt must be a positive number; got {dt}.")
        n = max(1, math.ceil(L / dt - 1e-9))
        dt = min(dt, L)
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= 50):
            raise ValueError(f"depth must be an integer in [0, 50] or None; got {depth!r}.")
        if dt_min is not None:
            dt_min = float(dt_min)
            if not math.isfinite(dt_min) or dt_min <= 0:
                raise ValueError(f"dt_min must be a positive number or None; got {dt_min}.")
            need = max(0, math.ceil(math.log2(dt / dt_min)) + 2)
            if need > 50:
                raise ValueError(f"dt_min={dt_min} needs more than 50 bridge levels below cells of width dt={dt}; "
                                 "pass a smaller dt.")
            depth = need if depth is None else max(depth, need)
        elif depth is None:
            depth = 12
        self._t0, self._t1 = t0, t1
        self.shape = shape
        self.seed = seed
        self.levy_area = levy_area
        self.dtype = dtype
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.dt = dt
        self.n_cells = n
        self.depth = depth
        self._levy = levy_area != "none"
        self._area = levy_area in ("davie", "foster")
        numel = max(1, math.prod(shape))
        self._chunk = max(1, min(n, chunk_elements // numel))
        self._gen = torch.Generator(device=self.device)
        # small Brownian motions can afford many cached nodes (independent-mode solves query one
        # bridge path per sample): by default at least 256 nodes, or as many as fit in 2**22 numbers
        if cache_size is None:
            nodes = max(256, (1 << 22) // (numel * (2 if self._levy else 1)))
        elif isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"cache_size must be a positive integer or None; got {cache_size!r}.")
        else:
            nodes = cache_size
        self._nodes = _LRU(nodes)
        self._points = _LRU(nodes)
        self._chunks = _LRU(2 if nodes < 64 else 4)
        # W and J at chunk starts: kept at every _SUPER-th chunk, the others computed from there along the
        # same chain of additions (so the same values whatever was cached) and kept in small LRUs
        self._super_start = [(torch.zeros(shape, dtype=torch.float64, device=self.device),
                              torch.zeros(shape, dtype=torch.float64, device=self.device) if self._levy else None)]
        self._starts = _LRU(8)
        self._totals = _LRU(_SUPER)
        self._grid_tol = 1e-9 * dt
        self._bridge = np.concatenate([_M, _L], 1).tolist()
        self._descents = {}  # below-leaf descents of one-time queries, per (leaf width, digits)
        self._given = None
        if given:
            for name, v in given.items():
                if tuple(v.shape) != shape:
                    raise ValueError(f"{name} must have the shape of the Brownian motion, {shape}; got {tuple(v.shape)}.")
            if "H" in given and not self._levy:
                raise ValueError("Conditioning on H (the space-time Lévy area over [t0, t1]) needs a Lévy area: "
                                 "create the BrownianInterval with levy_area='space-time' (or 'davie' / 'foster').")
            self._given = given
            self._resid = None

    # ---- AbstractPath ---------------------------------------------------------------------
    @property
    def t0(self):
        return self._t0

    @property
    def t1(self):
        return self._t1

    @property
    def resolution(self):
        """Width of the finest bridge leaves: the shortest increment that can lie inside one leaf."""
        return self.dt / (1 << self.depth)

    def __repr__(self):
        return (f"BrownianInterval(t0={self._t0}, t1={self._t1}, shape={self.shape}, levy_area={self.levy_area!r}, "
                f"dt={self.dt}, depth={self.depth}, dtype={self.dtype})")

    def size(self):
        """The shape of ``W(t)`` (torchsde's name)."""
        return self.shape

    @property
    def levy_area_approximation(self):
        """torchsde's name of :attr:`levy_area`."""
        return self.levy_area

    def __call__(self, ta, tb=None, use_levy=False, return_U=False, return_A=False):
        """:meth:`evaluate`, or torchsde's convention with ``return_U`` / ``return_A``: ``W``, ``(W, U)``,
        ``(W, A)`` or ``(W, U, A)`` over ``[ta, tb]`` (``[t0, ta]`` when ``tb`` is None) with
        ``U = int (W(r) - W(ta)) dr`` and ``A`` the space-space Lévy area. As in torchsde, a path of
        shape ``(batch,)`` is a batch of one-dimensional Brownian motions here, so its ``A`` is zero of
        shape ``(batch,)`` (:meth:`evaluate_area` treats it as one ``batch``-dimensional motion).

        Also as in torchsde, a single time outside ``[t0, t1]`` is moved onto the nearer end with a
        warning (:meth:`evaluate` raises instead)."""
        ta = self._clamped(ta, "ta")
        tb = None if tb is None else self._clamped(tb, "tb")
        if not (return_U or return_A):
            return self.evaluate(ta, tb, use_levy=use_levy)
        if tb is None:
            ta, tb = self._t0, ta
        if return_A:
            if len(self.shape) == 1:
                if not self._area:
                    self.evaluate_area(ta, tb)  # the error that names the levy_area needed
                W = self.evaluate(ta, tb)
                A = torch.zeros_like(W)
            else:
                W, A = self.evaluate_area(ta, tb)
        if return_U:
            W, H = self.evaluate(ta, tb, use_levy=True)
            U = (_scalar(tb) - _scalar(ta)) * (H + 0.5 * W)
            return (W, U, A) if return_A else (W, U)
        return W, A

    def _clamped(self, t, name):
        if isinstance(t, torch.Tensor) and t.numel() > 1:
            return t
        v = _scalar(t)
        for bad, end, rel in ((v < self._t0, self._t0, ">=t0"), (v > self._t1, self._t1, "<=t1")):
            if bad:
                warnings.warn(f"Should have {name}{rel} but got {name}={v} and {rel[2:]}={end}: the time is "
                              f"taken as {end}.", stacklevel=3)
                return end
        return t

    def evaluate(self, t0, t1=None, left=True, use_levy=False):
        """``W(t0)`` (with ``W(self.t0) = 0``), or the increment ``W(t1) - W(t0)``.

        With ``use_levy=True`` (needs a Lévy area) returns ``(W, H)`` where ``H`` is the space-time
        Lévy area over the interval between ``t0`` and ``t1``.

        Times are floats or 0-d tensors, or tensors with one time per sample (shape
        ``batch_shape + (1,) * k`` as in independent-mode solves).
        """
        if use_levy and not self._levy:
            raise ValueError("Lévy areas were requested but this BrownianInterval has levy_area='none'; "
                             "create it with levy_area='space-time'.")
        if t1 is None:
            if use_levy:
                raise ValueError("A Lévy area needs an interval: pass both t0 and t1.")
            if isinstance(t0, torch.Tensor) and t0.numel() > 1:
                out = self._per_sample(t0, None, False)
                return out if self._given is None else self._condition(None, t0, out, None)
            s = _scalar(t0)
            W = self._point(*self._locate(s))[0]
            return (W if self._given is None else self._condition(None, s, W, None)).to(self.dtype)
        if (isinstance(t0, torch.Tensor) and t0.numel() > 1) or (isinstance(t1, torch.Tensor) and t1.numel() > 1):
            out = self._per_sample(t0, t1, use_levy)
        else:
            t0, t1 = _scalar(t0), _scalar(t1)
            out = self._increment(t0, t1, use_levy)
        if self._given is None:
            return out
        W, H = out if use_levy else (out, None)
        W, H = self._condition(t0, t1, W, H)
        return (W, H) if use_levy else W

    # ---- conditioning on the increment (W=) and space-time Lévy area (H=) over [t0, t1] ---------
    def _condition(self, s, u, W, H):
        """``W`` (the increment from ``s`` to ``u``, or the point value at ``u`` when ``s`` is None) and
        ``H`` (the space-time Lévy area over the interval between them, or None) of the path
        conditioned on the given ``W`` / ``H`` over ``[t0, t1]``.

        Matheron's rule: the conditioned Gaussian path is the free one plus ``Cov(X, O) Cov(O)^-1 (o - O)``
        for the observed ``O`` (linear functionals of ``(W(t1), J(t1))``); ``X = (W(t), J(t))`` are linear
        too, so the correction is exact, continuous in ``t`` and the same whatever the queries.
        """
        if self._resid is None:
            self._setup_condition()
        dtype = W.dtype

        def fix(t):
            if isinstance(t, torch.Tensor):
                t = self._rows(t) if t.numel() > 1 else float(t)
            tau = t - self._t0
            L = self._t1 - self._t0
            kw = (tau, tau * L - tau**2 / 2)
            kj = (tau**2 / 2, tau**2 * L / 2 - tau**3 / 6)
            dW = dJ = 0.0
            for row, r in zip(self._gain, self._resid):  # row: (a_W, a_I) of the gain for this observation
                dW = dW + (kw[0] * row[0] + kw[1] * row[1]) * r
                dJ = dJ + (kj[0] * row[0] + kj[1] * row[1]) * r
            return dW, dJ

        dWu, dJu = fix(u)
        if s is None:
            return (W.to(torch.float64) + dWu).to(dtype)
        dWs, dJs = fix(s)
        Wc = (W.to(torch.float64) + (dWu - dWs)).to(dtype)
        if H is None:
            return Wc, None
        # over [a, b] = [min(s, u), max(s, u)]: H = (J(b) - J(a) - h W(a)) / h - (W(b) - W(a)) / 2
        su = torch.as_tensor(u, dtype=torch.float64) - torch.as_tensor(s, dtype=torch.float64)
        if su.numel() > 1:
            su = self._rows(su)
            flip = su < 0
            dWa, dWb = torch.where(flip, dWu, dWs), torch.where(flip, dWs, dWu)
            dJa, dJb = torch.where(flip, dJu, dJs), torch.where(flip, dJs, dJu)
            h = su.abs()
            dH = torch.where(h > 0, (dJb - dJa - h * dWa) / torch.where(h > 0, h, torch.ones_like(h)) - (dWb - dWa) / 2,
                             torch.zeros_like(dWa))
        else:
            h = float(su)
            if h < 0:
                dWs, dWu, dJs, dJu, h = dWu, dWs, dJu, dJs, -h
            dH = (dJu - dJs - h * dWs) / h - (dWu - dWs) / 2 if h > 0 else 0.0
        return Wc, (H.to(torch.float64) + dH).to(H.dtype)

    def _rows(self, t):
        """Per-sample times (one a sample, any shape) as float64 broadcasting against ``shape``."""
        t = t.detach().to(device=self.device, dtype=torch.float64).reshape(-1)
        k = _lead(self.shape, t.numel())
        return t.expand(math.prod(self.shape[:k])).reshape(self.shape[:k] + (1,) * (len(self.shape) - k))

    def _setup_condition(self):
        """The gain ``Cov(O)^-1`` rows and the residuals ``o - O`` of the observations (float64)."""
        L = self._t1 - self._t0
        Wt, Jt = self._point(*self._locate(self._t1))
        # each observation as a row over (W(t1), J(t1)): W = (1, 0), and H = J(t1) / L - W(t1) / 2
        rows, vals, free = [], [], []
        if "W" in self._given:
            rows.append((1.0, 0.0))
            vals.append(self._given["W"].to(device=self.device, dtype=torch.float64))
            free.append(Wt)
        if "H" in self._given:
            rows.append((-0.5, 1.0 / L))
            vals.append(self._given["H"].to(device=self.device, dtype=torch.float64))
            free.append(Jt / L - Wt / 2)
        S = np.array([[L, L * L / 2], [L * L / 2, L**3 / 3]])  # Cov of (W(t1), J(t1))
        A = np.array(rows)
        gain = A.T @ np.linalg.inv(A @ S @ A.T)  # (2, k): Cov(X, O) = k_X A^T, times Cov(O)^-1
        self._gain = [tuple(gain[:, i]) for i in range(len(rows))]
        self._resid = [v - f for v, f in zip(vals, free)]

    def evaluate_area(self, t0, t1):
        """``(W, A)``: the increment and the space-space Lévy area over the interval between ``t0`` and ``t1``.

        ``A_ij = 1/2 int (W_i dW_j - W_j dW_i)`` has shape ``shape + (m,)`` (``m = shape[-1]``),
        approximated from the increment and space-time Lévy area ``H``:
        ``A_ij = H_i W_j - W_i H_j + s_ij lambda_ij`` with ``lambda`` antisymmetric, standard normal above
        the diagonal, and ``s_ij^2 = h^2 / 12`` (``levy_area="davie"``, Davie 2014) or
        ``s_ij^2 = h^2 / 20 + h (H_i^2 + H_j^2) / 5`` (``"foster"``, Foster 2020, Gaussian variant). Both
        have the exact variance ``E[A_ij^2] = h^2 / 4``. (torchsde's own ``BrownianInterval`` scales the
        noise differently; pass it as ``bm`` to ``nde.sdeint`` to reproduce its paths.)
        For ``t1 < t0`` both are those of the reversed path: ``(-W, -A)`` of ``[t1, t0]``.
        """
        if not self._area:
            raise ValueError(f"This BrownianInterval has levy_area={self.levy_area!r}; a space-space Lévy area "
                             "needs levy_area='davie' or 'foster'.")
        if (isinstance(t0, torch.Tensor) and t0.numel() > 1) or (isinstance(t1, torch.Tensor) and t1.numel() > 1):
            raise ValueError("Space-space Lévy areas take one time pair for the whole batch (batch_mode='joint').")
        s, u = _scalar(t0), _scalar(t1)
        flip = u < s
        a, b = (u, s) if flip else (s, u)
        W, H = self._increment(a, b, True)
        if self._given is not None:
            W, H = self._condition(a, b, W, H)
        if not self.shape:
            return (-W if flip else W), torch.zeros_like(W)
        W64, H64 = W.to(torch.float64), H.to(torch.float64)
        la, lb = self._locate(a), self._locate(b)
        m = self.shape[-1]
        key = _mix(self.seed & ((1 << 63) - 1), 4, la[0], la[1], _float_bits(la[2]), lb[0], lb[1],
                   _float_bits(lb[2]), bits=64)
        noise = _hash_normal_range(torch.tensor(_s64(key), dtype=torch.int64, device=self.device),
                                   math.prod(self.shape) * m, self.device).reshape(self.shape + (m,))
        noise = (noise - noise.transpose(-1, -2)) * (1 / math.sqrt(2))  # unit variance off the diagonal
        h = b - a
        if self.levy_area == "davie":
            std = math.sqrt(h * h / 12)
        else:
            H2 = H64 * H64
            std = (h * h / 20 + (h / 5) * (H2.unsqueeze(-1) + H2.unsqueeze(-2))).sqrt()
        A = H64.unsqueeze(-1) * W64.unsqueeze(-2) - W64.unsqueeze(-1) * H64.unsqueeze(-2) + std * noise
        A = A.to(self.dtype)
        return (-W, -A) if flip else (W, A)

    # ---- locating times -------------------------------------------------------------------
    def _locate(self, t):
        """Cell ``k``, leaf ``j`` (of ``2**depth``) inside it, fraction ``theta`` of the leaf, and the time.

        Grid points have ``theta == 0`` (their time is the grid's)."""
        lo, hi = self._t0, self._t1
        tol = 1e-9 * (hi - lo)
        if not (lo - tol <= t <= hi + tol):
            raise ValueError(f"Time {t} lies outside the BrownianInterval's interval [{lo}, {hi}].")
        x = (t - lo) / self.dt
        k = round(x)
        if abs(t - (lo + k * self.dt)) <= self._grid_tol or t >= hi - self._grid_tol:
            k = min(k, self.n_cells) if t < hi - self._grid_tol else self.n_cells
            return k, 0, 0.0, (lo + k * self.dt if k < self.n_cells else hi)
        k = min(int(math.floor(x)), self.n_cells - 1)
        a = lo + k * self.dt
        w = self._cell_width(k)
        scale = 1 << self.depth
        y = (t - a) / w * scale
        j = int(math.floor(y))
        th = y - j
        if th <= _SNAP:
            th = 0.0
        elif th >= 1 - _SNAP:
            j, th = j + 1, 0.0
        if j >= scale:
            return k + 1, 0, 0.0, (a + w if k + 1 < self.n_cells else hi)
        if j < 0:
            return k, 0, 0.0, a
        return k, j, th, (a + w * j / scale if th == 0.0 else t)

    def _cell_width(self, k):
        if k < self.n_cells - 1:
            return self.dt
        return self._t1 - (self._t0 + (self.n_cells - 1) * self.dt)

    def _check_resolution(self, s, u, ls, lu):
        if ls[0] == lu[0] and ls[1] == lu[1] and ls[2] > 0 and lu[2] > 0 and ls[2] != lu[2]:
            h = abs(u - s)
            raise ValueError(
                f"W({s}, {u}): both times lie inside one bridge leaf of width {self.resolution:.3g} (the resolution "
                f"of this BrownianInterval), so the increment over |u - s| = {h:.3g} cannot be sampled consistently; "
                f"create the BrownianInterval with dt_min={h:.3g} or smaller (or a smaller dt, or a larger depth)."
            )

    # ---- cells ----------------------------------------------------------------------------
    def _normal(self, n, key):
        self._gen.manual_seed(key)
        return torch.randn((n,) + self.shape, generator=self._gen, dtype=torch.float32, device=self.device)

    def _chunk_data(self, c, prefix=False):
        """Cell values of chunk ``c`` (generated on demand, cached); with ``prefix`` also the float64
        in-chunk prefix sums of ``W`` and ``J``."""
        data = self._chunks.get(c)
        if data is None:
            first = c * self._chunk
            last = min(first + self._chunk, self.n_cells)
            n = last - first
            widths = torch.full((n,), self.dt, dtype=torch.float64, device=self.device)
            if last == self.n_cells:
                widths[-1] = self._cell_width(self.n_cells - 1)
            wsh = widths.reshape((n,) + (1,) * len(self.shape))
            z = self._normal(2 * n if self._levy else n, _mix(self.seed, 1, c))
            zw = z[:n]
            zh = z[n:] if self._levy else None
            if self.dtype == torch.float64:
                w_out = zw.double() * wsh.sqrt()
                h_out = None if zh is None else zh.double() * (wsh / 12).sqrt()
            else:
                sq = wsh.sqrt().to(torch.float32)
                w_out = (zw * sq).to(self.dtype)
                h_out = None if zh is None else (zh * (sq * (1 / math.sqrt(12)))).to(self.dtype)
            data = {"zw": zw, "zh": zh, "wsh": wsh, "W_out": w_out, "H_out": h_out, "start": first,
                    "len": float(widths.sum()), "W": None}
            self._chunks.put(c, data)
        if prefix and data["W"] is None:
            wsh = data["wsh"]
            W = data["zw"].double() * wsh.sqrt()
            zero = torch.zeros((1,) + self.shape, dtype=torch.float64, device=self.device)
            PW = torch.cat([zero, torch.cumsum(W, 0)])
            if self._levy:
                H = data["zh"].double() * (wsh / 12).sqrt()
                I = wsh * (H + 0.5 * W)
                PJ = torch.cat([zero, torch.cumsum(wsh * PW[:-1] + I, 0)])
            else:
                I = PJ = None
            data.update(W=W, I=I, PW=PW, PJ=PJ)
        return data

    def _fit_chunks(self, n):
        """Let the chunk cache hold the ``n`` chunks one query needs (and two more)."""
        if self._chunks.size < n + 2:
            self._chunks.size = n + 2

    def _advance(self, i, start):
        """``(W, J)`` at the start of chunk ``i + 1`` from those at the start of chunk ``i``."""
        tot = self._totals.get(i)
        if tot is None:
            d = self._chunk_data(i, prefix=True)
            tot = (d["PW"][-1], d["PJ"][-1] if self._levy else None, d["len"])
            self._totals.put(i, tot)
        ws, js = start
        tw, tj, length = tot
        return ws + tw, (None if js is None else js + length * ws + tj)

    def _start_of_chunk(self, c):
        v = self._starts.get(c)
        if v is not None:
            return v
        s = c // _SUPER
        while len(self._super_start) <= s:
            k = len(self._super_start) - 1
            v = self._super_start[k]
            for i in range(k * _SUPER, (k + 1) * _SUPER):
                v = self._advance(i, v)
            self._super_start.append(v)
        b, v = s * _SUPER, self._super_start[s]
        for j in range(c - 1, s * _SUPER, -1):
            w = self._starts.get(j)
            if w is not None:
                b, v = j, w
                break
        for i in range(b, c):
            v = self._advance(i, v)
        self._starts.put(c, v)
        return v

    def _grid_value(self, k):
        """``(W, J)`` at the grid point ``t0 + k dt`` (float64)."""
        c = min(k // self._chunk, (self.n_cells - 1) // self._chunk)
        d = self._chunk_data(c, prefix=True)
        ws, js = self._start_of_chunk(c)
        i = k - d["start"]
        W = ws + d["PW"][i]
        if not self._levy:
            return W, None
        off = d["len"] if k == self.n_cells else (k - d["start"]) * self.dt
        return W, js + off * ws + d["PJ"][i]

    def _cell(self, k):
        c = k // self._chunk
        d = self._chunk_data(c, prefix=True)
        i = k - d["start"]
        return d["W"][i], (None if d["I"] is None else d["I"][i])

    # ---- bridge inside a cell -------------------------------------------------------------
    def _node_key(self, k, d, idx):
        seed = self.seed & ((1 << 63) - 1)
        if isinstance(k, int):
            # the same arithmetic on Python integers: much cheaper than a dozen 0-d tensor operations
            return torch.tensor(_s64(_mix(seed, 2, k, d, idx, bits=64)), dtype=torch.int64)
        return _tmix(seed, 2, k, d, idx)

    def _split(self, W, I, z, width):
        """The two halves ``((W, I), (W, I))`` of an interval of ``width`` given its ``(W, I)`` and noise ``z``.

        ``width`` is a float, or a tensor broadcasting against ``W`` (one width per row)."""
        if self._levy:
            sw = width**0.5
            si = width**1.5
            # rows of [M | L] rescaled to physical units: child = a W + b I + c z0 + e z1
            scale = (sw, si, sw, si)
            src = (W, I, z[0], z[1])
            units = (1 / sw, 1 / si, 1.0, 1.0)
            out = []
            for r in range(4):
                acc = None
                for q in range(4):
                    if self._bridge[r][q] == 0.0:
                        continue
                    term = src[q] * (self._bridge[r][q] * units[q] * scale[r])
                    acc = term if acc is None else acc + term
                out.append(acc)
            return (out[0], out[1]), (out[2], out[3])
        half = 0.5 * W
        noise = z[0] * (0.5 * width**0.5)
        return (half + noise, None), (half - noise, None)

    def _below_leaf(self, th, r):
        """The path on ``[a, a + th r]`` inside a leaf ``[a, a + r]``, as coefficients on the basis
        ``(W_leaf, I_leaf, z_0, ..., z_{E-1})`` (``I_leaf`` and the second component of every level's
        noise ``z_e`` only with a Lévy area): ``(cW, cI, idx)``.

        ``th`` and ``r`` are floats or arrays (one entry a row); ``cW``, ``cI`` have a last axis of the
        basis's length; ``idx[e]`` is the index, among the ``2**e`` nodes of level ``e`` below the leaf,
        of the node holding ``th`` (its noise key). The same linear bridge as above the leaf (``_split``
        applied to coefficient vectors), then the polynomial through the last node's ``(W, I)``. The
        descent depends on ``th`` only through its first ``E`` binary digits: for one time it is kept
        per ``(r, digits)``.
        """
        E = _SUB_LEVELS
        if np.ndim(th) == 0 and np.ndim(r) == 0:
            scaled = float(th) * (1 << E)  # exact: a power of two
            digits = min(int(math.floor(scaled)), (1 << E) - 1)
            key = (float(r), digits)
            d = self._descents.get(key)
            if d is None:
                d = self._descents[key] = self._sub_descent(np.float64((digits + 0.5) / (1 << E)), float(r))[:5]
            accW, accI, nodeW, nodeI, idxs = d
            return self._sub_close(accW, accI, nodeW, nodeI, np.float64(scaled - digits), float(r)) + (idxs,)
        accW, accI, nodeW, nodeI, idxs, pos = self._sub_descent(np.asarray(th, dtype=np.float64),
                                                                 np.asarray(r, dtype=np.float64))
        return self._sub_close(accW, accI, nodeW, nodeI, pos, r) + (idxs,)

    def _sub_descent(self, th, r):
        """The ``E`` dyadic levels below a leaf down to the node holding ``th``: the coefficients of
        the path up to that node's start (``accW``, ``accI``) and of the node's own ``(W, I)``, the
        node indices of every level, and ``th``'s position inside the last node."""
        levy = self._levy
        E = _SUB_LEVELS
        ncomp = 2 if levy else 1
        off = 2 if levy else 1
        r = np.asarray(r, dtype=np.float64)[..., None]
        nb = off + E * ncomp
        eye = np.eye(nb)

        def unit(i):
            return np.broadcast_to(eye[i], th.shape + (nb,))

        nodeW, nodeI = unit(0), (unit(1) if levy else None)
        accW = np.zeros(th.shape + (nb,))
        accI = np.zeros(th.shape + (nb,)) if levy else None
        pos = th.copy()
        idx = np.zeros(th.shape, dtype=np.int64)
        idxs = []
        for e in range(E):
            idxs.append(idx.copy())
            w = r / (1 << e)
            z = (unit(off + e * ncomp), unit(off + e * ncomp + 1) if levy else None)
            (lW, lI), (rW, rI) = self._split(nodeW, nodeI, z, w)
            bit = pos >= 0.5
            m = bit[..., None]
            if levy:
                accI = np.where(m, accI + (w / 2) * accW + lI, accI)
                nodeI = np.where(m, rI, lI)
            accW = np.where(m, accW + lW, accW)
            nodeW = np.where(m, rW, lW)
            pos = np.where(bit, 2 * pos - 1, 2 * pos)  # exact in binary floating point
            idx = 2 * idx + bit
        return accW, accI, nodeW, nodeI, idxs, pos

    def _sub_close(self, accW, accI, nodeW, nodeI, pos, r):
        """``(cW, cI)`` at position ``pos`` of the last node: its polynomial added to the path before it."""
        rf = np.asarray(r, dtype=np.float64)[..., None] / (1 << _SUB_LEVELS)
        phi = np.asarray(pos)[..., None]
        if self._levy:
            # W(phi) = p phi + q phi^2 with W(1) = W_node and rf int_0^1 W = I_node
            p_ = 6 * nodeI / rf - 2 * nodeW
            q_ = 3 * nodeW - 6 * nodeI / rf
            subW = p_ * phi + q_ * phi**2
            subI = rf * (p_ * phi**2 / 2 + q_ * phi**3 / 3)
            return accW + subW, accI + (phi * rf) * accW + subI
        return accW + phi * nodeW, None

    def _children(self, k, d, idx, parent, width, z=None):
        key = (k, d + 1, 2 * idx)
        left = self._nodes.get(key)
        right = self._nodes.get((k, d + 1, 2 * idx + 1))
        if left is not None and right is not None:
            return left, right
        W, I = parent
        if z is None:
            z = self._noise([_s64(self._node_int_key(k, d, idx))])[0]
        left, right = self._split(W, I, z, width)
        self._nodes.put(key, left)
        self._nodes.put((k, d + 1, 2 * idx + 1), right)
        return left, right

    def _node_int_key(self, k, d, idx):
        return _mix(self.seed & ((1 << 63) - 1), 2, k, d, idx, bits=64)

    def _noise(self, keys):
        """Bridge noise ``(len(keys), ncomp, *shape)`` for a list of signed 64-bit keys, in one draw."""
        ncomp = 2 if self._levy else 1
        n = ncomp * max(1, math.prod(self.shape))
        kt = torch.tensor(keys, dtype=torch.int64, device=self.device)
        return _hash_normal_range(kt, n, self.device).reshape((len(keys), ncomp) + self.shape)

    def _inside(self, k, j, leaf=False, extra_keys=()):
        """``(W(a, s), I(a, s))`` from the start ``a`` of cell ``k`` to the start ``s`` of leaf ``j``
        (None when ``s == a``), the leaf's own ``(W, I)`` (with ``leaf``; otherwise the node where the
        descent stopped) and the noise of ``extra_keys`` (None if there are none), drawn with the
        missing bridge levels."""
        D = self.depth
        width = self._cell_width(k)
        # the levels to descend: all of them to reach the leaf, else until s is a node's left edge
        if leaf:
            stop = D
        elif j == 0:
            stop = 0
        else:
            stop = D - ((j & -j).bit_length() - 1)
        idxs = [j >> (D - d) for d in range(stop)]
        # the first level whose children are not cached: its noise and all deeper levels' in one draw
        first = stop
        for d in range(stop):
            if self._nodes.get((k, d + 1, 2 * idxs[d])) is None or self._nodes.get((k, d + 1, 2 * idxs[d] + 1)) is None:
                first = d
                break
        keys = [_s64(self._node_int_key(k, d, idxs[d])) for d in range(first, stop)]
        keys.extend(extra_keys)
        z = self._noise(keys) if keys else None
        node = self._cell(k)
        accW = accI = None
        for d in range(stop):
            w = width / (1 << d)
            left, right = self._children(k, d, idxs[d], node, w, None if d < first else z[d - first])
            if (j >> (D - d - 1)) & 1:
                lw, li = left
                if accW is None:
                    accW, accI = lw, li
                else:
                    if self._levy:
                        accI = accI + (w / 2) * accW + li
                    accW = accW + lw
                node = right
            else:
                node = left
        return accW, accI, node, (z[len(z) - len(extra_keys):] if extra_keys else None)

    def _point(self, k, j, th, t):
        """``(W(t), J(t))`` at the located time (float64, cached); ``J(t) = int_{t0}^t W``."""
        key = (k, j, th)
        v = self._points.get(key)
        if v is not None:
            return v
        W, J = self._grid_value(k)
        if j or th:
            a = self._t0 + k * self.dt
            if th > 0:
                r = self._cell_width(k) / (1 << self.depth)
                cW, cI, idxs = self._below_leaf(th, r)
                D = self.depth
                extra = [_s64(self._node_int_key(k, D + e, (j << e) + int(i))) for e, i in enumerate(idxs)]
                aw, ai, (lw, li), z = self._inside(k, j, leaf=True, extra_keys=extra)
                basis = torch.cat([lw.unsqueeze(0)] + ([li.unsqueeze(0)] if self._levy else [])
                                  + [z.reshape((-1,) + lw.shape)])
                sw = torch.tensordot(torch.from_numpy(cW), basis, 1)
                si = torch.tensordot(torch.from_numpy(cI), basis, 1) if self._levy else None
                s_leaf = a + self._cell_width(k) * j / (1 << self.depth)
                if aw is None:
                    aw, ai = sw, si
                else:
                    if self._levy:
                        ai = ai + (t - s_leaf) * aw + si
                    aw = aw + sw
            else:
                aw, ai, _, _ = self._inside(k, j)
            if aw is not None:
                if self._levy:
                    J = J + (t - a) * W + ai
                W = W + aw
        v = (W, J)
        self._points.put(key, v)
        return v

    # ---- queries --------------------------------------------------------------------------
    def _increment(self, s, u, use_levy):
        ls, lu = self._locate(s), self._locate(u)
        ks, js, ths, ts = ls
        ku, ju, thu, tu = lu
        if js == 0 and ju == 0 and ths == 0.0 and thu == 0.0 and abs(ku - ks) == 1:
            k = min(ks, ku)
            d = self._chunk_data(k // self._chunk)
            i = k - d["start"]
            W = d["W_out"][i]
            if ku < ks:
                W = -W
            if use_levy:
                return W, d["H_out"][i]
            return W
        self._check_resolution(s, u, ls, lu)
        Ws, Js = self._point(*ls)
        Wu, Ju = self._point(*lu)
        dW = Wu - Ws
        if not use_levy:
            return dW.to(self.dtype)
        return dW.to(self.dtype), _levy_from_points(Ws, Js, ts, Wu, Ju, tu).to(self.dtype)

    def _per_sample(self, t0, t1, use_levy):
        """Increments with one time (pair) per sample: samples are the leading dimensions of ``shape``."""
        ta = torch.as_tensor(t0, dtype=torch.float64).reshape(-1)
        tb = None if t1 is None else torch.as_tensor(t1, dtype=torch.float64).reshape(-1)
        B = max(ta.numel(), 1 if tb is None else tb.numel())
        numel = math.prod(self.shape)
        if B == 0 or numel % B != 0 or (self.shape and math.prod(self.shape[: _lead(self.shape, B)]) != B):
            raise ValueError(
                f"Per-sample times for {B} samples need the BrownianInterval's leading dimensions to be the batch; "
                f"its shape is {self.shape}."
            )
        ta = ta.expand(B).tolist()
        tb = None if tb is None else tb.expand(B).tolist()
        found = {}

        def locate(t):
            v = found.get(t)
            if v is None:
                v = found[t] = self._locate(t)
            return v

        la = [locate(t) for t in ta]
        Ws, Js, ts_ = self._rows_at(la, B)
        if tb is None:
            return Ws.reshape(self.shape).to(self.dtype)
        lb = [locate(t) for t in tb]
        for s, u, x, y in zip(ta, tb, la, lb):
            self._check_resolution(s, u, x, y)
        Wu, Ju, tu_ = self._rows_at(lb, B)
        W = (Wu - Ws).reshape(self.shape).to(self.dtype)
        if not use_levy:
            return W
        # space-time Lévy area per row over [min(s, u), max(s, u)]
        flip = (tu_ < ts_).unsqueeze(-1)
        W0, J0, t0r = torch.where(flip, Wu, Ws), torch.where(flip, Ju, Js), torch.minimum(ts_, tu_).unsqueeze(-1)
        W1, J1, t1r = torch.where(flip, Ws, Wu), torch.where(flip, Js, Ju), torch.maximum(ts_, tu_).unsqueeze(-1)
        h = t1r - t0r
        safe = torch.where(h > 0, h, torch.ones_like(h))
        H = torch.where(h > 0, (J1 - J0 - h * W0) / safe - 0.5 * (W1 - W0), torch.zeros_like(W0))
        return W, H.reshape(self.shape).to(self.dtype)

    def _rows_at(self, locs, B):
        """Point values ``(W, J)`` (float64, ``(B, rest)``) with row ``b`` at the located time ``locs[b]``."""
        rest = math.prod(self.shape) // B
        outW = torch.empty((B, rest), dtype=torch.float64, device=self.device)
        outJ = torch.zeros_like(outW) if self._levy else None
        times = torch.tensor([loc[3] for loc in locs], dtype=torch.float64, device=self.device)
        grid = [b for b, loc in enumerate(locs) if loc[1] == 0 and loc[2] == 0.0]
        if grid:
            ks = torch.tensor([locs[b][0] for b in grid], device=self.device)
            rows = torch.tensor(grid, device=self.device)
            last = (self.n_cells - 1) // self._chunk
            chunks = torch.clamp(ks // self._chunk, max=last)
            needed = torch.unique(chunks).tolist()
            self._fit_chunks(len(needed))
            for c in needed:
                sel = chunks == c
                k, r = ks[sel], rows[sel]
                d = self._chunk_data(c, prefix=True)
                ws, js = self._start_of_chunk(c)
                i = k - d["start"]
                n = d["PW"].shape[0]
                outW[r] = ws.reshape(B, rest)[r] + d["PW"].reshape(n, B, rest)[i, r]
                if self._levy:
                    off = torch.where(k == self.n_cells, torch.full_like(i, 0, dtype=torch.float64) + d["len"],
                                      i.to(torch.float64) * self.dt).unsqueeze(-1)
                    outJ[r] = js.reshape(B, rest)[r] + off * ws.reshape(B, rest)[r] + d["PJ"].reshape(n, B, rest)[i, r]
        off = [b for b, loc in enumerate(locs) if loc[1] != 0 or loc[2] != 0.0]
        if off:
            self._inside_rows(off, locs, B, rest, outW, outJ)
        return outW, outJ, times

    def _inside_rows(self, rows, locs, B, rest, outW, outJ):
        """Off-grid point values of the given rows, every row descending its own bridge path at once.

        Row ``r`` of a node's noise is the same as in the full-shape draw of :meth:`_children`
        (counter ``component * numel + r * rest + e``), so the values equal the joint ones."""
        dev = self.device
        R = len(rows)
        r = torch.tensor(rows, device=dev)
        k = torch.tensor([locs[b][0] for b in rows], dtype=torch.int64, device=dev)
        j = torch.tensor([locs[b][1] for b in rows], dtype=torch.int64, device=dev)
        th = torch.tensor([locs[b][2] for b in rows], dtype=torch.float64, device=dev)
        t = torch.tensor([locs[b][3] for b in rows], dtype=torch.float64, device=dev).unsqueeze(-1)
        # grid values at the cell starts and the cells' own (W, I)
        base_W, base_J, cell_W, cell_I = (torch.empty((R, rest), dtype=torch.float64, device=dev) for _ in range(4))
        last = (self.n_cells - 1) // self._chunk
        chunks = torch.clamp(k // self._chunk, max=last)
        needed = torch.unique(chunks).tolist()
        self._fit_chunks(len(needed))
        for c in needed:
            sel = (chunks == c).nonzero().flatten()
            d = self._chunk_data(c, prefix=True)
            ws, js = self._start_of_chunk(c)
            i = k[sel] - d["start"]
            rr = r[sel]
            n = d["PW"].shape[0]
            wsr = ws.reshape(B, rest)[rr]
            base_W[sel] = wsr + d["PW"].reshape(n, B, rest)[i, rr]
            cell_W[sel] = d["W"].reshape(n - 1, B, rest)[i, rr]
            if self._levy:
                offt = (i.to(torch.float64) * self.dt).unsqueeze(-1)
                base_J[sel] = js.reshape(B, rest)[rr] + offt * wsr + d["PJ"].reshape(n, B, rest)[i, rr]
                cell_I[sel] = d["I"].reshape(n - 1, B, rest)[i, rr]
        widths = torch.full((R, 1), self.dt, dtype=torch.float64, device=dev)
        widths[k == self.n_cells - 1] = self._cell_width(self.n_cells - 1)
        starts = self._t0 + k.to(torch.float64).unsqueeze(-1) * self.dt
        D = self.depth
        ncomp = 2 if self._levy else 1
        numel = max(1, math.prod(self.shape))
        counters = (torch.arange(ncomp, dtype=torch.int64, device=dev).reshape(1, ncomp, 1) * numel
                    + r.reshape(R, 1, 1) * rest + torch.arange(rest, dtype=torch.int64, device=dev).reshape(1, 1, rest))
        nodeW, nodeI = cell_W, (cell_I if self._levy else None)
        accW = torch.zeros_like(cell_W)
        accI = torch.zeros_like(cell_W) if self._levy else None
        idx = torch.zeros_like(k)
        leaf = th > 0
        for d in range(D):
            # rows inside a leaf descend to it; the others stop at the left edge of their position
            active = (j != (idx << (D - d))) | leaf
            if not bool(active.any()):
                break
            key = self._node_key(k, d, idx)
            z = _hash_normal(key.reshape(R, 1, 1), counters).transpose(0, 1)
            w = widths / (1 << d)
            (lW, lI), (rW, rI) = self._split(nodeW, nodeI, z, w)
            bit = ((j >> (D - d - 1)) & 1).bool() & active
            m = bit.unsqueeze(-1)
            if self._levy:
                accI = torch.where(m, accI + (w / 2) * accW + lI, accI)
                nodeI = torch.where(m, rI, lI)
            accW = torch.where(m, accW + lW, accW)
            nodeW = torch.where(m, rW, lW)
            idx = torch.where(active, 2 * idx + bit.long(), idx)
        if bool(leaf.any()):
            # below the finest level: the bridge's further levels and the polynomial (see _below_leaf),
            # for the rows inside a leaf
            sel = leaf.nonzero().flatten()
            rw = widths[sel, 0] / (1 << D)
            cW, cI, idxs = self._below_leaf(th[sel].cpu().numpy(), rw.cpu().numpy())
            ks, js, cs = k[sel], j[sel], counters[sel]
            parts = [nodeW[sel].unsqueeze(1)] + ([nodeI[sel].unsqueeze(1)] if self._levy else [])
            for e, i in enumerate(idxs):
                key = self._node_key(ks, D + e, (js << e) + torch.from_numpy(i).to(dev))
                parts.append(_hash_normal(key.reshape(-1, 1, 1), cs))
            basis = torch.cat(parts, 1)  # (rows, basis, rest)
            sW = torch.einsum("rn,rnx->rx", torch.from_numpy(cW).to(dev), basis)
            s_leaf = (starts + widths * j.to(torch.float64).unsqueeze(-1) / (1 << D))[sel]
            if self._levy:
                sI = torch.einsum("rn,rnx->rx", torch.from_numpy(cI).to(dev), basis)
                accI = accI.index_put((sel,), accI[sel] + (t[sel] - s_leaf) * accW[sel] + sI)
            accW = accW.index_put((sel,), accW[sel] + sW)
        outW[r] = base_W + accW
        if self._levy:
            outJ[r] = base_J + (t - starts) * base_W + accI


def _lead(shape, B):
    p = 1
    for i, s in enumerate(shape):
        p *= s
        if p == B:
            return i + 1
    return len(shape)


def _levy_from_points(Ws, Js, ts, Wu, Ju, tu):
    """Space-time Lévy area over the interval between ``ts`` and ``tu`` from point values of ``(W, J)``."""
    if tu < ts:
        Ws, Js, ts, Wu, Ju, tu = Wu, Ju, tu, Ws, Js, ts
    h = tu - ts
    if h <= 0:
        return torch.zeros_like(Ws)
    I = Ju - Js - h * Ws
    return I / h - 0.5 * (Wu - Ws)


def _scalar(t):
    if isinstance(t, torch.Tensor):
        return float(t.detach().reshape(()))
    return float(t)
