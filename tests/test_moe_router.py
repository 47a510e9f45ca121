"""The fused MoE router (patterns/moe.fuse, kernel family ``moe_router``): a multi-output fusion of
SOFT_MAX -> ARGSORT -> VIEW -> GET_ROWS [-> SUM_ROWS -> CLAMP -> DIV] whose outputs are the weights
and the expert ids.

Matching: the patterns fuse llama.cpp's router (with and without renormalization) and nothing that
differs from it (ascending sort, a view that is not the leading columns, more than 1024 experts, a
masked softmax). Kernels: the fused graph run on wgpu (and cuda) equals the interpreter on the
unfused graph: ids exactly (the logits are spaced so that no two probabilities tie within f32
rounding), weights within normalized MSE 1e-7. Every variant compiles with nvcc, the MSL shim, naga.
"""

from __future__ import annotations

import math
import shutil
import types

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from fusec.codegen import emit
from fusec.dsl import default_patterns
from fusec.errors import CodegenError
from fusec.interp import interpret
from fusec.ir import GraphBuilder
from fusec.ir.serialize import dumps
from fusec.models.moe import WEIGHTS_SUM_MIN, build_moe_ffn, moe_weight_specs
from fusec.rewrite import rewrite
from fusec.rewrite.fuse import make_fused_node
from tests.gpu import compile_check_tests, requires_cuda, requires_wgpu
from tests.test_elementwise_kernels import nmse

BACKENDS = [pytest.param("wgpu", marks=requires_wgpu.mark), pytest.param("cuda", marks=requires_cuda.mark)]


def moe_patterns():
    return [p for p in default_patterns() if p.file == "patterns/moe.fuse"]


def router_graph(n_expert, k, n_tokens, norm=True, scale=1.0, order="desc", view_offset=0, mask=False):
    """llama.cpp's router on logits [n_expert, n_tokens]; outputs (weights, ids)."""
    b = GraphBuilder()
    x = b.input("logits", "f32", (n_expert, n_tokens))
    m = b.input("mask", "f32", (n_expert, n_tokens)) if mask else None
    probs = b.soft_max_ext(x, m, scale=scale, name="probs")
    srt = b.argsort(probs, order, name="argsort")
    ids = b.view(srt, (k, n_tokens), srt.nb, offset=view_offset * 4, name="topk")
    w = b.get_rows(b.reshape(probs, (1, n_expert, n_tokens)), ids, name="weights")
    if norm:
        w2 = b.reshape(w, (k, n_tokens))
        s = b.clamp(b.sum_rows(w2), WEIGHTS_SUM_MIN, math.inf)
        w = b.div(w2, s, name="weights_norm")
    return b.build([w, ids]), w, ids


def spaced_logits(rng, n_expert, n_tokens):
    """Logits whose softmax probabilities are pairwise far apart (no near ties), random order."""
    return np.stack([rng.permutation(n_expert) * 0.02 + rng.uniform(-0.004, 0.004, n_expert) - 3.0
                     for _ in range(n_tokens)]).astype(np.float32)


def fused_names(g):
    return {t.name: (t.op, t.params.get("pattern")) for t in g.nodes if t.op in ("FUSED", "FUSED_OUTPUT")}


# ---------------------------------------------------------------------------------------------
# matching


@pytest.mark.parametrize("norm, pattern", [(True, "moe_router_norm"), (False, "moe_router")])
def test_router_fuses_into_one_node_with_the_ids_as_second_output(norm, pattern):
    g, w, ids = router_graph(128, 8, 3, norm=norm)
    fused, report = rewrite(g, moe_patterns())
    assert fused_names(fused) == {w.name: ("FUSED", pattern), "topk": ("FUSED_OUTPUT", None)}
    assert [o.name for o in fused.outputs] == [w.name, "topk"]
    node = fused.outputs[0]
    assert node.params["kernel"] == "moe_router" and node.ne == w.ne
    assert fused.outputs[1].ne == (8, 3, 1, 1) and fused.outputs[1].nb == ids.nb
    assert report.total_matches == 1
    rng = np.random.default_rng(0)
    vals = {"logits": rng.standard_normal(128 * 3).astype(np.float32)}
    want, got = interpret(g, vals), interpret(fused, vals)
    for name in (w.name, "topk"):
        np.testing.assert_array_equal(got[name], want[name])


