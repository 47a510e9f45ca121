"""Multi-output fusion (``rewrite F(...) kernel k outputs(v)``): the DSL clause, the matcher's escape
exemption and cycle check, FUSED_OUTPUT nodes through rewrite / interpreter / buffer plan / JSON /
structural key / report, the norm_epilogue ADD prologue kernels (WGSL run on lavapipe, CUDA compiled
with nvcc and run on a GPU when present, MSL syntax-checked) and the proptest generators."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from rich.console import Console

from fusec.backends import cuda_runtime, wgpu_runtime
from fusec.codegen import emit, needs_kernel
from fusec.codegen.check import check_cuda, check_msl, check_wgsl
from fusec.codegen.families.norm_epilogue import plan
from fusec.dsl import default_patterns, parse_patterns
from fusec.errors import BackendError, CodegenError, GraphError, PatternError
from fusec.interp import interpret
from fusec.ir import GraphBuilder
from fusec.ir.serialize import graph_from_dict, graph_to_dict
from fusec.models import build_llama_decode, load_config
from fusec.proptest import run_pattern_tests
from fusec.proptest.analysis import analyze
from fusec.proptest.case import EXTRA_USER, INTERIOR_OUTPUT, realize
from fusec.proptest.strategies import near_miss_kinds
from fusec.rewrite import rewrite
from fusec.rewrite.match import MatchResult, NoMatch, match_at
from fusec.runtime.key import structural_key
from fusec.runtime.plan import binding_root, lifetimes, plan_buffers
from tests.gpu import requires_cuda, requires_wgpu

PATS = {p.name: p for p in default_patterns()}
MULTI = ("add_rms_norm", "add_rms_norm_mul", "add_rms_norm_mul_add")

ONE = """
pattern p {
  match {
    s = ADD(a, b)
    y = RMS_NORM(s) { eps: $eps }
  }
  rewrite ADD_RMS_NORM(a, b) kernel norm_epilogue OUTS
}
"""


# -- DSL ---------------------------------------------------------------------------------------------------


def test_outputs_clause_parses_and_lowers_the_default_benefit():
    (p,) = parse_patterns(ONE.replace("OUTS", "outputs(s)"))
    assert p.outputs == ["s"]
    assert p.benefit == 1  # two op nodes, one of them still written
    (q,) = parse_patterns(ONE.replace("OUTS", ""))
    assert q.outputs == [] and q.benefit == 2


@pytest.mark.parametrize("outs, col, msg", [
    ("outputs(y)", 59, "output 'y' is the root"),
    ("outputs(a)", 59, "output 'a' is a leaf variable"),
    ("outputs(t)", 59, "output 't' is not a variable of the match"),
    ("outputs(s, s)", 62, "output 's' is given twice"),
    ("outputs()", 59, "syntax error: found ')'"),
])
def test_outputs_clause_errors_point_at_the_name(outs, col, msg):
    with pytest.raises(PatternError) as e:
        parse_patterns(ONE.replace("OUTS", outs), "m.fuse")
    assert str(e.value).startswith(f"m.fuse:7:{col}: {msg}"), str(e.value)


def test_rewrite_op_takes_no_outputs_clause():
    src = """pattern p {
  match {
    s = ADD(a, b)
    y = SCALE(s) { s: 1.0, b: 0.0 }
  }
  rewrite op ADD(a, b) outputs(s)
}"""
    with pytest.raises(PatternError, match=r"^<string>:6:\d+: syntax error: found 'outputs', expected one of"):
        parse_patterns(src)


# -- matcher ----------------------------------------------------------------------------------------------


def residual(ne0=64, rows=3, dtype="f32", user_first=False, n_user=False, s_output=True):
    """x + r -> RMS_NORM -> MUL(w); the sum s used by a later ADD (and a graph output when
    ``s_output``); ``user_first`` builds an outside user of s before the norm (earlier in topological
    order than the root); ``n_user`` gives the norm an outside user too (a near miss)."""
    b = GraphBuilder()
    x = b.input("x", dtype, (ne0, rows))
    r = b.input("r", dtype, (ne0, rows))
    w = b.weight("w", dtype, (ne0,))
    s = b.add(x, r, name="s")
    outs = []
    if user_first:
        outs.append(b.scale(s, 0.5, name="early"))
    n = b.rms_norm(s, 1e-5, name="n")
    y = b.mul(n, w, name="y")
    z = b.add(b.scale(y, 2.0, name="ffn"), s, name="z")
    outs.append(z)
    if n_user:
        outs.append(b.scale(n, 3.0, name="n_user"))
    if s_output:
        outs.append(s)
    return b.build(outs)


def values(g, seed=0):
    rng = np.random.default_rng(seed)
    return {t.name: rng.standard_normal(t.ne[::-1]).astype(t.dtype.np) for t in g.leaves}


def test_declared_output_may_escape_and_be_a_graph_output():
    g = residual()
    m = match_at(PATS["add_rms_norm_mul"], g, g.by_name("y"))
    assert isinstance(m, MatchResult)
    assert [t.name for t in m.outputs] == ["s"]


def test_other_interior_values_still_may_not_escape():
    g = residual(n_user=True)
    m = match_at(PATS["add_rms_norm_mul"], g, g.by_name("y"))
    assert isinstance(m, NoMatch) and m.kind == "escape"
    assert "interior 'n' ('n') escapes: used by 'n_user'" in m.reason


def test_output_feeding_a_source_of_the_match_is_refused():
    """s -> SCALE -> w': fusing would make the FUSED node read its own output."""
    b = GraphBuilder()
    x = b.input("x", "f32", (16, 2))
    r = b.input("r", "f32", (16, 2))
    s = b.add(x, r, name="s")
    w = b.scale(s, 2.0, name="w_from_s")
    y = b.mul(b.rms_norm(s, 1e-5, name="n"), w, name="y")
    g = b.build([y])
    m = match_at(PATS["add_rms_norm_mul"], g, y)
    assert isinstance(m, NoMatch) and m.kind == "escape"
    assert "output 's' ('s') reaches source 'w_from_s'" in m.reason
    g2, rep = rewrite(g, [PATS["add_rms_norm_mul"]])
    assert rep.total_matches == 0 and "FUSED" not in g2.by_op()


