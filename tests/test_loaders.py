"""Checkpoint loaders (GGUF, HF safetensors), arch configs, the sliding-window mask, the q/k RoPE
permutation, tokenizers, and their user errors -- without torch/transformers (see
test_hf_equivalence.py for the comparison with transformers)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
tokenizers = pytest.importorskip("tokenizers")

from fusec.cli import main  # noqa: E402
from fusec.interp import interpret  # noqa: E402
from fusec.ir import GraphBuilder  # noqa: E402
from fusec.models import (  # noqa: E402
    ConfigError,
    ModelError,
    Tokenizer,
    config_from_dict,
    hf_to_gguf_name,
    load_model,
    permute_rope_rows,
    random_weights,
    weight_specs,
)
from fusec.runtime import DecodeSession, causal_kq_mask  # noqa: E402
from tests.gguf_util import llama_gguf_writer  # noqa: E402

TINY = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "rms_norm_eps": 1e-5, "vocab_size": 97, "max_position_embeddings": 128,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
HF_CFG = {
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "rope_theta": 10000.0},
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "rope_theta": 10000.0},
    "mistral": {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "rope_theta": 10000.0,
                "sliding_window": 3},
}


def tiny_cfg(arch="llama"):
    return config_from_dict({**TINY, **HF_CFG[arch]}, name=f"tiny-{arch}")


# -- writers for small files (llama.cpp layout) ---------------------------------------------------------


def _file_shape(arr, name):
    """GGUF/HF files store norms and biases 1-D and matrices 2-D (not fusec's 4-D arrays)."""
    a = np.asarray(arr)
    return a.reshape(-1) if (name.endswith(".bias") or "norm" in name or "rope_freqs" in name) else a.reshape(
        a.shape[-2:])


def write_gguf(path, cfg, weights, arch="llama", types=None, drop=(), extra=None, meta=None, swa=None):
    """GGUF with llama.cpp metadata keys; ``types`` maps tensor name -> GGMLQuantizationType."""
    w = llama_gguf_writer(path, arch, cfg, cfg.rope_theta)
    if swa:
        w.add_sliding_window(swa)
    for k, v in (meta or {}).items():
        w.add_string(k, v)
    for name, arr in {**weights, **(extra or {})}.items():
        if name in drop:
            continue
        a = _file_shape(arr, name).astype(np.float32)
        qt = (types or {}).get(name)
        if qt is None:
            w.add_tensor(name, a)
        elif qt == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


HF_NAMES = {  # GGUF -> HF, inverse of the loader's table, written out independently
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight", "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def hf_name(gname):
    if gname.startswith("blk."):
        _, il, rest = gname.split(".", 2)
        return f"model.layers.{il}.{HF_NAMES[rest]}"
    return HF_NAMES[gname]


def write_hf(d, arch, weights, cfg_over=None, tensors_over=None, drop=()):
    """An HF checkpoint dir from GGUF-layout weights (q/k rows not un-permuted: enough for errors)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({**TINY, **HF_CFG[arch], **(cfg_over or {})}))
    t = {hf_name(n): np.ascontiguousarray(_file_shape(a, n)) for n, a in weights.items() if n not in drop}
    t.update(tensors_over or {})
    safetensors_numpy.save_file(t, str(d / "model.safetensors"))
    return d


@pytest.fixture(scope="module")
def llama():
    cfg = tiny_cfg("llama")
    return cfg, random_weights(cfg, seed=3)


# -- configs -------------------------------------------------------------------------------------------


def test_arch_configs():
    ll, qw, mi = tiny_cfg("llama"), tiny_cfg("qwen2"), tiny_cfg("mistral")
    assert (ll.arch, ll.rope_mode, ll.attn_bias, ll.sliding_window) == ("llama", 0, False, None)
    assert (qw.arch, qw.rope_mode, qw.attn_bias, qw.sliding_window) == ("qwen2", 2, True, None)
    assert (mi.arch, mi.rope_mode, mi.attn_bias, mi.sliding_window) == ("llama", 0, False, 3)
    assert "blk.1.attn_k.bias" in weight_specs(qw) and "blk.1.attn_k.bias" not in weight_specs(ll)
    assert weight_specs(qw)["blk.0.attn_k.bias"].ne == (qw.n_embd_k_gqa, 1, 1, 1)


def test_transformers5_rope_parameters_are_read():
    cfg = config_from_dict({**TINY, **HF_CFG["llama"], "rope_theta": None,
                            "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}})
    assert cfg.rope_theta == 5000.0 and cfg.rope_scaling is None
    data = {k: v for k, v in {**TINY, **HF_CFG["llama"]}.items() if k != "rope_theta"}
    cfg = config_from_dict({**data, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 64}})
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling is not None and cfg.has_rope_freqs


@pytest.mark.parametrize("over,match", [
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True},
     "use_sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "unsupported model_type='gpt2'"),
])
def test_unsupported_config_fields_are_named(over, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({**TINY, **HF_CFG["llama"], **over})


# -- sliding-window mask -----------------------------------------------------------------------------


@settings(deadline=None)
@given(pos=st.integers(0, 40), n_tokens=st.integers(1, 8), extra=st.integers(0, 16), window=st.integers(1, 20))
def test_sliding_window_mask(pos, n_tokens, extra, window):
    n_kv = pos + n_tokens + extra
    m = causal_kq_mask(pos, n_tokens, n_kv, sliding_window=window)[0, 0]
    for i in range(n_tokens):
        for j in range(n_kv):
            p_q = pos + i
            masked = j > p_q or p_q - j >= window  # llama.cpp: causal, then p1 - p0 >= n_swa
            assert (m[i, j] == -np.inf) == masked and (masked or m[i, j] == 0.0)
    if window >= n_kv:  # a window longer than the sequence is plain causal
        np.testing.assert_array_equal(m, causal_kq_mask(pos, n_tokens, n_kv)[0, 0])


def test_session_uses_the_sliding_window():
    cfg = tiny_cfg("mistral")
    s = DecodeSession(cfg, "numpy", random_weights(cfg, seed=1), kv_size=16, kv_pad=8)
    s.step([3, 4, 5, 6, 7])
    np.testing.assert_array_equal(s.last_inputs["kq_mask"], causal_kq_mask(0, 5, 8, sliding_window=3))
    assert (s.last_inputs["kq_mask"][0, 0, 4] == 0).sum() == 3


# -- RoPE layout ---------------------------------------------------------------------------------------


def _rope(x, pos, mode):
    """ROPE of x (numpy (n_tokens, n_head, head_dim)) through fusec's ggml-semantics interpreter."""
    t, h, d = x.shape
    b = GraphBuilder()
    xi = b.input("x", "f32", (d, h, t))
    pi = b.input("p", "i32", (t,))
    y = b.rope(xi, pi, d, mode=mode, freq_base=10000.0, name="y")
    return interpret(b.build([y]), {"x": x.astype(np.float32), "p": pos.astype(np.int32)})["y"].reshape(t, h, d)


@settings(deadline=None, max_examples=15)
@given(n_head=st.integers(1, 3), half=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_permuted_rows_make_mode0_rope_equal_neox_rope(n_head, half, seed):
    """HF's rotate-half RoPE (= ggml NEOX) on q equals ggml mode 0 on the permuted rows, permuted:
    rope0(P q) == P neox(q), so q.k scores are the same with either layout."""
    rng = np.random.default_rng(seed)
    hd, n_embd, t = 2 * half, 5, 3
    w = rng.standard_normal((n_head * hd, n_embd)).astype(np.float32)
    h = rng.standard_normal((t, n_embd)).astype(np.float32)
    pos = np.arange(t) * 7
    wp = permute_rope_rows(w, n_head)
    q_hf = (h @ w.T).reshape(t, n_head, hd)
    q_gg = (h @ wp.T).reshape(t, n_head, hd)
    neox = _rope(q_hf, pos, 2).reshape(t, -1)
    norm = _rope(q_gg, pos, 0).reshape(t, -1)
    perm = permute_rope_rows(np.arange(n_head * hd), n_head)
    np.testing.assert_allclose(norm, neox[:, perm], rtol=1e-5, atol=1e-5)
    # row 2i of a head is HF row i, row 2i+1 is HF row i + hd/2
    np.testing.assert_array_equal(perm[:hd], [i // 2 + (i % 2) * half for i in range(hd)])


def test_hf_names_map_to_gguf_names():
    assert hf_to_gguf_name("model.layers.11.self_attn.q_proj.weight") == "blk.11.attn_q.weight"
    assert hf_to_gguf_name("model.layers.0.self_attn.v_proj.bias") == "blk.0.attn_v.bias"
    assert hf_to_gguf_name("model.layers.2.post_attention_layernorm.weight") == "blk.2.ffn_norm.weight"
    assert hf_to_gguf_name("lm_head.weight") == "output.weight"
    assert hf_to_gguf_name("model.layers.0.self_attn.q_norm.weight") is None


# -- GGUF ------------------------------------------------------------------------------------------------


def test_gguf_f32_round_trip_runs_like_random_weights(tmp_path, llama):
    cfg, w = llama
    c2, w2, tk = load_model(write_gguf(tmp_path / "m.gguf", cfg, w))
    assert tk is None and c2.vocab_size == cfg.vocab_size and not c2.tie_word_embeddings
    assert w2.keys() == w.keys()
    for n in w:
        np.testing.assert_array_equal(w2[n], w[n], err_msg=n)
    a = DecodeSession(cfg, "numpy", w, kv_size=8).step([1, 2, 3])
    b = DecodeSession(c2, "numpy", w2, kv_size=8).step([1, 2, 3])
    np.testing.assert_array_equal(a, b)


def test_gguf_float_and_quant_types_dequantize_as_gguf_does(tmp_path, llama):
    cfg, w = llama
    T = gguf.GGMLQuantizationType
    types = {"blk.0.attn_q.weight": T.F16, "blk.0.attn_k.weight": T.BF16, "blk.0.ffn_up.weight": T.Q8_0,
             "blk.1.ffn_gate.weight": T.Q4_0}
    c2, w2, _ = load_model(write_gguf(tmp_path / "m.gguf", cfg, w, types=types))
    for name, qt in types.items():
        a = _file_shape(w[name], name)
        if qt == T.F16:
            want = a.astype(np.float16).astype(np.float32)
        else:
            want = gguf.quants.dequantize(gguf.quants.quantize(a, qt), qt)
        np.testing.assert_array_equal(w2[name].reshape(a.shape), want, err_msg=name)
        assert w2[name].dtype == np.float32 and w2[name].shape == w[name].shape
    _, w16, _ = load_model(tmp_path / "m.gguf", weight_dtype="f16")
    assert w16["blk.0.ffn_up.weight"].dtype == np.float16 and w16["blk.0.attn_norm.weight"].dtype == np.float32


def test_gguf_tied_embeddings_and_sliding_window(tmp_path, llama):
    cfg, w = llama
    c2, w2, _ = load_model(write_gguf(tmp_path / "m.gguf", cfg, w, drop=("output.weight",), swa=5))
    assert c2.tie_word_embeddings and "output.weight" not in w2 and c2.sliding_window == 5


@pytest.mark.parametrize("case,match", [
    ("missing", r"missing tensor 'blk\.1\.ffn_up\.weight'"),
    ("shape", r"tensor 'blk\.0\.attn_k\.weight' has ne=\[64, 48\].*expected \[64, 32, 1, 1\]"),
    ("arch", r"unsupported architecture general\.architecture='gpt2'"),
    ("quant", r"tensor 'blk\.1\.ffn_down\.weight' has unsupported type Q5_0"),
    ("extra", r"unexpected tensor 'blk\.0\.attn_q_norm\.weight'"),
    ("key", r"missing metadata key 'llama\.feed_forward_length'"),
])
def test_gguf_errors_name_the_tensor_or_field(tmp_path, llama, capsys, case, match):
    cfg, w = llama
    path = tmp_path / f"{case}.gguf"
    if case == "missing":
        write_gguf(path, cfg, w, drop=("blk.1.ffn_up.weight",))
    elif case == "shape":
        write_gguf(path, cfg, {**w, "blk.0.attn_k.weight": np.zeros((48, 64), np.float32)})
    elif case == "arch":
        write_gguf(path, cfg, w, arch="gpt2")
    elif case == "quant":
        write_gguf(path, cfg, w, types={"blk.1.ffn_down.weight": gguf.GGMLQuantizationType.Q5_0})
    elif case == "extra":
        write_gguf(path, cfg, w, extra={"blk.0.attn_q_norm.weight": np.ones(16, np.float32)})
    else:
        g = gguf.GGUFWriter(str(path), "llama")
        g.add_block_count(2)
        g.add_embedding_length(64)
        g.add_head_count(4)
        g.add_layer_norm_rms_eps(1e-5)
        g.add_tensor("token_embd.weight", np.zeros((97, 64), np.float32))
        g.write_header_to_file()
        g.write_kv_data_to_file()
        g.write_tensors_to_file()
        g.close()
    with pytest.raises(ModelError, match=match):
        load_model(path)
    # the CLI: exit 2, one line, nothing decoded
    assert main(["run", "--model", str(path), "--backend", "numpy", "--prompt-ids", "1"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("fusec: error: ") and len(err.strip().splitlines()) == 1 and "step" not in out


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="not a readable GGUF file"):
        load_model(p)


# -- HF directories -------------------------------------------------------------------------------------


def test_hf_qwen2_loads_unpermuted_with_biases(tmp_path):
    cfg = tiny_cfg("qwen2")
    w = random_weights(cfg, seed=5)
    c2, w2, tk = load_model(write_hf(tmp_path / "q", "qwen2", w))
    assert tk is None and c2.attn_bias and c2.rope_mode == 2
    for n in w:  # NEOX: rows exactly as stored
        np.testing.assert_array_equal(w2[n], w[n], err_msg=n)


def test_hf_llama_permutes_q_and_k_only(tmp_path, llama):
    cfg, w = llama
    _, w2, _ = load_model(write_hf(tmp_path / "l", "llama", w))
    for n in w:
        if n.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if "attn_q" in n else cfg.num_key_value_heads
            a = _file_shape(w[n], n)
            np.testing.assert_array_equal(w2[n].reshape(a.shape), permute_rope_rows(a, heads))
        else:
            np.testing.assert_array_equal(w2[n], w[n], err_msg=n)


def test_hf_bf16_and_f16_tensors(tmp_path, llama):
    cfg, w = llama
    a = _file_shape(w["blk.0.ffn_up.weight"], "blk.0.ffn_up.weight")
    bits = (a.view(np.uint32) >> 16).astype(np.uint16)  # truncated bf16 bit patterns
    d = write_hf(tmp_path / "b", "llama", w, tensors_over={
        "model.layers.0.mlp.down_proj.weight": _file_shape(w["blk.0.ffn_down.weight"], "x").astype(np.float16)})
    # rewrite the file with one BF16 tensor (numpy has no bfloat16: write the header by hand)
    st = d / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(st), "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.0.mlp.up_proj.weight"] = bits
    header, blobs, off = {}, [], 0
    for k, v in tensors.items():
        raw = np.ascontiguousarray(v).tobytes()
        dt = {np.float32: "F32", np.float16: "F16", np.uint16: "BF16"}[v.dtype.type]
        header[k] = {"dtype": dt, "shape": list(v.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    st.write_bytes(len(hb).to_bytes(8, "little") + hb + b"".join(blobs))
    _, w2, _ = load_model(d)
    np.testing.assert_array_equal(w2["blk.0.ffn_up.weight"].reshape(a.shape),
                                  (bits.astype(np.uint32) << 16).view(np.float32))
    down = _file_shape(w["blk.0.ffn_down.weight"], "x")
    np.testing.assert_array_equal(w2["blk.0.ffn_down.weight"].reshape(down.shape),
                                  down.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("case,match", [
    ("missing", r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight' \(blk\.1\.ffn_up\.weight\)"),
    ("shape", r"tensor 'model\.layers\.0\.self_attn\.k_proj\.weight \(blk\.0\.attn_k\.weight\)' has ne=\[64, 48\]"),
    ("arch", r"unsupported model_type='gpt2'"),
    ("dtype", r"tensor 'model\.layers\.0\.input_layernorm\.weight' has unsupported dtype I32"),
    ("extra", r"unexpected tensor 'model\.layers\.0\.self_attn\.q_norm\.weight'"),
    ("nofiles", r"no \*\.safetensors files"),
])
def test_hf_errors_name_the_tensor_or_field(tmp_path, llama, capsys, case, match):
    cfg, w = llama
    d = tmp_path / case
    if case == "missing":
        write_hf(d, "llama", w, drop=("blk.1.ffn_up.weight",))
    elif case == "shape":
        write_hf(d, "llama", w, tensors_over={"model.layers.0.self_attn.k_proj.weight": np.zeros((48, 64), np.float32)})
    elif case == "arch":
        write_hf(d, "llama", w, cfg_over={"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    elif case == "dtype":
        write_hf(d, "llama", w, tensors_over={"model.layers.0.input_layernorm.weight": np.ones(64, np.int32)})
    elif case == "extra":
        write_hf(d, "llama", w, tensors_over={"model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)})
    else:
        write_hf(d, "llama", w)
        (d / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=match):
        load_model(d)
    assert main(["run", "--model", str(d), "--backend", "numpy", "--prompt-ids", "1"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("fusec: error: ") and len(err.strip().splitlines()) == 1 and "step" not in out


def test_hf_directory_runs_with_prompt_ids(tmp_path, llama, capsys):
    cfg, w = llama
    d = write_hf(tmp_path / "ok", "llama", w)
    assert main(["run", "--model", str(d), "--backend", "numpy", "--prompt-ids", "1,2", "--tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "step 2:" in out and "tokens/s" in out
    assert main(["run", "--model", str(d), "--layers", "1"]) == 2


# -- tokenizers ------------------------------------------------------------------------------------------


def _bytelevel_tokenizer():
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = HFTok(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["héllo wörld", "naïve café"] * 10, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<s>", "</s>"],
        show_progress=False))
    return tk


def test_text_stream_holds_back_incomplete_characters():
    tk = Tokenizer(_bytelevel_tokenizer())
    # "é" is UTF-8 C3 A9; GPT-2's byte-level alphabet writes those bytes as "Ã" and "©"
    ids = [tk.tk.token_to_id("\u00c3"), tk.tk.token_to_id("\u00a9")]
    assert None not in ids
    s = tk.stream()
    assert s.push(ids[0]) == "" and s.push(ids[1]) == "é"
    s = tk.stream()
    assert "".join(s.push(i) for i in tk.encode("naïve café")) == "naïve café"


def test_gguf_vocabulary_tokenizer_matches_tokenizer_json(tmp_path, llama):
    hf = _bytelevel_tokenizer()
    hf.save(str(tmp_path / "tokenizer.json"))
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    tokens = [t for t, _ in sorted(hf.get_vocab().items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    types = [3 if t in ("<s>", "</s>") else 1 for t in tokens]
    g = Tokenizer.from_gguf_vocab(tokens, merges, token_types=types, bos_id=0, eos_ids=[1], add_bos=True)
    f = Tokenizer.from_file(tmp_path / "tokenizer.json", eos_ids=[1])
    for text in ["héllo wörld", "naïve café, hello", "a  b\n c"]:
        assert g.encode(text) == [0] + f.encode(text)
        assert g.decode(g.encode(text)) == f.decode(f.encode(text)) == text
    assert g.encode("x</s>y")[2] == 1  # control tokens are matched whole
    with pytest.raises(ModelError, match="malformed merge"):
        Tokenizer.from_gguf_vocab(tokens, ["abc"])
