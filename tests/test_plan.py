"""Buffer planning: reuse, lifetimes through views and FUSED nodes, and the no-self-alias rule.

Besides checking the plan's own invariants, the Hypothesis property *executes* random graphs on
the planned memory (every root reads and writes the bytes of its slot, views are strided windows
onto them) and compares with the reference interpreter: a plan that reused a buffer too early
would change the results.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusec.errors import BackendError
from fusec.interp import eval_node, interpret
from fusec.ir import GraphBuilder
from fusec.ir.graph import Graph
from fusec.ir.ops import VIEW_OPS
from fusec.ir.tensor import Tensor
from fusec.rewrite.fuse import make_fused_node
from fusec.runtime.plan import BufferPlan, plan_buffers, read_roots, written_root

NE = (8, 4)  # every full-size tensor of the random graphs: 4 rows of 8


# -- helpers -------------------------------------------------------------------------------------
def fused(b: GraphBuilder, srcs: list[Tensor], name: str, kind: int = 0) -> Tensor:
    """A FUSED node over ``srcs`` (all ne=NE except optional broadcast rows) whose decomposition
    is ``rms_norm(src0 + src1) * src0`` (kind 0) or ``silu(src0) * src1`` (kind 1)."""
    sb = GraphBuilder()
    ph = []
    for i, s in enumerate(srcs):
        p = sb.leaf(f"p{i}", s.dtype, s.ne)
        p.params["fused_input"] = i
        ph.append(p)
    if kind == 0:
        out = sb.mul(sb.rms_norm(sb.add(ph[0], ph[1]), eps=1e-6), ph[0])
    else:
        out = sb.mul(sb.silu(ph[0]), ph[1])
    return make_fused_node(b, sb.build([out]), srcs, {"pattern": "test", "kernel": "norm_epilogue"}, name)


def window(mem: dict[int, np.ndarray], plan: BufferPlan, t: Tensor) -> np.ndarray:
    buf = mem[plan.slot(t).index]
    return np.ndarray(shape=t.ne[::-1], dtype=t.dtype.np, buffer=buf, offset=t.view_offs, strides=t.nb[::-1])


def run_on_plan(plan: BufferPlan, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Execute ``plan.graph`` with every root living in the bytes of its planned slot."""
    mem = {s.index: np.zeros(s.size, dtype=np.uint8) for s in plan.slots}
    for t in plan.graph.nodes:
        if t.is_leaf:
            window(mem, plan, t)[...] = np.asarray(values[t.name]).reshape(t.ne[::-1])
        elif t.op not in VIEW_OPS:
            srcs = [None if s is None else window(mem, plan, s).copy() for s in t.src]
            window(mem, plan, t)[...] = eval_node(t, srcs)
    return {o.name: window(mem, plan, o).copy() for o in plan.graph.outputs}


def assert_no_self_alias(plan: BufferPlan) -> None:
    """Independent statement of the safety rule."""
    for node in plan.graph.nodes:
        w = written_root(node)
        if w is None:
            continue
        for r in read_roots(node):
            if r is not w:
                assert plan.slot(r).index != plan.slot(w).index, (node.name, r.name)


def chain_graph(n: int = 8) -> Graph:
    b = GraphBuilder()
    x = b.input("x", "f32", (64, 8))
    w = b.weight("w", "f32", (64,))
    h = x
    for i in range(n):
        h = b.add(b.mul(h, w, name=f"m{i}"), x, name=f"a{i}")
    return b.build([h])


# -- reuse -----------------------------------------------------------------------------------------
def test_chain_reuses_memory():
    g = chain_graph(8)
    plan = plan_buffers(g)
    plan.check()
    st_ = plan.stats()
    assert st_.n_results == 16
    assert st_.scratch_bytes_no_reuse == 16 * 64 * 8 * 4
    assert st_.n_scratch_slots == 2  # a chain ping-pongs between two buffers
    assert st_.scratch_bytes == 2 * 64 * 8 * 4
    assert st_.bytes_with_reuse < st_.bytes_no_reuse
    assert st_.input_bytes == 64 * 8 * 4 and st_.weight_bytes == 64 * 4


def test_leaves_get_dedicated_named_slots():
    g = chain_graph(3)
    plan = plan_buffers(g)
    x, w = g.by_name("x"), g.by_name("w")
    assert (plan.slot(x).kind, plan.slot(x).name) == ("input", "x")
    assert (plan.slot(w).kind, plan.slot(w).name) == ("weight", "w")
    scratch = {plan.slot(t).index for t in g.ops}
    assert plan.slot(x).index not in scratch and plan.slot(w).index not in scratch


def test_outputs_are_never_reused():
    b = GraphBuilder()
    x = b.input("x", "f32", (16, 4))
    h = b.silu(x, name="h0")
    mid = b.scale(h, 2.0, name="mid")  # an output in the middle of the chain
    for i in range(5):
        h = b.silu(mid if i == 0 else h, name=f"h{i + 1}")
    g = b.build([mid, h])
    plan = plan_buffers(g)
    plan.check()
    k = plan.slot(mid).index
    assert [t.name for t in g.ops if plan.slot(t).index == k] == ["mid"]


