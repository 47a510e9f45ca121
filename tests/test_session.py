"""Backends registry, the numpy backend and DecodeSession against a hand-written transformer."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusec.backends import Backend, get_backend
from fusec.backends.numpy_backend import NumpyBackend
from fusec.errors import BackendError
from fusec.models import build_llama_decode, config_from_dict, random_weights
from fusec.runtime import DecodeSession, SessionError, causal_kq_mask

TINY = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "vocab_size": 97, "tie_word_embeddings": False, "max_position_embeddings": 128,
    # llama3 scaling with a short original context so that all three factor bands occur for head_dim 16
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64},
}
KV_SIZE = 24
TOKENS = [5, 17, 3, 96, 0, 42, 42, 7, 61, 12]


@pytest.fixture(scope="module")
def cfg():
    return config_from_dict(TINY, name="tiny")


@pytest.fixture(scope="module")
def weights(cfg):
    return random_weights(cfg, seed=7)


# -- a straightforward transformer forward (float64), independent of the graph -----------------------


def _mat(w, name):
    a = w[name]
    return a.reshape(a.shape[-2], a.shape[-1]).astype(np.float64)  # numpy (out, in) = ne[::-1]


def _vec(w, name):
    return w[name].reshape(-1).astype(np.float64)


def _rms(x, g, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g


def _rope_adjacent(x, pos, base, factors):
    """x (T, heads, hd): rotate pairs (2i, 2i+1) by pos * base**(-2i/hd) / factors[i]."""
    hd = x.shape[-1]
    inv = base ** (-np.arange(0, hd, 2) / hd) / factors
    ang = pos[:, None, None] * inv[None, None, :]
    c, s = np.cos(ang), np.sin(ang)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out


def reference_logits(cfg, w, tokens):
    """Logits (T, n_vocab) of a causal Llama forward over the whole sequence ``tokens``."""
    T, hd, nh, nkv = len(tokens), cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    pos = np.arange(T, dtype=np.float64)
    factors = np.asarray(cfg.rope_freq_factors(), dtype=np.float64)
    x = _mat(w, "token_embd.weight")[tokens]
    causal = np.triu(np.full((T, T), -np.inf), 1)
    for il in range(cfg.num_hidden_layers):
        p = f"blk.{il}."
        h = _rms(x, _vec(w, p + "attn_norm.weight"), cfg.rms_norm_eps)
        q = _rope_adjacent((h @ _mat(w, p + "attn_q.weight").T).reshape(T, nh, hd), pos, cfg.rope_theta, factors)
        k = _rope_adjacent((h @ _mat(w, p + "attn_k.weight").T).reshape(T, nkv, hd), pos, cfg.rope_theta, factors)
        v = (h @ _mat(w, p + "attn_v.weight").T).reshape(T, nkv, hd)
        heads = []
        for hh in range(nh):
            g = hh // (nh // nkv)  # grouped-query attention
            s = q[:, hh] @ k[:, g].T / np.sqrt(hd) + causal
            pr = np.exp(s - s.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            heads.append(pr @ v[:, g])
        x = x + np.concatenate(heads, axis=-1) @ _mat(w, p + "attn_output.weight").T
        h = _rms(x, _vec(w, p + "ffn_norm.weight"), cfg.rms_norm_eps)
        gate, up = h @ _mat(w, p + "ffn_gate.weight").T, h @ _mat(w, p + "ffn_up.weight").T
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ _mat(w, p + "ffn_down.weight").T
    x = _rms(x, _vec(w, "output_norm.weight"), cfg.rms_norm_eps)
    return x @ _mat(w, "output.weight").T


@pytest.fixture(scope="module")
def expected(cfg, weights):
    return reference_logits(cfg, weights, TOKENS)


def _decode_in_chunks(cfg, weights, chunks, kv_pad=4):
    s = DecodeSession(cfg, "numpy", weights, kv_size=KV_SIZE, kv_pad=kv_pad)
    return s, np.concatenate([s.step(c) for c in chunks])


# -- decode equals the reference -------------------------------------------------------------------


def test_prompt_then_single_tokens_match_reference(cfg, weights, expected):
    chunks = [TOKENS[:4]] + [[t] for t in TOKENS[4:]]
    _, got = _decode_in_chunks(cfg, weights, chunks)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@settings(max_examples=8, deadline=None)
@given(cuts=st.sets(st.integers(1, len(TOKENS) - 1), max_size=5), kv_pad=st.sampled_from([1, 3, 8, 32]))
def test_any_chunking_matches_reference(cfg, weights, expected, cuts, kv_pad):
    bounds = [0, *sorted(cuts), len(TOKENS)]
    chunks = [TOKENS[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    _, got = _decode_in_chunks(cfg, weights, chunks, kv_pad=kv_pad)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_greedy_feeds_back_the_argmax(cfg, weights):
    s = DecodeSession(cfg, "numpy", weights, kv_size=KV_SIZE)
    out = s.greedy(TOKENS[:3], 4)
    ref = reference_logits(cfg, weights, TOKENS[:3] + out[:-1])
    assert out == [int(np.argmax(r)) for r in ref[2:]]


def test_reset_empties_the_cache(cfg, weights, expected):
    s = DecodeSession(cfg, "numpy", weights, kv_size=KV_SIZE)
    s.step(TOKENS[5:9])
    s.reset()
    assert s.pos == 0 and not s.backend.read_weight("cache_k_l0").any()
    np.testing.assert_allclose(s.step(TOKENS[:2]), expected[:2], rtol=1e-4, atol=1e-4)


def test_f16_weights_and_cache_stay_close_to_f32(cfg, weights, expected):
    s = DecodeSession(cfg, "numpy", random_weights(cfg, seed=7, weight_dtype="f16"), kv_size=KV_SIZE,
                      kv_dtype="f16")
    assert s.backend.read_weight("cache_k_l0").dtype == np.float16
    got = np.concatenate([s.step(TOKENS[:4]), s.step(TOKENS[4:5])])
    np.testing.assert_allclose(got, expected[:5], atol=3e-2)


def test_fused_decode_matches_unfused(cfg, weights):
    dsl = pytest.importorskip("fusec.dsl")
    fused = DecodeSession(cfg, "numpy", weights, kv_size=KV_SIZE, patterns=dsl.default_patterns())
    plain = DecodeSession(cfg, "numpy", weights, kv_size=KV_SIZE)
    for chunk in (TOKENS[:3], TOKENS[3:4], TOKENS[4:5]):
        np.testing.assert_allclose(fused.step(chunk), plain.step(chunk), rtol=1e-5, atol=1e-5)
    assert fused.last_report is not None and "FUSED" in fused.last_graph.by_op()


# -- session bookkeeping -----------------------------------------------------------------------------


def test_n_kv_is_padded_and_capped(cfg, weights):
    s = DecodeSession(cfg, "numpy", weights, kv_size=KV_SIZE, kv_pad=16)
    s.step(TOKENS[:3])
    s.step(TOKENS[3:10] + TOKENS[:10])
    assert [t["n_kv"] for t in s.timings] == [16, KV_SIZE]


def test_timings_record_each_stage_and_graph_reuse(cfg, weights):
    s = DecodeSession(cfg, "numpy", weights, kv_size=KV_SIZE, kv_pad=8)
    for t in TOKENS[:3]:
        s.step([t])
    assert [t["cached"] for t in s.timings] == [False, True, True]
    assert all(t[k] >= 0.0 for t in s.timings for k in ("build_s", "rewrite_s", "compile_s", "run_s"))
    assert s.last_report is None and s.last_graph is not None and s.pos == 3


def test_kv_cache_written_at_the_step_positions(cfg, weights):
    s = DecodeSession(cfg, "numpy", weights, kv_size=KV_SIZE)
    s.step(TOKENS[:3])
    k = s.backend.read_weight("cache_k_l1").reshape(KV_SIZE, cfg.n_embd_k_gqa)
    v = s.backend.read_weight("cache_v_l1").reshape(cfg.n_embd_v_gqa, KV_SIZE)  # transposed
    assert k[:3].any(axis=1).all() and not k[3:].any()
    assert v[:, :3].any(axis=0).all() and not v[:, 3:].any()


def test_overflowing_the_kv_cache_is_a_user_error(cfg, weights):
    s = DecodeSession(cfg, "numpy", weights, kv_size=4)
    s.step(TOKENS[:3])
    with pytest.raises(SessionError, match="KV cache full"):
        s.step(TOKENS[:2])
    assert s.pos == 3


@pytest.mark.parametrize("ids", [[], [97], [-1]])
def test_bad_token_ids_are_user_errors(cfg, weights, ids):
    s = DecodeSession(cfg, "numpy", weights, kv_size=KV_SIZE)
    with pytest.raises(SessionError):
        s.step(ids)


@settings(max_examples=30, deadline=None)
@given(pos=st.integers(0, 40), n_tokens=st.integers(1, 8), extra=st.integers(0, 16))
def test_causal_mask_allows_exactly_the_past(pos, n_tokens, extra):
    n_kv = pos + n_tokens + extra
    m = causal_kq_mask(pos, n_tokens, n_kv)
    assert m.shape == (1, 1, n_tokens, n_kv) and m.dtype == np.float32
    allowed = m[0, 0] == 0.0
    assert (allowed.sum(axis=1) == pos + 1 + np.arange(n_tokens)).all()  # cells 0..pos+i
    assert np.isneginf(m[0, 0][~allowed]).all()


# -- backends ------------------------------------------------------------------------------------------


def test_get_backend_numpy():
    b = get_backend("numpy")
    assert isinstance(b, NumpyBackend) and isinstance(b, Backend) and b.name == "numpy"


def test_get_backend_auto_returns_an_available_backend():
    b = get_backend("auto")
    assert type(b).available()


def test_unknown_backend_lists_the_names():
    with pytest.raises(BackendError, match="numpy, wgpu, cuda, auto"):
        get_backend("tpu")


def test_cuda_without_gpu_is_a_backend_error():
    try:
        b = get_backend("cuda")
    except BackendError as e:
        assert "cuda" in str(e)
    else:
        assert b.name == "cuda"  # a machine with a GPU


def test_numpy_backend_copies_weights():
    b = NumpyBackend()
    a = np.ones(4, np.float32)
    b.set_weights({"w": a})
    a[:] = 5
    assert (b.read_weight("w") == 1).all()


def test_numpy_backend_missing_weight_is_named(cfg):
    b = NumpyBackend()
    exe = b.compile(build_llama_decode(cfg, 1, 4, 8))
    with pytest.raises(BackendError, match="token_embd.weight"):
        exe.run({})


def test_numpy_backend_missing_input_is_named(cfg, weights):
    s = DecodeSession(cfg, NumpyBackend(), weights, kv_size=8)
    exe = s.backend.compile(build_llama_decode(cfg, 1, 4, 8))
    inputs = s.make_inputs([1])
    del inputs["kq_mask"]
    with pytest.raises(BackendError, match="kq_mask"):
        exe.run(inputs)


def test_read_missing_weight_is_a_backend_error():
    with pytest.raises(BackendError, match="nope"):
        NumpyBackend().read_weight("nope")
