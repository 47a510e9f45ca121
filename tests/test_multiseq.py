"""Several sequences in one unified KV cache, sliding window and the flash-attention switch.

The mask against hand-written matrices (llama.cpp ``set_input_kq_mask`` for a unified cache);
S sequences decoded together against each sequence decoded alone (numpy; wgpu with a tiny config);
the FLASH_ATTN_EXT graph against the unfused graph (interpreter); ``fusec run --n-seq``; the
attention rewrite of ``fusec compile --model llama-3.2-1b`` unchanged.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusec.cli import main
from fusec.errors import FusecError
from fusec.interp import interpret
from fusec.models import build_llama_decode, config_from_dict, random_weights
from fusec.models.config import ModelError
from fusec.runtime import DecodeSession, SessionError, causal_kq_mask
from fusec.runtime.session import unified_kq_mask
from tests.gpu import requires_wgpu

TINY = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "vocab_size": 97, "tie_word_embeddings": False, "max_position_embeddings": 128,
}
# head size 64 so that the wgpu run also exercises the attention rewrite / the flash_attn kernels
TINY64 = {**TINY, "hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}
SWA = {**TINY, "model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 3}

O, X = 0.0, -np.inf


@pytest.fixture(scope="module")
def cfg():
    return config_from_dict(TINY, name="tiny")


@pytest.fixture(scope="module")
def swa_cfg():
    return config_from_dict(SWA, name="tiny-swa")


@pytest.fixture(scope="module")
def weights(cfg):
    return random_weights(cfg, seed=3)


@pytest.fixture(scope="module")
def swa_weights(swa_cfg):
    return random_weights(swa_cfg, seed=4)


def _m(rows):
    return np.array(rows, dtype=np.float32).reshape(1, 1, len(rows), len(rows[0]))


# -- the mask ------------------------------------------------------------------------------------


def test_mask_two_sequences_hand_computed():
    # cells: s0p0 s1p0 s0p1 s1p1 s0p2 empty empty; tokens: (s0, p2) and (s1, p1)
    cell_seq, cell_pos = [0, 1, 0, 1, 0, -1, -1], [0, 0, 1, 1, 2, 0, 0]
    got = unified_kq_mask(cell_seq, cell_pos, [0, 1], [2, 1])
    want = _m([[O, X, O, X, O, X, X],
               [X, O, X, O, X, X, X]])
    np.testing.assert_array_equal(got, want)


def test_mask_three_sequences_with_sliding_window_hand_computed():
    # cells: three prompts of different lengths then one token each (positions per sequence)
    cell_seq = [0, 0, 1, 2, 2, 2, 0, 1, 2, -1]
    cell_pos = [0, 1, 0, 0, 1, 2, 2, 1, 3, 0]
    seqs, pos = [0, 1, 2], [2, 1, 3]
    full = _m([[O, O, X, X, X, X, O, X, X, X],
               [X, X, O, X, X, X, X, O, X, X],
               [X, X, X, O, O, O, X, X, O, X]])
    np.testing.assert_array_equal(unified_kq_mask(cell_seq, cell_pos, seqs, pos), full)
    # n_swa = 2: a token sees positions p-1 and p only
    swa = _m([[X, O, X, X, X, X, O, X, X, X],
              [X, X, O, X, X, X, X, O, X, X],
              [X, X, X, X, X, O, X, X, O, X]])
    np.testing.assert_array_equal(unified_kq_mask(cell_seq, cell_pos, seqs, pos, sliding_window=2), swa)


def test_mask_hides_later_positions_of_the_same_sequence():
    # a prompt step: two tokens of sequence 0 and one of sequence 1, causal inside each sequence
    got = unified_kq_mask([0, 0, 1, -1], [0, 1, 0, 0], [0, 0, 1], [0, 1, 0])
    want = _m([[O, X, X, X],
               [O, O, X, X],
               [X, X, O, X]])
    np.testing.assert_array_equal(got, want)


def test_session_mask_for_three_interleaved_sequences(cfg, weights):
    s = DecodeSession(cfg, "numpy", weights, kv_size=16, n_seq=3, kv_pad=8)
    s.step([1, 2, 3])
    inp = s.make_inputs([4, 5, 6])
    np.testing.assert_array_equal(inp["k_idxs"], [3, 4, 5])
    np.testing.assert_array_equal(inp["inp_pos"], [1, 1, 1])
    # cell p*3 + s holds position p of sequence s
    want = _m([[O, X, X, O, X, X, X, X],
               [X, O, X, X, O, X, X, X],
               [X, X, O, X, X, O, X, X]])
    np.testing.assert_array_equal(inp["kq_mask"], want)


@settings(max_examples=40)
@given(st.data())
def test_mask_matches_the_per_cell_rule(data):
    n_kv = data.draw(st.integers(1, 12))
    cell_seq = data.draw(st.lists(st.integers(-1, 2), min_size=n_kv, max_size=n_kv))
    cell_pos = data.draw(st.lists(st.integers(0, 6), min_size=n_kv, max_size=n_kv))
    n_tok = data.draw(st.integers(1, 4))
    seqs = data.draw(st.lists(st.integers(0, 2), min_size=n_tok, max_size=n_tok))
    pos = data.draw(st.lists(st.integers(0, 6), min_size=n_tok, max_size=n_tok))
    swa = data.draw(st.none() | st.integers(1, 4))
    got = unified_kq_mask(cell_seq, cell_pos, seqs, pos, swa)[0, 0]
    for i in range(n_tok):
        for j in range(n_kv):
            masked = (cell_seq[j] < 0 or cell_seq[j] != seqs[i] or cell_pos[j] > pos[i]
                      or (swa is not None and pos[i] - cell_pos[j] >= swa))
            assert got[i, j] == (-np.inf if masked else 0.0), (i, j)


@settings(max_examples=15)
@given(st.lists(st.integers(1, 3), min_size=1, max_size=4), st.sampled_from([1, 4, 8]))
def test_one_sequence_mask_is_the_causal_mask(cfg, weights, chunks, kv_pad):
    s = DecodeSession(cfg, "numpy", weights, kv_size=16, kv_pad=kv_pad)
    for n in chunks:
        inp = s.make_inputs([1] * n)
        np.testing.assert_array_equal(inp["kq_mask"], causal_kq_mask(s.pos, n, s.n_kv_for(n)))
        s.step([1] * n)


def test_mask_rejects_mismatched_arrays():
    with pytest.raises(SessionError, match="cell_seq"):
        unified_kq_mask([0, 1], [0], [0], [0])
    with pytest.raises(SessionError, match="seq_ids"):
        unified_kq_mask([0], [0], [0, 1], [0])
    with pytest.raises(SessionError, match="sliding_window"):
        unified_kq_mask([0], [0], [0], [0], sliding_window=0)


# -- several sequences together == each alone --------------------------------------------------------


def _alone(cfg, w, prompt, follow, **kw):
    """Logits of the prompt's last token, then of each following token, decoding one sequence."""
    s = DecodeSession(cfg, "numpy", w, kv_size=64, **kw)
    rows = [s.step(prompt)[-1]]
    rows += [s.step([t])[0] for t in follow]
    return np.stack(rows)