def test_view_users_extend_the_lifetime_of_the_root():
    b = GraphBuilder()
    x = b.input("x", "f32", (8, 4))
    a = b.silu(x, name="a")
    v = b.transpose(a, name="aT")
    vv = b.view(v, (4, 1), nb=(32, 4 * 8), offset=0, name="vv")  # view of a view of a
    h = b.scale(x, 3.0, name="h")
    h = b.silu(h, name="h2")
    late = b.add(b.cont(vv, name="c"), b.view(h, (4, 1), name="hv"), name="late")
    g = b.build([late])
    plan = plan_buffers(g)
    plan.check()
    order = {id(t): i for i, t in enumerate(g.nodes)}
    assert plan.live[a][1] >= order[id(g.by_name("c"))]
    for t in (g.by_name("h"), g.by_name("h2")):
        assert plan.slot(t).index != plan.slot(a).index
    vals = {"x": np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)}
    np.testing.assert_array_equal(run_on_plan(plan, vals)["late"], interpret(g, vals)["late"])


# -- the safety rule -----------------------------------------------------------------------------
def fused_last_use_graph() -> tuple[Graph, Tensor, Tensor]:
    """``t1`` and ``t2`` are last read by the FUSED node ``f`` -- where a planner made for the
    unfused graph (or ggml-alloc's in-place reuse) would let ``f`` write into ``t1``'s buffer
    although ``f`` reads ``t1`` after writing its first element."""
    b = GraphBuilder()
    x = b.input("x", "f32", (32, 4))
    y = b.input("y", "f32", (32, 4))
    t1 = b.silu(x, name="t1")
    t2 = b.scale(y, 0.5, name="t2")
    f = fused(b, [t1, t2], "f")
    out = b.silu(f, name="out")
    return b.build([out]), t1, f


def test_plan_never_writes_a_fused_node_into_its_input():
    g, t1, f = fused_last_use_graph()
    plan = plan_buffers(g)
    plan.check()
    for s in f.src:
        assert plan.slot(f).index != plan.slot(s).index


def test_check_refuses_a_fused_node_overwriting_its_input():
    g, t1, f = fused_last_use_graph()
    plan = plan_buffers(g)
    plan.slot_of[f] = plan.slot_of[t1]  # the naive in-place choice
    with pytest.raises(BackendError, match=r"node 'f' \(FUSED\).*'t1'"):
        plan.check()


def test_check_refuses_aliasing_through_a_view():
    b = GraphBuilder()
    x = b.input("x", "f32", (8, 4))
    t = b.silu(x, name="t")
    tv = b.transpose(t, name="tT")
    f = b.cont(tv, name="f")  # reads t only through the view
    g = b.build([b.scale(f, 2.0, name="out")])
    plan = plan_buffers(g)
    plan.check()
    plan.slot_of[f] = plan.slot_of[t]
    with pytest.raises(BackendError, match=r"node 'f' \(CONT\)"):
        plan.check()


def test_check_refuses_overlapping_lifetimes_and_small_slots():
    g = chain_graph(4)
    plan = plan_buffers(g)
    m0, a0, m1 = g.by_name("m0"), g.by_name("a0"), g.by_name("m1")
    plan.slot_of[m1] = plan.slot_of[a0]  # m1 reads a0: self-alias
    with pytest.raises(BackendError, match="m1"):
        plan.check()
    plan = plan_buffers(g)
    plan.slots[plan.slot_of[m0]].size = 16
    with pytest.raises(BackendError, match="needs 2048 bytes"):
        plan.check()
    plan = plan_buffers(g)
    plan.slot_of[g.by_name("x")] = plan.slot_of[g.by_name("w")]
    with pytest.raises(BackendError, match="'x'"):
        plan.check()


def test_check_refuses_reuse_while_live_elsewhere():
    b = GraphBuilder()
    x = b.input("x", "f32", (8, 4))
    keep = b.silu(x, name="keep")  # read at the very end
    h1 = b.scale(x, 2.0, name="h1")
    h2 = b.scale(h1, 2.0, name="h2")
    g = b.build([b.add(h2, keep, name="out")])
    plan = plan_buffers(g)
    plan.check()
    plan.slot_of[h1] = plan.slot_of[keep]  # h1 never reads keep, but keep is still live
    with pytest.raises(BackendError, match="'h1' reuses slot .* 'keep' is still live"):
        plan.check()


