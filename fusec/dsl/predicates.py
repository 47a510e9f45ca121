"""Predicates callable from a pattern's ``where`` block: the built-ins and the Python-registered ones.

Built-ins take bound tensors (match variables) and follow ggml's helpers:

=====================  ==========================================================  ===================
call                   value                                                       ggml
=====================  ==========================================================  ===================
``dtype(v)``           element type (``f32``/``f16``/``i32``)                      ``tensor->type``
``ne(v, i)``           ``ne[i]`` (int, ``0 <= i < 4``, innermost first)            ``tensor->ne[i]``
``nb(v, i)``           ``nb[i]``, byte stride (int, ``0 <= i < 4``)                ``tensor->nb[i]``
``shape(v)``           ``[ne0, ne1, ne2, ne3]``                                    ``tensor->ne``
``nrows(v)``           ``ne1*ne2*ne3``                                             ``ggml_nrows``
``nelements(v)``       ``ne0*ne1*ne2*ne3``                                         ``ggml_nelements``
``contiguous(v)``      bool                                                        ``ggml_is_contiguous``
``contiguous_rows(v)`` bool                                                        ``ggml_is_contiguous_rows``
``can_repeat(a, b)``   bool: ``a`` broadcasts to ``b``                             ``ggml_can_repeat``
``same_shape(a, b)``   bool                                                        ``ggml_are_same_shape``
``uses(v)``            number of source slots using ``v`` in the whole graph       (graph use count)
``is_output(v)``       bool: ``v`` is a graph output                               ``GGML_TENSOR_FLAG_OUTPUT``
``param(v, name)``     op parameter ``name`` of ``v`` (``name`` bare or quoted)    ``op_params``
=====================  ==========================================================  ===================

Python predicates are registered with :func:`predicate` *before* the patterns using them are
parsed; they receive bound :class:`~fusec.ir.tensor.Tensor` objects or plain values.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import PatternError
from ..ir.shape import can_repeat, nelements, nrows
from ..ir.tensor import Tensor


@dataclass
class EvalContext:
    """Graph facts the context-dependent built-ins need.

    Attributes:
        use_counts: ``id(tensor)`` -> number of source slots referring to it (``Graph.use_counts``).
        outputs: ``id`` of every graph output.
    """

    use_counts: dict[int, int]
    outputs: set[int]


@dataclass(frozen=True)
class Builtin:
    """A built-in predicate. ``args`` is one letter per argument: ``t`` a match variable (tensor),
    ``n`` a parameter name (bare name or string), ``v`` any value."""

    name: str
    args: str
    fn: Callable[..., Any]
    doc: str


def _param(ctx: EvalContext, t: Tensor, name: str) -> Any:
    if name not in t.params:
        raise KeyError(f"{t.op} node {t.name!r} has no parameter {name!r} (has {sorted(t.params)})")
    return t.params[name]


def _ne(ctx: EvalContext, t: Tensor, i: Any) -> int:
    if not isinstance(i, int) or not 0 <= i < 4:
        raise ValueError(f"ne(v, i) needs an integer axis 0..3, got {i!r}")
    return t.ne[i]


def _nb(ctx: EvalContext, t: Tensor, i: Any) -> int:
    if not isinstance(i, int) or not 0 <= i < 4:
        raise ValueError(f"nb(v, i) needs an integer axis 0..3, got {i!r}")
    return t.nb[i]


BUILTINS: dict[str, Builtin] = {b.name: b for b in [
    Builtin("dtype", "t", lambda ctx, t: t.dtype, "element type"),
    Builtin("ne", "tv", _ne, "ne[i], innermost first"),
    Builtin("nb", "tv", _nb, "nb[i], byte stride"),
    Builtin("shape", "t", lambda ctx, t: list(t.ne), "the 4 ne values"),
    Builtin("nrows", "t", lambda ctx, t: nrows(t.ne), "ggml_nrows"),
    Builtin("nelements", "t", lambda ctx, t: nelements(t.ne), "ggml_nelements"),
    Builtin("contiguous", "t", lambda ctx, t: t.is_contiguous, "ggml_is_contiguous"),
    Builtin("contiguous_rows", "t", lambda ctx, t: t.is_contiguous_rows, "ggml_is_contiguous_rows"),
    Builtin("can_repeat", "tt", lambda ctx, a, b: can_repeat(a.ne, b.ne), "ggml_can_repeat(a, b)"),
    Builtin("same_shape", "tt", lambda ctx, a, b: tuple(a.ne) == tuple(b.ne), "ggml_are_same_shape"),
    Builtin("uses", "t", lambda ctx, t: ctx.use_counts.get(id(t), 0), "source slots using v"),
    Builtin("is_output", "t", lambda ctx, t: id(t) in ctx.outputs, "v is a graph output"),
    Builtin("param", "tn", _param, "op parameter"),
]}

_USER: dict[str, Callable[..., Any]] = {}


def predicate(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn(*args) -> bool | value`` as the where-predicate ``name``.

    Arguments arrive as bound tensors (for match variables) or values (numbers, dtypes, captures,
    lists). Registering a name again replaces the earlier function. Raises :class:`PatternError`
    (located at the function's definition) when ``name`` is a built-in or not an identifier.
    """

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in BUILTINS or not name.isidentifier():
            try:
                file, line = inspect.getsourcefile(fn) or "<python>", inspect.getsourcelines(fn)[1]
            except (OSError, TypeError):
                file, line = "<python>", 0
            why = "is a built-in predicate" if name in BUILTINS else "is not an identifier"
            raise PatternError(f"cannot register predicate {name!r}: the name {why}", file, line, 1)
        _USER[name] = fn
        return fn

    return register


