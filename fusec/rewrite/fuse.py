"""FUSED nodes: a node that stands for a matched subgraph and keeps it as its decomposition."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import GraphError
from ..ir.builder import GraphBuilder
from ..ir.graph import Graph
from ..ir.shape import contiguous_nb
from ..ir.tensor import Tensor


def fused_inputs(sub: Graph) -> list[Tensor]:
    """Placeholders of a decomposition, ordered by ``params["fused_input"]`` (= src index)."""
    ph = [t for t in sub.nodes if t.is_leaf and "fused_input" in t.params]
    return sorted(ph, key=lambda t: t.params["fused_input"])


def make_fused_node(b: GraphBuilder, sub: Graph, srcs: Sequence[Tensor | None], params: dict[str, Any],
                    name: str) -> Tensor:
    """Create a ``FUSED`` node computing ``sub.outputs[0]`` from ``srcs``.

    ``sub``'s leaves carry ``params["fused_input"] = i`` and stand for ``srcs[i]``; their dtype and
    ``ne`` must match. ``params`` must hold ``pattern`` (pattern name) and ``kernel`` (kernel family
    used by codegen). The result is contiguous memory of its own. Raises :class:`GraphError`.
    """
    where = repr(name)
    if len(sub.outputs) != 1:
        raise GraphError("a decomposition must have exactly one output", node=where, field="decomposition")
    ph = fused_inputs(sub)
    if [p.params["fused_input"] for p in ph] != list(range(len(srcs))):
        raise GraphError(f"decomposition placeholders {[p.params['fused_input'] for p in ph]} do not match "
                         f"{len(srcs)} sources", node=where, field="decomposition")
    for p, s in zip(ph, srcs, strict=True):
        if s is None or p.dtype != s.dtype or p.ne != s.ne:
            raise GraphError(f"source {p.params['fused_input']} does not match its placeholder {p!r}",
                             node=where, field="src")
    for k in ("pattern", "kernel"):
        if not isinstance(params.get(k), str):
            raise GraphError(f"FUSED params need a string '{k}'", node=where, field="params")
    root = sub.outputs[0]
    t = Tensor(b._id(), "FUSED", tuple(srcs), dict(params), root.dtype, root.ne,
               contiguous_nb(root.ne, root.dtype.size), name, set(), decomposition=sub)
    b.nodes.append(t)
    return t
