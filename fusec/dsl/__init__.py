"""The pattern language: parse and check ``*.fuse`` files into :class:`Pattern` objects.

Reference: ``docs/patterns.md``. Public API::

    parse_patterns(text, file="<string>") -> list[Pattern]
    load_patterns(paths) -> list[Pattern]
    default_patterns() -> list[Pattern]
    @predicate("name")  # register a Python where-predicate

Every malformed pattern raises :class:`fusec.errors.PatternError` (``file:line:col: message``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..errors import PatternError
from .ast import Pattern, PNode, WhereClause
from .checker import check_pattern, check_unique
from .parser import parse_raw
from .predicates import BUILTINS, known_predicates, predicate, unregister

__all__ = ["BUILTINS", "PNode", "Pattern", "WhereClause", "default_patterns", "known_predicates", "load_patterns",
           "parse_patterns", "predicate", "unregister"]


def parse_patterns(text: str, file: str = "<string>") -> list[Pattern]:
    """Parse and check the patterns in ``text`` (``file`` names it in error positions).

    Returns the patterns in source order. Raises :class:`PatternError` for syntax errors, unknown
    ops/predicates/dtypes/captures, wrong arity, unbound variables, bad rewrite arguments and
    duplicate names.
    """
    pats = [check_pattern(r, file) for r in parse_raw(text, file)]
    check_unique(pats)
    return pats


def load_patterns(paths: Iterable[Path | str]) -> list[Pattern]:
    """Load ``*.fuse`` files; a directory contributes its ``*.fuse`` files sorted by name.

    Pattern names must be unique across all files. Raises :class:`PatternError` (also when a path
    does not exist).
    """
    pats: list[Pattern] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files = sorted(path.glob("*.fuse"))
        elif path.is_file():
            files = [path]
        else:
            raise PatternError("no such pattern file or directory", str(path), 0, 0)
        for f in files:
            pats.extend(parse_patterns(f.read_text(encoding="utf-8"), str(f)))
    check_unique(pats)
    return pats


def default_patterns() -> list[Pattern]:
    """The shipped patterns (``patterns/*.fuse``, via :func:`fusec.resources.patterns_dir`)."""
    from ..resources import patterns_dir

    return load_patterns([patterns_dir()])
