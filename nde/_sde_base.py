"""torchsde's base classes for SDEs and Brownian motions, so that torchsde scripts run unchanged.

``BaseSDE`` / ``SDEIto`` / ``SDEStratonovich`` are ``nn.Module`` s that check and hold ``noise_type`` and
``sde_type``; ``BrownianPath`` and ``BrownianTree`` are :class:`nde.BrownianInterval` s with torchsde's
constructor and point convention (``bm(t)`` includes ``w0``); ``ReverseBrownian`` reads a Brownian
motion backwards in time; ``brownian_interval_like`` builds one shaped like a tensor.
"""

from __future__ import annotations

import abc

from torch import nn

from . import settings
from ._brownian import BrownianInterval


class BaseSDE(nn.Module):
    """An SDE as :func:`nde.sdeint` takes it: subclasses define ``f(t, y)`` and ``g(t, y)`` (or
    ``f_and_g``, ``g_prod``, ``f_and_g_prod``; optionally ``h``), and this base checks and stores
    ``noise_type`` (one of :data:`nde.settings.NOISE_TYPES`) and ``sde_type`` (``"ito"`` or
    ``"stratonovich"``)."""

    def __init__(self, noise_type, sde_type):
        super().__init__()
        if noise_type not in settings.NOISE_TYPES:
            raise ValueError(f"Expected noise type in {settings.NOISE_TYPES}, but found {noise_type!r}.")
        if sde_type not in settings.SDE_TYPES:
            raise ValueError(f"Expected sde type in {settings.SDE_TYPES}, but found {sde_type!r}.")
        self.noise_type = noise_type
        self.sde_type = sde_type


class SDEIto(BaseSDE):
    """An Itô SDE (:class:`BaseSDE` with ``sde_type="ito"``)."""

    def __init__(self, noise_type):
        super().__init__(noise_type=noise_type, sde_type=settings.SDE_TYPES.ito)


class SDEStratonovich(BaseSDE):
    """A Stratonovich SDE (:class:`BaseSDE` with ``sde_type="stratonovich"``)."""

    def __init__(self, noise_type):
        super().__init__(noise_type=noise_type, sde_type=settings.SDE_TYPES.stratonovich)


class BaseBrownian(abc.ABC):
    """What :func:`nde.sdeint` needs of a Brownian motion given as ``bm``: ``bm(ta, tb, return_U=...,
    return_A=...)`` and ``dtype``, ``device``, ``shape``, ``levy_area_approximation``.
    :class:`nde.BrownianInterval` is one."""

    @abc.abstractmethod
    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        raise NotImplementedError

    def size(self):
        return self.shape


BaseBrownian.register(BrownianInterval)


class ReverseBrownian(BaseBrownian):
    """``base`` read backwards in time: ``bm(ta, tb)`` is ``base(-tb, -ta)`` (with the same ``return_U`` /
    ``return_A``), as torchsde's adjoint uses it; defined on ``[-base.t1, -base.t0]``."""

    def __init__(self, base_brownian):
        if not callable(base_brownian):
            raise TypeError(f"ReverseBrownian needs a Brownian motion; got {type(base_brownian).__name__}.")
        self.base_brownian = base_brownian

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        if tb is None:
            raise ValueError("ReverseBrownian is queried on intervals: pass both ta and tb.")
        return self.base_brownian(-tb, -ta, return_U=return_U, return_A=return_A)

    def __repr__(self):
        return f"ReverseBrownian(base_brownian={self.base_brownian!r})"

    @property
    def t0(self):
        return -float(self.base_brownian.t1)

    @property
    def t1(self):
        return -float(self.base_brownian.t0)

    @property
    def dtype(self):
        return self.base_brownian.dtype

    @property
    def device(self):
        return self.base_brownian.device

    @property
    def shape(self):
        return self.base_brownian.shape

    @property
    def levy_area_approximation(self):
        return self.base_brownian.levy_area_approximation


class _Offset(BrownianInterval):
    """A BrownianInterval whose point values start at ``self._w0`` (increments are unchanged)."""

    def __call__(self, ta, tb=None, use_levy=False, return_U=False, return_A=False):
        out = super().__call__(ta, tb, use_levy=use_levy, return_U=return_U, return_A=return_A)
        if tb is None and not (return_U or return_A or use_levy):
            out = out + self._w0
        return out


class BrownianPath(_Offset):
    """torchsde's ``BrownianPath(t0, w0)``: a Brownian motion on ``[t0, t0 + 1]`` of the shape, dtype and
    device of ``w0``, with ``bm(t) = w0 + W(t0, t)``; ``window_size`` has no effect."""

    def __init__(self, t0, w0, window_size=8):
        super().__init__(float(t0), float(t0) + 1.0, tuple(w0.shape), dtype=w0.dtype, device=w0.device)
        self._w0 = w0

    def __repr__(self):
        return f"BrownianPath(t0={self.t0}, shape={self.shape})"


class BrownianTree(_Offset):
    """torchsde's ``BrownianTree(t0, w0, t1=None, entropy=None, tol=1e-6)``: a Brownian motion on
    ``[t0, t1]`` (``t1 = t0 + 1`` by default) of the shape, dtype and device of ``w0``, determined by
    ``entropy`` (its seed), with ``bm(t) = w0 + W(t0, t)``. Query times are resolved down to ``tol``
    (passed as ``dt_min``); with ``w1`` the motion is conditioned on ``bm(t1) = w1`` (a Brownian bridge).
    ``pool_size``, ``cache_depth`` and ``safety`` have no effect."""

    def __init__(self, t0, w0, t1=None, w1=None, entropy=None, tol=1e-6, pool_size=24, cache_depth=9,
                 safety=None):
        t0 = float(t0)
        t1 = t0 + 1.0 if t1 is None else float(t1)
        super().__init__(t0, t1, tuple(w0.shape), seed=entropy, dtype=w0.dtype, device=w0.device,
                         dt_min=tol, W=None if w1 is None else w1 - w0)
        self._w0 = w0

    def __repr__(self):
        return f"BrownianTree(t0={self.t0}, t1={self.t1}, shape={self.shape})"


def brownian_interval_like(y, t0=0.0, t1=1.0, size=None, dtype=None, device=None, **kwargs):
    """A :class:`nde.BrownianInterval` on ``[t0, t1]`` with the shape, dtype and device of ``y`` (each
    overridable); other keywords go to its constructor."""
    return BrownianInterval(t0, t1, size=tuple(y.shape) if size is None else size,
                            dtype=y.dtype if dtype is None else dtype,
                            device=y.device if device is None else device, **kwargs)
