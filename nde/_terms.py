"""Terms: what the equation is.

A term describes one piece of ``dy = f(t, y) dt + g(t, y) dX``. Solvers see terms
through this interface only:

* ``vf(t, y, args)``: the vector field;
* ``contr(t0, t1)``: the control increment over ``[t0, t1]`` (``t1 - t0`` for ``dt``);
* ``prod(vf, control)``: how a vector field acts on a control increment;
* ``vf_prod(t, y, args, control)``: both at once (terms may fuse them);
* ``ode(t, y, args)``: ``dy/dt`` when the term is an ODE in disguise (ODE
  solvers use this; a CDE control path contributes ``g(t, y) dX/dt``).
"""

from __future__ import annotations

import abc
import inspect
import types
from typing import Callable

import torch

from ._path import AbstractPath


def add_product(out, x, c):
    """``out + x * c`` in one operation (``c`` a number or a tensor)."""
    if isinstance(c, torch.Tensor):
        return torch.addcmul(out, x, c)
    return torch.add(out, x, alpha=c)


def _positional_arity(fn) -> int | None:
    """Number of positional parameters of ``fn`` (None when it takes ``*args``)."""
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    # plain functions and methods: read off the code object (inspect.signature costs tens of µs, once
    # a solve); anything wrapped, partial or with a declared signature goes through inspect
    func, skip = (target.__func__, 1) if type(target) is types.MethodType else (target, 0)
    if type(func) is types.FunctionType and not hasattr(func, "__wrapped__") and not hasattr(func, "__signature__"):
        code = func.__code__
        return None if code.co_flags & inspect.CO_VARARGS else code.co_argcount - skip
    sig = getattr(target, "__signature__", None)
    if not isinstance(sig, inspect.Signature):
        try:
            sig = inspect.signature(target)
        except (TypeError, ValueError):
            return None
    n = 0
    for p in sig.parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            return None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            n += 1
    return n


def as_vector_field(fn: Callable, name: str = "vector field") -> Callable:
    """Return ``fn`` as a callable ``f(t, y, args)``.

    Accepts ``f(t, y, args)`` (the nde convention) and ``f(t, y)`` (the
    torchdiffeq habit, for plain callables and ``nn.Module``s alike).
    """
    if not callable(fn):
        raise TypeError(f"The {name} must be callable as f(t, y, args) or f(t, y); got {type(fn).__name__}.")
    n = _positional_arity(fn)
    if n == 2:
        def two_arg(t, y, args, _fn=fn):
            return _fn(t, y)
        two_arg.__wrapped__ = fn
        return two_arg
    if n is not None and n < 2:
        raise TypeError(
            f"The {name} must take (t, y, args) or (t, y); {getattr(fn, '__name__', type(fn).__name__)} "
            f"takes {n} positional argument(s)."
        )
    return fn