@pytest.mark.parametrize("kwargs", [
    {"order": "asc"},            # smallest experts: not a top-k
    {"view_offset": 1},          # not the leading columns
    {"mask": True},              # masked softmax
])
def test_near_misses_do_not_fuse(kwargs):
    g, _, _ = router_graph(16, 4, 2, **kwargs)
    fused, _ = rewrite(g, moe_patterns())
    assert fused_names(fused) == {}


def test_more_experts_than_the_sort_holds_do_not_fuse():
    g, _, _ = router_graph(1025, 8, 1)
    fused, _ = rewrite(g, moe_patterns())
    assert fused_names(fused) == {}


def test_ids_used_elsewhere_still_fuse_and_weights_used_elsewhere_do_not():
    # the ids are a declared output: MUL_MAT_ID reads them; the un-normalized weights are interior
    b = GraphBuilder()
    x = b.input("logits", "f32", (16, 2))
    probs = b.soft_max(x)
    ids = b.argsort_top_k(probs, 4, name="topk")
    w = b.get_rows(b.reshape(probs, (1, 16, 2)), ids, name="weights")
    w2 = b.reshape(w, (4, 2))
    y = b.div(w2, b.clamp(b.sum_rows(w2), WEIGHTS_SUM_MIN, math.inf), name="norm")
    extra = b.scale(w, 2.0, name="raw_weights_user")
    fused, _ = rewrite(b.build([y, extra, ids]), moe_patterns())
    # the normalized form cannot fuse (w escapes); the shorter router can, with w as its root
    assert fused_names(fused) == {"weights": ("FUSED", "moe_router"), "topk": ("FUSED_OUTPUT", None)}


def test_whole_moe_ffn_gets_the_router_and_expert_sum_fusions():
    cfg = types.SimpleNamespace(name="moe", hidden_size=64, n_expert=16, n_expert_used=4, n_ff_exp=32,
                                norm_topk_prob=True, expert_weights_scale=0.0)
    b = GraphBuilder()
    w = {n: b.weight(n, s.dtype, s.ne) for n, s in moe_weight_specs(cfg, 0).items()}
    y = build_moe_ffn(b, b.input("ffn_norm", "f32", (64, 2)), 0, cfg, w)
    fused, _ = rewrite(b.build([y]), default_patterns())
    assert fused_names(fused) == {"ffn_moe_weights_norm-0": ("FUSED", "moe_router_norm"),
                                  "ffn_moe_topk-0": ("FUSED_OUTPUT", None),
                                  "ffn_moe_swiglu-0": ("FUSED", "moe_up_gate_swiglu"),
                                  "ffn_moe_out-0": ("FUSED", "add_chain_4")}
    down = [t for t in fused.nodes if t.op == "MUL_MAT_ID"]
    glu = [t for t in fused.nodes if t.name == "ffn_moe_swiglu-0"][0]
    assert len(down) == 1 and down[0].src[2].op == "FUSED_OUTPUT" and glu.src[3] is down[0].src[2]


def test_fusec_compile_shows_the_router_fusion(tmp_path):
    from fusec.cli import main  # noqa: PLC0415

    cfg = types.SimpleNamespace(name="moe", hidden_size=64, n_expert=16, n_expert_used=4, n_ff_exp=32,
                                norm_topk_prob=True, expert_weights_scale=0.0)
    b = GraphBuilder()
    w = {n: b.weight(n, s.dtype, s.ne) for n, s in moe_weight_specs(cfg, 0).items()}
    y = build_moe_ffn(b, b.input("ffn_norm", "f32", (64, 1)), 0, cfg, w)
    path = tmp_path / "moe.json"
    path.write_text(dumps(b.build([y])))
    check = [] if shutil.which("g++") else ["--no-check"]
    assert main(["compile", "--graph", str(path), "-o", str(tmp_path / "out"), "--target", "msl", *check]) == 0
    files = sorted(p.name for p in (tmp_path / "out" / "kernels" / "msl").iterdir())
    assert "moe_router_norm_n16.metal" in files and any(f.startswith("mul_mat_id_vec") for f in files)