# -- rewrite, interpreter, report ---------------------------------------------------------------------


@pytest.mark.parametrize("user_first", [False, True])
@pytest.mark.parametrize("s_output", [False, True])
def test_rewrite_rewires_outside_users_to_a_fused_output(user_first, s_output):
    g = residual(user_first=user_first, s_output=s_output)
    g2, rep = rewrite(g, [PATS["add_rms_norm_mul"]])
    fused, proj = g2.by_name("y"), g2.by_name("s")
    assert fused.op == "FUSED" and proj.op == "FUSED_OUTPUT"
    assert proj.src == (fused,) and proj.params == {"index": 1}
    assert [o.op for o in fused.decomposition.outputs] == ["MUL", "ADD"]
    assert g2.by_name("z").src[1] is proj
    if user_first:
        assert g2.by_name("early").src[0] is proj
    assert ("output" in proj.flags) == s_output
    assert not needs_kernel(proj)
    vals = values(g)
    want, got = interpret(g, vals), interpret(g2, vals)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    (a,) = rep.applied
    assert a.outputs == ("s",) and a.to_dict()["outputs"] == ["s"]
    nbytes = 64 * 3 * 4
    # n is written once and read once (by y); s is still written, only its read by n is saved
    assert a.bytes_saved == 2 * nbytes + nbytes
    assert rep.patterns["add_rms_norm_mul"].nodes_removed == 1  # 3 ops -> FUSED + FUSED_OUTPUT


def test_declared_output_without_outside_users_is_still_computed():
    b = GraphBuilder()
    x = b.input("x", "f32", (32, 2))
    r = b.input("r", "f32", (32, 2))
    y = b.rms_norm(b.add(x, r, name="s"), 1e-6, name="y")
    g = b.build([y])
    g2, rep = rewrite(g, [PATS["add_rms_norm"]])
    assert rep.total_matches == 1
    assert g2.by_name("s").op == "FUSED_OUTPUT" and not g2.users().get(id(g2.by_name("s")))
    plan_buffers(g2).check()
    vals = values(g)
    np.testing.assert_array_equal(interpret(g2, vals)["y"], interpret(g, vals)["y"])


# -- buffer plan ---------------------------------------------------------------------------------------------


