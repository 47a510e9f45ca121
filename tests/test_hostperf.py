"""Invariants behind the host-time work (issue 5): the linear topological sort gives exactly the
``graphlib`` reference order, the cyclic GC is paused only for the duration of a rewrite, and a
rewrite shares no mutable param with its input graph now that it no longer clones it first."""

from __future__ import annotations

import gc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusec._gc import paused
from fusec.dsl import default_patterns, parse_patterns
from fusec.errors import GraphError
from fusec.ir import GraphBuilder, dumps
from fusec.ir.graph import _topo_sort_graphlib, topo_sort
from fusec.ir.tensor import Tensor
from fusec.rewrite import rewrite


def _reachable(nodes, outputs) -> dict[int, Tensor]:
    seen: dict[int, Tensor] = {}
    stack = [*nodes, *outputs]
    while stack:
        t = stack.pop()
        if id(t) not in seen:
            seen[id(t)] = t
            stack.extend(s for s in t.src if s is not None)
            if t.view_src is not None:
                stack.append(t.view_src)
    return seen


@st.composite
def dags(draw):
    """Random DAGs of element-wise ops over two inputs, with ids shuffled (and sometimes repeated)
    so that the id tie-break, not the creation order, decides."""
    b = GraphBuilder()
    pool = [b.input("x", "f32", (4,)), b.input("y", "f32", (4,))]
    for _ in range(draw(st.integers(1, 30))):
        op = draw(st.sampled_from(["ADD", "MUL", "SILU", "SCALE"]))
        a, c = draw(st.sampled_from(pool)), draw(st.sampled_from(pool))
        pool.append(b.op(op, [a, c] if op in ("ADD", "MUL") else [a]))
    ids = draw(st.permutations(list(range(len(b.nodes)))))
    if draw(st.booleans()):
        ids = [i // 2 for i in ids]  # repeated ids: the graphlib path
    for t, i in zip(b.nodes, ids, strict=True):
        t.id = i
    outs = draw(st.lists(st.sampled_from(pool[2:]), min_size=1, max_size=3, unique_by=id))
    nodes = draw(st.permutations(b.nodes))
    return nodes, outs


@given(dags())
def test_topo_sort_is_the_graphlib_order(dag):
    nodes, outs = dag
    got = topo_sort(list(nodes), outs)
    ref = _topo_sort_graphlib(_reachable(nodes, outs))
    assert [id(t) for t in got] == [id(t) for t in ref]


def test_topo_sort_still_names_a_node_on_a_cycle():
    b = GraphBuilder()
    x = b.input("x", "f32", (4,))
    a = b.silu(x, name="a")
    c = b.silu(a, name="c")
    a.src = (c,)  # a <- c <- a
    with pytest.raises(GraphError, match="cycle"):
        topo_sort([x, a, c], [c])


def test_gc_is_paused_only_during_the_rewrite():
    pats = default_patterns()
    b = GraphBuilder()
    x = b.input("x", "f32", (8, 2))
    g = b.build([b.mul(b.rms_norm(x, 1e-6), b.weight("w", "f32", (8,)), name="y")])

    assert gc.isenabled()
    with paused():
        assert not gc.isenabled()
        with paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # nested: the outer pause still holds
    assert gc.isenabled()
    rewrite(g, pats)
    assert gc.isenabled()
    gc.disable()
    try:
        rewrite(g, pats)
        assert not gc.isenabled()  # a caller's disabled collector stays disabled
    finally:
        gc.enable()


def test_rewrite_shares_no_params_with_its_input():
    (p,) = parse_patterns("""
pattern perm_cont {
  match {
    y = CONT(PERMUTE(x) { axes: $axes })
  }
  rewrite F(x) kernel copy
}
""", "t.fuse")
    b = GraphBuilder()
    x = b.input("x", "f32", (4, 3, 2))
    perm = b.permute(x, 1, 0, 2, 3, name="perm")
    g = b.build([b.cont(perm, name="y")])
    before = dumps(g)
    fg, rep = rewrite(g, [p])
    (f,) = fg.ops
    assert rep.total_matches == 1 and f.params["axes"] == [1, 0, 2, 3]
    assert f.params["axes"] is not perm.params["axes"]
    f.params["axes"].append(9)  # mutating the result leaves the input alone
    assert dumps(g) == before
    assert all(t is not u for t in fg.nodes for u in g.nodes)


def test_rewrite_without_matches_still_returns_a_copy():
    b = GraphBuilder()
    x = b.input("x", "f32", (4,))
    g = b.build([b.silu(x, name="y")])
    fg, rep = rewrite(g, default_patterns())
    assert rep.total_matches == 0 and dumps(fg) == dumps(g)
    assert all(t is not u for t in fg.nodes for u in g.nodes)
