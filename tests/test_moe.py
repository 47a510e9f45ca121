"""The Qwen3-MoE FFN graph (:mod:`fusec.models.moe`): llama.cpp's op sequence and names, the numpy
interpreter against an independent numpy formula (softmax, argpartition, renormalized weights, per
expert SwiGLU MLPs), and the wgpu backend (unfused and after the default fusions) against the
interpreter."""

from __future__ import annotations

import types

import numpy as np
import pytest

from fusec.interp import interpret
from fusec.ir import GraphBuilder
from fusec.models import ModelError, load_config
from fusec.models.moe import WEIGHTS_SUM_MIN, build_moe_ffn, moe_weight_specs
from tests.gpu import requires_cuda, requires_wgpu


def small_cfg(n_embd=64, n_expert=16, n_used=4, n_ff=32, norm=True, scale=0.0):
    return types.SimpleNamespace(name="moe-test", hidden_size=n_embd, n_expert=n_expert, n_expert_used=n_used,
                                 n_ff_exp=n_ff, norm_topk_prob=norm, expert_weights_scale=scale)


def moe_graph(cfg, n_tokens, weight_dtype="f32", il=0):
    b = GraphBuilder()
    w = {n: b.weight(n, s.dtype, s.ne) for n, s in moe_weight_specs(cfg, il, weight_dtype).items()}
    x = b.input("ffn_norm", "f32", (cfg.hidden_size, n_tokens))
    y = build_moe_ffn(b, x, il, cfg, w)
    return b.build([y]), y


def moe_values(cfg, n_tokens, seed=0, weight_dtype="f32", il=0):
    rng = np.random.default_rng(seed)
    vals = {}
    for n, s in moe_weight_specs(cfg, il, weight_dtype).items():
        scale = 4.0 if n.endswith("gate_inp.weight") else 1.0  # spread the router's probabilities
        vals[n] = (scale * rng.standard_normal(s.np_shape) / np.sqrt(s.ne[0])).astype(s.dtype.np)
    vals["ffn_norm"] = rng.standard_normal((n_tokens, cfg.hidden_size)).astype(np.float32)
    return vals


def reference(cfg, vals, il=0):
    """The MoE FFN by its textbook formula, float64, written without fusec's ops."""
    p = f"blk.{il}."
    x = vals["ffn_norm"].astype(np.float64)  # [T, n_embd]
    gate_inp = vals[p + "ffn_gate_inp.weight"].astype(np.float64).reshape(cfg.n_expert, cfg.hidden_size)
    up = vals[p + "ffn_up_exps.weight"].astype(np.float64).reshape(cfg.n_expert, cfg.n_ff_exp, cfg.hidden_size)
    gate = vals[p + "ffn_gate_exps.weight"].astype(np.float64).reshape(cfg.n_expert, cfg.n_ff_exp, cfg.hidden_size)
    down = vals[p + "ffn_down_exps.weight"].astype(np.float64).reshape(cfg.n_expert, cfg.hidden_size, cfg.n_ff_exp)
    logits = x @ gate_inp.T
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        sel = np.argpartition(-probs[t], cfg.n_expert_used - 1)[: cfg.n_expert_used]
        w = probs[t, sel]
        if cfg.norm_topk_prob:
            w = w / max(w.sum(), WEIGHTS_SUM_MIN)
        if cfg.expert_weights_scale not in (0.0, 1.0):
            w = w * cfg.expert_weights_scale
        for e, we in zip(sel, w, strict=True):
            g, u = gate[e] @ x[t], up[e] @ x[t]
            out[t] += we * (down[e] @ (g / (1.0 + np.exp(-g)) * u))
    return out


def test_graph_follows_llama_cpp_build_moe_ffn():
    cfg = small_cfg(n_used=3)
    g, y = moe_graph(cfg, 2)
    by_name = {t.name: t for t in g.nodes}
    assert y.name == "ffn_moe_out-0" and y.ne == (64, 2, 1, 1) and y.is_contiguous
    assert by_name["ffn_moe_logits-0"].op == "MUL_MAT" and by_name["ffn_moe_logits-0"].ne == (16, 2, 1, 1)
    assert by_name["ffn_moe_probs-0"].op == "SOFT_MAX"
    assert by_name["ffn_moe_argsort-0"].op == "ARGSORT" and by_name["ffn_moe_argsort-0"].params["order"] == 1
    top = by_name["ffn_moe_topk-0"]
    assert top.op == "VIEW" and top.ne == (3, 2, 1, 1) and top.dtype.value == "i32"
    assert by_name["ffn_moe_weights-0"].op == "GET_ROWS" and by_name["ffn_moe_weights-0"].ne == (1, 3, 2, 1)
    assert by_name["ffn_moe_weights_sum_clamped-0"].params == {"min": WEIGHTS_SUM_MIN, "max": float("inf")}
    assert by_name["ffn_moe_weights_norm-0"].op == "DIV"
    for nm, ne in (("ffn_moe_up-0", (32, 3, 2, 1)), ("ffn_moe_gate-0", (32, 3, 2, 1)),
                   ("ffn_moe_down-0", (64, 3, 2, 1))):
        assert by_name[nm].op == "MUL_MAT_ID" and by_name[nm].ne == ne and by_name[nm].src[2] is top
    assert by_name["ffn_moe_swiglu-0"].op == "SWIGLU"
    assert by_name["ffn_moe_weighted-0"].op == "MUL"
    assert [t.op for t in g.nodes].count("ADD") == 2  # k views summed by k-1 ADDs