def test_plan_gives_an_extra_output_its_own_slot_from_the_fused_node_on():
    g = residual()
    g2, _ = rewrite(g, [PATS["add_rms_norm_mul"]])
    p = plan_buffers(g2)
    p.check()
    fused, proj = g2.by_name("y"), g2.by_name("s")
    idx = {id(t): i for i, t in enumerate(g2.nodes)}
    assert lifetimes(g2)[proj][0] == idx[id(fused)]  # born with the FUSED node that writes it
    assert p.slot(proj).index != p.slot(fused).index
    assert p.extra_outputs(fused) == {1: proj}


def test_plan_never_hands_an_extra_output_the_slot_of_an_input_the_kernel_reads():
    b = GraphBuilder()
    x = b.input("x", "f32", (64, 2))
    a = b.scale(x, 2.0, name="a")  # scratch, last read by the FUSED node
    c = b.scale(x, 3.0, name="c")  # scratch, last read by the FUSED node
    y = b.rms_norm(b.add(a, c, name="s"), 1e-6, name="y")
    g2, _ = rewrite(b.build([b.scale(b.input("q", "f32", (64, 2)), 1.0, name="q2"), y]), [PATS["add_rms_norm"]])
    p = plan_buffers(g2)
    p.check()
    fused, proj = g2.by_name("y"), g2.by_name("s")
    read = {p.slot(g2.by_name("a")).index, p.slot(g2.by_name("c")).index}
    assert p.slot(proj).index not in read and p.slot(fused).index not in read
    # a plan edited to alias the extra output with an input is refused, naming it
    p.slot_of[proj] = p.slot_of[g2.by_name("a")]
    with pytest.raises(BackendError, match=r"node 'y' \(FUSED\) writes slot \d+, which also holds 'a' that the "
                                           r"node reads: its extra output 's' would overwrite its own input"):
        p.check()


def test_kernel_binding_of_an_extra_output_needs_its_fused_output_node():
    g2, _ = rewrite(residual(), [PATS["add_rms_norm_mul"]])
    fused, proj = g2.by_name("y"), g2.by_name("s")
    k = emit(fused, "wgsl")
    (out1,) = [b for b in k.bindings if b.name == "out1"]
    assert out1.write and out1.tensor is fused.decomposition.outputs[1]
    assert binding_root(fused, out1.tensor, {1: proj}) is proj
    with pytest.raises(BackendError, match="writes extra output 1 .* no FUSED_OUTPUT node"):
        binding_root(fused, out1.tensor, {})


# -- IR: FUSED_OUTPUT, JSON, structural key -----------------------------------------------------------------


def test_json_round_trip_and_structural_key():
    g2, _ = rewrite(residual(user_first=True), [PATS["add_rms_norm_mul"]])
    d = graph_to_dict(g2)
    (proj,) = [n for n in d["nodes"] if n["op"] == "FUSED_OUTPUT"]
    assert proj["params"] == {"index": 1} and proj["name"] == "s"
    (fn,) = [n for n in d["nodes"] if n["op"] == "FUSED"]
    assert len(fn["decomposition"]["outputs"]) == 2
    g3 = graph_from_dict(d)
    assert graph_to_dict(g3) == d
    assert structural_key(g3).digest == structural_key(g2).digest
    vals = values(g2)
    np.testing.assert_array_equal(interpret(g3, vals)["z"], interpret(g2, vals)["z"])
    # a different extra-output index is a different graph
    bad = graph_to_dict(g2)
    next(n for n in bad["nodes"] if n["op"] == "FUSED_OUTPUT")["params"]["index"] = 2
    with pytest.raises(GraphError, match=r"index 2 is not an extra output of the FUSED node \(it has outputs 1..1\)"):
        graph_from_dict(bad)


def test_fused_output_of_a_plain_node_is_a_graph_error():
    b = GraphBuilder()
    x = b.input("x", "f32", (4,))
    with pytest.raises(GraphError, match="FUSED_OUTPUT reads a FUSED node"):
        b.op("FUSED_OUTPUT", [b.scale(x, 1.0)], {"index": 1})


# -- kernels -----------------------------------------------------------------------------------------------


