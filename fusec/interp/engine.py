"""Graph evaluation: bind leaves, run nodes in topological order over ggml-style memory."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..ir.graph import Graph
from ..ir.ops import VIEW_OPS
from ..ir.tensor import Tensor
from ..rewrite.fuse import fused_inputs
from .errors import InterpError
from .kernels import COMPUTE, WRITE
from .memory import Memory, bind_root, coerce_value

INPLACE_OPS = frozenset(WRITE)
"""Ops whose result aliases their destination and which write into it (SET_ROWS, CPY). A FUSED node
whose decomposition ends in one of them writes in place too (``fusec.rewrite.fuse.fused_alias_input``)."""


def writes_in_place(t: Tensor) -> bool:
    """``t`` executes and its result aliases another tensor's memory: SET_ROWS/CPY, or a FUSED node
    whose decomposition writes into one of its sources (pure views execute nothing)."""
    return t.is_view and not t.is_leaf and t.op not in VIEW_OPS


def _written_roots(graph: Graph) -> set[Tensor]:
    """Roots whose memory some node of ``graph`` overwrites in place."""
    return {t.root for t in graph.nodes if writes_in_place(t)}


def _run_node(mem: Memory, node: Tensor) -> None:
    """Execute one non-leaf node: a view needs nothing (its window is its value), an in-place op
    writes into its destination's window, any other op computes into fresh memory of its own. A
    multi-output FUSED node keeps its extra outputs in ``mem.extra`` until their ``FUSED_OUTPUT``
    nodes store them."""
    if node.op in VIEW_OPS:
        return
    if node.op == "FUSED_OUTPUT":
        key = (id(node.src[0]), int(node.params["index"]))
        if key not in mem.extra:
            raise InterpError(f"output {key[1]} of FUSED node {node.src[0].name!r} read before the node ran",
                              node=repr(node.name), field="src")
        mem.allocate(node)
        mem.store(node, mem.extra[key])
        return
    srcs = [None if s is None else mem.window(s) for s in node.src]
    if node.op in WRITE:
        WRITE[node.op](node, srcs, mem.window(node))
        return
    if node.op == "FUSED":
        values = _fused(node, srcs)
        value = values[0]
        for k, v in enumerate(values[1:], start=1):
            mem.extra[(id(node), k)] = v
        if node.is_view:  # it writes into a source's memory: its window there is its value
            mem.store(node, value)
            return
    elif node.op in COMPUTE:
        value = COMPUTE[node.op](node, srcs)
    else:
        raise InterpError(f"the interpreter has no kernel for op {node.op}", node=repr(node.name), field="op")
    if node.is_view:
        raise InterpError(f"{node.op} result cannot alias another tensor's memory", node=repr(node.name))
    mem.allocate(node)
    mem.store(node, value)


def _fused(node: Tensor, srcs: Sequence[np.ndarray | None]) -> list[np.ndarray]:
    """A FUSED node's values, one per decomposition output (the node's own value first, then its
    extra outputs): its decomposition evaluated with placeholder ``i`` bound to ``srcs[i]``
    (recursively for FUSED nodes inside). Placeholders alias the source memory unless the
    decomposition writes in place, in which case they are bound to copies, so that writes inside a
    FUSED node never leak out of it. A FUSED node that writes into a source (its decomposition's
    output aliases placeholder ``i``: SET_ROWS into a KV cache) gets the whole destination window
    after the writes as its value; :func:`_run_node` stores it into the node's own window, which
    aliases that source's memory -- the same bytes the unfused SET_ROWS would have left there."""
    sub = node.decomposition
    if sub is None or not sub.outputs:
        raise InterpError("FUSED node without a decomposition output", node=repr(node.name),
                          field="decomposition")
    placeholders = fused_inputs(sub)
    if len(placeholders) != len(srcs):
        raise InterpError(f"decomposition has {len(placeholders)} placeholders for {len(srcs)} sources",
                          node=repr(node.name), field="decomposition")
    alias = not _written_roots(sub)
    bindings = {p: v for p, v in zip(placeholders, srcs, strict=True)}
    res = _execute(sub, bindings, keep=list(sub.outputs), alias=alias)
    return [res[o] for o in sub.outputs]


