"""Llama configs, the llama.cpp-equivalent decode graph, weight layouts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusec.errors import FusecError
from fusec.ir import F16, F32, I32
from fusec.models import (
    ConfigError,
    ModelError,
    build_llama_decode,
    config_from_dict,
    empty_kv_cache,
    kv_cache_specs,
    load_config,
    random_weights,
    shipped_configs,
    weight_specs,
)

TINY = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "vocab_size": 97, "tie_word_embeddings": False, "max_position_embeddings": 128,
}


@pytest.fixture(scope="module")
def llama1b():
    return load_config("llama-3.2-1b")


@pytest.fixture(scope="module")
def llama1b_graph(llama1b):
    return build_llama_decode(llama1b, n_tokens=3, n_kv=64, kv_size=128)


# -- configs ---------------------------------------------------------------------------------------


def test_shipped_llama_3_2_1b_hparams(llama1b):
    c = llama1b
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (2048, 8192, 16)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 8, 64)
    assert c.tie_word_embeddings and c.vocab_size == 128256 and c.rope_theta == 500000.0
    assert c.rope_scaling is not None and c.rope_scaling.factor == 32.0
    assert c.rope_scaling.original_max_position_embeddings == 8192


def test_shipped_smollm2_135m_hparams():
    c = load_config("smollm2-135m")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (576, 30, 9, 3)
    assert c.head_dim == 64 and c.rope_scaling is None and c.n_embd_k_gqa == 192


def test_head_dim_defaults_to_hidden_over_heads():
    d = dict(TINY)
    assert config_from_dict(d).head_dim == 16


def test_load_config_from_path(tmp_path):
    p = tmp_path / "mymodel" / "config.json"
    p.parent.mkdir()
    p.write_text(json.dumps(TINY))
    c = load_config(p)
    assert c.hidden_size == 64 and c.name == "mymodel"


def test_unknown_config_name_lists_shipped_names():
    with pytest.raises(FusecError) as e:
        load_config("llama-9000")
    assert "llama-3.2-1b" in str(e.value) and "smollm2-135m" in str(e.value)


def test_unsupported_model_type_is_a_user_error():
    assert {"gemma-2-2b", "qwen3-30b-a3b"} <= set(shipped_configs())
    with pytest.raises(ConfigError, match="unsupported model_type='gemma3'"):
        config_from_dict(dict(TINY, model_type="gemma3", architectures=["Gemma3ForCausalLM"]))


def test_unsupported_rope_scaling_is_a_user_error():
    d = dict(TINY, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ConfigError, match="yarn"):
        config_from_dict(d)


@given(st.integers(1, 40))
def test_with_layers_changes_only_the_layer_count(n):
    c = load_config("smollm2-135m")
    t = c.with_layers(n)
    assert t.num_hidden_layers == n and t.hidden_size == c.hidden_size and t.rope_theta == c.rope_theta


def test_with_layers_rejects_zero():
    with pytest.raises(ModelError):
        load_config("smollm2-135m").with_layers(0)


def test_llama3_freq_factors_hand_checked(llama1b):
    # head_dim 64, theta 5e5: wavelength of pair i is 2*pi*5e5**(i/32) tokens; band [8192/4, 8192/1]
    ff = llama1b.rope_freq_factors()
    assert ff.dtype == np.float32 and ff.shape == (32,)
    assert ff[0] == 1.0 and ff[14] == 1.0  # wavelength 1959 < 2048: unscaled
    assert ff[15] == pytest.approx(1.6513, rel=1e-3)  # wavelength 2948: smooth = 0.5928
    assert ff[17] == pytest.approx(9.6667, rel=1e-3)  # wavelength 6695: smooth = 0.0745
    assert ff[18] == 32.0 and ff[31] == 32.0  # wavelength > 8192: divided by factor


def test_no_freq_factors_without_scaling():
    assert load_config("smollm2-135m").rope_freq_factors() is None


# -- graph -----------------------------------------------------------------------------------------


def test_graph_has_one_rms_norm_per_norm(llama1b_graph):
    assert len(llama1b_graph.by_op()["RMS_NORM"]) == 2 * 16 + 1


@pytest.mark.parametrize("name, ne", [
    ("inp_embd", (2048, 3, 1, 1)),
    ("attn_norm-0", (2048, 3, 1, 1)),
    ("kq-0", (64, 3, 32, 1)),
    ("kq_soft_max-0", (64, 3, 32, 1)),
    ("kqv_out-0", (2048, 3, 1, 1)),
    ("attn_out-0", (2048, 3, 1, 1)),
    ("ffn_norm-0", (2048, 3, 1, 1)),
    ("ffn_swiglu-0", (8192, 3, 1, 1)),
    ("l_out-15", (2048, 3, 1, 1)),
    ("result_norm", (2048, 3, 1, 1)),
    ("result_output", (128256, 3, 1, 1)),
])
def test_graph_names_and_shapes(llama1b_graph, name, ne):
    assert llama1b_graph.by_name(name).ne == ne


def test_roped_q_and_k_are_named_as_llama_cpp(llama1b_graph):
    ropes = {t.name: t for t in llama1b_graph.by_op()["ROPE"]}
    assert ropes["Qcur-0"].ne == (64, 32, 3, 1) and ropes["Kcur-0"].ne == (64, 8, 3, 1)
    assert ropes["Qcur-0"].src[2].name == "rope_freqs.weight"


def test_norm_mul_follows_rms_norm(llama1b_graph):
    t = llama1b_graph.by_name("attn_norm-0")
    assert t.op == "MUL" and t.src[0].op == "RMS_NORM" and t.src[1].name == "blk.0.attn_norm.weight"


def test_tied_output_reuses_token_embd(llama1b_graph):
    assert llama1b_graph.by_name("result_output").src[0].name == "token_embd.weight"


def test_untied_output_uses_output_weight():
    g = build_llama_decode(config_from_dict(TINY), 1, 4, 8)
    assert g.by_name("result_output").src[0].name == "output.weight"


def test_leaves_are_inputs_weights_and_caches(llama1b_graph):
    inputs = {t.name: t for t in llama1b_graph.inputs}
    assert set(inputs) == {"inp_tokens", "inp_pos", "k_idxs", "v_idxs", "kq_mask"}
    assert inputs["kq_mask"].ne == (64, 3, 1, 1) and inputs["kq_mask"].dtype == F32
    assert inputs["v_idxs"].ne == (512 * 3, 1, 1, 1) and inputs["v_idxs"].dtype == I32
    cache = llama1b_graph.by_name("cache_v_l3")
    assert cache.ne == (512, 128, 1, 1) and "weight" in cache.flags


def test_attention_reads_the_cache_after_writing_it(llama1b_graph):
    k = llama1b_graph.by_name("kq-0").src[0]
    v = llama1b_graph.by_name("kqv-0").src[0]
    assert k.op == "VIEW" and k.src[0].op == "SET_ROWS" and k.root.name == "cache_k_l0"
    assert v.op == "VIEW" and v.src[0].op == "SET_ROWS" and v.root.name == "cache_v_l0"
    assert k.ne == (64, 64, 8, 1) and v.ne == (64, 64, 8, 1)  # [head_dim, n_kv, n_head_kv] / [n_kv, head_dim, ..]
    assert v.nb == (4, 4 * 128, 4 * 128 * 64, 4 * 128 * 64 * 8)  # transposed V cache


def test_every_layer_writes_both_caches(llama1b_graph):
    written = sorted(t.root.name for t in llama1b_graph.by_op()["SET_ROWS"])
    assert written == sorted([f"cache_k_l{i}" for i in range(16)] + [f"cache_v_l{i}" for i in range(16)])


def test_smollm2_graph_builds_with_f16_weights_and_cache():
    c = load_config("smollm2-135m")
    g = build_llama_decode(c, 1, 32, 256, kv_dtype="f16", weight_dtype="f16")
    assert g.by_name("blk.0.attn_q.weight").dtype == F16 and g.by_name("cache_k_l29").dtype == F16
    assert g.by_name("result_output").ne == (49152, 1, 1, 1)
    assert len(g.by_op()["RMS_NORM"]) == 61


@pytest.mark.parametrize("n_tokens, n_kv, kv_size", [(0, 4, 8), (1, 9, 8), (1, 0, 8), (9, 8, 8)])
def test_bad_graph_sizes_are_user_errors(n_tokens, n_kv, kv_size):
    with pytest.raises(ModelError):
        build_llama_decode(config_from_dict(TINY), n_tokens, n_kv, kv_size)


# -- weights ----------------------------------------------------------------------------------------


def test_random_weights_match_the_graph_leaves():
    cfg = config_from_dict(TINY)
    w = random_weights(cfg, seed=0)
    g = build_llama_decode(cfg, 1, 4, 8)
    for t in g.leaves:
        if "weight" in t.flags and not t.name.startswith("cache_"):
            assert w[t.name].shape == t.ne[::-1] and w[t.name].dtype == t.dtype.np, t.name


def test_random_weights_are_deterministic_per_seed():
    cfg = config_from_dict(TINY)
    a, b, c = random_weights(cfg, 3), random_weights(cfg, 3), random_weights(cfg, 4)
    assert np.array_equal(a["blk.1.ffn_up.weight"], b["blk.1.ffn_up.weight"])
    assert not np.array_equal(a["blk.1.ffn_up.weight"], c["blk.1.ffn_up.weight"])


def test_random_weights_keep_projections_order_one():
    cfg = config_from_dict(dict(TINY, hidden_size=512, num_hidden_layers=1))
    w = random_weights(cfg, 0)
    x = np.random.default_rng(1).standard_normal((8, 512)).astype(np.float32)
    y = x @ w["blk.0.attn_q.weight"].reshape(512, 512).T
    assert 0.8 < float(y.std()) < 1.25


def test_f16_weights_keep_norms_f32():
    w = random_weights(config_from_dict(TINY), 0, weight_dtype="f16")
    assert w["blk.0.ffn_gate.weight"].dtype == np.float16 and w["blk.0.attn_norm.weight"].dtype == np.float32


def test_bad_weight_dtype_is_a_user_error():
    with pytest.raises(ModelError, match="weight_dtype"):
        weight_specs(config_from_dict(TINY), "q4_0")


def test_empty_kv_cache_layout():
    cfg = config_from_dict(TINY)
    kv = empty_kv_cache(cfg, 16, "f16")
    assert set(kv) == set(kv_cache_specs(cfg, 16))
    assert kv["cache_k_l1"].shape == (1, 1, 16, 32) and kv["cache_v_l0"].dtype == np.float16
    assert not kv["cache_k_l0"].any()
