"""Versioned JSON (de)serialization of graphs. The schema is documented in ``docs/graph-json.md``.

Top level::

    {"format": "fusec-graph", "version": 1, "nodes": [NODE, ...], "outputs": [ID, ...]}

NODE::

    {"id": int, "name": str, "op": str, "dtype": "f32"|"f16"|"i32",
     "ne": [4 ints, ggml order], "nb": [4 ints, bytes; optional for leaves -> contiguous],
     "src": [ID or null, ...], "params": {...}, "flags": ["input"|"output"|"weight", ...],
     "decomposition": GRAPH (FUSED nodes only; leaves carry params.fused_input = src index)}

Loading re-runs shape inference for every op node from its sources and params, and checks the
stored ``ne``/``dtype`` against it, so a JSON file cannot describe an impossible graph. Errors are
:class:`GraphError` naming the node (``id`` and name) and the field.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import GraphError
from .builder import GraphBuilder
from .dtypes import DType
from .graph import Graph
from .ops import REGISTRY
from .shape import norm_ne
from .tensor import FLAGS, Tensor

FORMAT = "fusec-graph"
VERSION = 1


def graph_to_dict(g: Graph) -> dict[str, Any]:
    ids = {id(t): i for i, t in enumerate(g.nodes)}
    nodes = []
    for t in g.nodes:
        d: dict[str, Any] = {
            "id": ids[id(t)], "name": t.name, "op": t.op, "dtype": t.dtype.value,
            "ne": list(t.ne), "nb": list(t.nb),
            "src": [ids[id(s)] if s is not None else None for s in t.src],
            "params": t.params, "flags": sorted(t.flags),
        }
        if t.decomposition is not None:
            d["decomposition"] = graph_to_dict(t.decomposition)
        nodes.append(d)
    return {"format": FORMAT, "version": VERSION, "nodes": nodes, "outputs": [ids[id(t)] for t in g.outputs]}


def dumps(g: Graph, indent: int | None = 1) -> str:
    return json.dumps(graph_to_dict(g), indent=indent)


def loads(text: str, source: str = "<json>") -> Graph:
    """Parse a JSON graph; raises :class:`GraphError` (naming node and field) on invalid input."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise GraphError(f"{source}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    return graph_from_dict(data)


def _field(node: dict, key: str, where: str, kind, required: bool = True, default=None):
    if key not in node:
        if required:
            raise GraphError("missing", node=where, field=key)
        return default
    v = node[key]
    if kind is not None and not isinstance(v, kind):
        raise GraphError(f"expected {getattr(kind, '__name__', kind)}, got {type(v).__name__} {v!r}",
                         node=where, field=key)
    return v


def _named(where: str, fn, *args, **kwargs) -> Tensor:
    """``fn(*args, **kwargs)``, with a :class:`GraphError` re-raised naming the node as every other
    load error does (id and name), keeping its field."""
    try:
        return fn(*args, **kwargs)
    except GraphError as e:
        raise GraphError(e.message, node=where, field=e.field) from None


def graph_from_dict(data: Any) -> Graph:
    if not isinstance(data, dict):
        raise GraphError("top level must be a JSON object")
    if data.get("format") != FORMAT:
        raise GraphError(f"field 'format' must be {FORMAT!r}, got {data.get('format')!r}")
    if data.get("version") != VERSION:
        raise GraphError(f"unsupported graph version {data.get('version')!r} (this fusec reads {VERSION})")
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list):
        raise GraphError("field 'nodes' must be a list")
    b = GraphBuilder()
    by_id: dict[int, Tensor] = {}
    for k, nd in enumerate(raw_nodes):
        if not isinstance(nd, dict):
            raise GraphError("must be an object", node=f"#{k}")
        nid = _field(nd, "id", f"#{k}", int)
        name = nd.get("name", f"node_{nid}")
        where = f"{nid} ({name!r})"
        if not isinstance(name, str):
            raise GraphError("expected str", node=where, field="name")
        if nid in by_id:
            raise GraphError("duplicate id", node=where, field="id")
        op = _field(nd, "op", where, str)
        if op not in REGISTRY:
            raise GraphError(f"unknown op {op!r}", node=where, field="op")
        try:
            dtype = DType.parse(_field(nd, "dtype", where, str))
        except ValueError as e:
            raise GraphError(str(e), node=where, field="dtype") from None
        ne_raw = _field(nd, "ne", where, list)
        try:
            if len(ne_raw) != 4 or not all(isinstance(v, int) for v in ne_raw):
                raise ValueError(f"expected 4 integers (ggml order), got {ne_raw!r}")
            ne = norm_ne(ne_raw)
        except ValueError as e:
            raise GraphError(str(e), node=where, field="ne") from None
        flags = _field(nd, "flags", where, list, required=False, default=[])
        bad = [f for f in flags if f not in FLAGS]
        if bad:
            raise GraphError(f"unknown flags {bad} (expected {sorted(FLAGS)})", node=where, field="flags")
        params = _field(nd, "params", where, dict, required=False, default={})
        src_ids = _field(nd, "src", where, list, required=False, default=[])
        srcs = []
        for s in src_ids:
            if s is None:
                srcs.append(None)
            elif not isinstance(s, int) or s not in by_id:
                raise GraphError(f"source {s!r} is not the id of an earlier node", node=where, field="src")
            else:
                srcs.append(by_id[s])
        if op == "NONE":
            if srcs:
                raise GraphError("leaf nodes take no sources", node=where, field="src")
            t = b.leaf(name, dtype, ne, flags)
            nb = nd.get("nb")
            if nb is not None:
                if not (isinstance(nb, list) and len(nb) == 4 and all(isinstance(v, int) and v > 0 for v in nb)):
                    raise GraphError(f"expected 4 positive integers (bytes), got {nb!r}", node=where, field="nb")
                t.nb = tuple(nb)
            t.params = dict(params)
        elif op == "FUSED":
            dec = _field(nd, "decomposition", where, dict)
            try:
                sub = graph_from_dict(dec)
            except GraphError as e:
                raise GraphError(f"in decomposition: {e}", node=where, field="decomposition") from None
            from ..rewrite.fuse import make_fused_node  # local: rewrite depends on ir

            t = _named(where, make_fused_node, b, sub, srcs, params, name)
        else:
            t = _named(where, b.op, op, srcs, params, name=name)
        t.flags |= set(flags)
        if t.ne != ne:
            raise GraphError(f"stored {list(ne)} but inference gives {list(t.ne)}", node=where, field="ne")
        if t.dtype != dtype:
            raise GraphError(f"stored {dtype} but inference gives {t.dtype}", node=where, field="dtype")
        by_id[nid] = t
    outs = _field(data, "outputs", "(graph)", list)
    for o in outs:
        if o not in by_id:
            raise GraphError(f"output {o!r} is not a node id", node="(graph)", field="outputs")
    return b.build([by_id[o] for o in outs])