def _execute(graph: Graph, bindings: Mapping[Tensor, object], keep: Sequence[Tensor] | None,
             alias: bool) -> dict[Tensor, np.ndarray]:
    """Run ``graph`` with leaves bound by ``bindings`` (leaf -> value); return copies of the values
    of ``keep`` (every node when ``None``), each taken as the node was evaluated."""
    mem = Memory()
    wanted = list(graph.nodes) if keep is None else list(keep)
    wanted_ids = {id(t) for t in wanted}
    written = _written_roots(graph)
    snap: dict[Tensor, np.ndarray] = {}
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        for t in graph.nodes:
            if t.is_leaf:
                if t not in bindings:
                    raise InterpError("no value given for this leaf", node=repr(t.name), field="values")
                if t.is_view:
                    raise InterpError("a leaf cannot be a view", node=repr(t.name))
                bind_root(mem, t, bindings[t], alias=alias)
            else:
                _run_node(mem, t)
            if id(t) in wanted_ids and t.root in written:
                snap[t] = mem.window(t).copy()  # later in-place writes must not change it
        for t in wanted:
            if t not in snap:
                snap[t] = mem.window(t).copy()
    return snap


def evaluate(graph: Graph, values: Mapping[str, np.ndarray]) -> dict[Tensor, np.ndarray]:
    """Evaluate every node of ``graph`` with ggml's semantics; the numpy reference interpreter.

    Args:
        graph: the graph; nodes run in ``graph.nodes`` (topological) order.
        values: one array per leaf (op ``NONE``: inputs and weights), keyed by ``Tensor.name``;
            any shape with ``size == nelements`` (reshaped to ``ne[::-1]``), any numeric dtype
            (converted to the leaf's; float values for an i32 leaf are refused). A writeable
            C-contiguous array of exactly the leaf's dtype *is* the leaf's memory (no copy):
            SET_ROWS/CPY into that leaf (a KV cache) update the caller's array in place. Names that
            match no leaf are ignored.

    Returns:
        ``{tensor: array}`` for every node (keyed by the :class:`Tensor` object), each a fresh copy
        of shape ``ne[::-1]`` (4-D) and the tensor's dtype, holding the value the node had when it
        was evaluated (a leaf later overwritten by SET_ROWS keeps its bound value here).

    Raises:
        InterpError (a :class:`fusec.errors.FusecError`): a leaf without a value (naming it), a
            value of the wrong size or kind, an out-of-range row index, an op without a kernel.

    Arithmetic: float32 for f32 and f16 tensors (f16 results rounded to f16 when stored), row
    reductions accumulated in float64; see :mod:`fusec.interp.kernels`.
    """
    return _execute(graph, _bind_by_name(graph, values), keep=None, alias=True)


def interpret(graph: Graph, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Evaluate ``graph`` (see :func:`evaluate`) and return its outputs by ``Tensor.name``: fresh
    arrays of shape ``ne[::-1]`` (4-D) in each output's dtype. Raises ``InterpError`` as
    :func:`evaluate` does."""
    res = _execute(graph, _bind_by_name(graph, values), keep=graph.outputs, alias=True)
    return {t.name: res[t] for t in graph.outputs}


def _bind_by_name(graph: Graph, values: Mapping[str, np.ndarray]) -> dict[Tensor, object]:
    return {t: values[t.name] for t in graph.leaves if t.name in values}


def eval_node(node: Tensor, srcs: Sequence[np.ndarray | None]) -> np.ndarray:
    """Evaluate one op from the values of its sources (for kernel tests).

    Args:
        node: a non-leaf node (any registry op, FUSED included).
        srcs: one value per ``node.src`` slot (``None`` for an absent optional source), each with
            ``size == src.nelements`` (reshaped to ``src.ne[::-1]``, converted to the source's
            dtype). For in-place ops the destination's value (``src[2]`` of SET_ROWS, ``src[1]``
            of CPY) is the memory written into.

    Returns:
        A fresh array of shape ``node.ne[::-1]`` and ``node.dtype``.

    Each source value is laid out in a scratch buffer of its root's size at the source's own
    offset and strides (the rest zero), so views (VIEW offsets, PERMUTE strides...) address it
    as they would in the graph; bytes of the root outside the given sources read as zero.

    Raises:
        InterpError: ``node`` is a leaf, the number of values does not match ``node.src``, a value
            is missing for a present source or has the wrong size, or the op fails (see
            :func:`evaluate`).
    """
    if node.is_leaf:
        raise InterpError("a leaf has no op to evaluate; bind it in `values` instead", node=repr(node.name))
    if len(srcs) != len(node.src):
        raise InterpError(f"{len(srcs)} source values for {len(node.src)} sources", node=repr(node.name),
                          field="src")
    mem = Memory()
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        for i, (s, v) in enumerate(zip(node.src, srcs, strict=True)):
            if s is None:
                continue
            if v is None:
                raise InterpError(f"no value for src[{i}] ({s.name!r})", node=repr(node.name), field="src")
            if not mem.has(s.root):
                mem.allocate(s.root)
            mem.store(s, coerce_value(s, v, f"src[{i}]"))
        _run_node(mem, node)
        return mem.window(node).copy()

