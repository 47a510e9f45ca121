"""The interpreter's user error."""

from __future__ import annotations

from ..errors import GraphError


class InterpError(GraphError):
    """A graph that cannot be evaluated with the values given: a leaf without a value, a value of
    the wrong size or kind, an out-of-range row index, an op the interpreter does not know.

    The message names the tensor (``node``) and, where useful, the field (``values``, ``src``...).
    """