def _together(cfg, w, prompts, follows, backend="numpy", **kw):
    S = len(prompts)
    s = DecodeSession(cfg, backend, w, kv_size=64, n_seq=S, **kw)
    first = s.step(prompts)
    assert first.shape == (sum(map(len, prompts)), cfg.vocab_size)
    last = np.cumsum([len(p) for p in prompts]) - 1
    out = [[first[r]] for r in last]
    for step in zip(*follows, strict=True):
        logits = s.step(list(step))
        assert logits.shape == (S, cfg.vocab_size)
        for i in range(S):
            out[i].append(logits[i])
    return s, [np.stack(o) for o in out]


PROMPTS = [[5, 17, 3], [96], [0, 42]]
FOLLOWS = [[7, 8, 9, 10], [11, 12, 13, 14], [1, 2, 3, 4]]


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("swa", [False, True])
def test_sequences_together_equal_each_alone(flash_attn, swa, cfg, weights, swa_cfg, swa_weights):
    c, w = (swa_cfg, swa_weights) if swa else (cfg, weights)
    _, got = _together(c, w, PROMPTS, FOLLOWS, flash_attn=flash_attn, kv_pad=8)
    for s in range(3):
        want = _alone(c, w, PROMPTS[s], FOLLOWS[s])
        np.testing.assert_allclose(got[s], want, rtol=1e-4, atol=1e-4)


