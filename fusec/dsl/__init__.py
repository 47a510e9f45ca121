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
    return _load(paths, display_dir=None)


SHIPPED_DISPLAY_DIR = "patterns"
"""Display folder of the shipped pattern files: their ``Pattern.file`` is ``patterns/<name>.fuse``
wherever :func:`fusec.resources.patterns_dir` finds them (source checkout or installed wheel)."""


def default_patterns() -> list[Pattern]:
    """The shipped patterns (``patterns/*.fuse``, read from :func:`fusec.resources.patterns_dir`).

    Their ``Pattern.file`` -- shown in error positions and FusionReport messages -- is the stable
    display path ``patterns/<name>.fuse``, not the absolute path they were read from.
    """
    from ..resources import patterns_dir

    return _load([patterns_dir()], display_dir=SHIPPED_DISPLAY_DIR)


def _load(paths: Iterable[Path | str], display_dir: str | None) -> list[Pattern]:
    """:func:`load_patterns`; with ``display_dir``, every file is named ``<display_dir>/<file name>``."""
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
            shown = str(f) if display_dir is None else f"{display_dir}/{f.name}"
            pats.extend(parse_patterns(f.read_text(encoding="utf-8"), shown))
    check_unique(pats)
    return pats