def test_weight_specs_use_gguf_names_and_layouts():
    cfg = load_moe_config()
    specs = moe_weight_specs(cfg, 5, "f16")
    assert {n: (str(s.dtype), s.ne) for n, s in specs.items()} == {
        "blk.5.ffn_gate_inp.weight": ("f32", (2048, 128, 1, 1)),
        "blk.5.ffn_gate_exps.weight": ("f16", (2048, 768, 128, 1)),
        "blk.5.ffn_down_exps.weight": ("f16", (768, 2048, 128, 1)),
        "blk.5.ffn_up_exps.weight": ("f16", (2048, 768, 128, 1)),
    }


def load_moe_config():
    """Qwen3-30B-A3B's sizes: from the shipped config once it carries the MoE fields (branch
    ``models``), else from the HF names in its JSON."""
    try:
        cfg = load_config("qwen3-30b-a3b")
        if hasattr(cfg, "n_expert"):
            return cfg
    except ModelError:
        pass
    import json  # noqa: PLC0415

    from fusec.models.config import CONFIGS_DIR  # noqa: PLC0415

    hf = json.loads((CONFIGS_DIR / "qwen3-30b-a3b.json").read_text())
    return types.SimpleNamespace(name="qwen3-30b-a3b", hidden_size=hf["hidden_size"], n_expert=hf["num_experts"],
                                 n_expert_used=hf["num_experts_per_tok"], n_ff_exp=hf["moe_intermediate_size"],
                                 norm_topk_prob=hf["norm_topk_prob"], expert_weights_scale=0.0)


@pytest.mark.parametrize("cfg, n_tokens", [
    (small_cfg(), 2),
    (small_cfg(n_used=1), 3),
    (small_cfg(norm=False), 1),
    (small_cfg(n_expert=128, n_used=8, n_embd=32, n_ff=16), 2),
    (small_cfg(scale=2.5), 2),
])
def test_interpreter_matches_the_numpy_formula(cfg, n_tokens):
    g, y = moe_graph(cfg, n_tokens)
    vals = moe_values(cfg, n_tokens)
    out = interpret(g, vals)[y.name].reshape(n_tokens, cfg.hidden_size)
    ref = reference(cfg, vals)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_missing_fields_and_weights_are_model_errors():
    b = GraphBuilder()
    x = b.input("x", "f32", (64, 1))
    with pytest.raises(ModelError, match="n_expert"):
        build_moe_ffn(b, x, 0, types.SimpleNamespace(name="dense", hidden_size=64), {})
    with pytest.raises(ModelError, match="blk.0.ffn_up_exps.weight"):
        build_moe_ffn(b, x, 0, small_cfg(), {"blk.0.ffn_gate_inp.weight": b.weight("g", "f32", (64, 16))})
    with pytest.raises(ModelError, match="n_expert_used"):
        moe_weight_specs(small_cfg(n_used=17), 0)
    with pytest.raises(ModelError, match=r"ne=\[64, n_tokens\]"):
        build_moe_ffn(b, b.input("x3", "f32", (32, 1)), 0, small_cfg(), {})


def _run_backend(name, g, y, vals, n_tokens, cfg, fuse):
    from fusec.backends import get_backend  # noqa: PLC0415
    from fusec.dsl import default_patterns  # noqa: PLC0415
    from fusec.rewrite import rewrite  # noqa: PLC0415

    if fuse:
        g, _ = rewrite(g, default_patterns())
    be = get_backend(name)
    be.set_weights({n: v for n, v in vals.items() if n != "ffn_norm"})
    out = be.compile(g).run({"ffn_norm": vals["ffn_norm"]})
    return g, out[y.name].reshape(n_tokens, cfg.hidden_size)


@requires_wgpu
@pytest.mark.parametrize("weight_dtype", ["f32", "f16"])
@pytest.mark.parametrize("fuse", [False, True])
def test_wgpu_matches_the_interpreter(weight_dtype, fuse):
    cfg, n_tokens = small_cfg(), 2
    g, y = moe_graph(cfg, n_tokens, weight_dtype)
    vals = moe_values(cfg, n_tokens, seed=3, weight_dtype=weight_dtype)
    ref = interpret(g, vals)[y.name].reshape(n_tokens, cfg.hidden_size)
    g2, out = _run_backend("wgpu", g, y, vals, n_tokens, cfg, fuse)
    if fuse:
        assert any(t.op == "FUSED" for t in g2.nodes)  # the expert sum (ADD chain) fuses
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@requires_cuda
@pytest.mark.parametrize("fuse", [False, True])
def test_cuda_matches_the_interpreter(fuse):
    cfg, n_tokens = small_cfg(n_expert=128, n_used=8, n_embd=256, n_ff=96), 3
    g, y = moe_graph(cfg, n_tokens, "f16")
    vals = moe_values(cfg, n_tokens, seed=4, weight_dtype="f16")
    ref = interpret(g, vals)[y.name].reshape(n_tokens, cfg.hidden_size)
    _, out = _run_backend("cuda", g, y, vals, n_tokens, cfg, fuse)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
