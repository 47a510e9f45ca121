"""``elementwise_dag`` kernel family and the patterns of ``patterns/elementwise.fuse``.

Every graph is rewritten with the shipped element-wise patterns; the FUSED kernel runs on random
inputs (output NaN-poisoned first) and is compared with the numpy interpreter of the *original,
unfused* graph.

Tolerances (normalized MSE, :func:`tests.test_elementwise_kernels.nmse`): f32 results: ``1e-7``
against the interpreter of the unfused graph (ggml's test-backend-ops bound). f16 results: ``5e-4``
(one f16 rounding, ~1e-3 relative, as the single-op element-wise tests) against the interpreter of
the unfused graph evaluated in f32 (the same graph with f32 leaves holding the f16 input values) and
rounded to f16 once. The unfused f16 graph itself rounds every intermediate to f16, which the fused
kernel (f32 registers) deliberately does not: its result differs from that by up to one f16 ulp *of
the largest intermediate* per op, unbounded relative to an output that cancels to ~0 (e.g. an ADD
chain of 8 summing to 0.01 after partial sums of ~20); on random data it measured nmse <= 3e-7.

Execution runs on WGSL (lavapipe) and, with the ``cuda`` marker, on CUDA; every emitted variant is
compiled with ``nvcc -arch=sm_90``, parsed with the MSL shim and validated by naga.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusec.codegen import emit
from fusec.codegen.check import check_cuda, check_msl
from fusec.codegen.families.elementwise_dag import plan
from fusec.dsl import default_patterns, parse_patterns
from fusec.errors import CodegenError
from fusec.interp import interpret
from fusec.ir import GraphBuilder
from fusec.ir.graph import Graph
from fusec.ir.tensor import Tensor
from fusec.rewrite import rewrite
from tests.gpu import requires_cuda, requires_wgpu
from tests.test_elementwise_kernels import _random, _runtime, bcast_ne, bundle, nmse

NMSE_BOUND = {"f32": 1e-7, "f16": 5e-4}
BACKENDS = [pytest.param("wgsl", marks=requires_wgpu.mark), pytest.param("cuda", marks=requires_cuda.mark)]
DTYPES = st.sampled_from(["f32", "f16"])
DIMS = st.sampled_from([1, 2, 3, 4, 5, 7, 8, 12, 16, 33])
NE = st.lists(DIMS, min_size=1, max_size=4).map(lambda v: tuple(v) + (1,) * (4 - len(v))).filter(
    lambda ne: int(np.prod(ne)) <= 6000)
ACTS = ["SILU", "GELU", "SIGMOID"]


def elementwise_patterns():
    return [p for p in default_patterns() if p.file == "patterns/elementwise.fuse"]


def fuse(g: Graph, patterns=None) -> tuple[Graph, object]:
    return rewrite(g, elementwise_patterns() if patterns is None else patterns)


def fused_nodes(g: Graph) -> list[Tensor]:
    return [t for t in g.nodes if t.op == "FUSED"]


def as_f32(g: Graph) -> Graph:
    """``g`` rebuilt with f32 leaves (and so f32 intermediates), names and params kept; leaves must be
    plain inputs (no views)."""
    b = GraphBuilder()
    new: dict[int, Tensor] = {}
    for t in g.nodes:
        if t.is_leaf:
            new[id(t)] = b.input(t.name, "f32", t.ne)
        else:
            new[id(t)] = b.op(t.op, [new[id(s)] if s is not None else None for s in t.src], dict(t.params),
                              name=t.name)
    return b.build([new[id(o)] for o in g.outputs])


def run_fused(original: Graph, backend: str, seed: int, patterns=None, positive: bool = False) -> Tensor:
    """Rewrite ``original`` (one output), check exactly one FUSED node replaced the output, run its
    kernel on random leaf values and compare with ``interpret(original)``; return the FUSED node."""
    fused, _ = fuse(original, patterns)
    nodes = fused_nodes(fused)
    assert len(nodes) == 1 and nodes[0] is fused.outputs[0], [n.op for n in fused.nodes]
    node = nodes[0]
    rng = np.random.default_rng(seed)
    values = {t.name: _random(rng, str(t.dtype), t.nelements) for t in original.leaves}
    if positive:  # SQRT/RSQRT/DIV inputs away from 0 and negatives
        values = {n: (np.abs(v) + 0.5).astype(v.dtype) for n, v in values.items()}
    out_name = original.outputs[0].name
    if str(original.outputs[0].dtype) == "f16":  # the unfused graph in f32, rounded to f16 once
        f32 = {n: v.astype(np.float32) for n, v in values.items()}
        ref = interpret(as_f32(original), f32)[out_name].reshape(-1).astype(np.float16)
    else:
        ref = interpret(original, {n: v.copy() for n, v in values.items()})[out_name].reshape(-1)
    k = emit(node, backend)
    arrays = {}
    for bnd in k.bindings:
        root = bnd.tensor.root
        arrays[bnd.name] = (values[root.name].copy() if root.is_leaf
                            else np.full(root.span_bytes // root.dtype.size, np.nan, dtype=root.dtype.np))
    got = _runtime(backend).run_kernel(k, arrays)["dst"]
    assert not np.isnan(got).any(), f"{k.entry}: unwritten (NaN) elements"
    err = nmse(got, ref)
    assert err <= NMSE_BOUND[str(node.dtype)], (k.entry, err)
    return node


# ---------------------------------------------------------------------------------------------
# positive cases: kernel == interpreter of the unfused graph


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data(), act=st.sampled_from(ACTS), dt=DTYPES, ne=NE, swap=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_unary_mul_matches_interpreter(backend, data, act, dt, ne, swap, seed):
    une = data.draw(bcast_ne(ne))  # u broadcasts to the gate (ggml_can_repeat)
    b = GraphBuilder()
    g = b.op(act, [b.input("x", dt, ne)], name="g")
    u = b.input("u", dt, une)
    y = b.op("MUL", [u, g] if swap and une == ne else [g, u], name="y")
    node = run_fused(b.build([y]), backend, seed)
    assert node.params["pattern"] == f"{act.lower()}_mul"


@pytest.mark.parametrize("backend", BACKENDS)
@given(dt=DTYPES, ne=NE, cap=st.floats(0.5, 50, width=32), bias=st.sampled_from([0.0, 0.25]),
       seed=st.integers(0, 2**32 - 1))
def test_softcap_matches_interpreter(backend, dt, ne, cap, bias, seed):
    b = GraphBuilder()
    a = b.scale(b.input("x", dt, ne), 1.0 / cap, bias, name="a")
    t = b.op("TANH", [a], name="t")
    y = b.scale(t, cap, name="y")
    g = b.build([y])
    node = run_fused(g, backend, seed)
    assert node.params["pattern"] == "softcap"
    (s0, b0), (s1, b1) = plan(node).scales
    assert (s0, b0, s1, b1) == pytest.approx((1.0 / cap, bias, cap, 0.0), rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data(), n=st.integers(3, 8), dt=DTYPES, ne=NE, seed=st.integers(0, 2**32 - 1))
def test_add_chain_matches_interpreter(backend, data, n, dt, ne, seed):
    b = GraphBuilder()
    acc = b.input("a0", dt, ne)
    for k in range(1, n):
        operand = b.input(f"a{k}", dt, data.draw(bcast_ne(ne)))
        flip = data.draw(st.booleans()) and tuple(operand.ne) == tuple(acc.ne)
        acc = b.op("ADD", [operand, acc] if flip else [acc, operand], name=f"s{k}")
    node = run_fused(b.build([acc]), backend, seed)
    assert node.params["pattern"] == f"add_chain_{n}"  # the longest chain wins
    assert len(node.src) == n


def test_add_chain_longer_than_8_splits():
    b = GraphBuilder()
    acc = b.input("a0", "f32", (8, 2))
    for k in range(1, 11):  # 11 operands, 10 ADDs: add_chain_8 (a0..a7), then a 4-operand chain on its result
        acc = b.add(acc, b.input(f"a{k}", "f32", (8, 2)), name=f"s{k}")
    fused, report = fuse(b.build([acc]))
    pats = sorted(n.params["pattern"] for n in fused_nodes(fused))
    assert pats == ["add_chain_4", "add_chain_8"]
    assert [n.op for n in fused.nodes if not n.is_leaf] == ["FUSED", "FUSED"]


# ---------------------------------------------------------------------------------------------
# the family is general: DAG decompositions, intermediates computed once

DAG_PATTERNS = """
pattern silu_residual_dag {
  match {
    n = SILU(x)
    m = MUL(n, w)
    y = ADD(m, n)
  }
  rewrite SILU_RESIDUAL(x, w) kernel elementwise_dag
}
pattern sqrt_div_sub {
  match {
    r = RSQRT(x)
    q = SQRT(x)
    d = DIV(q, w)
    s = SQR(d)
    y = SUB(s, r)
  }
  rewrite SQRT_DIV_SUB(x, w) kernel elementwise_dag
}
pattern rms_then_mul {
  match {
    n = RMS_NORM(x)
    y = MUL(n, w)
  }
  rewrite RMS_THEN_MUL(x, w) kernel elementwise_dag
}
"""


def dag_patterns():
    return parse_patterns(DAG_PATTERNS, "dag.fuse")


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data(), dt=DTYPES, ne=NE, seed=st.integers(0, 2**32 - 1))
def test_dag_with_a_shared_intermediate_matches_interpreter(backend, data, dt, ne, seed):
    b = GraphBuilder()
    x = b.input("x", dt, ne)
    n = b.op("SILU", [x], name="n")
    m = b.mul(n, b.input("w", dt, data.draw(bcast_ne(ne))), name="m")
    y = b.add(m, n, name="y")
    node = run_fused(b.build([y]), backend, seed, dag_patterns())
    src = emit(node, "wgsl").source
    assert src.count("op_silu(") == 2  # the helper's definition + one call: n computed once


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data(), dt=DTYPES, ne=NE, seed=st.integers(0, 2**32 - 1))
def test_dag_of_every_op_kind_matches_interpreter(backend, data, dt, ne, seed):
    b = GraphBuilder()
    x = b.input("x", dt, ne)
    d = b.op("DIV", [b.op("SQRT", [x], name="q"), b.input("w", dt, data.draw(bcast_ne(ne)))], name="d")
    y = b.op("SUB", [b.op("SQR", [d], name="s"), b.op("RSQRT", [x], name="r")], name="y")
    node = run_fused(b.build([y]), backend, seed, dag_patterns(), positive=True)
    assert plan(node).inputs == (0, 1)  # x read once although two ops use it


def test_non_elementwise_decomposition_is_refused_naming_the_node():
    b = GraphBuilder()
    y = b.mul(b.op("RMS_NORM", [b.input("x", "f32", (8, 2))]), b.input("w", "f32", (8,)), name="y")
    fused, _ = fuse(b.build([y]), dag_patterns())
    with pytest.raises(CodegenError, match=r"'y'.*RMS_NORM.*not an element-wise op"):
        emit(fused.outputs[0], "wgsl")


def test_plain_node_is_refused():
    b = GraphBuilder()
    y = b.add(b.input("x", "f32", (8,)), b.input("w", "f32", (8,)), name="y")
    with pytest.raises(CodegenError, match="'y'.*not a FUSED node"):
        plan(y)


def test_source_depends_on_structure_not_on_shapes_or_scales():
    def kernel(ne, cap):
        b = GraphBuilder()
        y = b.scale(b.op("TANH", [b.scale(b.input("x", "f32", ne), 1 / cap)]), cap, name="y")
        return emit(fuse(b.build([y]))[0].outputs[0], "cuda")

    k1, k2 = kernel((8, 3), 30.0), kernel((16, 5, 2), 50.0)
    assert k1.source == k2.source and k1.entry == k2.entry
    assert dict((n, v) for n, _, v in k2.params)["s1"] == 50.0


# ---------------------------------------------------------------------------------------------
# near misses do not fuse


def unary_mul_graph(act="SILU", une=(8, 3), extra_user=False, interior_output=False):
    b = GraphBuilder()
    x = b.input("x", "f32", (8, 3))
    g = b.op(act, [x], name="g")
    u = b.input("u", "f32", une)
    bigger = int(np.prod(une)) > 24  # u bigger than the gate: only valid as src[0] (ggml broadcasts src[1])
    y = b.mul(u, g, name="y") if bigger else b.mul(g, u, name="y")
    outs = [y]
    if extra_user:
        outs.append(b.add(g, x, name="other"))
    if interior_output:
        outs.append(g)
    return b.build(outs)


def test_unary_mul_positive_control():
    fused, _ = fuse(unary_mul_graph(une=(8, 1)))
    assert [n.params["pattern"] for n in fused_nodes(fused)] == ["silu_mul"]


@pytest.mark.parametrize("kw", [{"extra_user": True}, {"interior_output": True},
                                {"une": (8, 3, 2)}])  # u bigger than the gate: not can_repeat(u, g)
def test_unary_mul_near_misses_do_not_fuse(kw):
    fused, report = fuse(unary_mul_graph(**kw))
    assert fused_nodes(fused) == [] or all(n.params["pattern"] != "silu_mul" for n in fused_nodes(fused))
    assert report.why_not("y"), report.format()


def test_add_chain_with_a_shared_partial_sum_fuses_only_the_single_use_part():
    b = GraphBuilder()
    a = [b.input(f"a{k}", "f32", (8, 2)) for k in range(5)]
    s1 = b.add(a[0], a[1], name="s1")
    s2 = b.add(s1, a[2], name="s2")  # used twice: by s3 and by the graph output
    s3 = b.add(s2, a[3], name="s3")
    y = b.add(s3, a[4], name="y")
    fused, _ = fuse(b.build([y, s2]))
    assert sorted(n.params["pattern"] for n in fused_nodes(fused)) == ["add_chain_3", "add_chain_3"]
    roots = sorted(n.name for n in fused_nodes(fused))
    assert roots == ["s2", "y"]


def test_softcap_near_misses_do_not_fuse():
    b = GraphBuilder()
    t = b.op("TANH", [b.scale(b.input("x", "f32", (8, 2)), 0.1, name="a")], name="t")
    y = b.scale(t, 10.0, name="y")
    assert fused_nodes(fuse(b.build([y, t]))[0]) == []  # t is a graph output
    assert fused_nodes(fuse(b.build([y, b.add(t, t, name="o")]))[0]) == []  # t used outside


def test_f32_swiglu_keeps_its_canonicalization():
    """Same-shape f32 SILU -> MUL stays the exact ``swiglu_decomposed`` (benefit 2 > 1), so the
    gate/up GEMV fusion remains possible; f16 or broadcast cases take ``silu_mul``."""
    g = unary_mul_graph()
    fused, _ = rewrite(g, default_patterns())
    assert [n.op for n in fused.nodes if not n.is_leaf] == ["SWIGLU"]
    fused, _ = rewrite(unary_mul_graph(une=(8, 1)), default_patterns())
    assert [n.params.get("pattern") for n in fused.nodes if not n.is_leaf] == ["silu_mul"]


# ---------------------------------------------------------------------------------------------
# every variant compiles


def all_variants() -> list[Tensor]:
    """One FUSED node per kernel variant: each pattern (and the DAG test patterns) x dtype x
    vector width x broadcast or not."""
    out = []
    for dt in ("f32", "f16"):
        for ne, une in (((8, 3), (8, 3)), ((8, 3), (8, 1)), ((7, 3), (1, 3))):
            for act in ACTS:
                b = GraphBuilder()
                y = b.mul(b.op(act, [b.input("x", dt, ne)]), b.input("u", dt, une))
                out.append(b.build([y]))
            b = GraphBuilder()
            out.append(b.build([b.scale(b.op("TANH", [b.scale(b.input("x", dt, ne), 0.1, 0.5)]), 10.0)]))
            for n in range(3, 9):
                b = GraphBuilder()
                acc = b.input("a0", dt, ne)
                for k in range(1, n):
                    acc = b.add(acc, b.input(f"a{k}", dt, une if k % 2 else ne))
                out.append(b.build([acc]))
            b = GraphBuilder()
            x = b.input("x", dt, ne)
            d = b.op("DIV", [b.op("SQRT", [x]), b.input("w", dt, une)])
            out.append(b.build([b.op("SUB", [b.op("SQR", [d]), b.op("RSQRT", [x])])]))
            b = GraphBuilder()
            n_ = b.op("SILU", [b.input("x", dt, ne)])
            out.append(b.build([b.add(b.mul(n_, b.input("w", dt, une)), n_)]))
    pats = elementwise_patterns() + [p for p in dag_patterns() if p.name != "rms_then_mul"]
    nodes = []
    for g in out:
        fused, _ = rewrite(g, pats)
        (node,) = fused_nodes(fused)
        nodes.append(node)
    return nodes


def test_variants_cover_both_widths():
    entries = {emit(n, "wgsl").entry for n in all_variants()}
    assert any(e.endswith("_v4") for e in entries) and any(e.endswith("_v1") for e in entries)
    assert len(entries) >= 60


def test_every_variant_compiles_with_nvcc():
    kernels = [emit(n, "cuda") for n in all_variants()]
    check_cuda([kernels[0], kernels[-1]])
    check_cuda(("elementwise_dag_bundle", bundle(kernels, "#include <cuda_fp16.h>\ntypedef unsigned int uint;")))


def test_every_variant_passes_the_msl_shim():
    kernels = [emit(n, "msl") for n in all_variants()]
    check_msl([kernels[0], kernels[-1]])
    check_msl(("elementwise_dag_bundle", bundle(kernels, "#include <metal_stdlib>\nusing namespace metal;")))


@requires_wgpu
def test_every_variant_compiles_with_naga():
    from fusec.codegen.check import check_wgsl  # noqa: PLC0415

    check_wgsl({k.entry: k for k in (emit(n, "wgsl") for n in all_variants())}.values())


def test_header_names_family_and_structure():
    src = emit(all_variants()[0], "cuda").source
    assert re.search(r"// fusec elementwise_dag kernel dag_silu_mul_[0-9a-f]{6}_f32_f32_f32_v4", src)


def test_scale_parameters_are_runtime():
    b = GraphBuilder()
    y = b.scale(b.op("TANH", [b.scale(b.input("x", "f32", (8,)), 0.25, 1.5)]), 4.0, name="y")
    k = emit(fuse(b.build([y]))[0].outputs[0], "wgsl")
    params = {n: v for n, _, v in k.params}
    assert (params["s0"], params["b0"], params["s1"], params["b1"]) == (0.25, 1.5, 4.0, 0.0)