# ---------------------------------------------------------------------------------------------
# kernels


def _run(backend, g, vals):
    from fusec.backends import get_backend  # noqa: PLC0415

    fused, _ = rewrite(g, moe_patterns())
    assert any(t.op == "FUSED" for t in fused.nodes)
    return get_backend(backend).compile(fused).run(vals)


@pytest.mark.parametrize("backend", BACKENDS)
@given(n_expert=st.sampled_from([1, 2, 5, 8, 16, 60, 64, 128, 160, 256, 512, 1000, 1024]), n_tokens=st.integers(1, 5),
       norm=st.booleans(), scale=st.sampled_from([1.0, 0.5, 2.0]), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_router_kernel_matches_the_unfused_interpreter(backend, n_expert, n_tokens, norm, scale, seed, data):
    k = data.draw(st.integers(1, min(n_expert, 16)))
    g, w, ids = router_graph(n_expert, k, n_tokens, norm=norm, scale=scale)
    vals = {"logits": spaced_logits(np.random.default_rng(seed), n_expert, n_tokens) / np.float32(scale)}
    ref = interpret(g, vals)
    out = _run(backend, g, vals)
    np.testing.assert_array_equal(out["topk"].reshape(-1), ref["topk"].reshape(-1))
    got, want = out[w.name].reshape(-1), ref[w.name].reshape(-1)
    assert not np.isnan(got).any() and nmse(got, want) <= 1e-7, nmse(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_router_kernel_on_qwen3_sizes_and_many_tokens(backend):
    g, w, _ = router_graph(128, 8, 300)
    vals = {"logits": spaced_logits(np.random.default_rng(7), 128, 300)}
    ref, out = interpret(g, vals), _run(backend, g, vals)
    np.testing.assert_array_equal(out["topk"].reshape(-1), ref["topk"].reshape(-1))
    np.testing.assert_allclose(out[w.name].reshape(-1), ref[w.name].reshape(-1), rtol=1e-5)
    np.testing.assert_allclose(out[w.name].reshape(300, 8).sum(axis=1), 1.0, rtol=1e-5)


def test_router_family_refuses_other_decompositions():
    sb = GraphBuilder()
    ph = sb.leaf("x", "f32", (16, 2))
    ph.params["fused_input"] = 0
    sub = sb.build([sb.soft_max(ph)])
    b = GraphBuilder()
    node = make_fused_node(b, sub, [b.input("x", "f32", (16, 2))], {"pattern": "p", "kernel": "moe_router"},
                           name="not_a_router")
    with pytest.raises(CodegenError, match="not_a_router.*moe_router family cannot render"):
        emit(node, "wgsl")


# ---------------------------------------------------------------------------------------------
# the experts' gate/up GLU fusion (moe_up_gate_swiglu / _geglu, kernel family mul_mat_id)


def glu_graph(op, dt, k_, m, n_as, n_used, n_tok):
    b = GraphBuilder()
    wg, wu = b.weight("wg", dt, (k_, m, n_as)), b.weight("wu", dt, (k_, m, n_as))
    x = b.input("x", "f32", (k_, 1, n_tok))
    ids = b.input("ids", "i32", (n_used, n_tok))
    g, u = b.mul_mat_id(wg, x, ids, name="gate"), b.mul_mat_id(wu, x, ids, name="up")
    y = b.op(op, [g, u], name="act")
    return b.build([y]), y


def glu_patterns():
    return [p for p in moe_patterns() if p.name.startswith("moe_up_gate")]


@pytest.mark.parametrize("backend", BACKENDS)
@given(op=st.sampled_from(["SWIGLU", "GEGLU"]), dt=st.sampled_from(["f32", "f16"]), k_=st.sampled_from([3, 64, 130]),
       m=st.integers(1, 20), n_as=st.integers(1, 12), n_tok=st.integers(1, 3), small_limit=st.booleans(),
       seed=st.integers(0, 2**32 - 1), data=st.data())
def test_gate_up_glu_kernel_matches_the_unfused_interpreter(backend, op, dt, k_, m, n_as, n_tok, small_limit, seed,
                                                           data):
    from fusec.backends import get_backend  # noqa: PLC0415
    from fusec.codegen.families import mul_mat_id as mm  # noqa: PLC0415

    n_used = data.draw(st.integers(1, n_as))
    g, y = glu_graph(op, dt, k_, m, n_as, n_used, n_tok)
    fused, _ = rewrite(g, glu_patterns())
    assert fused_names(fused) == {"act": ("FUSED", f"moe_up_gate_{op.lower()}")}
    rng = np.random.default_rng(seed)
    npdt = np.float16 if dt == "f16" else np.float32
    weights = {n: rng.standard_normal(k_ * m * n_as).astype(npdt) for n in ("wg", "wu")}
    inputs = {"x": rng.standard_normal(k_ * n_tok).astype(np.float32),
              "ids": np.stack([rng.permutation(n_as)[:n_used] for _ in range(n_tok)]).astype(np.int32).reshape(-1)}
    ref = interpret(g, {**weights, **inputs})["act"].reshape(-1)
    limit = (1 << 10) if small_limit and backend == "wgpu" else mm.WGSL_MAX_BINDING
    try:
        mm.expert_windows(fused.outputs[0].src[0], limit)
    except CodegenError:  # one expert over the stand-in limit (the refusal is tested in test_moe_ops.py)
        assume(False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mm, "WGSL_MAX_BINDING", limit)  # windows on WGSL when a matrix set exceeds 1 KiB
        be = get_backend(backend)
        be.set_weights(weights)
        k = emit(fused.outputs[0], "wgsl")
        assert ("_w" in k.entry) == (small_limit and weights["wg"].nbytes > limit)
        out = be.compile(fused).run(inputs)["act"].reshape(-1)
    assert not np.isnan(out).any() and nmse(out, ref) <= 1e-7, nmse(out, ref)


def test_gate_up_glu_needs_matching_experts():
    b = GraphBuilder()
    x, ids = b.input("x", "f32", (64, 1, 1)), b.input("ids", "i32", (2, 1))
    g = b.mul_mat_id(b.weight("wg", "f16", (64, 32, 8)), x, ids)
    u = b.mul_mat_id(b.weight("wu", "f32", (64, 32, 8)), x, ids)  # another dtype: not fused
    fused, _ = rewrite(b.build([b.swiglu(g, u, name="act")]), glu_patterns())
    assert fused_names(fused) == {}


def test_mul_mat_id_family_refuses_other_fused_nodes():
    sb = GraphBuilder()
    ph = sb.leaf("x", "f32", (16, 2))
    ph.params["fused_input"] = 0
    b = GraphBuilder()
    node = make_fused_node(b, sb.build([sb.silu(ph)]), [b.input("x", "f32", (16, 2))],
                           {"pattern": "p", "kernel": "mul_mat_id"}, name="not_experts")
    with pytest.raises(CodegenError, match="not_experts.*GLU\\(MUL_MAT_ID"):
        emit(node, "cuda")


def _variants(backend):
    from fusec.codegen.families import mul_mat_id as mm  # noqa: PLC0415

    out = {}
    for op, dt, k_ in (("SWIGLU", "f16", 64), ("GEGLU", "f32", 63)):
        g, _ = glu_graph(op, dt, k_, 8, 6, 2, 2)
        fused, _ = rewrite(g, glu_patterns())
        for limit in (mm.WGSL_MAX_BINDING, 1 << 12):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(mm, "WGSL_MAX_BINDING", limit)
                k = emit(fused.outputs[0], backend)
            out[k.source] = k
    for n_expert, norm in ((8, True), (128, True), (128, False), (1000, True)):
        g, _, _ = router_graph(n_expert, min(8, n_expert), 2, norm=norm)
        fused, _ = rewrite(g, [p for p in moe_patterns() if p.name.startswith("moe_router")])
        for t in fused.nodes:
            if t.op == "FUSED":
                k = emit(t, backend)
                out[k.source] = k
    return list(out.values())


(test_every_cuda_variant_compiles_with_nvcc, test_every_msl_variant_passes_the_shim,
 test_every_wgsl_variant_compiles_with_naga) = compile_check_tests(_variants)
