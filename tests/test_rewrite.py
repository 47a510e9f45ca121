"""Matcher and rewriter: structural matches, near misses with their reasons, overlaps,
determinism, fixed point, and numerical equivalence against the numpy reference interpreter."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusec.dsl import default_patterns, parse_patterns
from fusec.errors import PatternError
from fusec.interp import interpret
from fusec.ir import GraphBuilder, dumps
from fusec.rewrite import MatchResult, NoMatch, find_matches, match_at, rewrite

SHIPPED = default_patterns()
RMS_MUL = [p for p in SHIPPED if p.name == "rms_norm_mul"]


def where_line(pattern, text: str) -> int:
    (line,) = [w.line for w in pattern.where if w.text == text]
    return line


def one(text: str):
    (p,) = parse_patterns(text, "t.fuse")
    return p


def norm_mul(dtype="f32", w_ne=(8,), w_dtype=None, swap=False, eps=1e-6):
    """x[8x3] -> RMS_NORM -> MUL with w; returns (builder, x, w, n, y)."""
    b = GraphBuilder()
    x = b.input("x", dtype, (8, 3))
    w = b.weight("w", w_dtype or dtype, w_ne)
    n = b.rms_norm(x, eps, name="norm")
    y = b.mul(w, n, name="y") if swap else b.mul(n, w, name="y")
    return b, x, w, n, y


# ---------------------------------------------------------------------------------------------
# structural matches


def test_rms_norm_mul_fuses_into_one_node():
    b, x, w, n, y = norm_mul()
    g2, rep = rewrite(b.build([y]), SHIPPED)
    assert [t.op for t in g2.ops] == ["FUSED"] and rep.total_matches == 1


def test_fused_node_params_name_sources_and_flags():
    b, x, w, n, y = norm_mul(eps=1e-5)
    (f,) = rewrite(b.build([y]), SHIPPED)[0].ops
    assert f.params == {"pattern": "rms_norm_mul", "kernel": "norm_epilogue", "fused_op": "RMS_NORM_MUL", "eps": 1e-5}
    assert f.name == "y" and "output" in f.flags and [s.name for s in f.src] == ["x", "w"]


def test_decomposition_has_placeholders_and_copies():
    b, x, w, n, y = norm_mul()
    (f,) = rewrite(b.build([y]), SHIPPED)[0].ops
    sub = f.decomposition
    ph = [t for t in sub.nodes if t.is_leaf]
    assert [(t.name, t.params["fused_input"], t.ne, t.nb) for t in ph] == [
        ("x", 0, x.ne, x.nb), ("w", 1, w.ne, w.nb)]
    assert [t.op for t in sub.ops] == ["RMS_NORM", "MUL"] and sub.outputs[0].name == "y"


def test_commutative_operand_order_matches():
    b, x, w, n, y = norm_mul(w_ne=(8, 3), swap=True)
    r = match_at(RMS_MUL[0], b.build([y]), y)
    assert isinstance(r, MatchResult) and r.bindings["w"] is w and r.bindings["n"] is n


def test_commutative_match_keeps_original_source_order_in_decomposition():
    b, x, w, n, y = norm_mul(w_ne=(8, 3), swap=True)
    (f,) = rewrite(b.build([y]), SHIPPED)[0].ops
    mul = f.decomposition.outputs[0]
    assert [s.name for s in mul.src] == ["w", "norm"]


DAG = """pattern dag {
  match {
    n = RMS_NORM(x)
    y = ADD(MUL(n, w), n)
  }
  rewrite F(x, w) kernel k
}
"""


def test_dag_pattern_matches_value_used_twice():
    b = GraphBuilder()
    x, w = b.input("x", "f32", (8, 3)), b.weight("w", "f32", (8,))
    n = b.rms_norm(x, 1e-6)
    y = b.add(b.mul(n, w), n, name="y")
    r = match_at(one(DAG), b.build([y]), y)
    assert isinstance(r, MatchResult) and len(r.nodes) == 3


def test_dag_pattern_rejects_two_different_tensors():
    b = GraphBuilder()
    x, w = b.input("x", "f32", (8, 3)), b.weight("w", "f32", (8,))
    y = b.add(b.mul(b.rms_norm(x, 1e-6), w), b.rms_norm(x, 1e-6), name="y")
    r = match_at(one(DAG), b.build([y]), y)
    assert isinstance(r, NoMatch) and r.kind == "structure"


EPS_LITERAL = """pattern p {
  match {
    n = RMS_NORM(x) { eps: 0.5 }
    y = MUL(n, w)
  }
  rewrite F(x, w) kernel k
}
"""


def test_literal_param_mismatch_does_not_match():
    p = one(EPS_LITERAL)
    b, x, w, n, y = norm_mul(eps=1e-6)
    assert match_at(p, b.build([y]), y).kind == "structure"


def test_literal_param_equal_matches():
    p = one(EPS_LITERAL)
    b, x, w, n, y = norm_mul(eps=0.5)
    assert isinstance(match_at(p, b.build([y]), y), MatchResult)


def test_capture_used_twice_must_bind_equal_values():
    p = one("pattern p {\n match {\n  a = SCALE(x) { s: $s }\n  y = SCALE(a) { s: $s }\n }\n"
            " rewrite F(x) kernel k\n}\n")
    b = GraphBuilder()
    x = b.input("x", "f32", (4,))
    y_same = b.scale(b.scale(x, 2.0), 2.0, name="same")
    y_diff = b.scale(b.scale(x, 2.0), 3.0, name="diff")
    g = b.build([y_same, y_diff])
    assert isinstance(match_at(p, g, y_same), MatchResult) and not match_at(p, g, y_diff)


def test_unwritten_optional_source_must_be_absent():
    p = one("pattern p {\n match {\n  y = SOFT_MAX(x)\n }\n rewrite F(x) kernel k\n}\n")
    b = GraphBuilder()
    x, mask = b.input("x", "f32", (8, 3)), b.input("mask", "f32", (8, 3))
    y = b.soft_max_ext(x, mask, name="y")
    assert match_at(p, b.build([y]), y).kind == "structure"


def test_wildcard_source_becomes_an_extra_fused_input():
    p = one("pattern p {\n match {\n  y = SOFT_MAX(x, _)\n }\n rewrite F(x) kernel k\n}\n")
    b = GraphBuilder()
    x, mask = b.input("x", "f32", (8, 3)), b.input("mask", "f32", (8, 3))
    y = b.soft_max_ext(x, mask, name="y")
    (f,) = rewrite(b.build([y]), [p])[0].ops
    assert [s.name for s in f.src] == ["x", "mask"]


# ---------------------------------------------------------------------------------------------
# near misses and their reasons


def test_intermediate_used_twice_is_not_fused():
    b, x, w, n, y = norm_mul()
    other = b.scale(n, 2.0, name="other")
    g2, rep = rewrite(b.build([y, other]), SHIPPED)
    assert rep.total_matches == 0 and not any(t.op == "FUSED" for t in g2.nodes)
    (nf,) = rep.not_fused
    assert nf.kind == "escape" and "interior 'n' ('norm') escapes: used by 'other' outside the match" in nf.reason
    assert nf.message.endswith(f"rms_norm.fuse:{RMS_MUL[0].nodes[0].pos.line}")


def test_intermediate_graph_output_is_not_fused():
    b, x, w, n, y = norm_mul()
    g2, rep = rewrite(b.build([y, n]), SHIPPED)
    assert rep.total_matches == 0 and "interior 'n' ('norm') is a graph output" in rep.not_fused[0].reason


def test_leaf_bound_to_interior_is_not_fused():
    b = GraphBuilder()
    n = b.rms_norm(b.input("x", "f32", (8, 3)), 1e-6, name="norm")
    y = b.mul(n, n, name="y")
    r = match_at(RMS_MUL[0], b.build([y]), y)
    assert r.kind == "escape" and "leaf variable 'w' is bound to matched node 'norm'" in r.reason


def test_non_broadcastable_weight_is_not_fused():
    b = GraphBuilder()
    x, w = b.input("x", "f32", (8, 1)), b.weight("w", "f32", (8, 3))
    y = b.mul(w, b.rms_norm(x, 1e-6, name="norm"), name="y")
    _, rep = rewrite(b.build([y]), SHIPPED)
    (nf,) = rep.not_fused
    assert nf.reason == "where can_repeat(w, n) failed (can_repeat(w, n) = false)"
    assert nf.line == where_line(RMS_MUL[0], "can_repeat(w, n)")


def test_weight_dtype_mismatch_is_not_fused():
    b, x, w, n, y = norm_mul(w_dtype="f16")
    _, rep = rewrite(b.build([y]), SHIPPED)
    line = where_line(RMS_MUL[0], "dtype(w) == dtype(x)")
    want = f"where dtype(w) == dtype(x) failed (w is f16, x is f32) at {RMS_MUL[0].file}:{line}"
    assert rep.not_fused[0].message == want


def test_i32_source_reports_its_dtype():
    p = one("pattern rows {\n match {\n  y = GET_ROWS(a, idx)\n }\n where {\n  dtype(a) in [f32, f16]\n }\n"
            " rewrite F(a, idx) kernel k\n}\n")
    b = GraphBuilder()
    y = b.get_rows(b.weight("tab", "i32", (4, 10)), b.input("idx", "i32", (3,)), name="y")
    _, rep = rewrite(b.build([y]), [p])
    assert rep.not_fused[0].message == "where dtype(a) in [f32, f16] failed (a is i32) at t.fuse:6"


def test_set_rows_root_fuses_into_its_bound_destination():
    """A SET_ROWS root writing into a leaf-bound tensor fuses: the FUSED node writes that source in
    place (its result is a view of it); an interior SET_ROWS never fuses."""
    p = one("pattern p {\n match {\n  y = SET_ROWS(r, i, d)\n }\n rewrite F(r, i, d) kernel k\n}\n")
    b = GraphBuilder()
    d = b.leaf("cache", "f32", (8, 4))
    y = b.set_rows(d, b.input("r", "f32", (8, 2)), b.input("i", "i32", (2,)), name="y")
    g = b.build([y])
    assert match_at(p, g, y)
    g2, rep = rewrite(g, [p])
    node = g2.by_name("y")
    assert rep.total_matches == 1 and node.op == "FUSED" and node.view_src is g2.by_name("cache")
    q = one("pattern q {\n match {\n  y = SET_ROWS(r, i, d)\n  z = SCALE(y) { s: $s }\n }\n"
            " rewrite F(r, i, d) kernel k\n}\n")
    b = GraphBuilder()
    d = b.leaf("cache", "f32", (8, 4))
    z = b.scale(b.set_rows(d, b.input("r", "f32", (8, 2)), b.input("i", "i32", (2,)), name="y"), 2.0, name="z")
    r = match_at(q, b.build([z]), z)
    assert r.kind == "escape" and "writes into 'cache'" in r.reason and "only the root" in r.reason


def test_where_type_error_is_a_pattern_error():
    p = one("pattern p {\n match {\n  y = SILU(x)\n }\n where {\n  dtype(x) + 1 > 0\n }\n rewrite F(x) kernel k\n}\n")
    b = GraphBuilder()
    y = b.silu(b.input("x", "f32", (4,)), name="y")
    with pytest.raises(PatternError) as ei:
        rewrite(b.build([y]), [p])
    assert (ei.value.line, "arithmetic needs numbers") == (6, "arithmetic needs numbers")
    assert "arithmetic needs numbers" in ei.value.msg


def test_context_predicates_uses_and_is_output():
    p = one("pattern p {\n match {\n  y = SILU(x)\n }\n where {\n  uses(x) == 2\n  not is_output(x)\n }\n"
            " rewrite F(x) kernel k\n}\n")
    b = GraphBuilder()
    x = b.input("x", "f32", (4,))
    y = b.silu(x, name="y")
    g = b.build([y, b.gelu(x)])
    assert isinstance(match_at(p, g, y), MatchResult)


# ---------------------------------------------------------------------------------------------
# overlaps, determinism, fixed point


def norm_mul_add():
    b = GraphBuilder()
    x = b.input("x", "f32", (8, 3))
    w, bias = b.weight("w", "f32", (8,)), b.weight("bias", "f32", (8,))
    m = b.mul(b.rms_norm(x, 1e-6, name="norm"), w, name="mul")
    return b, b.add(m, bias, name="out")


def test_longer_match_wins_overlap():
    b, out = norm_mul_add()
    g2, rep = rewrite(b.build([out]), SHIPPED)
    (f,) = g2.ops
    assert f.params["pattern"] == "rms_norm_mul_add" and rep.patterns["rms_norm_mul"].matches == 0


def test_overlap_loser_is_reported():
    b, out = norm_mul_add()
    _, rep = rewrite(b.build([out]), SHIPPED)
    (nf,) = rep.not_fused
    assert (nf.pattern, nf.root, nf.kind) == ("rms_norm_mul", "mul", "overlap")
    assert nf.reason == "overlaps higher-benefit match rms_norm_mul_add at 'out'"


def test_report_counts_nodes_and_bytes():
    b, out = norm_mul_add()
    _, rep = rewrite(b.build([out]), SHIPPED)
    # two interior f32 [8x3] tensors, each written once and read once: 2 * 96 * 2
    assert (rep.total_nodes_removed, rep.total_bytes_saved) == (2, 384)
    assert rep.patterns["rms_norm_mul_add"].applied[0].nodes == ("norm", "mul", "out")


def test_report_to_dict_is_json():
    b, out = norm_mul_add()
    _, rep = rewrite(b.build([out]), SHIPPED)
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["total_matches"] == 1 and d["not_fused"][0]["kind"] == "overlap"


def test_input_graph_is_not_mutated():
    b, out = norm_mul_add()
    g = b.build([out])
    before, nodes = dumps(g), list(g.nodes)
    rewrite(g, SHIPPED)
    assert dumps(g) == before and g.nodes == nodes


def layers(n_layers: int):
    b = GraphBuilder()
    h = b.input("x", "f32", (8, 3))
    for i in range(n_layers):
        w, bias = b.weight(f"w{i}", "f32", (8,)), b.weight(f"b{i}", "f32", (8,))
        h = b.add(b.mul(b.rms_norm(h, 1e-6, name=f"norm-{i}"), w, name=f"mul-{i}"), bias, name=f"out-{i}")
        if i % 2:
            h = b.norm(h, 1e-5, name=f"ln-{i}")
            h = b.add(b.mul(h, w, name=f"lnmul-{i}"), bias, name=f"lnout-{i}")
    return b.build([h])


@given(st.randoms(use_true_random=False))
def test_result_is_independent_of_pattern_order(rnd: random.Random):
    g = layers(4)
    pats = list(SHIPPED)
    rnd.shuffle(pats)
    g_ref, rep_ref = rewrite(g, SHIPPED)
    g2, rep = rewrite(g, pats)
    assert dumps(g2) == dumps(g_ref) and rep.to_dict() == rep_ref.to_dict()


def test_chain_fuses_every_layer():
    g2, rep = rewrite(layers(4), SHIPPED)
    assert rep.patterns["rms_norm_mul_add"].matches == 4 and rep.patterns["norm_mul_add"].matches == 2
    assert {t.op for t in g2.ops} == {"FUSED"}


CHAIN = """pattern scale2 {
  match {
    y = SCALE(SCALE(x))
  }
  rewrite F(x) kernel k
}
pattern scale_fused {
  match {
    y = SCALE(FUSED(x))
  }
  rewrite G(x) kernel k
}
"""


def scale_chain():
    b = GraphBuilder()
    h = b.input("x", "f32", (4,))
    for i in range(3):
        h = b.scale(h, 1.5, name=f"s{i}")
    return b.build([h])


def test_fixed_point_takes_several_rounds():
    g2, rep = rewrite(scale_chain(), parse_patterns(CHAIN))
    (f,) = g2.ops
    assert (rep.rounds, f.params["pattern"], rep.hit_max_iters) == (2, "scale_fused", False)


def test_round_cap_is_reported():
    g2, rep = rewrite(scale_chain(), parse_patterns(CHAIN), max_iters=1)
    assert rep.hit_max_iters and rep.rounds == 1 and len(g2.ops) == 2


def test_duplicate_pattern_objects_are_refused():
    with pytest.raises(PatternError, match="duplicate pattern name"):
        rewrite(scale_chain(), SHIPPED + SHIPPED)


def test_find_matches_lists_valid_and_failed_candidates():
    b, x, w, n, y = norm_mul()
    other = b.scale(n, 2.0, name="other")
    found, failed = find_matches(b.build([y, other]), SHIPPED)
    assert found == [] and [(f.pattern, f.root, f.kind) for f in failed] == [("rms_norm_mul", "y", "escape")]


# ---------------------------------------------------------------------------------------------
# numerical equivalence (numpy reference interpreter)

SHAPES = [(8, 3), (8,), (8, 1), (1, 3)]


@st.composite
def random_graphs(draw):
    """Small graphs of RMS_NORM/NORM/MUL/ADD/SCALE over x[8x3]: norm -> MUL -> ADD blocks (weights of
    broadcastable shapes, either operand order) mixed with single ops, with random extra uses of
    intermediates (later ops pick any earlier value) and random extra outputs."""
    b = GraphBuilder()
    acts = [b.input("x", "f32", (8, 3))]
    params = [b.weight(f"p{i}", "f32", ne) for i, ne in enumerate(SHAPES)]

    def binary(op, a, name):
        other = draw(st.sampled_from(params + acts))
        fn = b.mul if op == "MUL" else b.add
        return fn(other, a, name=name) if other.ne == a.ne and draw(st.booleans()) else fn(a, other, name=name)

    for i in range(draw(st.integers(1, 6))):
        a = draw(st.sampled_from(acts))
        kind = draw(st.sampled_from(["RMS_NORM", "NORM", "SCALE", "MUL", "ADD"]))
        if kind == "SCALE":
            acts.append(b.scale(a, draw(st.sampled_from([0.5, 2.0])), name=f"s{i}"))
        elif kind in ("MUL", "ADD"):
            acts.append(binary(kind, a, f"e{i}"))
        else:
            norm = b.rms_norm if kind == "RMS_NORM" else b.norm
            acts.append(norm(a, draw(st.sampled_from([1e-6, 1e-5])), name=f"n{i}"))
            for j in range(draw(st.integers(0, 2))):
                acts.append(binary(["MUL", "ADD"][j], acts[-1], f"{'ma'[j]}{i}"))
    outs = [acts[-1]] + [t for t in acts[1:-1] if draw(st.integers(0, 3)) == 0]
    return b.build(outs)


@given(random_graphs(), st.integers(0, 2**32 - 1))
def test_rewrite_preserves_values(g, seed):
    rng = np.random.default_rng(seed)
    values = {t.name: rng.standard_normal(t.ne[::-1]).astype(np.float32) for t in g.leaves}
    g2, _ = rewrite(g, SHIPPED)
    want, got = interpret(g, values), interpret(g2, values)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_rewrite_fuses_something_in_the_reference_shape():
    b, out = norm_mul_add()
    g = b.build([out])
    rng = np.random.default_rng(0)
    values = {t.name: rng.standard_normal(t.ne[::-1]).astype(np.float32) for t in g.leaves}
    g2, _ = rewrite(g, SHIPPED)
    np.testing.assert_allclose(interpret(g2, values)["out"], interpret(g, values)["out"], rtol=1e-5)
