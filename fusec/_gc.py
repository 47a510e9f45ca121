"""Pausing Python's cyclic garbage collector around allocation-heavy host work (rewrite, codegen).

A rewrite allocates tens of thousands of short-lived container objects (match states, tensors,
param dicts), almost all freed by reference counting; they still trigger many young-generation
collections and, in a process's first rewrite, often a full collection that walks every object
the process holds (Lark tables, templates, the graph). Both grow with the graph and the heap, not
with the work. :func:`paused` turns the collector off for the duration (as ``timeit`` does) and
restores the previous state; objects that survive are collected normally afterwards. Nested uses
are fine; a caller that disabled the collector keeps it disabled.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
