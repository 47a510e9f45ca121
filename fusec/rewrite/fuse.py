"""FUSED nodes: a node that stands for a matched subgraph and keeps it as its decomposition."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import GraphError
from ..ir.builder import GraphBuilder
from ..ir.graph import Graph
from ..ir.ops import VIEW_OPS
from ..ir.shape import contiguous_nb
from ..ir.tensor import Tensor


def fused_inputs(sub: Graph) -> list[Tensor]:
    """Placeholders of a decomposition, ordered by ``params["fused_input"]`` (= src index)."""
    ph = [t for t in sub.nodes if t.is_leaf and "fused_input" in t.params]
    return sorted(ph, key=lambda t: t.params["fused_input"])


def fused_alias_input(sub: Graph) -> int | None:
    """The fused input whose memory a decomposition's result aliases, or ``None``.

    When the decomposition's output is an in-place op (SET_ROWS, CPY: the registry's inference sets
    ``view_of``) whose memory belongs to placeholder ``i`` (directly or through views), the FUSED
    node computing it writes into ``src[i]``'s memory, exactly as that op does, and its result is a
    view of that source. Any other output -- a value of its own, a pure view (it writes nothing), a
    write into a decomposition-internal value -- gives ``None``: the FUSED result is its own memory.
    """
    out = sub.outputs[0]
    root = out.root
    if out.is_view and out.op not in VIEW_OPS and root.is_leaf and "fused_input" in root.params:
        return int(root.params["fused_input"])
    return None


def make_fused_node(b: GraphBuilder, sub: Graph, srcs: Sequence[Tensor | None], params: dict[str, Any],
                    name: str) -> Tensor:
    """Create a ``FUSED`` node computing ``sub.outputs[0]`` from ``srcs``.

    A decomposition with several outputs (multi-output fusion) makes the node compute all of them:
    the node's own value is ``sub.outputs[0]``; output ``k >= 1`` is read through a ``FUSED_OUTPUT``
    node (``params["index"] = k``, see :func:`make_fused_outputs`) that has memory of its own, which
    the FUSED node's kernel writes. ``sub``'s leaves carry ``params["fused_input"] = i`` and stand
    for ``srcs[i]``; their dtype and ``ne`` must match. ``params`` must hold ``pattern`` (pattern
    name) and ``kernel`` (kernel family used by codegen). Raises :class:`GraphError`.

    Memory: the result is contiguous memory of its own, unless the decomposition writes into one of
    its inputs (:func:`fused_alias_input` gives ``i``, e.g. a KV-cache write ending in SET_ROWS):
    then the result aliases ``srcs[i]``'s memory as the decomposition's output aliases placeholder
    ``i`` (``view_src = srcs[i].root``, ``view_offs = srcs[i].view_offs`` plus the output's own
    offset, the output's ``nb``), so the buffer plan, the interpreter and every backend see the
    FUSED node write in place, as they see SET_ROWS/CPY.
    """
    where = repr(name)
    if not sub.outputs:
        raise GraphError("a decomposition must have at least one output", node=where, field="decomposition")
    if len({id(o) for o in sub.outputs}) != len(sub.outputs) or any(o.is_leaf for o in sub.outputs):
        raise GraphError("decomposition outputs must be distinct op nodes", node=where, field="decomposition")
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
    alias = fused_alias_input(sub)
    if alias is None:
        t = Tensor(b._id(), "FUSED", tuple(srcs), dict(params), root.dtype, root.ne,
                   contiguous_nb(root.ne, root.dtype.size), name, set(), decomposition=sub)
    else:
        dst = srcs[alias]
        assert dst is not None
        t = Tensor(b._id(), "FUSED", tuple(srcs), dict(params), root.dtype, root.ne, tuple(root.nb), name, set(),
                   view_src=dst.root, view_offs=dst.view_offs + root.view_offs, decomposition=sub)
    b.nodes.append(t)
    return t


def make_fused_outputs(b: GraphBuilder, fused: Tensor, names: Sequence[str]) -> list[Tensor]:
    """The ``FUSED_OUTPUT`` nodes of ``fused``'s extra outputs ``1..len(names)`` (named ``names``):
    each has the dtype/``ne``/``nb`` of ``decomposition.outputs[k]`` and memory of its own. Raises
    :class:`GraphError` when ``names`` does not have one name per extra output."""
    assert fused.decomposition is not None
    n = len(fused.decomposition.outputs) - 1
    if len(names) != n:
        raise GraphError(f"{len(names)} names for {n} extra outputs", node=repr(fused.name), field="decomposition")
    return [b.op("FUSED_OUTPUT", [fused], {"index": k}, name=nm) for k, nm in enumerate(names, start=1)]