def chain_graph(pattern: str, dtype: str, ne0: int, bcast: bool, swap: bool = False):
    b = GraphBuilder()
    ne = (ne0, 3, 2)
    a = b.input("a", dtype, ne)
    r = b.input("r", dtype, (ne0, 1, 2) if bcast else ne)
    s = b.add(r, a, name="s") if swap and not bcast else b.add(a, r, name="s")
    y = b.rms_norm(s, 1e-5, name="n")
    if "mul" in pattern:
        y = b.mul(y, b.weight("w", dtype, (ne0, 3, 1)), name="m")
    if pattern.endswith("mul_add"):
        y = b.add(y, b.weight("c", dtype, (ne0,)), name="y")
    return b.build([y, b.scale(s, 1.0, name="s_user")])


# row lengths picking each tuning: vec4 in registers, vec1 in registers, streamed (vec8 for f16)
KERNEL_CASES = [(p, dt, ne0, bc) for p in MULTI for dt in ("f32", "f16") for ne0, bc in ((64, True), (63, False),
                                                                                        (17000, True))]


def fused_node(pattern, dtype, ne0, bcast, swap=False):
    g = chain_graph(pattern, dtype, ne0, bcast, swap)
    g2, rep = rewrite(g, [PATS[pattern]])
    assert rep.total_matches == 1, rep.format()
    return g, g2, g2.outputs[0]


def run_and_compare(run, backend, pattern, dtype, ne0, bcast, swap=False):
    g, g2, node = fused_node(pattern, dtype, ne0, bcast, swap)
    vals = values(g, seed=ne0)
    want = interpret(g, vals)
    k = emit(node, backend)
    arrays = {b.name: (np.full(b.tensor.root.nelements, np.nan, b.dtype.np) if b.write
                       else vals[b.tensor.root.name].reshape(-1)) for b in k.bindings}
    got = run(k, arrays)
    tol = 1e-7 if dtype == "f32" else 1e-5
    s_ref = want["s_user"].astype(np.float64)
    s_got = got["out1"].reshape(s_ref.shape).astype(np.float64)
    np.testing.assert_array_equal(s_got, s_ref)  # the sum is exact (rounded to the storage type once)
    ref = want[node.name].astype(np.float64)
    out = got["dst"].reshape(ref.shape).astype(np.float64)
    assert np.sum((out - ref) ** 2) / np.sum(ref**2) <= tol, k.entry


@requires_wgpu
@pytest.mark.parametrize("pattern, dtype, ne0, bcast", KERNEL_CASES)
def test_wgsl_kernel_writes_both_outputs(pattern, dtype, ne0, bcast):
    run_and_compare(wgpu_runtime.run_kernel, "wgsl", pattern, dtype, ne0, bcast)


@requires_wgpu
@pytest.mark.parametrize("pattern", MULTI)
def test_wgsl_kernel_f16_vec4(pattern):
    """ne0 = 68: f16 rows as vec4<f16> (not the vec4<u32> eight-half words), the sum rounded through f16."""
    run_and_compare(wgpu_runtime.run_kernel, "wgsl", pattern, "f16", 68, True)


@requires_wgpu
def test_wgsl_kernel_with_the_row_operand_second():
    run_and_compare(wgpu_runtime.run_kernel, "wgsl", "add_rms_norm_mul", "f32", 64, False, swap=True)


@requires_cuda
@pytest.mark.parametrize("pattern, dtype, ne0, bcast", KERNEL_CASES)
def test_cuda_kernel_writes_both_outputs(pattern, dtype, ne0, bcast):
    run_and_compare(cuda_runtime.run_kernel, "cuda", pattern, dtype, ne0, bcast)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_kernels_compile():
    check_cuda([emit(fused_node(*c)[2], "cuda") for c in KERNEL_CASES])


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ for the MSL shim")
def test_msl_kernels_pass_the_syntax_check():
    check_msl([emit(fused_node(*c)[2], "msl") for c in KERNEL_CASES])


@requires_wgpu
def test_wgsl_kernels_pass_naga():
    check_wgsl([emit(fused_node(*c)[2], "wgsl") for c in KERNEL_CASES])


def test_norm_plan_describes_the_prologue_and_its_output():
    _, _, node = fused_node("add_rms_norm_mul_add", "f32", 64, True)
    p = plan(node)
    assert p.name == "add_rms_norm_mul_add" and p.prologue.output == 1
    assert p.describe() == "RMS_NORM(ADD(src0, src1) [output 1]) -> MUL(src2) -> ADD(src3)"


