"""Copy tensors and graphs node by node through a :class:`GraphBuilder`, re-running shape
inference (so every copy is checked against the registry, exactly as a freshly built graph)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

from ..errors import GraphError
from ..ir.builder import GraphBuilder
from ..ir.graph import Graph
from ..ir.tensor import Tensor
from .fuse import make_fused_node

_ATOMS = frozenset({str, int, float, bool, type(None)})


def copy_params(v):
    """A deep copy of op params (JSON-like: dicts, lists, tuples, scalars); the same result as
    ``copy.deepcopy`` without its memo bookkeeping (falls back to it for any other type)."""
    t = type(v)
    if t in _ATOMS:
        return v
    if t is dict:
        return {k: copy_params(x) for k, x in v.items()}
    if t is list:
        return [copy_params(x) for x in v]
    if t is tuple:
        return tuple(copy_params(x) for x in v)
    return copy.deepcopy(v)


def copy_tensor(b: GraphBuilder, t: Tensor, srcs: Sequence[Tensor | None], flags: bool = True) -> Tensor:
    """A copy of ``t`` in ``b`` with sources ``srcs`` (already in ``b``): same op, params (deep
    copied), name, dtype, ``ne``/``nb`` (leaves keep their strides; ops get them from inference),
    and, when ``flags``, the same flags. FUSED nodes get a cloned decomposition. Raises
    :class:`GraphError` when inference disagrees with the original layout."""
    if t.is_leaf:
        c = b.leaf(t.name, t.dtype, t.ne, sorted(t.flags) if flags else ())
        c.nb = tuple(t.nb)
        c.params = copy_params(t.params)
        return c
    if t.op == "FUSED":
        assert t.decomposition is not None
        c = make_fused_node(b, clone_graph(t.decomposition), list(srcs), copy_params(t.params), t.name)
    else:
        c = b.op(t.op, list(srcs), copy_params(t.params), name=t.name)
    if (c.dtype, c.ne, c.nb) != (t.dtype, t.ne, t.nb):
        raise GraphError(f"copy has {c.dtype} ne={list(c.ne)} nb={list(c.nb)}, original {t.dtype} ne={list(t.ne)} "
                         f"nb={list(t.nb)}", node=repr(t.name), field="ne")
    if flags:
        c.flags |= t.flags
    return c


def clone_graph(g: Graph) -> Graph:
    """A deep copy of ``g``: new tensors (ids renumbered in ``g``'s topological order, so the copy
    has the same order), same names, params, flags and outputs; decompositions cloned too."""
    b = GraphBuilder()
    mapping: dict[int, Tensor] = {}
    for t in g.nodes:
        mapping[id(t)] = copy_tensor(b, t, [None if s is None else mapping[id(s)] for s in t.src])
    return b.build([mapping[id(o)] for o in g.outputs])