class AbstractTerm(abc.ABC):
    """Base class of all terms."""

    @abc.abstractmethod
    def vf(self, t, y, args):
        """The vector field at ``(t, y)``."""

    @abc.abstractmethod
    def contr(self, t0, t1):
        """The control increment over ``[t0, t1]``."""

    @abc.abstractmethod
    def prod(self, vf, control):
        """The action of a vector field on a control increment."""

    def vf_prod(self, t, y, args, control):
        """``prod(vf(t, y, args), control)``; terms may fuse the two."""
        return self.prod(self.vf(t, y, args), control)

    def _prod_add(self, out, vf, control):
        """``out + prod(vf, control)``, in one fused operation where the product allows it."""
        return out + self.prod(vf, control)

    def ode(self, t, y, args):
        """``dy/dt`` of this term seen as an ODE. Terms that are not (Brownian controls) raise."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot be written as an ODE; use a solver for its kind of equation."
        )

    @property
    def is_ode(self) -> bool:
        """Whether :meth:`ode` is available."""
        return False

    @property
    def jump_ts(self):
        """Times at which the term is not smooth (a step should end there), or None."""
        return None


class ODETerm(AbstractTerm):
    """The term ``f(t, y, args) dt`` of an ordinary differential equation.

    Parameters
    ----------
    vector_field:
        ``f(t, y, args)`` or ``f(t, y)``; a plain callable or an ``nn.Module``.
        Returns a tensor of the shape of ``y``.
    """

    def __init__(self, vector_field: Callable):
        self.vector_field = vector_field
        self._fn = as_vector_field(vector_field)

    def vf(self, t, y, args):
        return self._fn(t, y, args)

    def ode(self, t, y, args):
        return self._fn(t, y, args)

    @property
    def is_ode(self) -> bool:
        return True

    def contr(self, t0, t1):
        return t1 - t0

    def prod(self, vf, control):
        return vf * control

    def _prod_add(self, out, vf, control):
        if type(self).prod is not ODETerm.prod or not isinstance(vf, torch.Tensor):
            return out + self.prod(vf, control)
        return add_product(out, vf, control)

    def __repr__(self):
        return f"ODETerm({self.vector_field!r})"


_NOISE_TYPES = ("general", "diagonal", "scalar", "additive")


class ControlTerm(AbstractTerm):
    """The term ``g(t, y, args) dX(t)`` of a controlled (CDE) or stochastic (SDE) equation.

    Parameters
    ----------
    vector_field:
        ``g(t, y, args)`` or ``g(t, y)``.
    control:
        An :class:`~nde.AbstractPath`: an interpolation of data or a Brownian motion.
    noise:
        How ``g`` acts on an increment ``dX`` of shape ``(..., m)``:

        * ``"general"`` (default): ``g`` returns ``(..., d, m)``; product ``g @ dX``;
        * ``"diagonal"``: ``g`` returns ``(..., d)`` and ``m == d``; product ``g * dX``;
        * ``"scalar"``: ``g`` returns ``(..., d, 1)`` and ``m == 1``; product ``g[..., 0] * dX``;
        * ``"additive"``: as general, but ``g`` does not depend on ``y`` (solvers may exploit this).
    vf_prod:
        Optional ``vf_prod(t, y, args, dX)`` computing the product directly, without
        materialising the ``(d, m)`` matrix.
    sde_type:
        Optional interpretation of a Brownian ``dX``: ``"ito"`` or ``"stratonovich"``. When given, SDE
        solvers of the other interpretation refuse the term.
    """

    def __init__(self, vector_field: Callable, control: AbstractPath, noise: str = "general", vf_prod: Callable | None = None,
                 sde_type: str | None = None):
        if noise not in _NOISE_TYPES:
            raise ValueError(f"noise must be one of {_NOISE_TYPES}; got {noise!r}.")
        if sde_type not in (None, "ito", "stratonovich"):
            raise ValueError(f"sde_type must be None, 'ito' or 'stratonovich'; got {sde_type!r}.")
        #: the interpretation of ``g dW`` (None: not declared); SDE solvers check that they match it
        self.sde_type = sde_type
        if not isinstance(control, AbstractPath):
            raise TypeError(
                f"control must be an nde path (an interpolation or a Brownian motion); got {type(control).__name__}."
            )
        self.vector_field = vector_field
        self._fn = as_vector_field(vector_field)
        self.control = control
        self.noise = noise
        self._vf_prod = vf_prod
        # shapes are checked once, at the first evaluation (no per-step cost)
        self._vf_checked = self._prod_checked = False

    def vf(self, t, y, args):
        g = self._fn(t, y, args)
        if not self._vf_checked:
            self._check_vf(g, y)
        return g

    def contr(self, t0, t1):
        return self.control.evaluate(t0, t1)

    def prod(self, vf, control):
        if not self._prod_checked:
            self._check_prod(vf, control)
        if self.noise == "diagonal":
            return vf * control
        if self.noise == "scalar":
            return vf[..., 0] * control
        return matrix_vector(vf, control)

    def _prod_add(self, out, vf, control):
        if self.noise == "diagonal" and self._prod_checked and type(self).prod is ControlTerm.prod:
            return add_product(out, vf, control)
        return out + self.prod(vf, control)

    def vf_prod(self, t, y, args, control):
        if self._vf_prod is not None:
            out = self._vf_prod(t, y, args, control)
            if not self._vf_checked:
                if isinstance(out, torch.Tensor) and isinstance(y, torch.Tensor) and not _broadcasts_to(out.shape, y.shape):
                    raise ValueError(
                        f"The product g(t, y) dX of a ControlTerm (vf_prod={_name(self._vf_prod)}) returned shape "
                        f"{tuple(out.shape)} but y has shape {tuple(y.shape)}; they must be equal."
                    )
                self._vf_checked = True
            return out
        return self.prod(self.vf(t, y, args), control)

    def _channels(self):
        shape = getattr(self.control, "shape", None)
        try:
            return int(tuple(shape)[-1]) if shape is not None and len(tuple(shape)) else None
        except (TypeError, ValueError):
            return None

    def _check_vf(self, g, y):
        """Check the matrix ``g(t, y)`` against ``y`` and the noise structure (once)."""
        if not isinstance(g, torch.Tensor) or not isinstance(y, torch.Tensor):
            self._vf_checked = True
            return
        name = _name(self.vector_field)
        gs, ys = tuple(g.shape), tuple(y.shape)
        m = self._channels()
        if self.noise == "diagonal":
            if not _broadcasts_to(gs, ys):
                raise ValueError(f"The diffusion {name} of a ControlTerm with noise='diagonal' must return the shape of "
                                 f"y, {ys}; got {gs}.")
        elif self.noise == "scalar":
            if g.dim() < 1 or gs[-1] != 1:
                raise ValueError(f"Scalar noise must have only one channel: the diffusion {name} must return shape "
                                 f"y.shape + (1,) = {ys + (1,)}; got {gs}.")
            if not _broadcasts_to(gs[:-1], ys):
                raise ValueError(f"The diffusion {name} of a ControlTerm with noise='scalar' must return shape "
                                 f"y.shape + (1,) = {ys + (1,)}; got {gs}.")
        else:
            want = ys + ((m,) if m is not None else ("m",))
            if g.dim() < 2 or (y.dim() >= 1 and gs[-2] != ys[-1]) or (m is not None and gs[-1] != m) \
                    or not _broadcasts_to(gs[:-1], ys):
                raise ValueError(
                    f"The diffusion {name} of a ControlTerm with noise={self.noise!r} must return shape y.shape + (m,) "
                    f"= {want} (m = number of control channels); got {gs}."
                )
        self._vf_checked = True

    def _check_prod(self, vf, control):
        """Check the control increment against the matrix ``g`` (once)."""
        if not isinstance(vf, torch.Tensor) or not isinstance(control, torch.Tensor):
            self._prod_checked = True
            return
        vs, cs = tuple(vf.shape), tuple(control.shape)
        name = _name(self.vector_field)
        if self.noise == "diagonal":
            ok = control.dim() >= 1 and vf.dim() >= 1 and cs[-1] == vs[-1]
            want = f"(..., {vs[-1] if vs else 'd'}) to match the diffusion's shape {vs}"
        elif self.noise == "scalar":
            ok = control.dim() >= 1 and cs[-1] == 1
            want = "(..., 1) (one channel)"
        else:
            ok = control.dim() >= 1 and vf.dim() >= 2 and cs[-1] == vs[-1]
            want = f"(..., {vs[-1] if vs else 'm'}) to match the diffusion's shape {vs} (..., d, m)"
        if not ok:
            raise ValueError(
                f"The control increments of a ControlTerm with noise={self.noise!r} have shape {cs}, but the diffusion "
                f"{name} needs {want}; give the Brownian motion / path the matching shape."
            )
        self._prod_checked = True

    @property
    def is_ode(self) -> bool:
        return _path_is_differentiable(self.control)

    def ode(self, t, y, args):
        return self.vf_prod(t, y, args, control_derivative(self.control, t))

    def _ode_vjp(self, t, y, args, a, inputs):
        """``ode(t, y, args)`` and the gradients of ``-a . ode(t, y, args)`` w.r.t. ``inputs``, for an
        adjoint's augmented field; None when only the general route (``ode``, then autograd) applies."""
        if (self.noise not in ("general", "additive") or self._vf_prod is not None or not self._prod_checked
                or type(self).prod is not ControlTerm.prod or type(self).ode is not ControlTerm.ode
                or type(self).vf_prod is not ControlTerm.vf_prod):
            return None
        return matrix_vector_vjp(lambda: self.vf(t, y, args), control_derivative(self.control, t), a, inputs)

    @property
    def jump_ts(self):
        return self.control.jump_ts


