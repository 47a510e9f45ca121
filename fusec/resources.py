"""Locate the shipped ``templates/`` and ``patterns/`` folders.

From an installed wheel they live in ``fusec/_data/``; from a source checkout they are the
top-level ``templates/`` and ``patterns/`` folders next to ``fusec/``.
"""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    for cand in (_PKG / "_data" / name, _PKG.parent / name):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(f"fusec: cannot find the shipped '{name}/' folder (looked in {_PKG})")


def templates_dir() -> Path:
    """The folder holding ``wgsl/``, ``cuda/`` and ``msl/`` kernel templates."""
    return _find("templates")


def patterns_dir() -> Path:
    """The folder holding the shipped ``*.fuse`` pattern files."""
    return _find("patterns")