def test_norm_plan_refuses_an_extra_output_it_cannot_write():
    src = """pattern p {
  match {
    n = RMS_NORM(x) { eps: $eps }
    y = MUL(n, w)
  }
  rewrite RMS_NORM_MUL(x, w) kernel norm_epilogue outputs(n)
}"""
    (p,) = parse_patterns(src)
    b = GraphBuilder()
    x = b.input("x", "f32", (16, 2))
    n = b.rms_norm(x, 1e-6, name="n")
    g = b.build([b.mul(n, b.weight("w", "f32", (16,)), name="y"), b.scale(n, 1.0, name="u")])
    g2, rep = rewrite(g, [p])
    assert rep.total_matches == 1
    vals = values(g)
    np.testing.assert_array_equal(interpret(g2, vals)["u"], interpret(g, vals)["u"])  # the numpy path works
    with pytest.raises(CodegenError, match="extra output\\(s\\) 'n': only the sum of the ADD before the norm"):
        emit(g2.by_name("y"), "wgsl")


# -- proptest generators ------------------------------------------------------------------------------------


def test_near_misses_never_target_a_declared_output():
    p = PATS["add_rms_norm"]
    assert EXTRA_USER not in near_miss_kinds(p, analyze(p))  # its only interior value is declared
    q = PATS["add_rms_norm_mul"]
    assert {EXTRA_USER, INTERIOR_OUTPUT} <= set(near_miss_kinds(q, analyze(q)))


def test_positive_cases_use_the_declared_outputs_outside_the_match():
    from hypothesis import given, settings

    from fusec.proptest.strategies import positive_cases

    p = PATS["add_rms_norm_mul"]
    seen = set()

    @settings(max_examples=25, deadline=None, database=None)
    @given(positive_cases(p, analyze(p)))
    def prop(case):
        seen.add(case.out_uses["s"])
        r = realize(p, case)
        names = {t.name for t in r.graph.outputs}
        assert ("s_user" in names) == (case.out_uses["s"] in ("user", "both"))
        assert ("s" in names) == (case.out_uses["s"] in ("output", "both"))
        assert isinstance(match_at(p, r.graph, r.root), MatchResult)

    prop()
    assert len(seen) >= 2


def test_multi_output_patterns_pass_on_numpy():
    buf = io.StringIO()
    con = Console(file=buf, width=200)
    assert run_pattern_tests([PATS[n] for n in MULTI], backend="numpy", examples=10, console=con), buf.getvalue()


@requires_wgpu
def test_multi_output_patterns_pass_on_wgpu():
    buf = io.StringIO()
    con = Console(file=buf, width=200)
    assert run_pattern_tests([PATS[n] for n in MULTI], backend="wgpu", examples=6, console=con), buf.getvalue()


# -- the Llama graph ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_tokens", [1, 4])
def test_llama_residual_adds(n_tokens):
    """Decode: the residual ADD goes into the GEMV epilogue (mul_mat_add) and RMS_NORM -> MUL stays
    rms_norm_mul (equal benefit, earlier root). Prefill (no GEMV epilogue): add_rms_norm_mul takes the
    residual ADD of every layer but the first, and the next layer's residual reads its FUSED_OUTPUT."""
    cfg = load_config("llama-3.2-1b").with_layers(2)
    g = build_llama_decode(cfg, n_tokens=n_tokens, n_kv=32, kv_size=64)
    g2, rep = rewrite(g, default_patterns())
    counts = {n: s.matches for n, s in rep.patterns.items() if s.matches}
    n_res = 2 * cfg.num_hidden_layers  # residual ADDs: after attention and after the FFN, per layer
    if n_tokens == 1:
        assert counts.get("mul_mat_add") == n_res and "add_rms_norm_mul" not in counts
    else:
        # every residual ADD is followed by the next RMS_NORM -> MUL (the last one by the output norm); the first
        # layer's attention norm reads the embeddings and stays rms_norm_mul
        assert counts.get("add_rms_norm_mul") == n_res and counts.get("rms_norm_mul") == 1
        outs = [t for t in g2.nodes if t.op == "FUSED_OUTPUT"]
        users = g2.users()
        assert len(outs) == n_res
        # each sum feeds the next residual ADD, except the last one (only the output norm reads it)
        assert sum(1 for t in outs if users.get(id(t))) == n_res - 1
        plan_buffers(g2).check()