def control_derivative(control, t, name=None):
    """``control.derivative(t)``; a failure inside the path is reported as the path's, not the vector field's."""
    try:
        return control.derivative(t)
    except NotImplementedError:
        raise
    except RuntimeError as e:
        if isinstance(t, torch.Tensor):
            t = float(t.detach().reshape(-1)[0]) if t.numel() == 1 else f"(tensor of shape {tuple(t.shape)})"
        raise ValueError(
            f"The control path {name or type(control).__name__} failed to evaluate its derivative at t={t}: {e}"
        ) from e


def _broadcasts_to(shape, target) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` without changing it."""
    try:
        return tuple(torch.broadcast_shapes(tuple(shape), tuple(target))) == tuple(target)
    except RuntimeError:
        return False


def _name(fn) -> str:
    inner = getattr(fn, "__wrapped__", fn)
    name = getattr(inner, "__qualname__", None) or getattr(inner, "__name__", None) or type(inner).__name__
    return f"{name}(t, y)"


def _path_is_differentiable(path) -> bool:
    return type(path).derivative is not AbstractPath.derivative


def matrix_vector(g, x):
    """``(g @ x[..., None])[..., 0]`` for a batch of small matrices ``g (..., d, m)``, vectors ``x (..., m)``.

    Without a graph to record: one batched matrix product (the fastest forward pass). When gradients
    are recorded: a broadcast product and a sum, whose backward pass is two broadcast operations instead
    of two batches of small matrix products (on the CPU about 5% of a whole CDE training step for
    ``(32 x 4)`` matrices).
    """
    if torch.is_grad_enabled() and (g.requires_grad or x.requires_grad):
        return (g * x.unsqueeze(-2)).sum(-1)
    return torch.matmul(g, x.unsqueeze(-1)).squeeze(-1)


def matrix_vector_vjp(matrix, x, a, inputs):
    """``f = g @ x[..., None]`` with ``g = matrix()``, and the gradients of ``-a . f`` w.r.t. ``inputs``.

    The cotangent is carried to ``g`` directly (``-a x^T``, one broadcast product) and the product
    itself is formed without a graph: cheaper than recording the product and differentiating through
    it. Returns None (before evaluating ``g``) when ``x`` itself needs gradients.
    """
    if not isinstance(x, torch.Tensor) or x.requires_grad:
        return None
    g = matrix()
    if not isinstance(g, torch.Tensor):
        return None
    if not g.requires_grad:
        grads = [None] * len(inputs)
    else:
        cot = a.unsqueeze(-1) * x.unsqueeze(-2)
        if cot.shape != g.shape:  # g broadcasts against the batch of x: through the product after all
            f = matrix_vector(g, x)
            return f.detach(), torch.autograd.grad(f, inputs, -a, allow_unused=True)
        grads = torch.autograd.grad(g, inputs, cot.neg_(), allow_unused=True)
    with torch.no_grad():
        f = torch.matmul(g, x.unsqueeze(-1)).squeeze(-1)
    return f, grads


class MultiTerm(AbstractTerm):
    """A sum of terms, e.g. ``MultiTerm(ODETerm(f), ControlTerm(g, brownian))`` for an SDE.

    ``vf`` and ``contr`` return tuples (one entry a term); ``prod`` sums the products.
    """

    def __init__(self, *terms: AbstractTerm):
        if len(terms) == 0:
            raise ValueError("MultiTerm needs at least one term.")
        for term in terms:
            if not isinstance(term, AbstractTerm):
                raise TypeError(f"MultiTerm takes terms (ODETerm, ControlTerm, ...); got {type(term).__name__}.")
        self.terms = tuple(terms)

    def vf(self, t, y, args):
        return tuple(term.vf(t, y, args) for term in self.terms)

    def contr(self, t0, t1):
        return tuple(term.contr(t0, t1) for term in self.terms)

    def prod(self, vf, control):
        out = None
        for term, v, c in zip(self.terms, vf, control):
            out = term.prod(v, c) if out is None else term._prod_add(out, v, c)
        return out

    def _prod_add(self, out, vf, control):
        for term, v, c in zip(self.terms, vf, control):
            out = term._prod_add(out, v, c)
        return out

    def vf_prod(self, t, y, args, control):
        out = None
        for term, c in zip(self.terms, control):
            p = term.vf_prod(t, y, args, c)
            out = p if out is None else out + p
        return out

    @property
    def is_ode(self) -> bool:
        return all(term.is_ode for term in self.terms)

    def ode(self, t, y, args):
        out = None
        for term in self.terms:
            p = term.ode(t, y, args)
            out = p if out is None else out + p
        return out

    @property
    def jump_ts(self):
        ts = [term.jump_ts for term in self.terms if term.jump_ts is not None]
        if not ts:
            return None
        return torch.unique(torch.cat([torch.as_tensor(t, dtype=torch.float64).reshape(-1) for t in ts]))


class ODEForm(AbstractTerm):
    """Base class of terms that are ODEs in disguise (``dy = ode(t, y, args) dt``): subclasses define :meth:`ode`."""

    def vf(self, t, y, args):
        return self.ode(t, y, args)

    def contr(self, t0, t1):
        return t1 - t0

    def prod(self, vf, control):
        return vf * control

    @property
    def is_ode(self) -> bool:
        return True


class DerivedODETerm(ODEForm):
    """An ODE ``dz/dt = f(t, z, args)`` built from another term, e.g. an adjoint's augmented field.

    It keeps the other term's ``jump_ts`` and, through :func:`only_ode_terms`, whether that term hides
    a control path: solvers then reuse no stage across steps and evaluate the stages at a step's
    ends from inside the step, as they do for the original term.

    Parameters
    ----------
    vector_field:
        ``f(t, z, args)`` or ``f(t, z)``.
    term:
        The term ``f`` is derived from.
    """

    def __init__(self, vector_field: Callable, term: AbstractTerm):
        self.vector_field = vector_field
        self._fn = as_vector_field(vector_field)
        self.term = term

    def ode(self, t, y, args):
        return self._fn(t, y, args)

    @property
    def jump_ts(self):
        return self.term.jump_ts


class _ReversedTime(AbstractTerm):
    """``term`` seen in the time ``tau = -t``, so that a solve from t0 to t1 < t0 runs forwards in tau."""

    def __init__(self, term: AbstractTerm):
        self.term = term

    def vf(self, t, y, args):
        return self.term.vf(-t, y, args)

    def contr(self, t0, t1):
        return self.term.contr(-t0, -t1)

    def prod(self, vf, control):
        return self.term.prod(vf, control)

    def vf_prod(self, t, y, args, control):
        return self.term.vf_prod(-t, y, args, control)

    @property
    def is_ode(self) -> bool:
        return self.term.is_ode

    def ode(self, t, y, args):
        return -self.term.ode(-t, y, args)

    @property
    def jump_ts(self):
        j = self.term.jump_ts
        return None if j is None else -torch.as_tensor(j)

    def __getattr__(self, name):
        return getattr(self.term, name)


def reverse_time(term: AbstractTerm) -> AbstractTerm:
    """The term in reversed time ``tau = -t`` (recursively through :class:`MultiTerm`)."""
    if isinstance(term, MultiTerm):
        return MultiTerm(*(reverse_time(t) for t in term.terms))
    if isinstance(term, _ReversedTime):
        return term.term
    return _ReversedTime(term)


def only_ode_terms(term) -> bool:
    """Whether every leaf of ``term`` is an :class:`ODETerm` (no control path, no Brownian motion)."""
    if isinstance(term, ODETerm):
        return True
    inner = getattr(term, "term", None)
    if isinstance(inner, AbstractTerm):
        return only_ode_terms(inner)
    subterms = getattr(term, "terms", None)
    if subterms is not None:
        return all(only_ode_terms(x) for x in subterms)
    return False
