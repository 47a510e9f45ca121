"""The computation graph: tensors in topological order, outputs, use counts."""

from __future__ import annotations

import graphlib
from collections.abc import Iterable, Iterator

from ..errors import GraphError
from .tensor import Tensor


class Graph:
    """A DAG of :class:`Tensor` nodes.

    ``nodes`` is kept in a topological order (every source before its users; ties broken by id,
    so the order is deterministic). ``outputs`` are the tensors whose values leave the graph;
    they are also flagged ``"output"``.
    """

    def __init__(self, nodes: Iterable[Tensor], outputs: Iterable[Tensor]):
        self.outputs: list[Tensor] = list(outputs)
        for t in self.outputs:
            t.flags.add("output")
        self.nodes: list[Tensor] = topo_sort(list(nodes), self.outputs)

    # -- queries -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def inputs(self) -> list[Tensor]:
        return [t for t in self.nodes if t.is_leaf and "weight" not in t.flags]

    @property
    def leaves(self) -> list[Tensor]:
        return [t for t in self.nodes if t.is_leaf]

    @property
    def ops(self) -> list[Tensor]:
        """Non-leaf nodes in topological order."""
        return [t for t in self.nodes if not t.is_leaf]

    def users(self) -> dict[int, list[Tensor]]:
        """Map ``id(tensor)`` -> list of nodes that use it as a source (once per source slot)."""
        out: dict[int, list[Tensor]] = {id(t): [] for t in self.nodes}
        for t in self.nodes:
            for s in t.src:
                if s is not None:
                    out.setdefault(id(s), []).append(t)
        return out

    def use_counts(self) -> dict[int, int]:
        """Map ``id(tensor)`` -> number of source slots referring to it (graph outputs not counted)."""
        return {k: len(v) for k, v in self.users().items()}

    def by_name(self, name: str) -> Tensor:
        for t in self.nodes:
            if t.name == name:
                return t
        raise KeyError(name)

    def by_op(self) -> dict[str, list[Tensor]]:
        """Index of nodes by op name (topological order inside each list)."""
        idx: dict[str, list[Tensor]] = {}
        for t in self.nodes:
            idx.setdefault(t.op, []).append(t)
        return idx

    def __repr__(self) -> str:
        return f"<Graph {len(self.nodes)} nodes, {len(self.ops)} ops, {len(self.outputs)} outputs>"


def topo_sort(nodes: list[Tensor], outputs: list[Tensor]) -> list[Tensor]:
    """Topological order of ``nodes`` plus everything reachable from ``outputs`` (``graphlib``).

    Ties are broken by ``Tensor.id`` so the order is deterministic. Raises :class:`GraphError` on a
    cycle, naming a node on it.
    """
    seen: dict[int, Tensor] = {}
    stack = list(nodes) + list(outputs)
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen[id(t)] = t
        stack.extend(s for s in t.src if s is not None)
        if t.view_src is not None:
            stack.append(t.view_src)
    ts: graphlib.TopologicalSorter = graphlib.TopologicalSorter()
    for t in seen.values():
        deps = [id(s) for s in t.src if s is not None]
        ts.add(id(t), *deps)
    try:
        ts.prepare()
    except graphlib.CycleError as e:
        cyc = e.args[1]
        raise GraphError("graph has a cycle", node=repr(seen[cyc[0]].name)) from None
    order: list[Tensor] = []
    while ts.is_active():
        ready = sorted((seen[i] for i in ts.get_ready()), key=lambda t: t.id)
        for t in ready:
            order.append(t)
            ts.done(id(t))
    return order
