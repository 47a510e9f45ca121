"""The pattern language: every construct parses into the documented AST, every error kind is
reported at its exact file:line:col, shipped patterns load."""

from __future__ import annotations

import pytest

from fusec.dsl import default_patterns, load_patterns, parse_patterns, predicate, unregister
from fusec.dsl.ast import Absent, Binary, Call, CaptureRef, DTypeLit, LeafVar, Num, PNode, Str, Unary, VarRef, Wildcard
from fusec.errors import PatternError
from fusec.ir import F16, F32

RMS = """\
# patterns/rms_norm.fuse - comments start with '#'
pattern rms_norm_mul {
  match {
    n = RMS_NORM(x) { eps: $eps }     # op-param capture
    y = MUL(n, w)
  }
  where {                              # one predicate per line
    dtype(x) in [f32, f16]
    dtype(w) == dtype(x)
    contiguous_rows(x) and contiguous_rows(w)
    can_repeat(w, n)
  }
  rewrite RMS_NORM_MUL(x, w) kernel norm_epilogue
  benefit 2
}
"""


def one(text: str):
    (p,) = parse_patterns(text, "t.fuse")
    return p


def pat(match: str, where: str = "", rewrite: str = "F(x) kernel k", extra: str = "") -> str:
    """A pattern with the match block on lines 3.., where block after it."""
    w = f"  where {{\n{where}\n  }}\n" if where else ""
    return f"pattern p {{\n  match {{\n{match}\n  }}\n{w}  rewrite {rewrite}\n{extra}}}\n"


def err(text: str) -> PatternError:
    with pytest.raises(PatternError) as ei:
        parse_patterns(text, "t.fuse")
    return ei.value


# ---------------------------------------------------------------------------------------------
# constructs


def test_full_example_fields():
    p = one(RMS)
    assert (p.name, p.file, p.line, p.column) == ("rms_norm_mul", "t.fuse", 2, 9)
    assert (p.root_op, p.ops, p.fused_op, p.kernel, p.leaves, p.benefit) == (
        "MUL", ["RMS_NORM", "MUL"], "RMS_NORM_MUL", "norm_epilogue", ["x", "w"], 2)
    assert p.captures == ["eps"]
    assert [w.line for w in p.where] == [8, 9, 10, 11]
    assert p.where[0].text == "dtype(x) in [f32, f16]"


def test_capture_param_is_recorded_on_the_node():
    p = one(RMS)
    assert p.nodes[0].params["eps"].name == "eps"


def test_literal_params_including_negative_and_string():
    p = one(pat("    y = SCALE(x) { s: -2.5, b: 0 }"))
    assert p.root.params == {"s": -2.5, "b": 0}


def test_root_is_last_assignment_and_nodes_sources_first():
    p = one(pat("    a = SILU(x)\n    y = GELU(a)"))
    assert p.root.var == "y" and p.ops == ["SILU", "GELU"] and [n.index for n in p.nodes] == [0, 1]


def test_nested_call_with_params():
    p = one(pat("    y = MUL(RMS_NORM(x){eps:$e}, w)", rewrite="F(x, w) kernel k"))
    inner = p.root.args[0]
    assert isinstance(inner, PNode) and inner.var is None and inner.op == "RMS_NORM"
    assert p.captures == ["e"]


def test_dag_pattern_shares_the_node():
    p = one(pat("    n = RMS_NORM(x)\n    y = ADD(MUL(n, w), n)", rewrite="F(x, w) kernel k"))
    mul = p.root.args[0]
    assert mul.args[0] is p.root.args[1] and len(p.nodes) == 3


def test_leaf_variable_used_twice_is_one_leaf():
    p = one(pat("    y = MUL(x, x)"))
    assert p.leaf_vars == ["x"] and p.root.args[0] is p.root.args[1]
    assert isinstance(p.root.args[0], LeafVar)


def test_wildcard_and_absent_sources():
    p = one(pat("    y = SOFT_MAX(x, _)"))
    q = one(pat("    y = SOFT_MAX(x, none)"))
    assert isinstance(p.root.args[1], Wildcard) and isinstance(q.root.args[1], Absent)


def test_default_benefit_is_number_of_ops():
    assert one(pat("    a = SILU(x)\n    y = GELU(a)")).benefit == 2


def test_where_precedence_and_not():
    p = one(pat("    y = SILU(x)", "    not ne(x, 0) + 2 * 3 == 7 or nrows(x) > 1 and contiguous(x)"))
    e = p.where[0].expr
    assert isinstance(e, Binary) and e.op == "or"
    assert isinstance(e.left, Unary) and e.left.op == "not"
    cmp_ = e.left.operand
    assert cmp_.op == "==" and cmp_.left.op == "+" and cmp_.left.right.op == "*"
    assert e.right.op == "and"