def test_sequences_do_not_leak_into_each_other(cfg, weights):
    # the same tokens in two sequences give the same logits, whatever a third one holds
    _, a = _together(cfg, weights, [[5, 6], [5, 6], [9]], [[1, 2], [1, 2], [3, 4]])
    _, b = _together(cfg, weights, [[5, 6], [5, 6], [80, 81, 82]], [[1, 2], [1, 2], [60, 61]])
    np.testing.assert_allclose(a[0], a[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(a[2], b[2])


def test_sliding_window_changes_the_logits_once_it_bites(swa_cfg, swa_weights):
    full_cfg = config_from_dict({k: v for k, v in SWA.items() if k != "sliding_window"}, name="tiny-full")
    prompt, follow = [5, 17], [3, 96, 0, 42]  # positions 0..5; window 3 hides position 0 from position 3 on
    swa = _alone(swa_cfg, swa_weights, prompt, follow)
    full = _alone(full_cfg, swa_weights, prompt, follow)
    np.testing.assert_allclose(swa[:2], full[:2], rtol=1e-5, atol=1e-6)
    assert not np.allclose(swa[2:], full[2:], rtol=1e-3, atol=1e-3)


@settings(max_examples=8)
@given(st.lists(st.lists(st.integers(0, 96), min_size=1, max_size=3), min_size=2, max_size=3),
       st.integers(1, 3))
def test_any_prompts_together_equal_alone(cfg, weights, prompts, n_follow):
    follows = [[(7 * i + 3 * s) % 97 for i in range(n_follow)] for s in range(len(prompts))]
    _, got = _together(cfg, weights, prompts, follows, kv_pad=4)
    for s, p in enumerate(prompts):
        np.testing.assert_allclose(got[s], _alone(cfg, weights, p, follows[s]), rtol=1e-4, atol=1e-4)


def test_a_sequence_may_sit_out_a_step(cfg, weights):
    s = DecodeSession(cfg, "numpy", weights, kv_size=32, n_seq=2)
    s.step([[5, 6], [9]])
    only1 = s.step([[], [4]])
    assert only1.shape == (1, cfg.vocab_size) and s.seq_pos == [2, 2]
    both = s.step([7, 8])
    np.testing.assert_allclose(both[1], _alone(cfg, weights, [9], [4, 8])[-1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(both[0], _alone(cfg, weights, [5, 6], [7])[-1], rtol=1e-4, atol=1e-4)


def test_greedy_seqs_equals_greedy_alone(cfg, weights):
    s = DecodeSession(cfg, "numpy", weights, kv_size=64, n_seq=3)
    got = s.greedy_seqs(PROMPTS, 4)
    for p, g in zip(PROMPTS, got, strict=True):
        assert DecodeSession(cfg, "numpy", weights, kv_size=64).greedy(p, 4) == g


def test_graph_cache_reused_across_multiseq_steps(cfg, weights):
    s = DecodeSession(cfg, "numpy", weights, kv_size=64, n_seq=3, kv_pad=32)
    s.step([1, 2, 3])
    for t in range(3):
        s.step([4 + t, 5 + t, 6 + t])
    assert [tm["reused"] for tm in s.timings] == [False, True, True, True]
    assert s.pos == 12 and s.seq_pos == [4, 4, 4]
    np.testing.assert_array_equal(s.cell_seq[:12], [0, 1, 2] * 4)
    np.testing.assert_array_equal(s.cell_pos[:12], np.repeat(np.arange(4), 3))


def test_multiseq_step_errors(cfg, weights):
    s = DecodeSession(cfg, "numpy", weights, kv_size=8, n_seq=2)
    with pytest.raises(SessionError, match="one entry per sequence"):
        s.step([1, 2, 3])
    with pytest.raises(SessionError, match="at least one token"):
        s.step([[], []])
    with pytest.raises(SessionError, match="must be integers"):
        s.step([[1.5], [2]])
    with pytest.raises(SessionError, match="token ids must be in"):
        s.step([1, 97])
    with pytest.raises(SessionError, match="greedy_seqs"):
        s.greedy([1], 2)
    with pytest.raises(SessionError, match="non-empty prompts"):
        s.greedy_seqs([[1], []], 2)
    s.step([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(SessionError, match="KV cache full"):
        s.step([[1, 2], [3]])
    assert s.seq_pos == [3, 3] and s.pos == 6  # failed steps do not advance
    with pytest.raises(SessionError, match="n_seq"):
        DecodeSession(cfg, "numpy", weights, kv_size=8, n_seq=0)
    with pytest.raises(SessionError, match="f16 needs flash_attn"):
        DecodeSession(cfg, "numpy", weights, kv_size=8, mask_dtype="f16")
    assert issubclass(SessionError, FusecError)


# -- the flash-attention graph ---------------------------------------------------------------------


def _graph_inputs(cfg, n_tokens, n_kv, kv_size, flash_attn, rng):
    """Random filled caches (the same cells in both V layouts) and a 2-sequence step's inputs."""
    seqs = np.arange(n_tokens) % 2
    cell_seq = np.full(kv_size, -1)
    cell_pos = np.zeros(kv_size, dtype=np.int64)
    used = n_kv - n_tokens - 1
    cell_seq[:used] = np.arange(used) % 2
    cell_pos[:used] = np.arange(used) // 2
    cells = np.arange(used, used + n_tokens)
    pos = np.array([np.sum(cell_seq[:used] == s) + np.sum(seqs[:i] == s) for i, s in enumerate(seqs)])
    cell_seq[cells], cell_pos[cells] = seqs, pos
    vals = {"inp_tokens": rng.integers(0, cfg.vocab_size, n_tokens).astype(np.int32),
            "inp_pos": pos.astype(np.int32), "k_idxs": cells.astype(np.int32),
            "kq_mask": unified_kq_mask(cell_seq[:n_kv], cell_pos[:n_kv], seqs, pos)}
    caches = {}
    for il in range(cfg.num_hidden_layers):
        k = rng.standard_normal((kv_size, cfg.n_embd_k_gqa)).astype(np.float32)
        v = rng.standard_normal((kv_size, cfg.n_embd_v_gqa)).astype(np.float32)  # [cell, channel]
        caches[f"cache_k_l{il}"] = k
        caches[f"cache_v_l{il}"] = v if flash_attn else np.ascontiguousarray(v.T)
    if flash_attn:
        vals["v_idxs"] = cells.astype(np.int32)
    else:
        chan = np.arange(cfg.n_embd_v_gqa)
        vals["v_idxs"] = (chan[None, :] * kv_size + cells[:, None]).astype(np.int32).reshape(-1)
    return vals, caches


@pytest.mark.parametrize("mask_dtype", ["f32", "f16"])
def test_flash_attn_graph_equals_unfused_graph(mask_dtype, cfg, weights):
    n_tokens, n_kv, kv_size = 4, 16, 24
    fa = build_llama_decode(cfg, n_tokens, n_kv, kv_size, flash_attn=True, mask_dtype=mask_dtype)
    ref = build_llama_decode(cfg, n_tokens, n_kv, kv_size)
    ops = [n.op for n in fa.nodes]
    assert ops.count("FLASH_ATTN_EXT") == cfg.num_hidden_layers and "SOFT_MAX" not in ops
    fattn = [n for n in fa.nodes if n.op == "FLASH_ATTN_EXT"]
    assert [n.name for n in fattn] == [f"__fattn__-{il}" for il in range(cfg.num_hidden_layers)]
    assert tuple(fattn[0].ne[:3]) == (cfg.head_dim, cfg.num_attention_heads, n_tokens)
    assert fattn[0].src[3].dtype.value == mask_dtype
    vals_fa, caches_fa = _graph_inputs(cfg, n_tokens, n_kv, kv_size, True, np.random.default_rng(1))
    vals_ref, caches_ref = _graph_inputs(cfg, n_tokens, n_kv, kv_size, False, np.random.default_rng(1))
    if mask_dtype == "f16":
        vals_fa["kq_mask"] = vals_fa["kq_mask"].astype(np.float16)
    got = interpret(fa, {**weights, **caches_fa, **vals_fa})["result_output"]
    want = interpret(ref, {**weights, **caches_ref, **vals_ref})["result_output"]
    assert np.all(np.isfinite(want))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_flash_attn_session_writes_a_row_major_v_cache(cfg, weights):
    fa = DecodeSession(cfg, "numpy", weights, kv_size=16, n_seq=2, flash_attn=True)
    un = DecodeSession(cfg, "numpy", weights, kv_size=16, n_seq=2)
    for step in ([[5, 6], [7]], [1, 2], [3, 4]):
        np.testing.assert_allclose(fa.step(step), un.step(step), rtol=1e-5, atol=1e-5)
    for il in range(cfg.num_hidden_layers):
        v_rows = fa.backend.read_weight(f"cache_v_l{il}").reshape(16, cfg.n_embd_v_gqa)
        v_trans = un.backend.read_weight(f"cache_v_l{il}").reshape(cfg.n_embd_v_gqa, 16)
        np.testing.assert_allclose(v_rows, v_trans.T, rtol=1e-6, atol=1e-6)
        assert np.any(v_rows[:7] != 0) and np.all(v_rows[7:] == 0)


def test_f16_mask_needs_flash_attn(cfg):
    with pytest.raises(ModelError, match="f16 needs flash_attn"):
        build_llama_decode(cfg, 1, 8, 8, mask_dtype="f16")
    with pytest.raises(ModelError, match="mask_dtype"):
        build_llama_decode(cfg, 1, 8, 8, flash_attn=True, mask_dtype="i32")


def test_unfused_graph_still_rewrites_to_flash_attention(cfg):
    from fusec.dsl import default_patterns
    from fusec.rewrite import rewrite

    g = build_llama_decode(config_from_dict(TINY64, name="tiny64"), 3, 16, 24)
    _, report = rewrite(g, default_patterns())
    assert sorted(a.root for a in report.patterns["attention_flash"].applied) == ["kqv_out-0", "kqv_out-1"]


# -- wgpu ------------------------------------------------------------------------------------------


@requires_wgpu
@pytest.mark.parametrize("flash_attn", [False, True])
def test_wgpu_sequences_together_equal_each_alone(flash_attn):
    c = config_from_dict(TINY64, name="tiny64")
    w = random_weights(c, seed=5)
    from fusec.dsl import default_patterns

    s, got = _together(c, w, PROMPTS, [f[:2] for f in FOLLOWS], backend="wgpu", patterns=default_patterns(),
                       flash_attn=flash_attn, kv_pad=16)
    if flash_attn:
        assert sum(n.op == "FLASH_ATTN_EXT" for n in s.last_graph.nodes) == c.num_hidden_layers
    else:
        assert sum(n.op == "FUSED" and n.params["kernel"] == "flash_attn" for n in s.last_graph.nodes) == 2
    for i in range(3):
        want = _alone(c, w, PROMPTS[i], FOLLOWS[i][:2])
        np.testing.assert_allclose(got[i], want, rtol=1e-3, atol=1e-3)


# -- CLI -------------------------------------------------------------------------------------------


@requires_wgpu
def test_cli_run_three_sequences_verified_on_wgpu(capsys):
    rc = main(["run", "--model", "smollm2-135m", "--layers", "2", "--n-seq", "3", "--n-ctx", "96",
               "--tokens", "3", "--verify", "--backend", "wgpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "3 sequences in 96 KV cells" in out and "verify: ok (3 steps x 3 sequences" in out
    assert out.count("sequence ") >= 3


def test_cli_run_flash_attn_multiseq_verified_on_numpy(capsys):
    rc = main(["run", "--model", "smollm2-135m", "--layers", "1", "--n-seq", "2", "--n-ctx", "8",
               "--tokens", "3", "--prompt-ids", "1,2", "--verify", "--backend", "numpy", "--flash-attn"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "flash attention" in out and "2 sequences in 10 KV cells" in out and "verify: ok" in out


@pytest.mark.parametrize("argv, msg", [
    (["--n-seq", "0"], "--n-seq must be >= 1"),
    (["--n-seq", "2", "--prompt", "hi"], "--prompt streams one sequence"),
])
def test_cli_run_multiseq_usage_errors(argv, msg, capsys):
    rc = main(["run", "--model", "smollm2-135m", "--layers", "1", "--backend", "numpy", *argv])
    assert rc == 2
    assert msg in capsys.readouterr().err


def test_compile_llama_3_2_1b_still_rewrites_attention_at_16_layers(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compile", "--model", "llama-3.2-1b", "--target", "wgsl", "--no-check", "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    stats = {p["name"]: p for p in report["patterns"]}
    assert stats["attention_flash"]["matches"] == 16
    assert sorted(a["root"] for a in stats["attention_flash"]["applied"]) == sorted(f"kqv_out-{i}" for i in range(16))