def test_a_family_that_ignores_an_extra_output_fails_loudly():
    """gemv_epilogue renders the chain ending at output 0 only: the generic check in fusec.codegen.emit
    refuses to hand out a kernel that leaves a declared output unwritten."""
    src = """pattern p {
  match {
    m = MUL_MAT(w, x)
    y = ADD(m, b)
  }
  rewrite MUL_MAT_ADD(w, x, b) kernel gemv_epilogue outputs(m)
}"""
    (p,) = parse_patterns(src)
    g = GraphBuilder()
    m = g.mul_mat(g.weight("w", "f32", (32, 8)), g.input("x", "f32", (32, 1)), name="m")
    g2, rep = rewrite(g.build([g.add(m, g.input("b", "f32", (8, 1)), name="y"), m]), [p])
    assert rep.total_matches == 1
    vals = values(g2)
    assert set(interpret(g2, vals)) == {"y", "m"}
    with pytest.raises(CodegenError, match=r"node 'y': kernel family 'gemv_epilogue' does not write extra "
                                           r"output\(s\) 1 \('m'\)"):
        emit(g2.by_name("y"), "wgsl")


def test_two_multi_output_matches_that_would_form_a_cycle_together():
    """Each match alone passes the cycle check, but s1 -> w2 (a source of the second match) and
    s2 -> w1 (a source of the first): fusing both makes each FUSED node depend on the other. One of
    them is left for the next round, where the matcher sees the cycle through the first FUSED node."""
    b = GraphBuilder()
    ne = (16, 2)
    s1 = b.add(b.input("a1", "f32", ne), b.input("b1", "f32", ne), name="s1")
    s2 = b.add(b.input("a2", "f32", ne), b.input("b2", "f32", ne), name="s2")
    w1 = b.scale(s2, 0.5, name="w1")
    w2 = b.scale(s1, 0.25, name="w2")
    y1 = b.mul(b.rms_norm(s1, 1e-6, name="n1"), w1, name="y1")
    y2 = b.mul(b.rms_norm(s2, 1e-6, name="n2"), w2, name="y2")
    g = b.build([y1, y2])
    p = PATS["add_rms_norm_mul"]
    assert isinstance(match_at(p, g, y1), MatchResult) and isinstance(match_at(p, g, y2), MatchResult)
    g2, rep = rewrite(g, [p])
    assert rep.total_matches == 1
    (left,) = [n for n in rep.not_fused if n.kind == "overlap"]
    assert "its declared outputs would feed its own sources (a cycle)" in left.reason
    assert [n for n in rep.not_fused if n.root == left.root and n.kind == "escape" and "reaches source" in n.reason]
    vals = values(g)
    want, got = interpret(g, vals), interpret(g2, vals)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("kind", [pytest.param("wgpu", marks=requires_wgpu.mark),
                                  pytest.param("cuda", marks=requires_cuda.mark)])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_backend_runs_the_rewritten_graph(kind, dtype):
    """The whole path on a device backend: buffer plan with the FUSED_OUTPUT slot, the kernel writing
    it, an outside user that comes before the root, the sum also a graph output, and a second
    multi-output match that reads the first one's extra output (chained residuals)."""
    from fusec.backends import get_backend

    b = GraphBuilder()
    ne = (256, 3)
    x = b.input("x", dtype, ne)
    w = b.weight("w", dtype, (256,))
    s1 = b.add(x, b.input("r", dtype, ne), name="s1")
    early = b.scale(s1, 0.5, name="early")
    y1 = b.mul(b.rms_norm(s1, 1e-5, name="n1"), w, name="y1")
    s2 = b.add(b.scale(y1, 2.0, name="ffn"), s1, name="s2")
    y2 = b.mul(b.rms_norm(s2, 1e-5, name="n2"), w, name="y2")
    g = b.build([y2, s2, early])
    g2, rep = rewrite(g, default_patterns())
    assert rep.patterns["add_rms_norm_mul"].matches == 2
    vals = values(g, seed=3)
    want = interpret(g, vals)
    be = get_backend(kind)
    be.set_weights({"w": vals["w"]})
    got = be.compile(g2).run({t.name: vals[t.name] for t in g2.leaves if "weight" not in t.flags})
    tol = 1e-6 if dtype == "f32" else 2e-3
    for k in ("y2", "s2", "early"):
        np.testing.assert_allclose(got[k].astype(np.float32), want[k].astype(np.float32), rtol=tol, atol=tol,
                                   err_msg=k)