def test_where_parentheses_override_precedence():
    p = one(pat("    y = SILU(x)", "    (ne(x, 0) + 2) * 3 == 30"))
    assert p.where[0].expr.left.op == "*" and p.where[0].expr.left.left.op == "+"


@pytest.mark.parametrize("op", ["==", "!=", "<", "<=", ">", ">=", "-", "/", "%"])
def test_where_binary_operators(op):
    p = one(pat("    y = SILU(x)", f"    nrows(x) {op} 2"))
    assert p.where[0].expr.op == op


def test_where_in_and_not_in_lists():
    p = one(pat("    y = SILU(x)", "    dtype(x) in [f32, f16]\n    ne(x, 0) not in [1, 3]"))
    assert p.where[0].expr.op == "in" and p.where[1].expr.op == "not in"
    assert [i.value for i in p.where[0].expr.right.items] == [F32, F16]


def test_dtype_names_resolve_to_dtype_literals():
    p = one(pat("    y = SILU(x)", "    dtype(x) == f16"))
    assert isinstance(p.where[0].expr.right, DTypeLit) and p.where[0].expr.right.value is F16


def test_capture_reference_in_where():
    p = one(pat("    y = SCALE(x) { s: $s }", "    $s > 0.5"))
    assert isinstance(p.where[0].expr.left, CaptureRef) and p.where[0].expr.right.value == 0.5


def test_param_predicate_takes_a_bare_name():
    p = one(pat("    y = SCALE(x)", "    param(y, s) == 1"))
    call = p.where[0].expr.left
    assert isinstance(call, Call) and isinstance(call.args[1], Str) and call.args[1].value == "s"
    assert isinstance(call.args[0], VarRef)


def test_semicolons_separate_where_clauses():
    p = one(pat("    y = SILU(x)", "    contiguous(x); nrows(x) >= 1"))
    assert [w.line for w in p.where] == [6, 6] and len(p.where) == 2


def test_unary_minus_literal():
    p = one(pat("    y = SILU(x)", "    ne(x, 0) > -1"))
    rhs = p.where[0].expr.right
    assert isinstance(rhs, Unary) and rhs.op == "-" and isinstance(rhs.operand, Num)


def test_registered_python_predicate_is_callable():
    @predicate("even_rows_t")
    def even_rows(t):
        return t.ne[1] % 2 == 0

    try:
        p = one(pat("    y = SILU(x)", "    even_rows_t(x)"))
        assert p.where[0].expr.fn == "even_rows_t"
    finally:
        unregister("even_rows_t")


def test_registering_a_builtin_name_is_an_error():
    with pytest.raises(PatternError, match="built-in"):
        predicate("dtype")(lambda t: True)


def test_several_patterns_in_one_file_keep_source_order():
    text = pat("    y = SILU(x)").replace("pattern p", "pattern b")
    text += pat("    y = GELU(x)").replace("pattern p", "pattern a")
    assert [p.name for p in parse_patterns(text)] == ["b", "a"]


# ---------------------------------------------------------------------------------------------
# errors: exact positions


def where_at(e: PatternError) -> tuple[str, int, int]:
    return e.file, e.line, e.column


def test_syntax_error_missing_paren():
    e = err(pat("    y = MUL(x, w", rewrite="F(x, w) kernel k"))
    assert where_at(e) == ("t.fuse", 3, 17)
    assert "found a newline" in e.msg and "')'" in e.msg and "','" in e.msg


def test_syntax_error_bad_character():
    e = err(pat("    y = MUL(x, w) @", rewrite="F(x, w) kernel k"))
    assert where_at(e)[1:] == (3, 19) and "character '@'" in e.msg


def test_syntax_error_unclosed_pattern_at_end_of_file():
    e = err("pattern p {\n  match {\n    y = SILU(x)\n  }\n  rewrite F(x) kernel k\n")
    assert e.line == 5 and "the end of the file" in e.msg and "'}'" in e.msg


def test_syntax_error_reports_keyword_found():
    e = err("pattern p {\n  where {\n  }\n}\n")
    assert (e.line, e.column) == (2, 3) and "'where'" in e.msg and "'match'" in e.msg


def test_unknown_op_suggests_close_names():
    e = err(pat("    y = RMS_NROM(x)"))
    assert (e.line, e.column) == (3, 9) and "did you mean RMS_NORM" in e.msg


