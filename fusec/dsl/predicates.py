"""Predicates callable from a pattern's ``where`` block: the built-ins and the Python-registered ones.

Built-ins take bound tensors (match variables) and follow ggml's helpers:

=====================  ==========================================================  ===================
call                   value                                                       ggml
=====================  ==========================================================  ===================
``dtype(v)``           element type (``f32``/``f16``/``i32``)                      ``tensor->type``
``ne(v, i)``           ``ne[i]`` (int, ``0 <= i < 4``, innermost first)            ``tensor->ne[i]``
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


BUILTINS: dict[str, Builtin] = {b.name: b for b in [
    Builtin("dtype", "t", lambda ctx, t: t.dtype, "element type"),
    Builtin("ne", "tv", _ne, "ne[i], innermost first"),
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
