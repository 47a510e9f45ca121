"""Gemma-2 (iSWA, softcaps, post-norms, GEGLU) and Qwen3 / Qwen3-MoE (q/k norms, MoE config) configs,
decode graphs (op by op against llama.cpp's ``llm_build_gemma2_iswa`` / ``llm_build_qwen3``), the two
masks of an iSWA session, the HF Gemma-2 norm ``+1`` and ``--vocab`` truncation. transformers
equivalence: ``test_hf_equivalence.py``."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from fusec.dsl import default_patterns
from fusec.models import (
    ConfigError,
    ModelError,
    build_llama_decode,
    config_from_dict,
    load_config,
    random_weights,
    weight_specs,
)
from fusec.runtime import DecodeSession
from fusec.runtime.session import unified_kq_mask

GEMMA2 = {
    "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_hidden_layers": 4,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "vocab_size": 97, "max_position_embeddings": 128,
    "sliding_window": 3, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
    "query_pre_attn_scalar": 48, "hidden_activation": "gelu_pytorch_tanh",
}
QWEN3 = {
    "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "num_hidden_layers": 2,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "vocab_size": 97, "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


def moe_available() -> bool:
    try:
        import fusec.models.moe  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def gemma():
    return config_from_dict(GEMMA2, name="tiny-gemma2")


def ops_of_layer(g, il):
    """Op counts of the nodes whose llama.cpp name ends in ``-{il}`` (the layer's cb names)."""
    return Counter(n.op for n in g.nodes if n.name.endswith(f"-{il}") and n.op != "NONE")


# -- configs -------------------------------------------------------------------------------------------


def test_shipped_gemma_2_2b_hparams():
    c = load_config("gemma-2-2b")
    assert (c.arch, c.hidden_size, c.head_dim, c.num_hidden_layers, c.rope_mode) == ("gemma2", 2304, 256, 26, 2)
    assert (c.attn_logit_softcapping, c.final_logit_softcapping, c.query_pre_attn_scalar) == (50.0, 30.0, 256.0)
    assert c.tie_word_embeddings and c.embd_scale and c.post_norms and c.hidden_act == "gelu_pytorch_tanh"
    assert c.iswa and c.sliding_window == 4096 and c.swa_pattern == 2
    # llama.cpp set_swa_pattern(2): even layers slide, odd layers are global (HF layer_types agrees)
    assert [c.is_swa(il) for il in range(4)] == [True, False, True, False]


def test_shipped_qwen3_30b_a3b_hparams():
    c = load_config("qwen3-30b-a3b")
    assert (c.arch, c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.rope_mode) == ("qwen3moe", 128, 32,
                                                                                                 4, 2)
    assert (c.n_expert, c.n_expert_used, c.n_ff_exp, c.norm_topk_prob) == (128, 8, 768, True)
    assert c.qk_norm and c.is_moe and not c.attn_bias and not c.iswa


def test_mistral_keeps_one_mask_on_every_layer():
    c = load_config("mistral-7b-v0.1")
    assert not c.iswa and all(c.is_swa(il) for il in range(3))


@pytest.mark.parametrize("over,match", [
    ({"hidden_activation": "silu"}, "hidden_activation='silu'"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings=false"),
    ({"layer_types": ["full_attention"] * 4}, "layer_types"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"attn_logit_softcapping": -1.0}, "attn_logit_softcapping must be > 0"),
])
def test_unsupported_gemma2_fields_are_named(over, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({**GEMMA2, **over})


def test_gemma2_layer_types_as_transformers_writes_them_are_accepted():
    types = ["sliding_attention", "full_attention"] * 2
    assert config_from_dict({**GEMMA2, "layer_types": types}).is_swa(2)


def test_null_softcaps_turn_them_off():
    c = config_from_dict({**GEMMA2, "attn_logit_softcapping": None, "final_logit_softcapping": None})
    g = build_llama_decode(c, 1, 8, 8)
    assert "TANH" not in g.by_op() and g.by_name("result_output").op == "MUL_MAT"


MOE = {**QWEN3, "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 8,
       "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True}


@pytest.mark.parametrize("over,match", [
    ({"mlp_only_layers": [1]}, "all-MoE layers"),
    ({"decoder_sparse_step": 2}, "all-MoE layers"),
    ({"norm_topk_prob": False}, "norm_topk_prob=false"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok=9"),
    ({"num_experts": None}, "bad config value"),
])
def test_unsupported_qwen3_moe_fields_are_named(over, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({**MOE, **over})


@pytest.mark.skipif(moe_available(), reason="fusec.models.moe is present: the MoE graph is built")
def test_moe_graph_without_the_moe_module_is_a_clear_error():
    cfg = config_from_dict(MOE)
    with pytest.raises(ModelError, match="MoE FFN not yet supported"):
        build_llama_decode(cfg, 1, 8, 8)
    with pytest.raises(ModelError, match="MoE FFN not yet supported"):
        weight_specs(cfg)


def test_with_vocab_shrinks_only_the_vocabulary():
    c = load_config("gemma-2-2b").with_layers(2).with_vocab(8192)
    assert (c.vocab_size, c.num_hidden_layers, c.hidden_size, c.name) == (8192, 2, 2304, "gemma-2-2b-L2-V8192")
    assert weight_specs(c)["token_embd.weight"].ne == (2304, 8192, 1, 1)
    with pytest.raises(ConfigError, match="at least 2 tokens"):
        c.with_vocab(1)
    with pytest.raises(ConfigError, match="has 256000 tokens; cannot keep the first 256001"):
        load_config("gemma-2-2b").with_vocab(256001)


# -- Gemma-2 graph -------------------------------------------------------------------------------------


def test_gemma2_weights_have_post_norms_and_no_output(gemma):
    specs = weight_specs(gemma)
    assert "output.weight" not in specs
    layer0 = [n for n in specs if n.startswith("blk.0.")]
    assert layer0 == ["blk.0.attn_norm.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight",
                      "blk.0.attn_output.weight", "blk.0.post_attention_norm.weight", "blk.0.ffn_norm.weight",
                      "blk.0.ffn_gate.weight", "blk.0.ffn_down.weight", "blk.0.ffn_up.weight",
                      "blk.0.post_ffw_norm.weight"]


def test_gemma2_layer_ops_are_llama_cpp_s(gemma):
    g = build_llama_decode(gemma, n_tokens=3, n_kv=16, kv_size=32)
    for il in range(gemma.num_hidden_layers):
        ops = ops_of_layer(g, il)
        # Q/K/V/O + KQ + KQV + up/gate/down; attn_norm, attn_post_norm, ffn_norm (ffn_post_norm is unsuffixed)
        assert ops["MUL_MAT"] == 9 and ops["RMS_NORM"] == 3 and ops["MUL"] == 3
        # kq softcap SCALE(1/c), SCALE(c) and Q's 1/sqrt(query_pre_attn_scalar)
        assert ops["SCALE"] == 3 and ops["TANH"] == 1 and ops["GEGLU"] == 1 and ops["SOFT_MAX"] == 1
        assert ops["ADD"] == 2 and ops["ROPE"] == 2 and "SWIGLU" not in ops
    byop = g.by_op()
    assert len(byop["RMS_NORM"]) == 4 * gemma.num_hidden_layers + 1
    assert len(byop["TANH"]) == gemma.num_hidden_layers + 1  # + the final logit softcap


def test_gemma2_softcaps_and_scales(gemma):
    g = build_llama_decode(gemma, n_tokens=2, n_kv=8, kv_size=8)
    s1, th, s2 = g.by_name("kq_scaled_1-0"), g.by_name("kq_tanh-0"), g.by_name("kq_scaled_2-0")
    assert s1.src[0].name == "kq-0" and th.src[0] is s1 and s2.src[0] is th
    assert s1.params["s"] == pytest.approx(1 / 50) and s2.params["s"] == 50.0
    sm = g.by_name("kq_soft_max-0")
    assert sm.src[0] is s2 and sm.params["scale"] == 1.0  # Q carries the scale
    q = g.by_name("Qcur_scaled-0")
    assert q.op == "SCALE" and q.src[0].name == "Qcur-0" and q.src[0].op == "ROPE"
    assert q.params["s"] == pytest.approx(1 / math.sqrt(48))
    assert q.src[0].params["mode"] == 2  # NEOX
    inp = g.by_name("inp_scaled")
    assert inp.src[0].name == "inp_embd" and inp.params["s"] == pytest.approx(8.0)  # sqrt(64)
    out = g.outputs[0]
    assert out.name == "result_output" and out.op == "SCALE" and out.params["s"] == 30.0
    assert out.src[0].op == "TANH" and out.src[0].src[0].params["s"] == pytest.approx(1 / 30)
    assert out.src[0].src[0].src[0].src[0].name == "token_embd.weight"  # tied lm_head


def test_gemma2_post_norms_feed_the_residuals(gemma):
    g = build_llama_decode(gemma, n_tokens=1, n_kv=8, kv_size=8)
    sa = g.by_name("sa_out-1")
    assert sa.op == "ADD" and sa.src[0].name == "attn_post_norm-1" and sa.src[1].name == "l_out-0"
    assert g.by_name("attn_post_norm-1").src[1].name == "blk.1.post_attention_norm.weight"
    lo = g.by_name("l_out-1")
    assert lo.src[0].name == "ffn_post_norm" and lo.src[1] is sa
    assert lo.src[0].src[1].name == "blk.1.post_ffw_norm.weight"
    assert g.by_name("ffn_geglu-1").src[0].name == "ffn_gate-1"


@pytest.mark.parametrize("flash_attn", [False, True])
def test_gemma2_swa_mask_on_even_layers(gemma, flash_attn):
    g = build_llama_decode(gemma, n_tokens=2, n_kv=8, kv_size=8, flash_attn=flash_attn)
    inputs = {t.name for t in g.nodes if "input" in t.flags}
    assert {"kq_mask", "kq_mask_swa"} <= inputs
    op = "FLASH_ATTN_EXT" if flash_attn else "SOFT_MAX"
    masks = [t.src[3 if flash_attn else 1].name for t in g.by_op()[op]]
    assert masks == ["kq_mask_swa", "kq_mask", "kq_mask_swa", "kq_mask"]
    if flash_attn:
        assert all(t.params["logit_softcap"] == 50.0 and t.params["scale"] == 1.0 for t in g.by_op()[op])
        assert "TANH" in g.by_op() and len(g.by_op()["TANH"]) == 1  # only the final softcap


def test_gemma2_softcap_attention_pattern_fuses(gemma):
    from fusec.rewrite import rewrite

    g = build_llama_decode(gemma, n_tokens=1, n_kv=16, kv_size=32)  # decode: the GEMV patterns apply
    _, rep = rewrite(g, default_patterns())
    got = {k: v.matches for k, v in rep.patterns.items() if v.matches}
    assert got["attention_flash_softcap"] == gemma.num_hidden_layers
    assert got["ffn_up_gate_geglu"] == gemma.num_hidden_layers
    assert got["softcap"] == 1  # the final logit softcap


# -- iSWA session --------------------------------------------------------------------------------------


def test_iswa_session_fills_both_masks(gemma):
    s = DecodeSession(gemma, "numpy", random_weights(gemma, seed=1), kv_size=16, kv_pad=8)
    s.step([3, 4, 5, 6, 7])
    cells = np.zeros(8, np.int64)
    cells[5:] = -1
    pos = np.arange(8)
    full = unified_kq_mask(cells, pos, [0] * 5, range(5))
    swa = unified_kq_mask(cells, pos, [0] * 5, range(5), sliding_window=3)
    np.testing.assert_array_equal(s.last_inputs["kq_mask"], full)
    np.testing.assert_array_equal(s.last_inputs["kq_mask_swa"], swa)
    assert (swa[0, 0, 4] == 0).sum() == 3 and (full[0, 0, 4] == 0).sum() == 5


@pytest.mark.parametrize("flash_attn", [False, True])
def test_iswa_multi_sequence_matches_each_sequence_alone(gemma, flash_attn):
    """Two sequences in one unified cache (masks keep them apart, window included) give each one's logits."""
    w = random_weights(gemma, seed=2)
    both = DecodeSession(gemma, "numpy", w, kv_size=32, n_seq=2, flash_attn=flash_attn)
    out = both.step([[5, 6, 7, 8], [9, 10, 11]])
    out2 = both.step([12, 13])
    for s, (prompt, nxt) in enumerate((([5, 6, 7, 8], 12), ([9, 10, 11], 13))):
        one = DecodeSession(gemma, "numpy", w, kv_size=32, flash_attn=flash_attn)
        ref = one.step(prompt)
        rows = slice(0, 4) if s == 0 else slice(4, 7)
        np.testing.assert_allclose(out[rows], ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out2[s:s + 1], one.step([nxt]), rtol=1e-5, atol=1e-5)


def test_gemma2_fused_flash_and_f16_mask_match_unfused(gemma):
    w = random_weights(gemma, seed=4)
    ref = DecodeSession(gemma, "numpy", w, kv_size=16)
    fused = DecodeSession(gemma, "numpy", w, kv_size=16, patterns=default_patterns())
    fa16 = DecodeSession(gemma, "numpy", w, kv_size=16, flash_attn=True, mask_dtype="f16")
    for toks in ([1, 2, 3, 4, 5], [6], [7]):  # 7 positions > sliding_window 3
        r = ref.step(toks)
        np.testing.assert_allclose(fused.step(toks), r, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(fa16.step(toks), r, rtol=1e-4, atol=1e-4)
    assert fa16.last_inputs["kq_mask_swa"].dtype == np.float16


# -- Qwen3 q/k norms -----------------------------------------------------------------------------------


def test_qwen3_qk_norm_before_rope():
    cfg = config_from_dict(QWEN3)
    assert cfg.arch == "qwen3" and cfg.qk_norm and cfg.rope_mode == 2 and not cfg.attn_bias
    specs = weight_specs(cfg)
    assert specs["blk.1.attn_q_norm.weight"].ne == (32, 1, 1, 1) and specs["blk.1.attn_k_norm.weight"].ne[0] == 32
    g = build_llama_decode(cfg, n_tokens=3, n_kv=8, kv_size=8)
    for tag, heads in (("Qcur", 4), ("Kcur", 2)):
        normed = g.by_name(f"{tag}_normed-1")
        assert normed.op == "MUL" and normed.src[1].name == f"blk.1.attn_{tag[0].lower()}_norm.weight"
        rms = normed.src[0]
        assert rms.op == "RMS_NORM" and rms.ne == (32, heads, 3, 1)  # over head_dim of each head
        assert rms.src[0].name == f"{tag}-1 (reshaped)"
        rope = next(t for t in g.by_op()["ROPE"] if t.name == f"{tag}-1")
        assert rope.src[0] is normed and rope.params["mode"] == 2
    assert len(g.by_op()["RMS_NORM"]) == 4 * 2 + 1
    assert ops_of_layer(g, 0)["SWIGLU"] == 1


# -- HF loader -----------------------------------------------------------------------------------------

GEMMA2_HF = {  # transformers Gemma2 names -> llama.cpp GGUF names (written out here, independently of the loader)
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}


def test_hf_names_per_architecture():
    from fusec.models import hf_to_gguf_name

    assert hf_to_gguf_name("model.layers.2.post_attention_layernorm.weight") == "blk.2.ffn_norm.weight"
    assert hf_to_gguf_name("model.layers.2.post_attention_layernorm.weight", "gemma2") == \
        "blk.2.post_attention_norm.weight"
    assert hf_to_gguf_name("model.layers.0.post_feedforward_layernorm.weight", "gemma2") == \
        "blk.0.post_ffw_norm.weight"
    assert hf_to_gguf_name("model.layers.1.self_attn.k_norm.weight", "qwen3") == "blk.1.attn_k_norm.weight"
    assert hf_to_gguf_name("model.layers.1.self_attn.k_norm.weight", "llama") is None


def test_hf_gemma2_loader_adds_one_to_every_norm(tmp_path, gemma):
    """HF Gemma stores w and computes x*(1 + w); llama.cpp's converter stores w + 1 (Gemma2Model)."""
    import json

    from fusec.models import load_model

    st = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(7)
    hf: dict[str, np.ndarray] = {}
    expected: dict[str, np.ndarray] = {}
    for name, spec in weight_specs(gemma).items():
        shape = tuple(d for d in spec.np_shape if d != 1) if spec.ne[1] == 1 else spec.np_shape[-2:]
        arr = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        if name.startswith("blk."):
            _, il, rest = name.split(".", 2)
            hf_name = f"model.layers.{il}.{next(k for k, v in GEMMA2_HF.items() if v == rest)}"
        else:
            hf_name = {"token_embd.weight": "model.embed_tokens.weight",
                       "output_norm.weight": "model.norm.weight"}[name]
        hf[hf_name] = arr
        expected[name] = (arr + np.float32(1.0) if name.endswith("norm.weight") else arr).reshape(spec.np_shape)
    d = tmp_path / "gemma"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(GEMMA2))
    st.save_file(hf, str(d / "model.safetensors"))
    cfg, w, _ = load_model(d)
    assert cfg.arch == "gemma2" and cfg.is_swa(0) and not cfg.is_swa(1)
    assert w.keys() == expected.keys()
    for name in w:
        np.testing.assert_array_equal(w[name], expected[name], err_msg=name)
    assert np.all(w["blk.3.post_ffw_norm.weight"] > 0.5)  # 1 + 0.1 N(0, 1): the +1 is there


# -- Qwen3-MoE -----------------------------------------------------------------------------------------


@pytest.mark.skipif(not moe_available(), reason="needs fusec.models.moe")
def test_qwen3_moe_graph_every_layer_moe_with_qk_norm():
    cfg = config_from_dict(MOE)
    specs = weight_specs(cfg)
    assert "blk.0.ffn_gate.weight" not in specs and specs["blk.1.ffn_gate_inp.weight"].ne == (64, 8, 1, 1)
    assert specs["blk.1.ffn_down_exps.weight"].ne == (32, 64, 8, 1) and "blk.1.attn_q_norm.weight" in specs
    g = build_llama_decode(cfg, n_tokens=2, n_kv=8, kv_size=8)
    for il in range(cfg.num_hidden_layers):
        lo = g.by_name(f"l_out-{il}")
        assert lo.src[0].name == f"ffn_moe_out-{il}" and lo.src[1].name == f"ffn_inp-{il}"
        assert g.by_name(f"Qcur_normed-{il}").src[0].ne == (32, 4, 2, 1)
        assert ops_of_layer(g, il)["MUL_MAT_ID"] == 3 and "SWIGLU" in ops_of_layer(g, il)


def test_qwen3_moe_transformers5_names_and_with_experts():
    data = {k: v for k, v in MOE.items() if k != "num_experts"}
    cfg = config_from_dict({**data, "num_local_experts": 8})
    assert (cfg.n_expert, cfg.n_expert_used, cfg.n_ff_exp) == (8, 2, 32)
    small = load_config("qwen3-30b-a3b").with_experts(16)
    assert (small.n_expert, small.n_expert_used, small.name) == (16, 8, "qwen3-30b-a3b-E16")
    assert load_config("qwen3-30b-a3b").with_experts(4).n_expert_used == 4
    with pytest.raises(ConfigError, match="no experts"):
        load_config("gemma-2-2b").with_experts(4)


@pytest.mark.skipif(not moe_available(), reason="needs fusec.models.moe")
def test_hf_qwen3_moe_missing_expert_is_named(tmp_path):
    import json

    from fusec.models import load_model

    st = pytest.importorskip("safetensors.numpy")
    cfg = config_from_dict(MOE)
    t: dict[str, np.ndarray] = {"model.embed_tokens.weight": np.zeros((97, 64), np.float32),
                                "model.norm.weight": np.ones(64, np.float32),
                                "lm_head.weight": np.zeros((97, 64), np.float32)}
    names = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
             "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm", "ffn_gate_inp": "mlp.gate"}
    for name, spec in weight_specs(cfg).items():
        if not name.startswith("blk."):
            continue
        _, il, rest = name.split(".", 2)
        kind = rest.split(".")[0]
        if kind.endswith("_exps"):
            for e in range(8):
                if not (il == "1" and kind == "ffn_up_exps" and e == 6):
                    t[f"model.layers.{il}.mlp.experts.{e}.{kind[4:-5]}_proj.weight"] = np.zeros(
                        spec.np_shape[-2:], np.float32)
        else:
            t[f"model.layers.{il}.{names[kind]}.weight"] = np.zeros(
                tuple(d for d in spec.np_shape if d != 1) or (1,), np.float32)
    d = tmp_path / "moe"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(MOE))
    st.save_file(t, str(d / "model.safetensors"))
    with pytest.raises(ModelError, match=r"missing tensor 'model\.layers\.1\.mlp\.experts\.6\.up_proj\.weight'"):
        load_model(d)