def test_wrong_arity():
    e = err(pat("    y = MUL(x)"))
    assert (e.line, e.column) == (3, 9) and "MUL takes 2 sources" in e.msg and "got 1" in e.msg


def test_unknown_op_param():
    e = err(pat("    y = RMS_NORM(x) { epsilon: 1 }"))
    assert (e.line, e.column) == (3, 23) and "did you mean eps" in e.msg


def test_none_on_a_required_source():
    e = err(pat("    y = MUL(x, none)"))
    assert (e.line, e.column) == (3, 16) and "required" in e.msg


def test_variable_used_before_assignment():
    e = err(pat("    a = SILU(b)\n    b = GELU(x)\n    y = ADD(a, b)"))
    assert (e.line, e.column) == (3, 14) and "before it is assigned" in e.msg


def test_assigned_value_not_used_by_root():
    e = err(pat("    a = SILU(x)\n    y = GELU(x)"))
    assert (e.line, e.column) == (3, 5) and "not used by the root" in e.msg


def test_unbound_variable_in_where():
    e = err(pat("    y = MUL(x, w)", "    dtype(z) == f32", "F(x, w) kernel k"))
    assert (e.line, e.column) == (6, 11) and "unbound variable 'z'" in e.msg and "x, w, y" in e.msg


def test_unknown_dtype_name():
    e = err(pat("    y = MUL(x, w)", "    dtype(x) in [f32, bf16]", "F(x, w) kernel k"))
    assert (e.line, e.column) == (6, 23) and "unknown dtype 'bf16'" in e.msg and "f32, f16, i32" in e.msg


def test_unknown_predicate_lists_known_ones():
    e = err(pat("    y = SILU(x)", "    contigous(x)"))
    assert (e.line, e.column) == (6, 5) and "did you mean contiguous" in e.msg and "can_repeat" in e.msg


def test_builtin_predicate_arity():
    e = err(pat("    y = SILU(x)", "    ne(x) == 4"))
    assert (e.line, e.column) == (6, 5) and "ne takes 2 arguments" in e.msg


def test_unknown_capture():
    e = err(pat("    y = SILU(x)", "    nrows(x) > $eps"))
    assert (e.line, e.column) == (6, 16) and "unknown capture '$eps'" in e.msg


def test_reserved_capture_name():
    e = err(pat("    y = SCALE(x) { s: $kernel }"))
    assert (e.line, e.column) == (3, 20) and "reserved" in e.msg


def test_rewrite_argument_interior():
    e = err(pat("    n = RMS_NORM(x)\n    y = MUL(n, w)", rewrite="F(x, n, w) kernel k"))
    assert (e.line, e.column) == (6, 16) and "'n' is an interior value" in e.msg


def test_rewrite_argument_unbound():
    e = err(pat("    y = MUL(x, w)", rewrite="F(x, z) kernel k"))
    assert (e.line, e.column) == (5, 16) and "'z' is not a leaf variable" in e.msg


def test_leaf_missing_from_rewrite():
    e = err(pat("    y = MUL(x, w)", rewrite="F(x) kernel k"))
    assert (e.line, e.column) == (5, 11) and "'w' missing from the rewrite" in e.msg


def test_duplicate_pattern_name_in_one_file():
    text = pat("    y = SILU(x)") + pat("    y = GELU(x)")
    e = err(text)
    assert (e.line, e.column) == (7, 9) and "duplicate pattern name 'p'" in e.msg and "t.fuse:1:9" in e.msg


def test_duplicate_pattern_name_across_files(tmp_path):
    (tmp_path / "a.fuse").write_text(pat("    y = SILU(x)"))
    (tmp_path / "b.fuse").write_text("\n" + pat("    y = GELU(x)"))
    with pytest.raises(PatternError) as ei:
        load_patterns([tmp_path])
    e = ei.value
    assert e.file.endswith("b.fuse") and (e.line, e.column) == (2, 9) and "a.fuse:1:9" in e.msg


# ---------------------------------------------------------------------------------------------
# loading


def test_load_directory_sorted_by_file_name(tmp_path):
    (tmp_path / "b.fuse").write_text(pat("    y = GELU(x)").replace("pattern p", "pattern first_in_b"))
    (tmp_path / "a.fuse").write_text(pat("    y = SILU(x)").replace("pattern p", "pattern second_in_a"))
    (tmp_path / "ignored.txt").write_text("not a pattern")
    assert [p.name for p in load_patterns([tmp_path])] == ["second_in_a", "first_in_b"]


