"""AST of the pattern language (``patterns/*.fuse``), produced by :mod:`fusec.dsl.parser` and
validated/resolved by :mod:`fusec.dsl.checker`.

Two layers:

* the *match* side is a DAG of :class:`PNode` (one per op occurrence) whose arguments are
  :class:`PNode`, :class:`LeafVar`, :class:`Wildcard` (``_``) or :class:`Absent` (``none``);
* the *where* side is an expression tree (:class:`Expr` subclasses), one :class:`WhereClause` per
  line of the ``where`` block.

Every node carries ``line``/``column`` (1-based) of its first token in ``file``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..ir.dtypes import DType


@dataclass(frozen=True)
class Pos:
    """A source position: ``file:line:col`` (1-based)."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


# ---------------------------------------------------------------------------------------------
# match side


@dataclass(eq=False)
class LeafVar:
    """A variable only used as an argument: binds any tensor (never an absent source)."""

    name: str
    pos: Pos


@dataclass(eq=False)
class Wildcard:
    """``_``: matches any source, present or absent."""

    pos: Pos


@dataclass(eq=False)
class Absent:
    """``none``: the optional source must be absent (``None``)."""

    pos: Pos


@dataclass(frozen=True)
class Capture:
    """``$name`` in an op-parameter block: binds the parameter's value."""

    name: str


@dataclass(eq=False)
class PNode:
    """One op occurrence of the match.

    Attributes:
        index: position in :attr:`Pattern.nodes` (sources before users; the root is last).
        op: registry op name (``fusec.ir.ops.REGISTRY``).
        args: sources in ggml order; trailing optional sources that are not written must be absent.
        params: op parameter -> literal value (must be equal) or :class:`Capture`.
        var: the variable assigned to this node (``None`` for a nested call).
        pos: position of the op name.
    """

    index: int
    op: str
    args: list[PArg]
    params: dict[str, Any]
    var: str | None
    pos: Pos


PArg = PNode | LeafVar | Wildcard | Absent


# ---------------------------------------------------------------------------------------------
# where side


@dataclass(eq=False)
class Expr:
    pos: Pos


@dataclass(eq=False)
class Num(Expr):
    value: int | float


@dataclass(eq=False)
class Str(Expr):
    value: str


@dataclass(eq=False)
class DTypeLit(Expr):
    """A dtype name (``f32``, ``f16``, ``i32``) used as a value."""

    value: DType


@dataclass(eq=False)
class VarRef(Expr):
    """A match variable (leaf or interior): evaluates to the bound ``Tensor``."""

    name: str


@dataclass(eq=False)
class CaptureRef(Expr):
    """``$name``: the value captured from an op parameter."""

    name: str


@dataclass(eq=False)
class Call(Expr):
    """A predicate call: built-in (``dtype``, ``ne``...) or registered with ``@fusec.dsl.predicate``."""

    fn: str
    args: list[Expr]


@dataclass(eq=False)
class ListExpr(Expr):
    items: list[Expr]


@dataclass(eq=False)
class Unary(Expr):
    """``not`` or unary ``-``."""

    op: str
    operand: Expr


@dataclass(eq=False)
class Binary(Expr):
    """Arithmetic ``+ - * / %``, comparisons ``== != < <= > >=``, ``in``/``not in``, ``and``/``or``."""

    op: str
    left: Expr
    right: Expr


@dataclass(eq=False)
class WhereClause:
    """One line of the ``where`` block: ``expr`` must be true; ``text`` is its source text."""

    expr: Expr
    text: str
    pos: Pos

    @property
    def line(self) -> int:
        return self.pos.line


# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Pattern:
    """A checked pattern, ready for the matcher.

    Attributes:
        name: unique pattern name.
        file, line, column: where ``pattern <name>`` is written.
        nodes: the op occurrences, sources before users; ``nodes[-1]`` is the root.
        root_op: op of the root (candidates are nodes with this op).
        ops: op names of ``nodes`` in the same order.
        leaf_vars: names of the leaf variables, in first-use order.
        vars: every variable name -> its :class:`PNode` or :class:`LeafVar`.
        captures: capture names (without ``$``), in first-use order.
        where: the ``where`` clauses, in source order (each with its line).
        fused_op: name of the fused op (``RMS_NORM_MUL``); stored in FUSED params.
        kernel: kernel family used by codegen (``norm_epilogue``).
        leaves: the rewrite arguments (leaf variable names), in order: they become the FUSED
            node's sources ``src[0..]`` (for ``rewrite op``: the new op's sources).
        benefit: priority when matches overlap (higher wins); defaults to ``len(nodes) - len(outputs)``
            (a declared extra output is still written to memory, so it saves less than a fused interior).
    """

    name: str
    file: str
    line: int
    column: int
    nodes: list[PNode]
    vars: dict[str, PNode | LeafVar]
    leaf_vars: list[str]
    captures: list[str]
    where: list[WhereClause]
    fused_op: str
    kernel: str
    leaves: list[str]
    benefit: int | float
    rewrite_pos: Pos = field(default=Pos("<string>", 0, 0))
    rewrite_kind: str = "fused"
    """``"fused"`` (``rewrite F(...) kernel k``: the root becomes a FUSED node) or ``"op"``
    (``rewrite op OP(...) { params }``: the root becomes a plain registry op ``fused_op`` taking the
    rewrite arguments as sources; ``kernel`` is then that op's default kernel family, for display)."""
    rewrite_params: dict[str, Any] = field(default_factory=dict)
    """Op rewrites: parameter name -> literal value or :class:`Capture` (resolved per match)."""
    outputs: list[str] = field(default_factory=list)
    """Multi-output fusion (``rewrite F(...) kernel k outputs(v, ...)``): interior variables whose
    values are also outputs of the fused node, in order (output ``1 + i``; the root is output 0).
    They may be used outside the match and be graph outputs; every other interior value may not."""

    @property
    def root(self) -> PNode:
        return self.nodes[-1]

    @property
    def root_op(self) -> str:
        return self.nodes[-1].op

    @property
    def ops(self) -> list[str]:
        return [n.op for n in self.nodes]

    @property
    def location(self) -> str:
        return f"{self.file}:{self.line}"

    def __repr__(self) -> str:
        return f"<Pattern {self.name} {'->'.join(self.ops)} at {self.location}>"
