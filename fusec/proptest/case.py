"""One generated example (:class:`Case`) and how it becomes a graph and input values.

A case is plain data -- leaf dtypes and shapes, op params, swapped operands, the near-miss
mutation and a value seed -- so that Hypothesis can shrink it and the report can print it.
:func:`realize` rebuilds the graph from it with :class:`fusec.ir.GraphBuilder` (shape inference
included), deterministically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..dsl.ast import Absent, LeafVar, Pattern, PNode
from ..ir.builder import GraphBuilder
from ..ir.dtypes import DType
from ..ir.graph import Graph
from ..ir.tensor import Tensor

POSITIVE = "positive"
EXTRA_USER = "extra_user"
INTERIOR_OUTPUT = "interior_output"
DTYPE = "dtype"
BROADCAST_SWAP = "broadcast_swap"
NEAR_MISS_KINDS = (EXTRA_USER, INTERIOR_OUTPUT, DTYPE, BROADCAST_SWAP)


@dataclass(frozen=True)
class LeafSpec:
    """A leaf of the generated graph: dtype and ``ne`` (ggml order, 4 entries)."""

    dtype: DType
    ne: tuple[int, int, int, int]

    def __str__(self) -> str:
        return f"{self.dtype} ne={list(self.ne)}"


@dataclass
class Case:
    """A generated example for one pattern.

    Attributes:
        pattern: pattern name.
        leaves: leaf name -> :class:`LeafSpec`, in creation order; pattern leaf variables keep their
            names, ``_`` wildcards are named ``_<node>_<arg>``.
        absent: wildcard names whose optional source is left absent.
        params: pattern node index -> op params passed to ``GraphBuilder.op``.
        swaps: pattern node indices whose (commutative) operands 0 and 1 are swapped in the graph.
        variant: :data:`POSITIVE` or one of :data:`NEAR_MISS_KINDS`.
        target: what the near miss breaks (interior variable, or where-clause text).
        value_seed: seed of the normal(0, 1) input values.
        out_uses: for a multi-output pattern, declared output variable -> how the graph uses it
            outside the match: ``"user"`` (a SCALE node ``<var>_user`` that is a graph output),
            ``"output"`` (the value itself is a graph output), ``"both"`` or ``"none"``.
    """

    pattern: str
    leaves: dict[str, LeafSpec]
    params: dict[int, dict[str, Any]]
    swaps: frozenset[int] = frozenset()
    absent: frozenset[str] = frozenset()
    variant: str = POSITIVE
    target: str | None = None
    value_seed: int = 0
    notes: list[str] = field(default_factory=list)
    out_uses: dict[str, str] = field(default_factory=dict)

    @property
    def has_f16(self) -> bool:
        return any(s.dtype == DType.F16 for s in self.leaves.values())

    def describe(self, p: Pattern) -> list[str]:
        """Human-readable lines: leaves (dtype, ne in ggml order), op params, swaps, variant, seed."""
        lines = ["leaves: " + ", ".join(f"{n} {s}" for n, s in self.leaves.items())]
        for i, prm in sorted(self.params.items()):
            if prm:
                pn = p.nodes[i]
                shown = ", ".join(f"{k}={v!r}" for k, v in prm.items())
                lines.append(f"params of {node_name(p, pn)} = {pn.op}: {shown}")
        if self.swaps:
            lines.append("operands 0/1 swapped at: " + ", ".join(node_name(p, p.nodes[i]) for i in sorted(self.swaps)))
        if self.absent:
            lines.append("absent optional sources: " + ", ".join(sorted(self.absent)))
        if self.out_uses:
            lines.append("declared outputs used outside the match: "
                         + ", ".join(f"{v}: {u}" for v, u in self.out_uses.items()))
        lines.append(f"variant: {self.variant}" + (f" ({self.target})" if self.target else ""))
        lines.append(f"input values: normal(0, 1), value seed {self.value_seed}")
        return lines + list(self.notes)


def node_name(p: Pattern, pn: PNode) -> str:
    """Graph name of pattern node ``pn``: its variable, else ``<op>_<index>``."""
    return pn.var if pn.var is not None else f"{pn.op.lower()}_{pn.index}"


def wildcard_name(pn: PNode, pos: int) -> str:
    return f"_{pn.index}_{pos}"


@dataclass
class Realized:
    """A graph built from a case: the graph, its root tensor and every named tensor."""

    graph: Graph
    root: Tensor
    tensors: dict[str, Tensor]


def arg_tensors(p: Pattern, pn: PNode, case: Case, b: GraphBuilder, tensors: dict[str, Tensor]) -> list[Tensor | None]:
    """Sources of ``pn`` in pattern order, creating leaves on first use (flag ``input`` for the
    main leaf -- the first of ``case.leaves`` -- and ``weight`` for the others)."""
    main = next(iter(case.leaves), None)
    out: list[Tensor | None] = []
    for pos, a in enumerate(pn.args):
        if isinstance(a, PNode):
            out.append(tensors[node_name(p, a)])
        elif isinstance(a, Absent):
            out.append(None)
        else:
            name = a.name if isinstance(a, LeafVar) else wildcard_name(pn, pos)
            if name in case.absent:
                out.append(None)
                continue
            if name not in tensors:
                spec = case.leaves[name]
                tensors[name] = b.leaf(name, spec.dtype, spec.ne, ("input",) if name == main else ("weight",))
            out.append(tensors[name])
    return out


def realize(p: Pattern, case: Case, upto: int | None = None) -> Realized:
    """Build the graph of ``case`` (only pattern nodes ``0..upto`` when ``upto`` is given; their last
    one is then the root and no near-miss mutation is applied). Raises
    :class:`fusec.errors.GraphError` when the registry refuses it (impossible shapes or dtypes)."""
    b = GraphBuilder()
    tensors: dict[str, Tensor] = {}
    t: Tensor | None = None
    for pn in p.nodes[: None if upto is None else upto + 1]:
        srcs = arg_tensors(p, pn, case, b, tensors)
        if pn.index in case.swaps:
            srcs[0], srcs[1] = srcs[1], srcs[0]
        t = b.op(pn.op, srcs, case.params.get(pn.index, {}), name=node_name(p, pn))
        tensors[node_name(p, pn)] = t
    assert t is not None
    outputs = [t]
    if upto is None:
        for var, use in case.out_uses.items():  # multi-output: outside uses of the declared outputs
            if use in ("user", "both"):
                outputs.append(b.scale(tensors[var], 2.0, name=f"{var}_user"))
            if use in ("output", "both"):
                outputs.append(tensors[var])
    if upto is None and case.variant == EXTRA_USER:
        outputs.append(b.scale(tensors[case.target], 2.0, name="extra_user"))  # type: ignore[index]
    elif upto is None and case.variant == INTERIOR_OUTPUT:
        outputs.append(tensors[case.target])  # type: ignore[index]
    return Realized(b.build(outputs), t, tensors)


def values(case: Case) -> dict[str, np.ndarray]:
    """Input values: normal(0, 1) for float leaves (numpy shape ``ne[::-1]``, the leaf's dtype),
    integers in ``[0, min float ne[1])`` for i32 leaves (valid row indices)."""
    rng = np.random.default_rng(case.value_seed)
    rows = [s.ne[1] for s in case.leaves.values() if s.dtype.is_float] or [1]
    out: dict[str, np.ndarray] = {}
    for name, s in case.leaves.items():
        shape = s.ne[::-1]
        if s.dtype.is_float:
            out[name] = rng.standard_normal(shape, dtype=np.float32).astype(s.dtype.np)
        else:
            out[name] = rng.integers(0, max(1, min(rows)), size=shape, dtype=np.int32)
    return out
