"""Memory safety of fusion (issue 6, part 9): the buffer plan is made *after* fusion, so a FUSED
kernel never writes a buffer it still reads.

The bug class (ggml guards against it after the fact, ``ggml_cuda_check_fusion_memory_ranges``):
an allocator that plans the *unfused* graph may put ``y = ADD(MUL(RMS_NORM(x), w), x)`` in place
over ``x`` (``x``'s last reader is the ADD). Once the three ops run as one kernel, that kernel
writes ``y`` while it still reads ``x``: a kernel that stages its result in the output buffer
(normalized row first, residual added last) then adds a residual it has already overwritten.

* (a) through the real pipeline: shipped patterns fuse the block, ``plan_buffers`` plans the fused
  graph; the FUSED node's output slot holds none of its sources, and the fused graph, executed on
  the planned memory with a kernel that stages through its output (and on wgpu), gives the
  reference result. The same staged execution on the naive in-place plan gives a wrong result;
* (b) that naive plan, built by hand, is refused by ``BufferPlan.check`` and
  ``BufferPlan.check_kernel`` with a message naming the node and the input it would overwrite;
* (c) a Hypothesis property over random fusable graphs: after rewrite + plan, no computing node's
  (or generated kernel's) write range overlaps one of its read ranges, except SET_ROWS writing
  its own destination; and the fused graph on the planned memory computes the reference.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from fusec.codegen import emit, emit_all, needs_kernel
from fusec.dsl import default_patterns
from fusec.errors import BackendError
from fusec.interp import eval_node, interpret
from fusec.ir import GraphBuilder
from fusec.ir.graph import Graph
from fusec.ir.ops import VIEW_OPS
from fusec.ir.tensor import Tensor
from fusec.rewrite import rewrite
from fusec.rewrite.fuse import fused_alias_input
from fusec.runtime.plan import INPLACE_OPS, BufferPlan, binding_root, plan_buffers, written_root
from tests.gpu import requires_wgpu

SHIPPED = default_patterns()
W, R = 64, 4


# -- executing a graph on its planned memory ------------------------------------------------------
def window(mem: dict[int, np.ndarray], plan: BufferPlan, t: Tensor) -> np.ndarray:
    """``t``'s elements inside the bytes of its slot (views: strided windows onto the root)."""
    buf = mem[plan.slot(t).index]
    return np.ndarray(shape=t.ne[::-1], dtype=t.dtype.np, buffer=buf, offset=t.view_offs, strides=t.nb[::-1])


def run_fused_staged(node: Tensor, mem: dict[int, np.ndarray], plan: BufferPlan) -> None:
    """Run a FUSED node the way a fused kernel may: decomposition step by step, every intermediate
    of the output's shape staged in the *output buffer*, every source read from memory when a step
    needs it. Correct exactly when the output buffer holds none of the node's sources. A node that
    writes in place (:func:`fused_alias_input`) stages nothing; extra outputs (multi-output fusion)
    are written to their ``FUSED_OUTPUT`` nodes' memory at the end."""
    sub = node.decomposition
    assert sub is not None
    inplace = fused_alias_input(sub) is not None
    extras = plan.extra_outputs(node)
    kept = {id(sub.outputs[k]) for k in extras}  # an extra output's value must survive the staging
    staged: set[int] = set()
    local: dict[int, np.ndarray] = {}

    def read(d: Tensor) -> np.ndarray:
        if d.is_leaf:  # placeholder: the source's current bytes
            return window(mem, plan, node.src[int(d.params["fused_input"])]).copy()
        if id(d) in staged:
            return window(mem, plan, node).copy()
        return local[id(d)]

    for d in sub.nodes:
        if d.is_leaf:
            continue
        val = eval_node(d, [None if s is None else read(s) for s in d.src])
        if not inplace and id(d) not in kept and d.ne == node.ne and d.dtype == node.dtype and d.op not in VIEW_OPS:
            window(mem, plan, node)[...] = val
            staged.add(id(d))
        else:
            local[id(d)] = val
    extra = {fo: read(sub.outputs[k]) for k, fo in extras.items()}
    if id(sub.outputs[0]) not in staged:
        window(mem, plan, node)[...] = read(sub.outputs[0])
    for fo, val in extra.items():
        window(mem, plan, fo)[...] = val