def test_set_rows_destination_stays_live_and_may_alias_its_output():
    b = GraphBuilder()
    x = b.input("x", "f32", (8, 4))
    idx = b.input("idx", "i32", (2,))
    cache = b.weight("cache", "f32", (8, 6))
    dst = b.scale(x, 1.0, name="dst")  # intermediate destination
    rows = b.view(x, (8, 2), name="rows")
    sr = b.set_rows(dst, rows, idx, name="sr")  # in place into dst
    h = b.silu(x, name="h")
    kv = b.set_rows(cache, b.cont(rows, name="r2"), idx, name="kv")
    out = b.add(sr, h, name="out")
    g = b.build([out, kv])
    plan = plan_buffers(g)
    plan.check()
    assert plan.slot(sr).index == plan.slot(dst).index
    assert plan.slot(kv).kind == "weight" and plan.slot(kv).name == "cache"
    assert plan.slot(h).index != plan.slot(dst).index
    rng = np.random.default_rng(1)
    vals = {"x": rng.standard_normal((4, 8)).astype(np.float32), "idx": np.array([3, 0], np.int32),
            "cache": np.zeros((6, 8), np.float32)}
    ref = interpret(g, {k: v.copy() for k, v in vals.items()})
    got = run_on_plan(plan, vals)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])


def test_leaf_kind_clash_is_refused():
    b = GraphBuilder()
    x = b.input("x", "f32", (4,))
    w = b.weight("x", "f32", (4,))
    g = b.build([b.add(x, w)])
    with pytest.raises(BackendError, match="weight and an input"):
        plan_buffers(g)


# -- random graphs ---------------------------------------------------------------------------------
@st.composite
def random_graphs(draw) -> Graph:
    b = GraphBuilder()
    pool: list[Tensor] = [b.input("x0", "f32", NE), b.input("x1", "f32", NE), b.weight("w", "f32", NE)]
    rows_pool: list[Tensor] = [b.weight("g", "f32", (NE[0],))]
    idx = b.input("idx", "i32", (1,))
    no_output: set[int] = set()
    n = draw(st.integers(3, 14))
    for i in range(n):
        kind = draw(st.sampled_from(["add", "mul", "silu", "scale", "rms", "soft_max", "transpose",
                                     "rowview", "fused0", "fused1", "set_rows"]))
        a = draw(st.sampled_from(pool))
        c = draw(st.sampled_from(pool))
        nm = f"n{i}"
        if kind in ("add", "mul"):
            bb = draw(st.sampled_from([c, *rows_pool]))
            t = (b.add if kind == "add" else b.mul)(a, bb, name=nm)
        elif kind == "silu":
            t = b.silu(a, name=nm)
        elif kind == "scale":
            t = b.scale(a, 0.5, name=nm)
        elif kind == "rms":
            t = b.rms_norm(a, 1e-6, name=nm)
        elif kind == "soft_max":
            t = b.soft_max(a, name=nm)
        elif kind == "transpose":
            t = b.reshape(b.cont(b.transpose(a, name=nm + "T"), name=nm + "c"), NE, name=nm)
        elif kind == "rowview":
            r = draw(st.integers(0, NE[1] - 1))
            if a.is_contiguous:
                rows_pool.append(b.view(a, (NE[0], 1), offset=r * NE[0] * 4, name=nm))
            continue
        elif kind in ("fused0", "fused1"):
            t = fused(b, [a, c], nm, kind=int(kind[-1]))
        else:  # set_rows of one row of c into a fresh copy of a
            dst = b.scale(a, 1.0, name=nm + "d")
            no_output.add(id(dst))
            t = b.set_rows(dst, b.view(c, (NE[0], 1), name=nm + "r") if c.is_contiguous else
                           b.cont(b.view(c, (NE[0], 1), nb=c.nb, name=nm + "r")), idx, name=nm)
        pool.append(t)
    cands = [t for t in pool[3:] if id(t) not in no_output]
    if not cands:
        cands = [b.silu(pool[0], name="fallback")]
    k = draw(st.integers(1, min(3, len(cands))))
    outs = draw(st.lists(st.sampled_from(cands), min_size=1, max_size=k, unique_by=id))
    return b.build(outs)


@given(random_graphs(), st.integers(0, 2**31 - 1))
def test_random_graphs_plan_is_safe_and_computes_the_reference(g, seed):
    plan = plan_buffers(g)
    plan.check()
    assert_no_self_alias(plan)
    stats = plan.stats()
    assert stats.scratch_bytes <= stats.scratch_bytes_no_reuse
    for o in g.outputs:  # outputs own their slot from their computation to the end
        if o.root in plan.live:
            start = plan.live[o.root][0]
            later = [t for t, (first, _) in plan.live.items() if first > start]
            assert all(plan.slot(t).index != plan.slot(o).index for t in later)
    rng = np.random.default_rng(seed)
    vals = {t.name: rng.standard_normal(t.ne[::-1]).astype(np.float32) for t in g.leaves if t.name != "idx"}
    vals["idx"] = np.array([int(rng.integers(0, NE[1]))], dtype=np.int32)
    ref = interpret(g, {k: v.copy() for k, v in vals.items()})
    got = run_on_plan(plan, vals)
    for name, v in ref.items():
        np.testing.assert_array_equal(got[name], v, err_msg=name)