def known_predicates() -> list[str]:
    """All predicate names callable from patterns (built-ins and registered), sorted."""
    return sorted(set(BUILTINS) | set(_USER))


def lookup_user(name: str) -> Callable[..., Any] | None:
    return _USER.get(name)


def unregister(name: str) -> None:
    """Remove a Python-registered predicate (no-op when absent); for tests and plugins."""
    _USER.pop(name, None)


# ---------------------------------------------------------------------------------------------
# evaluation of where-expressions


class EvalError(Exception):
    """A where-expression that cannot be evaluated (type error, bad axis...); ``expr`` locates it."""

    def __init__(self, message: str, expr: Any):
        super().__init__(message)
        self.expr = expr


def evaluate(expr: Any, bindings: dict[str, Tensor], captures: dict[str, Any], ctx: EvalContext,
             trace: list[tuple[Any, Any]] | None = None) -> Any:
    """Evaluate a checked where-expression (:mod:`fusec.dsl.ast`) without ``eval``.

    ``bindings`` maps match variables to tensors, ``captures`` capture names (no ``$``) to values.
    Every predicate call and its value is appended to ``trace`` (for "why not fused?" messages).
    ``/`` and ``%`` on two ints follow C (truncation toward zero). Raises :class:`EvalError`.
    """
    from . import ast as A  # local: ast imports nothing from here, keep module load order simple

    def ev(e: Any) -> Any:
        if isinstance(e, (A.Num, A.Str, A.DTypeLit)):
            return e.value
        if isinstance(e, A.VarRef):
            return bindings[e.name]
        if isinstance(e, A.CaptureRef):
            return captures[e.name]
        if isinstance(e, A.ListExpr):
            return [ev(i) for i in e.items]
        if isinstance(e, A.Call):
            args = [ev(a) for a in e.args]
            try:
                if e.fn in BUILTINS:
                    val = BUILTINS[e.fn].fn(ctx, *args)
                else:
                    val = _USER[e.fn](*args)
            except EvalError:
                raise
            except Exception as exc:  # a predicate's own failure is reported at the call
                raise EvalError(f"{e.fn}(...) raised {type(exc).__name__}: {exc}", e) from None
            if trace is not None:
                trace.append((e, val))
            return val
        if isinstance(e, A.Unary):
            v = ev(e.operand)
            if e.op == "not":
                return not _truth(v, e)
            _num(v, e)
            return -v
        if isinstance(e, A.Binary):
            if e.op == "and":
                return _truth(ev(e.left), e) and _truth(ev(e.right), e)
            if e.op == "or":
                return _truth(ev(e.left), e) or _truth(ev(e.right), e)
            lhs, rhs = ev(e.left), ev(e.right)
            return _binary(e.op, lhs, rhs, e)
        raise EvalError(f"cannot evaluate {type(e).__name__}", e)  # pragma: no cover

    return ev(expr)


def _truth(v: Any, e: Any) -> bool:
    if isinstance(v, Tensor):
        raise EvalError(f"tensor {v.name!r} used as a truth value; call a predicate on it", e)
    return bool(v)


def _num(v: Any, e: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        shown = f"tensor {v.name!r}" if isinstance(v, Tensor) else f"{type(v).__name__} {show(v)}"
        raise EvalError(f"arithmetic needs numbers, got {shown}", e)


def _binary(op: str, a: Any, b: Any, e: Any) -> Any:
    if op in ("in", "not in"):
        if not isinstance(b, list):
            raise EvalError(f"'{op}' needs a list on the right, got {show(b)}", e)
        found = any(_same(a, x) for x in b)
        return found if op == "in" else not found
    if op == "==":
        return _same(a, b)
    if op == "!=":
        return not _same(a, b)
    _num(a, e)
    _num(b, e)
    if op == "<":
        return a < b
    if op == "<=":
        return a <= b
    if op == ">":
        return a > b
    if op == ">=":
        return a >= b
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0 and op in ("/", "%"):
        raise EvalError(f"division by zero in '{op}'", e)
    both_int = isinstance(a, int) and isinstance(b, int)
    if op == "/":
        if both_int:
            q = abs(a) // abs(b)
            return q if (a >= 0) == (b >= 0) else -q
        return a / b
    if op == "%":
        if both_int:
            q = _binary("/", a, b, e)
            return a - b * q
        return a - b * int(a / b)
    raise EvalError(f"unknown operator {op!r}", e)  # pragma: no cover


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return a is b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))):
        return False
    return a == b


def show(v: Any) -> str:
    """Render a where-value the way patterns write it (``f32``, ``true``, ``[4, 1, 1, 1]``)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Tensor):
        return repr(v.name)
    if isinstance(v, list):
        return "[" + ", ".join(show(x) for x in v) + "]"
    return str(v)