def run_on_plan(plan: BufferPlan, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Execute ``plan.graph`` with every root living in the bytes of its planned slot (FUSED nodes
    staged through their output, :func:`run_fused_staged`)."""
    mem = {s.index: np.zeros(s.size, dtype=np.uint8) for s in plan.slots}
    for t in plan.graph.nodes:
        if t.is_leaf:
            window(mem, plan, t)[...] = np.asarray(values[t.name]).reshape(t.ne[::-1])
        elif t.op == "FUSED":
            run_fused_staged(t, mem, plan)
        elif t.op not in VIEW_OPS and t.op != "FUSED_OUTPUT":  # FUSED_OUTPUT: written by its FUSED node
            srcs = [None if s is None else window(mem, plan, s).copy() for s in t.src]
            window(mem, plan, t)[...] = eval_node(t, srcs)
    return {o.name: window(mem, plan, o).copy() for o in plan.graph.outputs}


# -- (a) the residual RMS-norm block through rewrite + plan ---------------------------------------
def residual_norm_graph() -> Graph:
    """``h`` is an intermediate (a reusable scratch buffer) read last by the residual ADD ``y``."""
    b = GraphBuilder()
    inp = b.input("inp", "f32", (W, R))
    w = b.weight("w", "f32", (W,))
    h = b.scale(inp, 2.0, 0.25, name="h")
    y = b.add(b.mul(b.rms_norm(h, 1e-6, name="norm"), w, name="mul"), h, name="y")
    return b.build([b.silu(y, name="out")])


def residual_values(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"inp": rng.standard_normal((R, W)).astype(np.float32),
            "w": rng.standard_normal(W).astype(np.float32)}


def fused_residual() -> tuple[Graph, Graph, Tensor, Tensor]:
    g = residual_norm_graph()
    fg, rep = rewrite(g, SHIPPED)
    assert [a.pattern for a in rep.applied] == ["rms_norm_mul_add"]
    f, h = fg.by_name("y"), fg.by_name("h")
    assert f.op == "FUSED" and [s.name for s in f.src] == ["h", "w", "h"]  # reads h twice: x and residual
    return g, fg, f, h


def naive_inplace_plan(fg: Graph, f: Tensor, h: Tensor) -> BufferPlan:
    """The unfused allocator's choice: ``y`` in place over ``h`` (h's last reader)."""
    plan = plan_buffers(fg)
    plan.slot_of[f] = plan.slot_of[h]
    return plan


def test_fused_output_never_shares_a_buffer_with_its_sources():
    g, fg, f, h = fused_residual()
    plan = plan_buffers(fg)
    plan.check()
    assert plan.live[h][1] == fg.nodes.index(f)  # h is last read by the fused node ...
    for s in f.src:  # ... and the fused node still does not get its buffer
        assert plan.slot(f).index != plan.slot(s).index, s.name
    ks = emit(f, "wgsl")
    plan.check_kernel(f, [(binding_root(f, b.tensor), b.write) for b in ks.bindings if b.tensor is not None])


def test_fused_graph_on_its_plan_computes_the_reference():
    g, fg, f, h = fused_residual()
    vals = residual_values()
    ref = interpret(g, {k: v.copy() for k, v in vals.items()})["out"]
    got = run_on_plan(plan_buffers(fg), vals)["out"]
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_naive_inplace_plan_would_compute_garbage():
    """What the plan rules out: with ``y`` over ``h``, the staged kernel adds a residual it has
    already overwritten with the normalized row."""
    g, fg, f, h = fused_residual()
    vals = residual_values()
    ref = interpret(g, {k: v.copy() for k, v in vals.items()})["out"]
    got = run_on_plan(naive_inplace_plan(fg, f, h), vals)["out"]
    assert not np.allclose(got, ref, rtol=1e-3, atol=1e-3)


@requires_wgpu
def test_fused_residual_block_on_wgpu():
    from fusec.backends.wgpu_backend import WgpuBackend

    g, fg, f, h = fused_residual()
    vals = residual_values(1)
    ref = interpret(g, {k: v.copy() for k, v in vals.items()})["out"]
    be = WgpuBackend()
    be.set_weights({"w": vals["w"]})
    exe = be.compile(fg)  # plans, checks the plan and every kernel's bindings
    assert exe.plan.slot(f).index not in {exe.plan.slot(s).index for s in f.src}
    np.testing.assert_allclose(exe.run({"inp": vals["inp"]})["out"], ref, rtol=1e-4, atol=1e-5)


# -- (b) the unsafe plan, built by hand, is refused ------------------------------------------------
def test_check_refuses_the_naive_inplace_plan():
    g, fg, f, h = fused_residual()
    plan = naive_inplace_plan(fg, f, h)
    with pytest.raises(BackendError, match=r"node 'y' \(FUSED\) writes slot \d+, which also holds 'h' that the node "
                                           r"reads: its output would overwrite its own input"):
        plan.check()


def test_check_kernel_refuses_the_naive_inplace_plan():
    g, fg, f, h = fused_residual()
    plan = naive_inplace_plan(fg, f, h)
    k = emit(f, "wgsl")
    accesses = [(binding_root(f, b.tensor), b.write) for b in k.bindings if b.tensor is not None]
    assert (h, False) in accesses and (f, True) in accesses
    with pytest.raises(BackendError, match=r"kernel of node 'y' \(FUSED\) writes slot \d+ \('y'\) that it also "
                                           r"reads as 'h'"):
        plan.check_kernel(f, accesses)


def test_check_refuses_a_fused_output_overlapping_a_broadcast_source_slot():
    """Aliasing with a *smaller* source (a broadcast weight row in a scratch slot) is refused too."""
    b = GraphBuilder()
    inp = b.input("inp", "f32", (W, R))
    w_in = b.input("w_in", "f32", (W,))
    w = b.scale(w_in, 1.0, name="w")  # computed weight row: scratch
    y = b.mul(b.rms_norm(inp, 1e-6, name="norm"), w, name="y")
    fg, rep = rewrite(b.build([b.silu(y, name="out")]), SHIPPED)
    assert [a.pattern for a in rep.applied] == ["rms_norm_mul"]
    f, wt = fg.by_name("y"), fg.by_name("w")
    plan = plan_buffers(fg)
    plan.check()
    plan.slot_of[f] = plan.slot_of[wt]
    plan.slots[plan.slot_of[wt]].size = max(plan.slots[plan.slot_of[wt]].size, f.span_bytes)
    with pytest.raises(BackendError, match=r"node 'y' \(FUSED\).*'w'"):
        plan.check()


# -- (c) random fusable graphs ---------------------------------------------------------------------
@st.composite
def fusable_graphs(draw) -> Graph:
    """Residual-stream graphs built from the blocks the shipped patterns fuse (RMS_NORM/NORM ->
    MUL -> ADD, SILU -> MUL, ADD chains, MUL_MAT -> ADD for one token, SOFT_MAX with scale) plus
    SET_ROWS into an intermediate destination, with random extra uses (so some matches escape)."""
    rows = draw(st.sampled_from([1, 3]))
    ne = (16, rows)
    b = GraphBuilder()
    pool: list[Tensor] = [b.scale(b.input("x", "f32", ne), 1.0, name="x0")]  # an intermediate, not a leaf
    wrow = b.weight("wrow", "f32", (16,))
    brow = b.weight("brow", "f32", (16,))
    wmat = b.weight("wmat", "f32", (16, 16))
    idx = b.input("idx", "i32", (1,))
    no_output: set[int] = set()
    for i in range(draw(st.integers(2, 9))):
        kind = draw(st.sampled_from(["rms", "rms_add", "norm_add", "silu_mul", "add", "add3", "gemv", "softmax",
                                     "set_rows"]))
        a = draw(st.sampled_from(pool))
        c = draw(st.sampled_from(pool))
        nm = f"n{i}"
        if kind == "rms":
            t = b.mul(b.rms_norm(a, 1e-6, name=nm + "r"), wrow, name=nm)
        elif kind == "rms_add":
            t = b.add(b.mul(b.rms_norm(a, 1e-6, name=nm + "r"), wrow, name=nm + "m"), c, name=nm)
        elif kind == "norm_add":
            t = b.add(b.mul(b.norm(a, 1e-5, name=nm + "r"), wrow, name=nm + "m"), brow, name=nm)
        elif kind == "silu_mul":
            t = b.mul(b.silu(a, name=nm + "s"), c, name=nm)
        elif kind == "add":
            t = b.add(a, c, name=nm)
        elif kind == "add3":
            t = b.add(b.add(a, c, name=nm + "a"), draw(st.sampled_from(pool)), name=nm)
        elif kind == "gemv":
            if rows != 1:
                continue
            t = b.add(b.mul_mat(wmat, a, name=nm + "mm"), c, name=nm)
        elif kind == "softmax":
            t = b.soft_max(b.scale(a, 0.125, name=nm + "sc"), name=nm)
        else:  # one row of c into a fresh copy of a, in place
            dst = b.scale(a, 1.0, name=nm + "d")
            no_output.add(id(dst))
            t = b.set_rows(dst, b.view(c, (16, 1), name=nm + "v"), idx, name=nm)
        pool.append(t)
    cands = [t for t in pool[1:] if id(t) not in no_output] or [b.silu(pool[0], name="fallback")]
    outs = draw(st.lists(st.sampled_from(cands), min_size=1, max_size=min(3, len(cands)), unique_by=id))
    return b.build(outs)


def _ranges_overlap(plan: BufferPlan, a: Tensor, b: Tensor) -> bool:
    """Whether the bytes ``a`` and ``b`` address (offset within the root's slot, span) intersect."""
    if plan.slot(a).index != plan.slot(b).index:
        return False
    a0, b0 = a.view_offs, b.view_offs
    return a0 < b0 + b.span_bytes and b0 < a0 + a.span_bytes


@given(fusable_graphs(), st.integers(0, 2**31 - 1))
def test_random_fused_graphs_never_write_what_they_read(g, seed):
    fg, rep = rewrite(g, SHIPPED)
    for a in rep.applied:
        event(f"fused {a.pattern}")
    plan = plan_buffers(fg)
    plan.check()
    for t in fg.nodes:
        w = written_root(t)
        if w is None:
            continue
        for s in t.src:
            if s is None:
                continue
            inplace_dst = t.op in INPLACE_OPS and s.root is w
            if not inplace_dst:
                assert not _ranges_overlap(plan, t, s), (t.name, t.op, s.name)
        if needs_kernel(t):  # the generated kernels' own bindings, as the backends check them
            for k in emit_all(t, "wgsl").kernels:
                plan.check_kernel(t, [(binding_root(t, bd.tensor, plan.extra_outputs(t)), bd.write)
                                      for bd in k.bindings if bd.tensor is not None])
    rng = np.random.default_rng(seed)
    vals = {t.name: rng.standard_normal(t.ne[::-1]).astype(np.float32) for t in g.leaves if t.name != "idx"}
    vals["idx"] = np.array([int(rng.integers(0, g.by_name("x").ne[1]))], dtype=np.int32)
    ref = interpret(g, {k: v.copy() for k, v in vals.items()})
    got = run_on_plan(plan, vals)
    for name, v in ref.items():
        np.testing.assert_allclose(got[name], v, rtol=1e-5, atol=1e-5, err_msg=name)
