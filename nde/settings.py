"""The names of SDE types, noise types, methods and Lévy-area approximations, as torchsde spells them.

For scripts that switch from torchsde: ``from nde.settings import NOISE_TYPES, SDE_TYPES`` in place of
``from torchsde.settings import ...``. Each class holds its values as string attributes
(``NOISE_TYPES.diagonal == "diagonal"``); ``"diagonal" in NOISE_TYPES`` tests membership and
``NOISE_TYPES.all()`` lists the values.
"""

from __future__ import annotations

__all__ = ["METHODS", "NOISE_TYPES", "SDE_TYPES", "LEVY_AREA_APPROXIMATIONS", "METHOD_OPTIONS"]


class _Names(type):
    def all(cls):
        return sorted(v for k, v in vars(cls).items() if not k.startswith("_") and isinstance(v, str))

    def __contains__(cls, item):
        return item in cls.all()

    def __iter__(cls):
        return iter(cls.all())

    def __str__(cls):
        return str(cls.all())


class METHODS(metaclass=_Names):
    """Method names of :func:`nde.sdeint`."""

    euler = "euler"
    milstein = "milstein"
    srk = "srk"
    midpoint = "midpoint"
    reversible_heun = "reversible_heun"
    adjoint_reversible_heun = "adjoint_reversible_heun"
    heun = "heun"
    log_ode_midpoint = "log_ode"
    euler_heun = "euler_heun"


class NOISE_TYPES(metaclass=_Names):  # noqa: N801
    """Noise types: the shape of ``g(t, y)`` (see :func:`nde.sdeint`)."""

    general = "general"
    diagonal = "diagonal"
    scalar = "scalar"
    additive = "additive"


class SDE_TYPES(metaclass=_Names):  # noqa: N801
    """Itô or Stratonovich."""

    ito = "ito"
    stratonovich = "stratonovich"


class LEVY_AREA_APPROXIMATIONS(metaclass=_Names):  # noqa: N801
    """The ``levy_area`` of :class:`nde.BrownianInterval` (``levy_area_approximation`` in torchsde)."""

    none = "none"
    space_time = "space-time"
    davie = "davie"
    foster = "foster"


class METHOD_OPTIONS(metaclass=_Names):  # noqa: N801
    """Keys of ``options`` in :func:`nde.sdeint`."""

    grad_free = "grad_free"