def test_load_missing_path_is_a_pattern_error(tmp_path):
    with pytest.raises(PatternError, match="no such pattern file"):
        load_patterns([tmp_path / "nope.fuse"])


def test_shipped_patterns_load():
    # patterns/torch.fuse (rewrite-op canonicalizations) is checked in tests/test_torch_import.py
    pats = {p.name: p for p in default_patterns() if p.file != "patterns/torch.fuse"}
    assert set(pats) == {"rms_norm_mul", "rms_norm_mul_add", "norm_mul_add", "mul_mat_add", "ffn_up_gate_swiglu",
                         "ffn_up_gate_geglu", "attention_flash", "attention_flash_nomask", "attention_flash_softcap",
                         "attention_flash_softcap_nomask", "silu_mul", "gelu_mul", "sigmoid_mul", "softcap",
                         "add_rms_norm", "add_rms_norm_mul", "add_rms_norm_mul_add",
                         *(f"add_chain_{n}" for n in range(3, 9)), "rope_set_rows", "rope_reshape_set_rows",
                         "rms_norm_mul_rope", "rms_norm_mul_rope_set_rows", "rms_norm_mul_rope_reshape_set_rows",
                         "moe_router", "moe_router_norm", "moe_up_gate_swiglu", "moe_up_gate_geglu"}
    assert {n for n, p in pats.items() if p.outputs} == {"add_rms_norm", "add_rms_norm_mul", "add_rms_norm_mul_add",
                                                          "moe_router", "moe_router_norm"}
    assert pats["add_rms_norm_mul"].outputs == ["s"] and pats["add_rms_norm_mul"].benefit == 2
    assert pats["moe_router_norm"].outputs == ["t"]
    assert {p.kernel for p in pats.values()} == {"norm_epilogue", "gemv_epilogue", "flash_attn", "elementwise_dag",
                                                "rope", "moe_router", "mul_mat_id"}
    assert pats["ffn_up_gate_swiglu"].ops == ["MUL_MAT", "MUL_MAT", "SWIGLU"]
    assert (pats["rms_norm_mul"].fused_op, pats["rms_norm_mul_add"].fused_op, pats["norm_mul_add"].fused_op) == (
        "RMS_NORM_MUL", "RMS_NORM_MUL_ADD", "NORM_MUL_ADD")
    assert pats["rms_norm_mul_add"].leaves == ["x", "w", "b"] and pats["rms_norm_mul_add"].ops == [
        "RMS_NORM", "MUL", "ADD"]


def test_shipped_patterns_have_stable_display_paths():
    """Shipped patterns are named ``patterns/<file>.fuse`` (not the absolute path they were read from),
    also in a FusionReport's "why not fused?" message; the text still comes from patterns_dir()."""
    from fusec.ir import GraphBuilder
    from fusec.resources import patterns_dir
    from fusec.rewrite import rewrite

    pats = default_patterns()
    assert {p.file for p in pats} == {f"patterns/{f.name}" for f in patterns_dir().glob("*.fuse")}
    rms = next(p for p in pats if p.name == "rms_norm_mul")
    assert rms.location == f"patterns/rms_norm.fuse:{rms.line}"
    text = (patterns_dir() / "rms_norm.fuse").read_text(encoding="utf-8")
    assert text.splitlines()[rms.line - 1].startswith("pattern rms_norm_mul ")

    b = GraphBuilder()
    x, w = b.input("x", "f32", (8, 1)), b.weight("w", "f32", (8, 3))
    y = b.mul(w, b.rms_norm(x, 1e-6, name="norm"), name="y")
    _, rep = rewrite(b.build([y]), [rms])
    (nf,) = rep.not_fused
    line = next(c.line for c in rms.where if c.text == "can_repeat(w, n)")
    assert nf.message == f"where can_repeat(w, n) failed (can_repeat(w, n) = false) at patterns/rms_norm.fuse:{line}"
    assert str(patterns_dir()) not in nf.message


def test_user_pattern_files_keep_the_path_as_given(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.fuse").write_text("pattern mine {\n match { y = SILU(x) }\n rewrite S(x) kernel k\n}\n")
    monkeypatch.chdir(tmp_path)
    assert [p.location for p in load_patterns(["sub/mine.fuse"])] == ["sub/mine.fuse:1"]
    assert [p.location for p in load_patterns(["sub"])] == ["sub/mine.fuse:1"]
    assert [p.location for p in load_patterns([tmp_path / "sub"])] == [f"{tmp_path}/sub/mine.fuse:1"]
