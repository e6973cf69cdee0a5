"""Symbolic vector fields as ``nn.Module``s whose numeric constants are trainable.

An expression such as ``1.5*x - 1.0*x*y`` becomes a module with one parameter per
floating-point constant (here ``1.5`` and ``-1.0``). Integers and rationals
(exponents such as the ``2`` of ``x**2``, the ``-1`` of a division) are structure
and stay fixed: write ``1.0*x`` rather than ``x`` to make a coefficient trainable.
sympy is imported only when a model is built.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from ._terms import ODETerm


def _require_sympy():
    try:
        import sympy
    except ImportError as e:  # pragma: no cover - exercised only without sympy
        raise ImportError(
            "nde.symbolic needs sympy: install it with `pip install nde[symbolic]` (sympy and pysindy)."
        ) from e
    return sympy


def _default_names(d: int) -> list[str]:
    if d <= 3:
        return ["x", "y", "z"][:d]
    return [f"y{i}" for i in range(d)]


def as_symbols(variables, time_name: str = "t"):
    """The sympy symbols of the state variables, validated (names unique, not the time name)."""
    sympy = _require_sympy()
    out = []
    for v in variables:
        if isinstance(v, sympy.Symbol):
            out.append(v)
        elif isinstance(v, str) and v.isidentifier():
            out.append(sympy.Symbol(v))
        else:
            raise ValueError(f"variable_names must be valid identifiers or sympy Symbols; got {v!r}.")
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"variable_names must be unique; got {names}.")
    if time_name in names:
        raise ValueError(
            f"variable_names may not contain the time symbol {time_name!r}; rename the variable or pass time_name=..."
        )
    return out


def _unary_torch_functions():
    sympy = _require_sympy()
    return {
        sympy.sin: torch.sin, sympy.cos: torch.cos, sympy.tan: torch.tan,
        sympy.asin: torch.asin, sympy.acos: torch.acos, sympy.atan: torch.atan,
        sympy.sinh: torch.sinh, sympy.cosh: torch.cosh, sympy.tanh: torch.tanh,
        sympy.asinh: torch.asinh, sympy.acosh: torch.acosh, sympy.atanh: torch.atanh,
        sympy.exp: torch.exp, sympy.log: torch.log, sympy.Abs: torch.abs, sympy.sign: torch.sign,
        sympy.erf: torch.erf, sympy.floor: torch.floor, sympy.ceiling: torch.ceil,
    }


def _make_template(expr, placeholders: list, values: list):
    """Copy ``expr`` with every Float replaced by a fresh placeholder symbol (one per occurrence)."""
    sympy = _require_sympy()
    if isinstance(expr, sympy.Float):
        c = sympy.Symbol(f"_nde_c{len(placeholders)}")
        placeholders.append(c)
        values.append(float(expr))
        return c
    if not expr.args:
        return expr
    args = [_make_template(a, placeholders, values) for a in expr.args]
    if isinstance(expr, (sympy.Add, sympy.Mul, sympy.Pow)):
        return expr.func(*args, evaluate=False)
    return expr.func(*args)


def _compile(expr, index: dict, time_symbol, const_index: dict, unary: dict) -> Callable:
    """A function ``(t, cols, c) -> tensor or float`` evaluating ``expr``.

    ``cols[i]`` is the i-th state variable, ``t`` the time and ``c`` the constants (a tuple of 0-d tensors).
    """
    sympy = _require_sympy()
    if expr in const_index:
        k = const_index[expr]
        return lambda t, cols, c: c[k]
    if isinstance(expr, sympy.Symbol):
        if expr in index:
            i = index[expr]
            return lambda t, cols, c: cols[i]
        if expr == time_symbol:
            return lambda t, cols, c: t
        raise ValueError(
            f"The expression uses the symbol {expr} that is neither a state variable ({list(index)}) nor the "
            f"time {time_symbol}; pass it in variable_names or substitute a value."
        )
    if expr.is_Number or isinstance(expr, sympy.NumberSymbol):
        value = float(expr)
        return lambda t, cols, c: value
    args = [_compile(a, index, time_symbol, const_index, unary) for a in expr.args]
    if isinstance(expr, sympy.Add):
        def add(t, cols, c, args=args):
            out = args[0](t, cols, c)
            for a in args[1:]:
                out = out + a(t, cols, c)
            return out
        return add
    if isinstance(expr, sympy.Mul):
        def mul(t, cols, c, args=args):
            out = args[0](t, cols, c)
            for a in args[1:]:
                out = out * a(t, cols, c)
            return out
        return mul
    if isinstance(expr, sympy.Pow):
        base, expo = args
        e = expr.args[1]
        if e.is_Integer or (e.is_Rational and e.q == 2):
            n = float(e)
            if n == 1.0:
                return base
            if n == 2.0:
                return lambda t, cols, c: _sq(base(t, cols, c))
            if n == -1.0:
                return lambda t, cols, c: 1.0 / base(t, cols, c)
            if n == 0.5:
                return lambda t, cols, c: _sqrt(base(t, cols, c))
            if n == -0.5:
                return lambda t, cols, c: 1.0 / _sqrt(base(t, cols, c))
        return lambda t, cols, c: _pow(base(t, cols, c), expo(t, cols, c))
    fn = unary.get(expr.func)
    if fn is not None and len(args) == 1:
        a0 = args[0]
        return lambda t, cols, c: fn(_as_tensor(a0(t, cols, c), cols[0]))
    if isinstance(expr, (sympy.Max, sympy.Min)):
        red = torch.maximum if isinstance(expr, sympy.Max) else torch.minimum

        def minmax(t, cols, c, args=args):
            out = _as_tensor(args[0](t, cols, c), cols[0])
            for a in args[1:]:
                out = red(out, _as_tensor(a(t, cols, c), cols[0]))
            return out
        return minmax
    raise ValueError(
        f"Cannot evaluate the function {expr.func} in torch; supported: + * ** / and "
        f"{sorted(str(f) for f in unary)} plus Max/Min. Rewrite the expression with those."
    )


def _as_tensor(x, ref):
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=ref.dtype, device=ref.device)


def _sq(x):
    return x * x


def _sqrt(x):
    return torch.sqrt(x) if isinstance(x, torch.Tensor) else math.sqrt(x)


def _pow(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.pow(a, b)
    return a ** b


def _clean_integers(expr):
    """``expr`` with floats that are whole numbers shown as integers (``1.0*x*y`` -> ``x*y``)."""
    sympy = _require_sympy()
    reps = {f: sympy.Integer(int(f)) for f in expr.atoms(sympy.Float) if float(f) == int(f)}
    return expr.xreplace(reps) if reps else expr


class SymbolicModel(nn.Module):
    """A vector field ``dy_i/dt = e_i(t, y)`` given by sympy expressions, with trainable constants.

    Every floating-point constant of the expressions is an entry of the parameter
    ``constants``, so the model can be fine-tuned by gradient descent (Kidger 2021,
    "On neural differential equations", §6.1: regress a learned vector field
    symbolically, then fine-tune the constants of the equations). It is an
    ``nn.Module`` ``f(t, y, args=None)``, usable directly in :func:`nde.solve` and
    ``nde.models.NeuralODE``.

    Parameters
    ----------
    expressions:
        One expression per state dimension (sympy expressions or strings such as
        ``"1.5*x - 1.0*x*y"``).
    variable_names:
        The names (or sympy symbols) of the state variables, in the order of the last
        dimension of ``y``. Default ``x, y, z`` (up to 3 dimensions) or ``y0, y1, ...``.
    time_name:
        Name of the time symbol the expressions may use (default ``"t"``).
    dtype:
        dtype of the constants (default ``torch.get_default_dtype()``); ``.double()`` converts later.

    Attributes
    ----------
    constants:
        ``nn.Parameter`` of shape ``(number of float constants,)``.
    info:
        Details of how the model was obtained (backend, fit error, ...), when built by :func:`nde.symbolic.distill`.
    """

    def __init__(self, expressions: Sequence, variable_names: Sequence | None = None, time_name: str = "t",
                 dtype: torch.dtype | None = None):
        super().__init__()
        sympy = _require_sympy()
        if isinstance(expressions, (str, sympy.Basic)):
            expressions = [expressions]
        expressions = list(expressions)
        if not expressions:
            raise ValueError("expressions must hold at least one expression (one per state dimension).")
        if variable_names is None:
            variable_names = _default_names(len(expressions))
        self.variables = as_symbols(variable_names, time_name)
        self.time_symbol = sympy.Symbol(time_name)
        local = {s.name: s for s in self.variables}
        local[time_name] = self.time_symbol
        parsed = []
        for e in expressions:
            if isinstance(e, str):
                try:
                    e = sympy.sympify(e, locals=local)
                except (sympy.SympifyError, SyntaxError, TypeError) as err:
                    raise ValueError(f"Could not parse the expression {e!r}: {err}") from None
            elif not isinstance(e, sympy.Basic):
                e = sympy.sympify(e)
            parsed.append(e)
        placeholders, values = [], []
        self._templates = [_make_template(e, placeholders, values) for e in parsed]
        self._placeholders = placeholders
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.constants = nn.Parameter(torch.tensor(values, dtype=dtype).reshape(-1))
        self._fns = self._compiled()
        self.info: dict = {}

    def _compiled(self):
        unary = _unary_torch_functions()
        index = {s: i for i, s in enumerate(self.variables)}
        const_index = {c: k for k, c in enumerate(self._placeholders)}
        return [_compile(tpl, index, self.time_symbol, const_index, unary) for tpl in self._templates]

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_fns", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._fns = self._compiled()

    @property
    def variable_names(self) -> list[str]:
        """Names of the state variables."""
        return [s.name for s in self.variables]

    @property
    def num_constants(self) -> int:
        """Number of trainable constants."""
        return len(self._placeholders)

    def forward(self, t, y: torch.Tensor, args=None) -> torch.Tensor:
        """The vector field at ``(t, y)``: a tensor of the shape of ``y`` (``y.shape[-1]`` = number of expressions)."""
        d = len(self._fns)
        if y.shape[-1:] != (len(self.variables),):
            raise ValueError(
                f"y must have {len(self.variables)} entries in its last dimension (variables {self.variable_names}); "
                f"got shape {tuple(y.shape)}."
            )
        c = self.constants.unbind(0)  # one op here rather than one indexing op per constant per call
        cols = y.unbind(-1)
        if isinstance(t, torch.Tensor):
            t = t.to(y.dtype)
            if t.dim() == y.dim() and t.dim() > 0:
                t = t[..., 0]
        outs = []
        batch = y.shape[:-1]
        for i in range(d):
            o = self._fns[i](t, cols, c)
            if not isinstance(o, torch.Tensor):
                o = torch.as_tensor(o, dtype=y.dtype, device=y.device)
            if o.shape != batch or o.dtype != y.dtype:
                o = o.to(y.dtype).expand(batch)
            outs.append(o)
        return torch.stack(outs, dim=-1)

    # -- symbolic views ------------------------------------------------------------------------
    def to_sympy(self) -> list:
        """The expressions with the current values of the constants, as sympy expressions."""
        sympy = _require_sympy()
        vals = self.constants.detach().cpu().tolist()
        reps = {p: sympy.Float(v) for p, v in zip(self._placeholders, vals)}
        return [tpl.xreplace(reps) for tpl in self._templates]

    def equations(self, digits: int | None = None) -> list[str]:
        """Human-readable equations ``dx/dt = ...`` (floats rounded to ``digits`` significant digits if given)."""
        exprs = self._display_exprs(digits)
        return [f"d{s.name}/dt = {e}" for s, e in zip(self.variables, exprs)]

    def latex(self, digits: int | None = None) -> str:
        """The system as a LaTeX ``aligned`` block: ``\\frac{dx}{dt} &= ...``."""
        sympy = _require_sympy()
        exprs = self._display_exprs(digits)
        rows = [
            rf"\frac{{d{sympy.latex(s)}}}{{dt}} &= {sympy.latex(e)}" for s, e in zip(self.variables, exprs)
        ]
        return "\\begin{aligned}\n" + " \\\\\n".join(rows) + "\n\\end{aligned}"

    def _display_exprs(self, digits):
        exprs = self.to_sympy()
        if digits is not None:
            exprs = [e.evalf(digits) for e in exprs]
        return [_clean_integers(e) for e in exprs]

    def __str__(self):
        return "\n".join(self.equations())

    def extra_repr(self) -> str:
        return "; ".join(self.equations(digits=6))

    # -- transformations ----------------------------------------------------------------------
    def round(self, decimals: int = 2) -> "SymbolicModel":
        """A new model with every constant rounded to ``decimals`` decimals.

        Terms whose coefficient rounds to zero disappear; the rounded constants stay trainable.
        """
        sympy = _require_sympy()
        if not isinstance(decimals, int) or decimals < 0:
            raise ValueError(f"decimals must be a non-negative integer; got {decimals!r}.")
        vals = [round(v, decimals) for v in self.constants.detach().cpu().tolist()]
        reps = {p: (sympy.Float(v) if v != 0 else sympy.Integer(0)) for p, v in zip(self._placeholders, vals)}
        exprs = [sympy.sympify(tpl.xreplace(reps)) for tpl in self._templates]
        out = self._rebuilt(exprs)
        out.info = dict(self.info, rounded_to=decimals)
        return out

    def simplify(self) -> "SymbolicModel":
        """A new model whose expressions are simplified by ``sympy.simplify`` (constants stay trainable)."""
        sympy = _require_sympy()
        return self._rebuilt([sympy.simplify(e) for e in self.to_sympy()])

    def _rebuilt(self, exprs) -> "SymbolicModel":
        return SymbolicModel(exprs, self.variables, self.time_symbol.name, dtype=self.constants.dtype).to(
            self.constants.device)

    # -- training -------------------------------------------------------------------------------
    def fine_tune(self, ts, ys, steps: int = 100, lr: float = 1e-2, optimizer: str = "adam", solver=None,
                  rtol: float = 1e-6, atol: float = 1e-8, dt0=None, args=None, loss_fn=None,
                  callback=None) -> list[float]:
        """Fit the constants to trajectories by integrating the equations and minimising the mismatch.

        Minimises ``mean_k |y_hat(t_k) - y(t_k)|^2`` where ``y_hat`` solves ``dy/dt = f(t, y)``
        from ``y(t_0)``, by backpropagating through :func:`nde.solve`. Modifies the model in place.

        Parameters
        ----------
        ts:
            Observation times, a 1-D tensor of length ``T``.
        ys:
            Observed states ``(T, *batch, d)`` (time first, as ``NeuralODE`` returns them);
            ``ys[0]`` is the initial condition.
        steps:
            Optimiser iterations (for L-BFGS: its ``max_iter``; it stops earlier once converged).
        lr:
            Learning rate.
        optimizer:
            ``"adam"`` or ``"lbfgs"`` (the latter is fast when there are few constants).
        solver, rtol, atol, dt0:
            How to integrate: default ``nde.solvers.Tsit5()`` with ``PIDController(rtol, atol)``;
            with ``dt0`` constant steps of that size.
        args:
            Passed to the vector field.
        loss_fn:
            ``loss_fn(prediction, target) -> scalar``; default mean squared error.
        callback:
            Called as ``callback(i, loss)`` after every loss evaluation.

        Returns
        -------
        list of float
            The loss at every evaluation (before every Adam iteration; every function evaluation of
            L-BFGS, line searches included), then the final loss.
        """
        from ._controllers import ConstantStepSize, PIDController
        from ._saveat import SaveAt
        from ._solve import solve
        from nde.solvers import Tsit5

        ts = torch.as_tensor(ts)
        if ts.dim() != 1 or ts.numel() < 2:
            raise ValueError(f"ts must be a 1-D tensor of at least two times; got shape {tuple(ts.shape)}.")
        if not isinstance(ys, torch.Tensor) or ys.shape[0] != ts.numel() or ys.shape[-1] != len(self.variables):
            raise ValueError(
                f"ys must be a tensor of shape (len(ts), ..., {len(self.variables)}) = ({ts.numel()}, ..., "
                f"{len(self.variables)}); got {tuple(ys.shape) if isinstance(ys, torch.Tensor) else type(ys).__name__}."
            )
        if optimizer not in ("adam", "lbfgs"):
            raise ValueError(f"optimizer must be 'adam' or 'lbfgs'; got {optimizer!r}.")
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative integer; got {steps!r}.")
        ys = ys.detach().to(self.constants.dtype)
        ts = ts.to(ys.dtype)
        solver = solver if solver is not None else Tsit5()
        controller = ConstantStepSize() if dt0 is not None else PIDController(rtol, atol)
        loss_fn = loss_fn if loss_fn is not None else (lambda p, y: torch.mean((p - y) ** 2))
        term = ODETerm(self)

        def trajectory_loss():
            sol = solve(term, solver, ts[0], ts[-1], ys[0], dt0=dt0, args=args, saveat=SaveAt(ts=ts),
                        controller=controller)
            return loss_fn(sol.ys, ys)

        history: list[float] = []
        if self.num_constants == 0 or steps == 0:
            with torch.no_grad():
                history.append(float(trajectory_loss()))
            return history
        if optimizer == "adam":
            opt = torch.optim.Adam([self.constants], lr=lr)
            for step in range(steps):
                opt.zero_grad()
                loss = trajectory_loss()
                loss.backward()
                opt.step()
                history.append(float(loss.detach()))
                if callback is not None:
                    callback(step, history[-1])
        else:
            opt = torch.optim.LBFGS([self.constants], lr=lr, max_iter=steps, line_search_fn="strong_wolfe",
                                    tolerance_grad=1e-12, tolerance_change=1e-14)

            def closure():
                opt.zero_grad()
                loss = trajectory_loss()
                loss.backward()
                history.append(float(loss.detach()))
                if callback is not None:
                    callback(len(history) - 1, history[-1])
                return loss
            opt.step(closure)
        with torch.no_grad():
            history.append(float(trajectory_loss()))
        return history
