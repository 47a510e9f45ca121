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
    """Topological order of ``nodes`` plus everything reachable from ``outputs``.

    Kahn's algorithm in waves: wave 0 holds the nodes without sources, wave k+1 the nodes whose last
    source became ready in wave k; each wave is sorted by ``Tensor.id``, so the order is
    deterministic (the order ``graphlib.TopologicalSorter`` gives when its ready batches are sorted by
    id, which is the reference implementation :func:`_topo_sort_graphlib` and still used when ids
    repeat). Linear in the graph size apart from the sorts of the waves. Raises :class:`GraphError`
    on a cycle, naming a node on it.
    """
    seen: dict[int, Tensor] = {}
    stack = [*nodes, *outputs]
    pop, push = stack.pop, stack.append
    while stack:
        t = pop()
        if id(t) in seen:
            continue
        seen[id(t)] = t
        for s in t.src:
            if s is not None:
                push(s)
        if t.view_src is not None:
            push(t.view_src)
    indeg: dict[int, int] = {}
    succ: dict[int, list[Tensor]] = {}
    wave: list[Tensor] = []
    ids: set[int] = set()
    for k, t in seen.items():
        ids.add(t.id)
        n = 0
        for s in t.src:
            if s is not None:
                n += 1
                ks = id(s)
                if ks in succ:
                    succ[ks].append(t)
                else:
                    succ[ks] = [t]
        indeg[k] = n
        if n == 0:
            wave.append(t)
    if len(ids) != len(seen):  # ties between equal ids: graphlib's own order
        return _topo_sort_graphlib(seen)
    order: list[Tensor] = []
    while wave:
        wave.sort(key=_by_id)
        order.extend(wave)
        nxt: list[Tensor] = []
        for t in wave:
            for u in succ.get(id(t), ()):
                ku = id(u)
                indeg[ku] -= 1
                if indeg[ku] == 0:
                    nxt.append(u)
        wave = nxt
    if len(order) != len(seen):  # a cycle: let graphlib find and name it
        return _topo_sort_graphlib(seen)
    return order


def _by_id(t: Tensor) -> int:
    return t.id


def _topo_sort_graphlib(seen: dict[int, Tensor]) -> list[Tensor]:
    """The reference order (``graphlib``, ready batches sorted by id) of the nodes in ``seen``."""
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
