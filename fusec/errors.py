"""Error types. Every ``FusecError`` is a *user* error: the CLI prints its message on one line
and exits with status 2, without a traceback."""

from __future__ import annotations


class FusecError(Exception):
    """Base class of the errors a user can act on (bad graph, bad pattern, unsupported op...)."""


class GraphError(FusecError):
    """A malformed graph or an invalid op application. The message names the node and the field."""

    def __init__(self, message: str, node: str | None = None, field: str | None = None):
        self.node = node
        self.field = field
        self.message = message
        where = ""
        if node is not None:
            where = f"node {node}"
            if field is not None:
                where += f", field '{field}'"
            where += ": "
        super().__init__(where + message)


class PatternError(FusecError):
    """A malformed pattern file: ``file:line:col: message``."""

    def __init__(self, message: str, file: str = "<string>", line: int = 0, column: int = 0):
        self.file, self.line, self.column, self.msg = file, line, column, message
        super().__init__(f"{file}:{line}:{column}: {message}")


class CodegenError(FusecError):
    """A node that no kernel template can render."""


class BackendError(FusecError):
    """A backend that cannot run a node (no kernel for an op, backend not available...)."""
